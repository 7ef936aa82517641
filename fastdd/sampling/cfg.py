"""Classifier-free guidance around any model `model(x [B, C, H, W], t [B], y [B]) -> [B, C_out, H, W]`.

guided = uncond + scale · (cond - uncond) on the eps channels (all of them, or the first `cfg_channels`).

Two layouts:
- clean (`cfg_model_output`): the sampler holds B rows; one batched forward of [x; x] with labels [y; null]
  returns B guided rows; channels not guided (the rest of eps if cfg_channels < C, and the variance) are the
  conditional row's.
- compat (`compat_cfg_model_output`): the official DiT `forward_with_cfg`. The sampler holds 2B rows
  [cond; uncond]; only the first half of x is fed (duplicated) with labels y = [y; null]; CFG is applied to
  out[:, :cfg_channels] (3 in the official code, a quirk: eps channel 4 stays unguided) and written to both
  halves; the remaining channels are taken row-wise from the model output, so an uncond row keeps its own
  unguided channels (eps channel 4 and the variance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _check_cfg_channels(cfg_channels: int, out_channels: int) -> None:
    if isinstance(cfg_channels, bool) or not isinstance(cfg_channels, int) or not 1 <= cfg_channels <= out_channels:
        raise ValueError(f"cfg_channels must be an int in 1..{out_channels}, got {cfg_channels!r}")


def cfg_model_output(
    model: nn.Module | ModelFn,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    scale: float,
    null_class: int,
    cfg_channels: int | None = None,
) -> Tensor:
    """Clean CFG in one batched forward. x: [B, C, H, W]; t, y: [B] -> guided output [B, C_out, H, W].

    cfg_channels: how many leading output channels are guided (default C = all eps channels); the other
    channels are the conditional row's.
    """
    batch, channels = x.shape[0], x.shape[1]
    if y.shape != (batch,):
        raise ValueError(f"y: expected shape [{batch}], got {list(y.shape)}")
    t = t.expand(batch) if t.dim() == 0 else t
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    guided = channels if cfg_channels is None else cfg_channels
    _check_cfg_channels(guided, out.shape[1])
    cond, uncond = out[:batch], out[batch:]
    mixed = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([mixed, cond[:, guided:]], dim=1)


def compat_cfg_model_output(
    model: nn.Module | ModelFn, x: Tensor, t: Tensor, y: Tensor, scale: float, cfg_channels: int = 3
) -> Tensor:
    """The official DiT `forward_with_cfg` for any model. x: [2B, C, H, W] = [cond; uncond] rows;
    t: [2B]; y: [2B] = [labels; null] -> [2B, C_out, H, W] (guided channels identical on both halves)."""
    rows = x.shape[0]
    if rows % 2 != 0:
        raise ValueError(f"x: compat CFG needs [cond; uncond] halves (an even number of rows), got {rows}")
    if y.shape != (rows,):
        raise ValueError(f"y: expected shape [{rows}], got {list(y.shape)}")
    half = x[: rows // 2]
    t = t.expand(rows) if t.dim() == 0 else t
    out = model(torch.cat([half, half]), t, y)
    _check_cfg_channels(cfg_channels, out.shape[1])
    cond, uncond = out[: rows // 2, :cfg_channels], out[rows // 2 :, :cfg_channels]
    mixed = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([mixed, mixed]), out[:, cfg_channels:]], dim=1)


def guided_model(
    model: nn.Module | ModelFn,
    scale: float,
    null_class: int,
    cfg_channels: int | None = None,
    compat: bool = False,
) -> ModelFn:
    """A function (x, t, y) -> model output after CFG, in the sampler's row layout.

    compat=False: x has B rows, y the B labels (scale == 1 runs the conditional model alone, one forward of B rows).
    compat=True: x has 2B rows [cond; uncond], y = [labels; null]; cfg_channels defaults to 3 (the official quirk).
    """
    if compat:
        channels = 3 if cfg_channels is None else cfg_channels
        return lambda x, t, y: compat_cfg_model_output(model, x, t, y, scale, channels)
    if scale == 1.0:
        return lambda x, t, y: model(x, t.expand(x.shape[0]) if t.dim() == 0 else t, y)
    return lambda x, t, y: cfg_model_output(model, x, t, y, scale, null_class, cfg_channels)

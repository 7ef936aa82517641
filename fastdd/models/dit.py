"""Diffusion Transformer (DiT, Peebles & Xie 2023) with the official state-dict layout.

The module names and parameter shapes match the official ``facebookresearch/DiT`` checkpoints
(``DiT-XL-2-256x256.pt``), so those load without key renaming.  Optional DiffFit scales
(``diffit``) match the Minimax / SAM fine-tuned checkpoints: in the blocks that carry them (Minimax's model
hard-codes the first 14, i.e. every block of a DiT of depth <= 14; a checkpoint's keys say which),
``attn.gamma1`` [3*hidden] scales the qkv projection output, ``attn.gamma2`` [hidden] scales the
attention output projection, and the block-level ``gamma1`` / ``gamma2`` [hidden] scale the attention
and MLP residual branches.  All-ones gammas give exactly the vanilla model.

Two numerical options exist only to reproduce ``diffusers.DiTTransformer2DModel`` bit-for-bit
(set by :meth:`DiT.from_diffusers`): ``timestep_freq_shift=1`` divides the timestep frequency exponent by
``half - 1`` instead of ``half``, and ``mlp_norm_eps=1e-5`` is the epsilon diffusers uses in the
pre-MLP LayerNorm.  The defaults (0 and 1e-6) are the official DiT numerics.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DiT",
    "DIT_VARIANTS",
    "dit_config",
    "infer_dit_config",
    "load_dit_checkpoint",
    "load_diffusers_dit",
    "sincos_pos_embed_2d",
]

# name -> (hidden_size, depth, num_heads)
DIT_VARIANTS: dict[str, tuple[int, int, int]] = {
    "XL": (1152, 28, 16),
    "L": (1024, 24, 16),
    "B": (768, 12, 12),
    "S": (384, 12, 6),
}
_HEADS_BY_HIDDEN = {hidden: heads for hidden, _, heads in DIT_VARIANTS.values()}
_TIMESTEP_FREQUENCIES = 256
MINIMAX_GAMMA_BLOCKS = 14  # Minimax's DiT: use_gamma = [True] * 14 + [False] * 14, whatever the depth
_GAMMA_KEY = re.compile(r"blocks\.(\d+)\.(attn\.)?gamma[12]$")


def diffit_blocks(diffit: bool | Sequence[int], depth: int) -> tuple[int, ...]:
    """The block indices that carry DiffFit gammas: none (False), Minimax's first 14 (True), or the given ones."""
    if isinstance(diffit, bool):
        return tuple(range(min(depth, MINIMAX_GAMMA_BLOCKS))) if diffit else ()
    blocks = tuple(sorted({int(index) for index in diffit}))
    if blocks and not 0 <= blocks[0] <= blocks[-1] < depth:
        raise ValueError(f"diffit: block indices must be in [0, {depth}), got {list(blocks)}")
    return blocks


def dit_config(name: str) -> dict:
    """Constructor kwargs for a named variant, e.g. ``"DiT-XL/2"`` -> hidden 1152, depth 28, 16 heads, patch 2."""
    match = re.fullmatch(r"(?:DiT-)?(XL|L|B|S)[/-](2|4|8)", name.strip())
    if match is None:
        raise ValueError(f"name: unknown DiT variant {name!r}; expected 'DiT-{{XL,L,B,S}}/{{2,4,8}}'")
    hidden_size, depth, num_heads = DIT_VARIANTS[match.group(1)]
    return dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=int(match.group(2)))


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding of the official DiT / MAE code: [grid_size**2, embed_dim].

    Token n = row * grid_size + col.  The first half of the channels encodes the column index, the second
    half the row index; each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)).
    Computed in float64 and returned as float32.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim: must be divisible by 4 for a 2D sin-cos embedding, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [B, T, D]; shift, scale: [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbedder(nn.Module):
    """Non-overlapping patch projection: [B, C, H, W] -> [B, (H/p)*(W/p), hidden]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256 frequencies, cos half then sin half) followed by an MLP."""

    def __init__(
        self,
        hidden_size: int,
        frequency_size: int = _TIMESTEP_FREQUENCIES,
        max_period: float = 10000.0,
        freq_shift: float = 0.0,
    ):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.freq_shift = freq_shift

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] (float or integer timesteps) -> [B, frequency_size] in float32."""
        half = self.frequency_size // 2
        # same float32 operation order as the official code: exp((-log(P) * k) / half)
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        angles = t.float()[:, None] * torch.exp(exponent / (half - self.freq_shift))[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        if self.frequency_size % 2:
            features = F.pad(features, (0, 1))
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table; row ``num_classes`` is the null (unconditional) class when dropout is used."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: [B] long. In training mode labels are replaced by the null class with prob ``dropout_prob``."""
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``, optional DiffFit scales."""

    def __init__(self, hidden_size: int, num_heads: int, diffit: bool):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide hidden_size {hidden_size}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        if diffit:
            self.gamma1 = nn.Parameter(torch.ones(3 * hidden_size))
            self.gamma2 = nn.Parameter(torch.ones(hidden_size))
        else:
            self.gamma1 = None
            self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x)
        if self.gamma1 is not None:
            qkv = qkv * self.gamma1
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        if self.gamma2 is not None:
            out = out * self.gamma2
        return out


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (and optional DiffFit branch scales)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, diffit: bool, mlp_norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, diffit)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        if diffit:
            self.gamma1 = nn.Parameter(torch.ones(hidden_size))
            self.gamma2 = nn.Parameter(torch.ones(hidden_size))
        else:
            self.gamma1 = None
            self.gamma2 = None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] tokens, c: [B, D] conditioning -> [B, T, D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn_branch = gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        if self.gamma1 is not None:
            attn_branch = attn_branch * self.gamma1
        x = x + attn_branch
        mlp_branch = gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.gamma2 is not None:
            mlp_branch = mlp_branch * self.gamma2
        return x + mlp_branch


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear projection to patch pixels: [B, T, D] -> [B, T, p*p*C_out]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional latent diffusion transformer (official DiT layout).

    forward(x [B, C, H, W], t [B], y [B] long) -> [B, C_out, H, W], C_out = 2C with learned sigma
    (first C channels: eps, last C: variance interpolation values).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        diffit: bool | Sequence[int] = False,
        *,
        timestep_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        for arg, value in dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
        ).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: expected a positive int, got {value!r}")
        if input_size % patch_size != 0:
            raise ValueError(f"input_size: {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.diffit_blocks = diffit_blocks(diffit, depth)
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbedder(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, index in self.diffit_blocks, mlp_norm_eps)
            for index in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------- setup
    @classmethod
    def from_name(cls, name: str, **overrides) -> DiT:
        """``DiT.from_name("DiT-XL/2", num_classes=10)``: named variant with constructor overrides."""
        return cls(**{**dit_config(name), **overrides})

    @classmethod
    def from_checkpoint(cls, path_or_state_dict, **kwargs) -> DiT:
        """See :func:`load_dit_checkpoint`."""
        return load_dit_checkpoint(path_or_state_dict, **kwargs)

    @classmethod
    def from_diffusers(cls, path_or_model, **kwargs) -> DiT:
        """See :func:`load_diffusers_dit`."""
        return load_diffusers_dit(path_or_model, **kwargs)

    NUMERICS = {"official": (0.0, 1e-6), "diffusers": (1.0, 1e-5)}  # (timestep freq shift, pre-MLP LayerNorm eps)

    @property
    def numerics(self) -> str:
        """ "official" (the DiT code's timestep frequencies and LayerNorm eps) or "diffusers" (DiTTransformer2DModel's;
        both load the same weights and differ by 0.1–0.3 relative in the output)."""
        current = (self.t_embedder.freq_shift, self.blocks[0].norm2.eps)
        return next((name for name, value in self.NUMERICS.items() if value == current), "custom")

    def set_numerics(self, name: str) -> DiT:
        """Switch to "official" or "diffusers" numerics in place (see `numerics`); returns self."""
        if name not in self.NUMERICS:
            raise ValueError(f"numerics must be one of {sorted(self.NUMERICS)}, got {name!r}")
        shift, eps = self.NUMERICS[name]
        self.t_embedder.freq_shift = shift
        for block in self.blocks:
            block.norm2.eps = eps
        return self

    @property
    def diffit(self) -> bool:
        """Whether any block carries DiffFit gammas (`diffit_blocks` says which)."""
        return bool(self.diffit_blocks)

    def config(self) -> dict:
        """Constructor kwargs that rebuild this architecture."""
        return dict(
            input_size=self.input_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            hidden_size=self.hidden_size,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            class_dropout_prob=self.class_dropout_prob,
            num_classes=self.num_classes,
            learn_sigma=self.learn_sigma,
            diffit=self._diffit_config(),
            timestep_freq_shift=self.t_embedder.freq_shift,
            mlp_norm_eps=self.blocks[0].norm2.eps,
        )

    def _diffit_config(self) -> bool | list[int]:
        """`diffit` as the constructor takes it: a bool for none / Minimax's blocks, else the block list."""
        if self.diffit_blocks in ((), diffit_blocks(True, self.depth)):
            return self.diffit
        return list(self.diffit_blocks)

    def initialize_weights(self) -> None:
        """Official DiT initialisation: xavier linears, sin-cos pos_embed, zero adaLN and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid_size)[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_layers = [block.adaLN_modulation[1] for block in self.blocks]
        zero_layers += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --------------------------------------------------------------------------------------- forward
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x: expected shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape [{x.shape[0]}], got {list(t.shape)}")
        if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y: expected integer labels of shape [{x.shape[0]}], got {y.dtype} {list(y.shape)}")
        return t

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Timestep + class embedding c: [B, hidden]."""
        return self.t_embedder(t) + self.y_embedder(y)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus positional embedding: [B, C, H, W] -> [B, T, hidden]."""
        return self.x_embedder(x) + self.pos_embed

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C_out] -> [B, C_out, H, W] (patch channel order (p, q, c) as official)."""
        batch, grid, patch, channels = tokens.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = tokens.reshape(batch, grid, grid, patch, patch, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * patch, grid * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] timesteps (0..999, float or int), y: [B] long -> [B, C_out, H, W]."""
        t = self._check_inputs(x, t, y)
        c = self.conditioning(t, y)
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, block_index: int) -> torch.Tensor:
        """Truncated forward: tokens after block ``block_index`` (0-based, inclusive): [B, T, hidden]."""
        if not isinstance(block_index, int) or not 0 <= block_index < self.depth:
            raise ValueError(f"block_index: expected an int in [0, {self.depth - 1}], got {block_index!r}")
        t = self._check_inputs(x, t, y)
        c = self.conditioning(t, y)
        tokens = self.embed(x)
        for block in self.blocks[: block_index + 1]:
            tokens = block(tokens, c)
        return tokens

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int = 3
    ) -> torch.Tensor:
        """Classifier-free guidance exactly as the official ``forward_with_cfg``.

        x: [2B, C, H, W] = [cond; uncond] halves; only x[:B] is used (fed to both halves). y: [2B] with the
        null class in the second half. Guidance ``uncond + s * (cond - uncond)`` is applied to the first
        ``cfg_channels`` output channels and written to both halves; the remaining channels are the model's
        own row-wise output (the uncond row keeps its own values).  Official quirk: cfg_channels=3 of 4 eps
        channels; pass ``cfg_channels=in_channels`` for guidance on all eps channels.  -> [2B, C_out, H, W]
        """
        if x.shape[0] % 2 != 0:
            raise ValueError(f"x: batch must hold [cond; uncond] halves (even size), got {x.shape[0]}")
        if not 1 <= cfg_channels <= self.out_channels:
            raise ValueError(f"cfg_channels: expected 1..{self.out_channels}, got {cfg_channels}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        cond, uncond = guided.chunk(2, dim=0)
        half_guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)


# ------------------------------------------------------------------------------------- checkpoints
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class TrainingArgs:
    """A training checkpoint's pickled argparse.Namespace, read as plain attributes (the weights-only load allows
    this one class under that name and nothing else)."""


def _read_checkpoint(source, weights_only: bool) -> tuple[Mapping, str]:
    """Returns (raw object, human-readable name of the source)."""
    if isinstance(source, Mapping):
        return source, "<state dict>"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"path_or_state_dict: expected a path or a state dict, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"path_or_state_dict: checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu"), path
    try:  # Minimax's training checkpoints pickle their argparse Namespace beside the tensors: read as TrainingArgs
        with torch.serialization.safe_globals([(TrainingArgs, "argparse.Namespace")]):
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except OSError as error:
        raise ValueError(f"{path}: cannot read checkpoint: {error}") from error
    except Exception as error:  # garbage bytes fail anywhere in the unpickler, with messages that vary by content
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        said = "" if first.startswith("Weights only load failed") else f"; torch.load: {first[:120]}"
        raise ValueError(  # torch's advice to unpickle untrusted code is not given
            f"{path}: cannot read checkpoint: it is not a checkpoint of tensors "
            f"(corrupt, another format, or pickled objects{said})"
        ) from error
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict with an 'ema' entry, got {type(obj).__name__}")
    return obj, path


def _extract_state_dict(obj: Mapping, name: str) -> dict[str, torch.Tensor]:
    """Picks the EMA weights of a training checkpoint (else 'model'), strips DDP / compile prefixes."""
    for key in ("ema", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{name}: entry {key!r} is not a tensor ({type(value).__name__}); "
                "expected a DiT state dict or a dict with an 'ema' state dict"
            )
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


DIT_KEY_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer.", "pos_embed")


def _require(state: Mapping, key: str, name: str) -> torch.Tensor:
    if key not in state:
        if not any(k.startswith(DIT_KEY_PREFIXES) for k in state):
            example = next(iter(state), None)
            raise ValueError(
                f"{name}: not a DiT checkpoint (none of its {len(state)} keys is a DiT key"
                + (f", e.g. {example!r})" if example else ")")
            )
        raise ValueError(f"{name}: cannot infer the DiT config, key {key!r} is missing")
    return state[key]


def infer_dit_config(state: Mapping[str, torch.Tensor], name: str = "<state dict>", **given) -> dict:
    """DiT constructor kwargs from official state-dict shapes; explicit ``given`` values take precedence.

    num_heads cannot be read from shapes: it comes from the standard variants (by hidden size) or must
    be given.  The class table has num_classes + 1 rows when a null class is present; unless
    ``num_classes`` or ``class_dropout_prob`` is given, a null class is assumed (as in all DiT releases).
    """
    patch_weight = _require(state, "x_embedder.proj.weight", name)
    hidden_size, in_channels, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    block_ids = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    depth = max(block_ids) + 1 if block_ids else 0
    tokens = _require(state, "pos_embed", name).shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{name}: pos_embed has {tokens} tokens, not a square grid")
    out_rows = _require(state, "final_layer.linear.weight", name).shape[0]
    out_channels = out_rows // (patch_size * patch_size)
    if out_channels not in (in_channels, 2 * in_channels) or out_rows % (patch_size * patch_size):
        raise ValueError(
            f"{name}: final_layer.linear has {out_rows} outputs, inconsistent with "
            f"{in_channels} input channels and patch {patch_size}"
        )
    table_rows = _require(state, "y_embedder.embedding_table.weight", name).shape[0]
    mlp_hidden = _require(state, "blocks.0.mlp.fc1.weight", name).shape[0]
    inferred = dict(
        input_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        mlp_ratio=mlp_hidden / hidden_size,
        learn_sigma=out_channels == 2 * in_channels,
        diffit=sorted({int(match.group(1)) for key in state if (match := _GAMMA_KEY.match(key))}),
    )
    if "num_classes" in given:
        inferred["class_dropout_prob"] = 0.1 if table_rows == given["num_classes"] + 1 else 0.0
    elif given.get("class_dropout_prob", 0.1) > 0:
        inferred["num_classes"] = table_rows - 1
    else:
        inferred["num_classes"] = table_rows
    if "num_heads" not in given:
        if hidden_size not in _HEADS_BY_HIDDEN:
            raise ValueError(f"{name}: hidden size {hidden_size} is not a standard DiT variant; pass num_heads=")
        inferred["num_heads"] = _HEADS_BY_HIDDEN[hidden_size]
    return {**inferred, **given}


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, strict: bool) -> None:
    """Copies ``state`` into ``model``; shape mismatches always, key mismatches when strict, raise ValueError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{key} (checkpoint {list(state[key].shape)}, model {list(own[key].shape)})"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    problems = []
    if wrong_shape:
        problems.append(f"shape mismatch: {listing(wrong_shape)}")
    if strict and missing:
        problems.append(f"missing keys: {listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if problems:
        raise ValueError(f"{name}: checkpoint does not match the DiT ({'; '.join(problems)})")
    model.load_state_dict({key: value for key, value in state.items() if key in own}, strict=False)


def _uninitialized_dit(config: dict, state: Mapping[str, torch.Tensor]) -> DiT:
    """DiT built without the (slow, for XL) random initialisation when ``state`` covers every parameter;
    otherwise fully initialised so that keys skipped by a non-strict load keep the official init."""
    with torch.device("meta"):
        model = DiT(**config)
    model = model.to_empty(device="cpu")
    if set(model.state_dict()) - set(state):
        model.initialize_weights()
    return model


def load_dit_checkpoint(
    path_or_state_dict,
    model: DiT | None = None,
    *,
    strict: bool = True,
    weights_only: bool = True,
    device=None,
    dtype: torch.dtype | None = None,
    **config,
) -> DiT:
    """Loads DiT weights: an official plain state dict, a training checkpoint ``{"ema": sd, ...}`` (EMA is
    used, else ``"model"``), or a Minimax / SAM checkpoint ``{"model", "ema", "opt", "args"}`` (``args`` an
    argparse Namespace, which a weights-only load accepts) with DiffFit gammas in the blocks whose keys carry them.

    path_or_state_dict: a ``.pt``/``.pth`` file (``torch.load(weights_only=...)``), a ``.safetensors`` file, or
    a mapping.  model: load into this DiT instead of building one (then ``config`` must be empty).
    config: DiT constructor overrides; what is not given is inferred from the state-dict shapes.
    strict: missing / unexpected keys raise ValueError naming the source; ``strict=False`` skips them (the
    authors' ``load_state_dict(strict=False)``).  Shape mismatches always raise.  Returns the model in eval mode.
    """
    obj, name = _read_checkpoint(path_or_state_dict, weights_only)
    state = _extract_state_dict(obj, name)
    if model is None:
        model = _uninitialized_dit(infer_dit_config(state, name, **config), state)
    elif config:
        raise ValueError(f"config: cannot override {sorted(config)} when loading into an existing model")
    _load_into(model, state, name, strict)
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------- diffusers
@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' loaders log warnings and fallbacks on stderr (e.g. "Defaulting to unsafe serialization"); fastdd
    says in one line what went wrong instead."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _diffusers_block_key_map(index: int) -> dict[str, str]:
    """fastdd key -> diffusers key for the non-qkv parameters of block ``index``."""
    src, dst = f"transformer_blocks.{index}.", f"blocks.{index}."
    pairs = {
        "adaLN_modulation.1": "norm1.linear",
        "attn.proj": "attn1.to_out.0",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
    }
    return {
        f"{dst}{ours}.{kind}": f"{src}{theirs}.{kind}" for ours, theirs in pairs.items() for kind in ("weight", "bias")
    }


def load_diffusers_dit(
    path_or_model,
    *,
    match_diffusers_numerics: bool = True,
    variant: str | None = None,
    device=None,
    dtype: torch.dtype | None = None,
) -> DiT:
    """Builds a fastdd DiT from diffusers-format weights.

    path_or_model: a ``diffusers.DiTTransformer2DModel`` instance, or a folder saved with ``save_pretrained``
    (either the transformer folder itself or a pipeline folder with a ``transformer/`` subfolder).
    diffusers keeps a copy of the timestep/label embedder in every block's ``norm1.emb``; fastdd has one
    shared embedder, so all copies must be equal (checked; ValueError otherwise).  qkv is the concatenation
    of to_q, to_k, to_v.  match_diffusers_numerics: reproduce diffusers' forward exactly (timestep frequency
    shift 1, pre-MLP LayerNorm eps = config.norm_eps); False gives the official DiT numerics.
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        from diffusers import DiTTransformer2DModel

        folder = os.fspath(path_or_model)
        if not os.path.isdir(folder):
            raise ValueError(f"path_or_model: not a folder: {folder}")
        subfolder = "transformer" if os.path.isfile(os.path.join(folder, "transformer", "config.json")) else None
        weights = os.path.join(folder, subfolder or "")
        if not glob.glob(os.path.join(weights, "diffusion_pytorch_model*")):
            raise ValueError(f"{weights}: holds no weights (diffusion_pytorch_model.safetensors or .bin)")
        try:
            with quiet_diffusers():
                source = DiTTransformer2DModel.from_pretrained(folder, subfolder=subfolder, variant=variant)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{folder}: cannot load a diffusers DiT: {first}") from error
        name = folder
    else:
        source, name = path_or_model, type(path_or_model).__name__
    if not hasattr(source, "config") or not hasattr(source, "transformer_blocks"):
        raise ValueError(f"path_or_model: {name} is not a diffusers DiTTransformer2DModel")
    cfg = source.config
    if cfg.norm_type != "ada_norm_zero" or cfg.activation_fn != "gelu-approximate" or not cfg.attention_bias:
        raise ValueError(
            f"{name}: unsupported diffusers DiT config (norm_type={cfg.norm_type}, "
            f"activation_fn={cfg.activation_fn}, attention_bias={cfg.attention_bias})"
        )
    theirs = {key: value.detach() for key, value in source.state_dict().items()}
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"{name}: out_channels {out_channels} is neither in_channels nor 2*in_channels")
    table = theirs["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    num_classes = cfg.num_embeds_ada_norm
    config = dict(
        input_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        hidden_size=hidden,
        depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=theirs["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
        class_dropout_prob=0.1 if table.shape[0] == num_classes + 1 else 0.0,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * cfg.in_channels,
        timestep_freq_shift=1.0 if match_diffusers_numerics else 0.0,
        mlp_norm_eps=cfg.norm_eps if match_diffusers_numerics else 1e-6,
    )

    embedder_keys = {
        "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    }
    ours: dict[str, torch.Tensor] = {
        "y_embedder.embedding_table.weight": table,
        "x_embedder.proj.weight": theirs["pos_embed.proj.weight"],
        "x_embedder.proj.bias": theirs["pos_embed.proj.bias"],
        "pos_embed": source.pos_embed.pos_embed.detach().float().reshape(1, -1, hidden),
        "final_layer.adaLN_modulation.1.weight": theirs["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": theirs["proj_out_1.bias"],
        "final_layer.linear.weight": theirs["proj_out_2.weight"],
        "final_layer.linear.bias": theirs["proj_out_2.bias"],
    }
    for key, their_key in embedder_keys.items():
        for kind in ("weight", "bias"):
            ours[f"{key}.{kind}"] = theirs[f"transformer_blocks.0.{their_key}.{kind}"]
    shared = [f"{key}.{kind}" for key in embedder_keys.values() for kind in ("weight", "bias")]
    shared.append("norm1.emb.class_embedder.embedding_table.weight")
    for index in range(cfg.num_layers):
        for key in shared:
            if not torch.equal(theirs[f"transformer_blocks.{index}.{key}"], theirs[f"transformer_blocks.0.{key}"]):
                raise ValueError(
                    f"{name}: block {index} has its own {key} (differs from block 0); fastdd's DiT "
                    "shares one timestep/label embedder across blocks"
                )
        for our_key, their_key in _diffusers_block_key_map(index).items():
            ours[our_key] = theirs[their_key]
        for kind in ("weight", "bias"):
            ours[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
                [theirs[f"transformer_blocks.{index}.attn1.to_{p}.{kind}"] for p in "qkv"], dim=0
            )
    model = _uninitialized_dit(config, ours)
    _load_into(model, ours, name, strict=True)
    return model.to(device=device, dtype=dtype).eval()

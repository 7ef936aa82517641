"""Per-sample gradient cosines for IGD influence guidance, without materialising per-sample gradients.

grad_cosine(model, flat_params, x, y, ref_grads)[i, k] = cos(∇_θ CE(f_θk(x_i), y_i), ref_grads[k]).

The fast path walks the model's leaf modules in forward order and runs all K parameter sets in one batched
forward ([B, K·C, H, W] activations, convolutions grouped by checkpoint). One autograd.grad of the summed loss
w.r.t. every parametrised layer's output gives δ_l (the per-sample, per-checkpoint output gradients: samples
and checkpoints never mix). Per layer, with a_l its input:
  ⟨g_ik, G_k⟩  = Σ_l ⟨δ_l, conv(a_l, G_k,l)⟩ (+ bias and norm-affine terms),
  ‖g_ik‖²      = Σ_l ‖Σ_s δ_s a_sᵀ‖², either materialised per layer (δ Aᵀ) or by the Gram ("ghost") identity
                 ⟨A Aᵀ, Δ Δᵀ⟩ on the [HW, HW] Grams, whichever moves fewer bytes and flops.
Everything is made of differentiable torch ops, so the result is differentiable w.r.t. x (and ref_grads)
to any order: IGD backpropagates the cosines to the image.

Models the fast path does not understand fall back to torch.func (vmap of grad), with a warning naming why.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from . import reference
from ._checks import check_nonempty, check_same_device, check_tensor

BACKENDS = ("auto", "reference")
COS_EPS = 1e-8  # like F.cosine_similarity


class _Unsupported(Exception):
    """The fast path cannot run this model (the message names the module and why)."""


# --------------------------------------------------------------------------- the layer plan
@dataclass(frozen=True)
class _ParamSlice:
    """Where one parameter lives in the flat vector."""

    start: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def take(self, flat: Tensor) -> Tensor:
        """flat: [..., P] -> [..., *shape]."""
        return flat[..., self.start : self.start + self.numel].unflatten(-1, self.shape)


@dataclass(frozen=True)
class _Step:
    """One leaf module: kind is "conv", "linear", "norm" (GroupNorm / InstanceNorm), "flatten",
    "spatial" (per-channel 2-d maps like pooling) or "pointwise" (elementwise activations)."""

    module: nn.Module
    kind: str
    fn: Callable[[Tensor], Tensor] | None = None
    weight: _ParamSlice | None = None
    bias: _ParamSlice | None = None
    groups: int = 1  # norm: number of channel groups


def _pointwise(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    if isinstance(module, nn.ReLU):
        return F.relu
    if isinstance(module, nn.LeakyReLU):
        return lambda h: F.leaky_relu(h, module.negative_slope)
    if isinstance(module, nn.GELU):
        return lambda h: F.gelu(h, approximate=module.approximate)
    if isinstance(module, nn.SiLU):
        return F.silu
    if isinstance(module, nn.Tanh):
        return torch.tanh
    if isinstance(module, nn.Sigmoid):
        return torch.sigmoid
    if isinstance(module, nn.Identity):
        return lambda h: h
    return None


def _spatial(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    if isinstance(module, nn.AvgPool2d):
        return lambda h: F.avg_pool2d(
            h, module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad,
            module.divisor_override,
        )
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        return lambda h: F.max_pool2d(h, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return lambda h: F.adaptive_avg_pool2d(h, module.output_size)
    return None


def _leaf_modules(model: nn.Module) -> list[nn.Module]:
    """model.layers() if it has one, else the flattened children of an nn.Sequential."""
    if callable(getattr(model, "layers", None)):
        return list(model.layers())
    if isinstance(model, nn.Sequential):
        leaves = []
        for child in model:
            leaves += _leaf_modules(child) if isinstance(child, nn.Sequential) else [child]
        return leaves
    raise _Unsupported(f"{type(model).__name__} has no layers() method and is not an nn.Sequential")


def _plan(model: nn.Module) -> list[_Step]:
    """The fast path's steps for model, or _Unsupported naming the first module it cannot run."""
    slices, offset = {}, 0
    for p in model.parameters():
        slices[id(p)] = _ParamSlice(offset, p.shape)
        offset += p.numel()
    used: set[int] = set()

    def param(p: Tensor | None) -> _ParamSlice | None:
        if p is None:
            return None
        if id(p) not in slices or id(p) in used:
            raise _Unsupported(f"a parameter of the layers is not a (distinct) parameter of {type(model).__name__}")
        used.add(id(p))
        return slices[id(p)]

    steps = []
    for module in _leaf_modules(model):
        name = type(module).__name__
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise _Unsupported(f"{name} with padding={module.padding!r}, padding_mode={module.padding_mode!r}")
            steps.append(_Step(module, "conv", weight=param(module.weight), bias=param(module.bias), groups=module.groups))
        elif isinstance(module, nn.Linear):
            steps.append(_Step(module, "linear", weight=param(module.weight), bias=param(module.bias)))
        elif isinstance(module, (nn.GroupNorm, nn.InstanceNorm2d)):
            if isinstance(module, nn.InstanceNorm2d) and module.track_running_stats:
                raise _Unsupported(f"{name} with track_running_stats=True")
            groups = module.num_groups if isinstance(module, nn.GroupNorm) else module.num_features
            affine = module.affine
            steps.append(
                _Step(module, "norm", weight=param(module.weight) if affine else None, bias=param(module.bias) if affine else None, groups=groups)
            )
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise _Unsupported(f"{name}(start_dim={module.start_dim}, end_dim={module.end_dim})")
            steps.append(_Step(module, "flatten"))
        elif (fn := _pointwise(module)) is not None:
            steps.append(_Step(module, "pointwise", fn=fn))
        elif (fn := _spatial(module)) is not None:
            steps.append(_Step(module, "spatial", fn=fn))
        else:
            raise _Unsupported(f"unsupported module {name}")
        if any(id(p) not in used for p in module.parameters(recurse=True)):
            raise _Unsupported(f"{name} has parameters the fast path does not use")
    if len(used) != len(slices):
        raise _Unsupported(f"{type(model).__name__} has parameters outside its layers")
    return steps


# --------------------------------------------------------------------------- batched-over-K forward
@dataclass
class _Record:
    """What a parametrised layer's gradient needs: its input (x̂ for norms), its output, and whether the
    input is the same for every checkpoint ([B, ...] instead of [B, K·C, ...] / [B, K, F])."""

    step: _Step
    inputs: Tensor
    output: Tensor
    shared: bool


def _conv_forward(step: _Step, flat: Tensor, h: Tensor, shared: bool) -> tuple[Tensor, Tensor]:
    """h: [B, Cin, H, W] (shared) or [B, K·Cin, H, W] -> (input used, output [B, K·Cout, H', W'])."""
    conv, K = step.module, flat.shape[0]
    weight = step.weight.take(flat).flatten(0, 1)  # [K·Cout, Cin/g, kh, kw]
    bias = step.bias.take(flat).flatten() if step.bias is not None else None
    if shared and conv.groups != 1:
        h = h.repeat(1, K, 1, 1)
        shared = False
    groups = conv.groups if shared else K * conv.groups
    return h, F.conv2d(h, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def _linear_forward(step: _Step, flat: Tensor, h: Tensor, shared: bool) -> Tensor:
    """h: [B, F] (shared) or [B, K, F] -> [B, K, O]."""
    K = flat.shape[0]
    weight = step.weight.take(flat)  # [K, O, F]
    if shared:
        out = (h @ weight.flatten(0, 1).T).unflatten(1, (K, -1))
    else:
        out = torch.einsum("bkf,kof->bko", h, weight)
    return out + step.bias.take(flat) if step.bias is not None else out


def _norm_forward(step: _Step, flat: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """GroupNorm / InstanceNorm per checkpoint: h: [B, K·C, ...] -> (x̂, x̂·w + b), both [B, K·C, ...]."""
    K = flat.shape[0]
    xhat = F.group_norm(h, K * step.groups, eps=step.module.eps)
    if step.weight is None:
        return xhat, xhat
    broadcast = (1, -1) + (1,) * (h.dim() - 2)
    out = xhat * step.weight.take(flat).reshape(broadcast)
    return xhat, out + step.bias.take(flat).reshape(broadcast) if step.bias is not None else out


def _forward(steps: list[_Step], flat: Tensor, x: Tensor) -> tuple[Tensor, list[_Record]]:
    """All K parameter sets in one pass. flat: [K, P], x: [B, ...] -> (logits [B, K, O], records)."""
    K, B = flat.shape[0], x.shape[0]
    h, shared, spatial = x, True, x.dim() > 2  # spatial: [B, (K·)C, ...] layout, else [B, (K,) F]
    records = []
    for step in steps:
        name = type(step.module).__name__
        if step.kind == "conv":
            if not spatial:
                raise _Unsupported(f"{name} after the activations were flattened")
            a, h = _conv_forward(step, flat, h, shared)
            shared = shared and step.module.groups == 1
            records.append(_Record(step, a, h, shared))
            shared = False
        elif step.kind == "linear":
            if spatial:
                raise _Unsupported(f"{name} on unflattened activations of shape {tuple(h.shape)}")
            a, h = h, _linear_forward(step, flat, h, shared)
            records.append(_Record(step, a, h, shared))
            shared = False
        elif step.kind == "norm":
            if shared:
                h = h.unsqueeze(1).expand(B, K, *h.shape[1:]).flatten(1, 2)
                shared = False
            per_checkpoint = h if spatial else h.flatten(1)
            xhat, out = _norm_forward(step, flat, per_checkpoint)
            h = out if spatial else out.unflatten(1, (K, -1))
            if step.weight is not None:
                records.append(_Record(step, xhat, out, False))
        elif step.kind == "flatten":
            if spatial:
                h = h.flatten(1) if shared else h.reshape(B, K, -1)
                spatial = False
        elif step.kind == "spatial":
            if not spatial:
                raise _Unsupported(f"{name} after the activations were flattened")
            h = step.fn(h)
        else:
            h = step.fn(h)
    if spatial or shared:
        raise _Unsupported("the layers do not end in logits [B, classes] from an nn.Linear")
    return h, records


# --------------------------------------------------------------------------- per-group accumulation
@dataclass
class _Grouping:
    """Rows → gradients. index: [B] group per row (None: each row its own gradient); count: G;
    row_weight: [B] 1/|group| (CE is averaged within a group); pair_*: all ordered pairs (i, j) of rows in
    one group (i == j included) and their group, for the cross-row Gram terms of the norms."""

    index: Tensor | None
    count: int
    row_weight: Tensor | None
    pair_i: Tensor | None
    pair_j: Tensor | None
    pair_group: Tensor | None

    @staticmethod
    def build(groups: Tensor | None, batch: int) -> _Grouping:
        if groups is None:
            return _Grouping(None, batch, None, None, None, None)
        sizes = torch.bincount(groups)
        index_cpu = groups.cpu()
        members = [torch.nonzero(index_cpu == g).flatten() for g in range(len(sizes))]
        pair_i = torch.cat([m.repeat_interleave(len(m)) for m in members])
        pair_j = torch.cat([m.repeat(len(m)) for m in members])
        pair_group = torch.cat([torch.full((len(m) ** 2,), g) for g, m in enumerate(members)])
        device = groups.device
        return _Grouping(
            groups, len(sizes), 1.0 / sizes[groups], pair_i.to(device), pair_j.to(device), pair_group.to(device)
        )

    def sum_rows(self, rows: Tensor) -> Tensor:
        """[B, ...] -> [G, ...]: the sum over the rows of each group."""
        if self.index is None:
            return rows
        return rows.new_zeros(self.count, *rows.shape[1:]).index_add(0, self.index, rows)

    def per_row(self, ref: Tensor) -> Tensor:
        """A per-gradient reference [G, ...] -> per row [B, ...]."""
        return ref if self.index is None else ref.index_select(0, self.index)

    def pair_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows: [B, ...] -> (rows[i], rows[j]) over the pairs (just (rows, rows) when every row is a group)."""
        if self.index is None:
            return rows, rows
        return rows.index_select(0, self.pair_i), rows.index_select(0, self.pair_j)

    def sum_pairs(self, values: Tensor) -> Tensor:
        """[pairs, ...] -> [G, ...]: the sum over the pairs of each group."""
        if self.index is None:
            return values
        return values.new_zeros(self.count, *values.shape[1:]).index_add(0, self.pair_group, values)


# --------------------------------------------------------------------------- per-layer dot and norm terms
@dataclass
class _Totals:
    """Running Σ over layers of ⟨g, G⟩ and ‖g‖², both [G, K]."""

    dots: Tensor
    sq_norms: Tensor

    def add_materialised(self, grouping: _Grouping, rows: Tensor, ref: Tensor) -> None:
        """rows: [B, K, D] per-row gradients of some parameters; ref: their references [K, D] or [G, K, D]."""
        summed = grouping.sum_rows(rows)
        self.sq_norms = self.sq_norms + summed.square().sum(-1)
        self.dots = self.dots + (summed * ref).sum(-1)


def _ghost_is_cheaper(rows: int, pairs: int, K: int, positions: int, in_features: int, out_channels: int) -> bool:
    """Per-layer choice for a conv weight's ‖Σ_s δ_s a_sᵀ‖²: materialise δ Aᵀ ([B, K, Cout, D]: wgrad flops
    plus several passes over that tensor, forward and backward) or contract the [L, L] Grams (plus the dot
    ⟨δ, G a⟩, which the materialised gradient gives for free). Rough cost in multiply-adds, backward included."""
    materialise = 3 * rows * K * out_channels * in_features * (positions + 8)
    ghost = 3 * pairs * K * positions**2 * (in_features + out_channels) + 2 * rows * K * positions * out_channels * in_features
    return ghost < materialise


def _conv_terms(record: _Record, delta: Tensor, ref: Tensor, grouping: _Grouping, totals: _Totals, K: int) -> None:
    """Conv2d: a: [B, (K·)Cin, H, W], δ: [B, K·Cout, H', W']."""
    conv, step = record.step.module, record.step
    B, L = delta.shape[0], delta.shape[2] * delta.shape[3]
    out_channels, groups = conv.out_channels, conv.groups
    cols = F.unfold(record.inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [B, (K·)Cin·kk, L]
    in_features = cols.shape[1] // (1 if record.shared else K) // groups  # D = Cin/g·kh·kw
    if step.bias is not None:
        totals.add_materialised(grouping, delta.flatten(2).sum(-1).unflatten(1, (K, -1)), step.bias.take(ref))
    ref_weight = step.weight.take(ref).flatten(-4)  # [(G,) K, Cout·D]
    pairs = B if grouping.index is None else len(grouping.pair_i)
    if groups == 1 and _ghost_is_cheaper(B, pairs, K, L, in_features, out_channels):
        cols = cols.unflatten(1, (1 if record.shared else K, in_features))  # [B, K|1, D, L]
        d = delta.flatten(2).unflatten(1, (K, out_channels))  # [B, K, Cout, L]
        cols_i, cols_j = grouping.pair_rows(cols)
        d_i, d_j = grouping.pair_rows(d)
        grams = (cols_i.transpose(-1, -2) @ cols_j) * (d_i.transpose(-1, -2) @ d_j)  # [pairs, K, L, L]
        totals.sq_norms = totals.sq_norms + grouping.sum_pairs(grams.sum((-1, -2)))
        ref_rows = ref_weight.unflatten(-1, (out_channels, in_features))
        if ref_rows.dim() == 4:
            ref_rows = grouping.per_row(ref_rows)
        projected = ref_rows @ cols  # [B, K, Cout, L]: conv(a, G) per position
        totals.dots = totals.dots + grouping.sum_rows((projected * d).sum((-1, -2)))
        return
    if record.shared:  # groups == 1: one [K·Cout, L] @ [L, D] product per sample
        rows = delta.flatten(2) @ cols.transpose(1, 2)  # [B, K·Cout, D]
    else:
        cols = cols.unflatten(1, (K * groups, in_features))  # [B, K·g, D, L]
        d = delta.flatten(2).unflatten(1, (K * groups, out_channels // groups))  # [B, K·g, Cout/g, L]
        rows = d @ cols.transpose(-1, -2)  # [B, K·g, Cout/g, D]
    totals.add_materialised(grouping, rows.reshape(B, K, -1), ref_weight)


def _linear_terms(record: _Record, delta: Tensor, ref: Tensor, grouping: _Grouping, totals: _Totals) -> None:
    """Linear: a: [B, F] (shared) or [B, K, F], δ: [B, K, O]. The per-sample weight gradient δ aᵀ has rank 1:
    ‖Σ_i δ_i a_iᵀ‖² = Σ_ij (a_i·a_j)(δ_i·δ_j) over the rows of a group, ⟨δ aᵀ, G⟩ = δ·(G a)."""
    step = record.step
    a = record.inputs.unsqueeze(1) if record.shared else record.inputs
    if step.bias is not None:
        totals.add_materialised(grouping, delta, step.bias.take(ref))
    a_i, a_j = grouping.pair_rows(a)
    d_i, d_j = grouping.pair_rows(delta)
    totals.sq_norms = totals.sq_norms + grouping.sum_pairs((a_i * a_j).sum(-1) * (d_i * d_j).sum(-1))
    ref_weight = step.weight.take(ref)  # [(G,) K, O, F]
    a = a.expand(-1, delta.shape[1], -1)
    if ref_weight.dim() == 3:
        projected = torch.einsum("kof,bkf->bko", ref_weight, a)
    else:
        projected = torch.einsum("bkof,bkf->bko", grouping.per_row(ref_weight), a)
    totals.dots = totals.dots + grouping.sum_rows((projected * delta).sum(-1))


def _norm_terms(record: _Record, delta: Tensor, ref: Tensor, grouping: _Grouping, totals: _Totals, K: int) -> None:
    """GroupNorm / InstanceNorm affine: per-row gradients Σ_s δ x̂ and Σ_s δ, [B, K, C] each."""
    step, B = record.step, delta.shape[0]
    per_channel = delta.reshape(B, K, step.weight.numel, -1)
    totals.add_materialised(grouping, (per_channel * record.inputs.reshape(per_channel.shape)).sum(-1), step.weight.take(ref))
    if step.bias is not None:
        totals.add_materialised(grouping, per_channel.sum(-1), step.bias.take(ref))


def _fast_dot_and_norm(steps, flat, x, y, ref, grouping: _Grouping) -> tuple[Tensor, Tensor]:
    """(⟨g, G⟩, ‖g‖²), both [G, K], by the batched forward, one backward to the layer outputs, and the
    per-layer identities."""
    K, B = flat.shape[0], x.shape[0]
    keep_graph = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad():
        inputs = x if keep_graph else x.detach().requires_grad_(True)
        logits, records = _forward(steps, flat, inputs)
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(K), reduction="none").view(B, K)
        if grouping.row_weight is not None:
            losses = losses * grouping.row_weight[:, None]
        deltas = torch.autograd.grad(losses.sum(), [r.output for r in records], create_graph=keep_graph)
    totals = _Totals(x.new_zeros(grouping.count, K), x.new_zeros(grouping.count, K))
    for record, delta in zip(records, deltas):
        if not keep_graph:
            record.inputs = record.inputs.detach()
        kind = record.step.kind
        if kind == "conv":
            _conv_terms(record, delta, ref, grouping, totals, K)
        elif kind == "linear":
            _linear_terms(record, delta, ref, grouping, totals)
        else:
            _norm_terms(record, delta, ref, grouping, totals, K)
    return totals.dots, totals.sq_norms


def _func_dot_and_norm(model, flat, x, y, ref, grouping: _Grouping) -> tuple[Tensor, Tensor]:
    """The fallback: per-row gradients by torch.func (vmap of grad) per checkpoint, [B, K, P] in memory."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def sample_loss(theta: Tensor, x_row: Tensor, y_row: Tensor) -> Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(functional_call(model, params, (x_row[None],)), y_row[None])

    per_row = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    rows = torch.stack([per_row(flat[k], x, y) for k in range(flat.shape[0])], 1)  # [B, K, P]
    if grouping.row_weight is not None:
        rows = rows * grouping.row_weight[:, None, None]
    summed = grouping.sum_rows(rows)
    return (summed * ref).sum(-1), summed.square().sum(-1)


def _checked(model, flat_params, x, y, ref_grads, groups, backend):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_tensor("flat_params", flat_params, ndim=2)
    check_tensor("x", x)
    check_tensor("y", y, ndim=1, floating=False)
    check_tensor("ref_grads", ref_grads)
    check_nonempty("flat_params", flat_params)
    check_nonempty("x", x)
    check_same_device(x=x, flat_params=flat_params, y=y, ref_grads=ref_grads, groups=groups)
    num_params = sum(p.numel() for p in model.parameters())
    if flat_params.shape[1] != num_params:
        raise ValueError(f"flat_params must be [K, {num_params}] for this model, got {tuple(flat_params.shape)}")
    if flat_params.dtype != x.dtype:
        raise ValueError(f"flat_params has dtype {flat_params.dtype} but x has {x.dtype}")
    if y.shape[0] != x.shape[0] or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"y must be [B] = [{x.shape[0]}] integer labels, got {y.dtype} of shape {tuple(y.shape)}")
    if groups is not None:
        check_tensor("groups", groups, ndim=1, floating=False)
        if groups.shape[0] != x.shape[0] or groups.dtype == torch.bool or groups.is_floating_point():
            raise ValueError(f"groups must be [B] = [{x.shape[0]}] integer group ids, got {groups.dtype} of shape {tuple(groups.shape)}")
        groups = groups.to(torch.int64)
        if bool((groups < 0).any()) or len(torch.unique(groups)) != int(groups.max()) + 1:
            raise ValueError("groups must number its groups 0..G-1, each used by at least one row")
    count = x.shape[0] if groups is None else int(groups.max()) + 1
    K = flat_params.shape[0]
    if ref_grads.shape not in ((K, num_params), (count, K, num_params)):
        raise ValueError(
            f"ref_grads must be [K, P] = [{K}, {num_params}] or [G, K, P] = [{count}, {K}, {num_params}], "
            f"got {tuple(ref_grads.shape)}"
        )
    return y.to(torch.int64), ref_grads.to(x.dtype), groups


def grad_dot_and_norm(
    model: nn.Module,
    flat_params: Tensor,
    x: Tensor,
    y: Tensor,
    ref_grads: Tensor,
    groups: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(⟨g_ik, ref_grads[k]⟩, ‖g_ik‖), both [B, K] (or [G, K] with groups), g_ik = ∇_θ CE(f_θk(x_i), y_i).

    model: the architecture (its own parameter values are not used); flat_params: [K, P] parameter sets in
    `parameters_to_vector(model.parameters())` order; x: [B, ...]; y: [B] labels; ref_grads: [K, P], or
    [G, K, P] with one reference per gradient (G = B without groups); groups: None or [B] group ids 0..G-1:
    the rows of a group give ONE gradient, that of their averaged CE. Differentiable w.r.t. x and ref_grads
    (to any order); flat_params is treated as a constant. backend: "auto" (the fast path; models it cannot
    run fall back to torch.func with a warning) or "reference" (one autograd.grad per sample and set).
    """
    y, ref_grads, groups = _checked(model, flat_params, x, y, ref_grads, groups, backend)
    if backend == "reference":
        return reference.grad_dot_and_norm(model, flat_params, x, y, ref_grads, groups)
    flat = flat_params.detach()
    grouping = _Grouping.build(groups, x.shape[0])
    try:
        dots, sq_norms = _fast_dot_and_norm(_plan(model), flat, x, y, ref_grads, grouping)
    except _Unsupported as reason:
        warnings.warn(f"grad_cosine: falling back to torch.func (slow): {reason}", stacklevel=2)
        dots, sq_norms = _func_dot_and_norm(model, flat, x, y, ref_grads, grouping)
    return dots, sq_norms.clamp_min(torch.finfo(sq_norms.dtype).tiny).sqrt()


def grad_cosine(
    model: nn.Module,
    flat_params: Tensor,
    x: Tensor,
    y: Tensor,
    ref_grads: Tensor,
    groups: Tensor | None = None,
    eps: float = COS_EPS,
    *,
    backend: str = "auto",
) -> Tensor:
    """cos(∇_θ CE(f_θk(x_i), y_i), ref_grads[k]) -> [B, K] (or [G, K] with groups); both norms clamped at
    eps like F.cosine_similarity. Arguments as grad_dot_and_norm; differentiable w.r.t. x (IGD's double
    backward) and ref_grads."""
    dots, norms = grad_dot_and_norm(model, flat_params, x, y, ref_grads, groups, backend=backend)
    ref = ref_grads.to(dots.dtype).norm(dim=-1).clamp_min(eps)  # [K] or [G, K]
    return dots / (norms.clamp_min(eps) * ref)

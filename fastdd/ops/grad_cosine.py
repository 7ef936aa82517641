"""Per-sample gradient cosines for IGD influence guidance, without materialising per-sample gradients.

grad_cosine(model, flat_params, x, y, ref_grads)[i, k] = cos(∇_θ CE(f_θk(x_i), y_i), ref_grads[k]).

The fast path walks the model's leaf modules in forward order and runs all K parameter sets in one batched
forward ([B, K·C, H, W] activations, convolutions grouped by checkpoint). The forward is cut at every
parametrised layer's output and each piece runs under torch.func.vjp; chaining the pullbacks from the loss
gives δ_l, the per-sample, per-checkpoint gradient w.r.t. each layer's output (samples and checkpoints never
mix). Per layer, with a_l its input:
  ⟨g_ik, G_k⟩  = Σ_l ⟨δ_l, conv(a_l, G_k,l)⟩ (+ bias and norm-affine terms),
  ‖g_ik‖²      = Σ_l ‖Σ_s δ_s a_sᵀ‖², either materialised per layer (one grouped weight-gradient convolution
                 with the rows folded into the channels, which also gives the dot) or by the Gram ("ghost")
                 identity ⟨A Aᵀ, Δ Δᵀ⟩ on the [HW, HW] Grams (small maps), whichever costs less.
On CPU the work runs in chunks of checkpoints (then rows) sized to the caches (_cpu_chunks); elsewhere in one pass.
Everything is made of differentiable torch ops, so the result is differentiable w.r.t. x (and ref_grads)
to any order: IGD backpropagates the cosines to the image.

torch.compile: grad_cosine is not a torch custom op (it takes an nn.Module and differentiates through it),
but a composition of differentiable aten ops with no host sync: torch.compile(fullgraph=True) traces it
as one graph, forward and double backward, with or without groups (value checks are skipped while
compiling; pass num_groups when groups come with [K, P] ref_grads). Groups are handled with [G, B] /
[B, B] membership matrices, never by host-side index lists.

Models the fast path does not understand fall back to torch.func (vmap of grad), with a warning naming why.

"auto" on CPU (eager): the fused path saves work over per-sample gradients only where the Gram identity replaces
a materialised weight gradient (small maps); where no conv layer takes it (and the network is big enough to be
FLOP-bound), both do the same FLOPs and torch.func's per-checkpoint vmap(grad) was as fast or faster on CPU
(benchmarks/results/grad_cosine_cpu.md), so auto runs that ("func", _fused_pays). Where the maps are too big for
all rows to share one CPU chunk, the fused path (in cache-sized row chunks) wins with an input gradient and loses
without one: auto follows that. CUDA and torch.compile keep the fused path (one batched pass; one traceable graph).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from . import _checks, reference
from ._backend import register_op, resolve_backend
from ._checks import check_nonempty, check_same_device, check_tensor
from .reference import GRAD_COS_EPS

# not custom ops (they differentiate through an nn.Module): "fused" is the fast path below (torch.func for the
# models it cannot run), "func" torch.func per-sample gradients (auto's choice on CPU where the fused path does not
# pay: _fused_pays), "reference" one autograd.grad per sample and parameter set
for _name in ("grad_dot_and_norm", "grad_cosine"):
    register_op(_name, cpu=("fused", "func", "reference"), cuda=("fused", "func", "reference"))
CPU_CHUNK_BYTES = 8 << 20  # widest activation per chunk on CPU (_cpu_chunks)
# CPU auto: below this many conv multiply-adds per row the fused path stays (overhead-bound: ConvNet-2 w8 16² ran
# 18 vs 30 ms, B 4, K 2); ConvNet-3 w64 32² (13.6 M) is FLOP-bound (_fused_pays)
CPU_FUNC_MIN_MACS = 8_000_000


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
            h,
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
            module.divisor_override,
        )
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        return lambda h: F.max_pool2d(
            h, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
        )
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
            steps.append(
                _Step(module, "conv", weight=param(module.weight), bias=param(module.bias), groups=module.groups)
            )
        elif isinstance(module, nn.Linear):
            steps.append(_Step(module, "linear", weight=param(module.weight), bias=param(module.bias)))
        elif isinstance(module, (nn.GroupNorm, nn.InstanceNorm2d)):
            if isinstance(module, nn.InstanceNorm2d) and module.track_running_stats:
                raise _Unsupported(f"{name} with track_running_stats=True")
            groups = module.num_groups if isinstance(module, nn.GroupNorm) else module.num_features
            affine = module.affine
            steps.append(
                _Step(
                    module,
                    "norm",
                    weight=param(module.weight) if affine else None,
                    bias=param(module.bias) if affine else None,
                    groups=groups,
                )
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
    """What a parametrised layer's gradient needs: its input (x̂ for norms), the gradient δ of the summed
    loss w.r.t. its output (filled in by the backward chain), and whether the input is the same for every
    checkpoint ([B, ...] instead of [B, K·C, ...] / [B, K, F])."""

    step: _Step
    inputs: Tensor
    shared: bool
    delta: Tensor | None = None


@dataclass
class _Layout:
    """How the activations are laid out between steps: shared ([B, C, ...], the same for every checkpoint)
    or per checkpoint ([B, K·C, ...] / [B, K, F]); spatial ([B, (K·)C, H, W]) or flattened."""

    shared: bool = True
    spatial: bool = True


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


def _apply(step: _Step, flat: Tensor, h: Tensor, layout: _Layout) -> tuple[Tensor, _Record | None]:
    """One step of the batched forward: -> (output, the record of a parametrised layer or None)."""
    K, B, name = flat.shape[0], h.shape[0], type(step.module).__name__
    if step.kind == "conv":
        if not layout.spatial:
            raise _Unsupported(f"{name} after the activations were flattened")
        a, h = _conv_forward(step, flat, h, layout.shared)
        record = _Record(step, a, layout.shared and step.module.groups == 1)
        layout.shared = False
        return h, record
    if step.kind == "linear":
        if layout.spatial:
            raise _Unsupported(f"{name} on unflattened activations of shape {tuple(h.shape)}")
        record = _Record(step, h, layout.shared)
        layout.shared = False
        return _linear_forward(step, flat, h, record.shared), record
    if step.kind == "norm":
        if layout.shared:
            h = h.unsqueeze(1).expand(B, K, *h.shape[1:]).flatten(1, 2)
            layout.shared = False
        xhat, out = _norm_forward(step, flat, h if layout.spatial else h.flatten(1))
        h = out if layout.spatial else out.unflatten(1, (K, -1))
        return h, _Record(step, xhat, False) if step.weight is not None else None
    if step.kind == "flatten":
        if layout.spatial:
            h = h.flatten(1) if layout.shared else h.reshape(B, K, -1)
            layout.spatial = False
        return h, None
    if step.kind == "spatial" and not layout.spatial:
        raise _Unsupported(f"{name} after the activations were flattened")
    return step.fn(h), None


def _is_recorded(step: _Step) -> bool:
    """Whether the step has parameters (conv, linear, affine norm): its per-row gradient terms are needed."""
    return step.kind in ("conv", "linear") or (step.kind == "norm" and step.weight is not None)


def _forward_backward(
    steps: list[_Step], flat: Tensor, x: Tensor, y: Tensor, row_weight: Tensor | None
) -> list[_Record]:
    """All K parameter sets in one pass, then δ of Σ_ik w_i·CE(f_θk(x_i), y_i) w.r.t. every parametrised
    layer's output. flat: [K, P], x: [B, ...], y: [B], row_weight: [B] or None -> records with δ filled in.

    The forward is cut into segments that each end at a parametrised layer's output; each segment runs under
    torch.func.vjp and the pullbacks are chained from the loss back to the first layer. Unlike
    torch.autograd.grad this traces under torch.compile, and every δ stays differentiable w.r.t. x."""
    K, B = flat.shape[0], x.shape[0]
    layout, records, pullbacks = _Layout(), [], []
    h, pending = x, list(steps)
    while True:
        cut = next((i for i, step in enumerate(pending) if _is_recorded(step)), None)
        if cut is None:
            break
        segment, pending = pending[: cut + 1], pending[cut + 1 :]

        def run_segment(h: Tensor, segment=segment) -> tuple[Tensor, Tensor]:
            for step in segment:
                h, record = _apply(step, flat, h, layout)
            records.append(record)
            return h, record.inputs

        h, pullback, records[-1].inputs = torch.func.vjp(run_segment, h, has_aux=True)
        pullbacks.append(pullback)

    def loss(h: Tensor) -> Tensor:
        for step in pending:
            h, _ = _apply(step, flat, h, layout)
        if layout.spatial or layout.shared:
            raise _Unsupported("the layers do not end in logits [B, classes] from an nn.Linear")
        losses = F.cross_entropy(h.flatten(0, 1), y.repeat_interleave(K), reduction="none").view(B, K)
        return (losses if row_weight is None else losses * row_weight[:, None]).sum()

    if not records:
        raise _Unsupported("the model has no parametrised layers")
    total, pullback = torch.func.vjp(loss, h)
    (delta,) = pullback(torch.ones_like(total))
    for record, pullback in zip(reversed(records), reversed([None] + pullbacks[1:])):
        record.delta = delta
        if pullback is not None:
            (delta,) = pullback(delta)
    return records


# --------------------------------------------------------------------------- per-group accumulation
@dataclass
class _Grouping:
    """Rows → gradients. index: [B] group per row (None: each row its own gradient); count: G;
    row_weight: [B] 1/|group| (CE is averaged within a group); members: [G, B] one-hot group membership;
    same: [B, B] 1 where rows i, j share a group (the cross-row terms of the norms). Built from device
    tensors only (no host sync), and sums are matmuls with members (no scatter): traceable."""

    index: Tensor | None
    count: int
    row_weight: Tensor | None
    members: Tensor | None
    same: Tensor | None

    @staticmethod
    def build(groups: Tensor | None, count: int, dtype: torch.dtype) -> _Grouping:
        if groups is None:
            return _Grouping(None, count, None, None, None)
        members = (torch.arange(count, device=groups.device)[:, None] == groups[None, :]).to(dtype)
        same = (groups[:, None] == groups[None, :]).to(dtype)
        return _Grouping(groups, count, 1.0 / same.sum(1), members, same)

    @property
    def pairs(self) -> int:
        """How many (i, j) row pairs the norms' cross terms visit."""
        return self.count if self.index is None else len(self.index) ** 2

    def sum_rows(self, rows: Tensor) -> Tensor:
        """[B, ...] -> [G, ...]: the sum over the rows of each group."""
        if self.index is None:
            return rows
        return (self.members.to(rows.dtype) @ rows.flatten(1)).view(self.count, *rows.shape[1:])

    def per_row(self, ref: Tensor) -> Tensor:
        """A per-gradient reference [G, ...] -> per row [B, ...]."""
        return ref if self.index is None else ref.index_select(0, self.index)

    def sum_gram_products(self, left: Tensor, right: Tensor) -> Tensor:
        """‖Σ_{i∈g} R_i L_iᵀ‖² per group by the Gram identity Σ_{i,j∈g} ⟨L_iᵀ L_j, R_iᵀ R_j⟩.
        left: [B, K|1, M, L], right: [B, K, N, L] -> [G, K]."""
        left = left.expand(-1, right.shape[1], -1, -1)
        if self.index is None:
            grams = (left.transpose(-1, -2) @ left) * (right.transpose(-1, -2) @ right)  # [B, K, L, L]
            return grams.sum((-1, -2))
        left_grams = torch.einsum("ikml,jkmn->ijkln", left, left)  # [B, B, K, L, L]
        right_grams = torch.einsum("ikml,jkmn->ijkln", right, right)
        cross = (left_grams * right_grams).sum((-1, -2)) * self.same[..., None]  # [B, B, K]
        return self.sum_rows(cross.sum(1))


# --------------------------------------------------------------------------- per-layer dot and norm terms
@dataclass
class _Totals:
    """Running Σ over layers of ⟨g, G⟩ and ‖g‖², both [G, K]."""

    dots: Tensor
    sq_norms: Tensor

    def add_materialised(self, grouping: _Grouping, rows: Tensor, ref: Tensor) -> None:
        """rows: [B, K, D] per-row gradients of some parameters; ref: their references [K, D] or [G, K, D]."""
        summed = grouping.sum_rows(rows)
        self.sq_norms = self.sq_norms + torch.linalg.vecdot(summed, summed)
        self.dots = self.dots + torch.linalg.vecdot(summed, ref)


def _ghost_is_cheaper(rows: int, pairs: int, K: int, positions: int, in_features: int, out_channels: int) -> bool:
    """Per-layer choice for a conv weight's ‖Σ_s δ_s a_sᵀ‖²: materialise δ Aᵀ ([B, K, Cout, D]: the weight-gradient
    convolution plus several passes over that tensor, forward and backward; it gives the dot for free) or
    contract the [L, L] Grams (plus the dot ⟨δ, conv(a, G)⟩, a forward-sized convolution). Rough cost in
    multiply-adds, backward included: the Grams win on small maps (L up to ≈ Cout·D / (3(D + Cout)))."""
    materialise = 3 * rows * K * out_channels * in_features * (positions + 8)
    ghost = (
        3 * pairs * K * positions**2 * (in_features + out_channels)
        + 2 * rows * K * positions * out_channels * in_features
    )
    return ghost < materialise


def _conv_terms(record: _Record, ref: Tensor, grouping: _Grouping, totals: _Totals, K: int) -> None:
    """Conv2d: a: [B, Cin, H, W] (shared) or [B, K·Cin, H, W], δ: [B, K·Cout, H', W']."""
    conv, step, delta, a = record.step.module, record.step, record.delta, record.inputs
    B, L = delta.shape[0], delta.shape[2] * delta.shape[3]
    out_channels, groups = conv.out_channels, conv.groups
    in_features = conv.in_channels // groups * conv.kernel_size[0] * conv.kernel_size[1]  # D = Cin/g·kh·kw
    if step.bias is not None:
        totals.add_materialised(grouping, delta.flatten(2).sum(-1).unflatten(1, (K, -1)), step.bias.take(ref))
    if groups == 1 and _ghost_is_cheaper(B, grouping.pairs, K, L, in_features, out_channels):
        cols = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [B, (K·)D, L]
        cols = cols.unflatten(1, (1 if record.shared else K, in_features))  # [B, K|1, D, L]
        d = delta.flatten(2).unflatten(1, (K, out_channels))  # [B, K, Cout, L]
        totals.sq_norms = totals.sq_norms + grouping.sum_gram_products(cols, d)
        per_position = _conv_with_refs(record, ref, grouping, K) * delta  # [B, K·Cout, H', W']
        totals.dots = totals.dots + grouping.sum_rows(per_position.flatten(1).unflatten(1, (K, -1)).sum(-1))
        return
    # per-(row, checkpoint) weight gradients as ONE grouped weight-gradient convolution: the batch is folded
    # into the channels ([1, B·(K·)Cin, H, W]) and every (row, checkpoint, conv group) is a group
    conv_groups = B if record.shared else B * K * groups
    rows = torch.nn.grad.conv2d_weight(
        a.reshape(1, -1, *a.shape[2:]),
        (B * K * out_channels, conv.in_channels // groups, *conv.kernel_size),
        delta.reshape(1, -1, *delta.shape[2:]),
        conv.stride,
        conv.padding,
        conv.dilation,
        conv_groups,
    )  # [B·K·Cout, Cin/g, kh, kw]
    totals.add_materialised(grouping, rows.view(B, K, -1), step.weight.take(ref).flatten(-4))  # ref: [(G,) K, Cout·D]


def _conv_with_refs(record: _Record, ref: Tensor, grouping: _Grouping, K: int) -> Tensor:
    """conv(a, G_k) for a groups == 1 conv, so that ⟨δ aᵀ, G⟩ = ⟨δ, conv(a, G)⟩: -> [B, K·Cout, H', W']."""
    conv, a = record.step.module, record.inputs
    weight = record.step.weight.take(ref)  # [(G,) K, Cout, Cin, kh, kw]
    if weight.dim() == 5:
        return F.conv2d(
            a, weight.flatten(0, 1), None, conv.stride, conv.padding, conv.dilation, 1 if record.shared else K
        )
    weight = grouping.per_row(weight)  # [B, K, Cout, Cin, kh, kw]: a weight per row, rows folded into channels
    B = a.shape[0]
    folded = a.reshape(1, -1, *a.shape[2:])
    out = F.conv2d(
        folded, weight.flatten(0, 2), None, conv.stride, conv.padding, conv.dilation, B if record.shared else B * K
    )
    return out.view(B, -1, *out.shape[2:])


def _linear_terms(record: _Record, ref: Tensor, grouping: _Grouping, totals: _Totals) -> None:
    """Linear: a: [B, F] (shared) or [B, K, F], δ: [B, K, O]. The per-sample weight gradient δ aᵀ has rank 1:
    ‖Σ_i δ_i a_iᵀ‖² = Σ_ij (a_i·a_j)(δ_i·δ_j) over the rows of a group, ⟨δ aᵀ, G⟩ = δ·(G a)."""
    step, delta = record.step, record.delta
    a = record.inputs.unsqueeze(1) if record.shared else record.inputs
    if step.bias is not None:
        totals.add_materialised(grouping, delta, step.bias.take(ref))
    totals.sq_norms = totals.sq_norms + grouping.sum_gram_products(a.unsqueeze(-1), delta.unsqueeze(-1))
    ref_weight = step.weight.take(ref)  # [(G,) K, O, F]
    a = a.expand(-1, delta.shape[1], -1)
    if ref_weight.dim() == 3:
        projected = torch.einsum("kof,bkf->bko", ref_weight, a)
    else:
        projected = torch.einsum("bkof,bkf->bko", grouping.per_row(ref_weight), a)
    totals.dots = totals.dots + grouping.sum_rows((projected * delta).sum(-1))


def _norm_terms(record: _Record, ref: Tensor, grouping: _Grouping, totals: _Totals, K: int) -> None:
    """GroupNorm / InstanceNorm affine: per-row gradients Σ_s δ x̂ and Σ_s δ, [B, K, C] each."""
    step, delta = record.step, record.delta
    B = delta.shape[0]
    per_channel = delta.reshape(B, K, step.weight.numel, -1)
    totals.add_materialised(
        grouping, torch.linalg.vecdot(per_channel, record.inputs.reshape(per_channel.shape)), step.weight.take(ref)
    )
    if step.bias is not None:
        totals.add_materialised(grouping, per_channel.sum(-1), step.bias.take(ref))


def _fast_dot_and_norm(steps, flat, x, y, ref, grouping: _Grouping) -> tuple[Tensor, Tensor]:
    """(⟨g, G⟩, ‖g‖²), both [G, K], by the batched forward, the chained backward to the layer outputs, and
    the per-layer identities."""
    K = flat.shape[0]
    totals = _Totals(x.new_zeros(grouping.count, K), x.new_zeros(grouping.count, K))
    for record in _forward_backward(steps, flat, x, y, grouping.row_weight):
        kind = record.step.kind
        if kind == "conv":
            _conv_terms(record, ref, grouping, totals, K)
        elif kind == "linear":
            _linear_terms(record, ref, grouping, totals)
        else:
            _norm_terms(record, ref, grouping, totals, K)
    return totals.dots, totals.sq_norms


def _cpu_chunks(steps: list[_Step], x: Tensor, K: int, rows_divisible: bool) -> tuple[int, int]:
    """(rows, checkpoints) per chunk of the fast path. On CPU the batched [B, K·C, H, W] activations are
    memory-bound once they outgrow the caches: runs whose widest activation per chunk stays under
    CPU_CHUNK_BYTES were ~2x faster (ConvNet-5 at 32x32 and ConvNet-6 at 64x64, B = 16, K = 4; see
    benchmarks/ops/bench_grad_cosine.py). Checkpoints split first (always exact), then rows (only without
    groups: a group's rows make one gradient). Other devices: one chunk."""
    B = x.shape[0]
    if x.device.type != "cpu":
        return B, K
    channels = max([s.module.out_channels for s in steps if s.kind == "conv"] + [1])
    pair_bytes = channels * math.prod(x.shape[2:]) * x.element_size()  # bounds one (row, checkpoint)'s widest map
    pairs = max(1, CPU_CHUNK_BYTES // pair_bytes)
    if B <= pairs or not rows_divisible:
        return B, max(1, min(K, pairs // B))
    return pairs, 1


def _chunked_dot_and_norm(steps, flat, x, y, ref, groups: Tensor | None, count: int) -> tuple[Tensor, Tensor]:
    """_fast_dot_and_norm over chunks of rows and checkpoints (_cpu_chunks), concatenated: both [G, K].
    ref: [K, P] or [G, K, P]; rows are chunked only without groups (then G = B)."""
    K = flat.shape[0]
    rows, checkpoints = _cpu_chunks(steps, x, K, rows_divisible=groups is None)
    dots, sq_norms = [], []
    for start in range(0, x.shape[0], rows):
        chunk = slice(start, start + rows)
        if groups is None:  # each row its own gradient: G = B, and a [B, K, P] ref is sliced with the rows
            grouping = _Grouping.build(None, x[chunk].shape[0], x.dtype)
            chunk_ref = ref if ref.dim() == 2 else ref[chunk]
        else:  # one chunk of rows
            grouping, chunk_ref = _Grouping.build(groups, count, x.dtype), ref
        parts = [
            _fast_dot_and_norm(
                steps, flat[k : k + checkpoints], x[chunk], y[chunk], chunk_ref[..., k : k + checkpoints, :], grouping
            )
            for k in range(0, K, checkpoints)
        ]
        dots.append(torch.cat([d for d, _ in parts], 1))
        sq_norms.append(torch.cat([n for _, n in parts], 1))
    return torch.cat(dots), torch.cat(sq_norms)


def _fused_pays(steps: list[_Step], x: Tensor, K: int, groups: Tensor | None, graph: bool = True) -> bool:
    """auto's choice between the fused path and torch.func ("func"). Fused, except on CPU in eager mode for a network
    big enough to be FLOP-bound (at least CPU_FUNC_MIN_MACS conv multiply-adds per row; smaller ones are bound by
    per-op overhead, where the fused path's batching wins) where no groups == 1 conv layer takes the Gram ("ghost")
    branch of _ghost_is_cheaper, i.e. where the fused path does the same FLOPs as per-sample gradients (and measured
    no faster on CPU: see the module docstring). Where the maps are too big for all rows to share one CPU chunk
    (_cpu_chunks splits them; never with groups, whose rows make one gradient), the chunking decides: with an input
    gradient the fused path's cache-sized chunks beat torch.func's whole-batch maps (ConvNet-4 w128 64², B 16, K 4:
    2.41 vs 2.92 s, benchmarks/results/grad_cosine_cpu.md), without one they lost to it (ConvNet-6 w128 64²: 859 vs
    744 ms)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or x.dim() != 4:
        return True
    pairs = x.shape[0] if groups is None else len(groups) ** 2  # (i, j) row pairs of the norms (_Grouping)
    h = torch.empty(1, 1, *x.shape[2:], device="meta")  # the spatial size through the layers
    macs, gram = 0, False
    for step in steps:
        if step.kind == "flatten":
            break
        if step.kind == "spatial":
            h = step.fn(h)
        elif step.kind == "conv":
            conv = step.module
            probe = torch.empty(1, 1, *conv.kernel_size, device="meta")
            h = F.conv2d(h, probe, None, conv.stride, conv.padding, conv.dilation)
            positions = h.shape[2] * h.shape[3]
            in_features = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            macs += positions * in_features * conv.out_channels
            gram = gram or (
                conv.groups == 1 and _ghost_is_cheaper(x.shape[0], pairs, K, positions, in_features, conv.out_channels)
            )
    if macs < CPU_FUNC_MIN_MACS:
        return True
    if groups is None and _cpu_chunks(steps, x, K, rows_divisible=True)[0] < x.shape[0]:
        return graph
    return gram


def auto_choice(model: nn.Module, x: Tensor, checkpoints: int, groups: Tensor | None = None, graph: bool = True) -> str:
    """The implementation backend="auto" runs for these arguments: "fused", "func" (see _fused_pays) or
    "reference". graph: whether the result is differentiated (x or ref_grads requires grad)."""
    if resolve_backend("grad_cosine", "auto", x.device) != "fused":
        return resolve_backend("grad_cosine", "auto", x.device)
    try:
        steps = _plan(model)
    except _Unsupported:
        return "func"
    return "fused" if _fused_pays(steps, x, checkpoints, groups, graph) else "func"


def _func_dot_and_norm(model, flat, x, y, ref, grouping: _Grouping) -> tuple[Tensor, Tensor]:
    """Per-row gradients by torch.func, written the way a competent user would: the parameters unflattened once
    per checkpoint outside vmap (views of flat[k]), vmap(grad) per checkpoint, and per parameter tensor its dot
    with the reference and squared norm (no [B, K, P] tensor, no concatenation). Both [G, K]; differentiable
    w.r.t. x (and ref) to any order. "auto" runs it where the fused path does not pay (_fused_pays)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [s.numel() for s in shapes]

    def row_loss(params: dict[str, Tensor], x_row: Tensor, y_row: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (x_row[None],)), y_row[None])

    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))
    ref_parts = ref.split(sizes, -1)  # [K, n] or [G, K, n] each
    dots, sq_norms = [], []
    for k in range(flat.shape[0]):
        params = {n: t.view(s) for n, t, s in zip(names, flat[k].split(sizes), shapes)}
        grads = per_row(params, x, y)  # name -> [B, *shape]
        dot = sq_norm = 0
        for name, part in zip(names, ref_parts):
            rows = grads[name].flatten(1)
            if grouping.row_weight is not None:
                rows = rows * grouping.row_weight[:, None]
            summed = grouping.sum_rows(rows)  # [G, n]
            dot = dot + torch.linalg.vecdot(summed, part[..., k, :])
            sq_norm = sq_norm + torch.linalg.vecdot(summed, summed)
        dots.append(dot)
        sq_norms.append(sq_norm)
    return torch.stack(dots, 1), torch.stack(sq_norms, 1)


def _checked(model, flat_params, x, y, ref_grads, groups, num_groups):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    check_tensor("flat_params", flat_params, ndim=2, finite=False)
    check_tensor("x", x, finite=False)
    check_tensor("y", y, ndim=1, floating=False)
    check_tensor("ref_grads", ref_grads, finite=False)
    if groups is not None:
        check_tensor("groups", groups, ndim=1, floating=False)
    check_nonempty("flat_params", flat_params)
    check_nonempty("x", x)
    check_same_device(x=x, flat_params=flat_params, y=y, ref_grads=ref_grads, groups=groups)
    for name, t in (("flat_params", flat_params), ("x", x), ("ref_grads", ref_grads)):
        check_tensor(name, t)  # NaN / Inf (skipped while compiling or capturing)
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and (x.dim() != 4 or x.shape[1] != first.in_channels):
        raise ValueError(f"x must be [B, {first.in_channels}, H, W] for this model, got shape {tuple(x.shape)}")
    num_params = sum(p.numel() for p in model.parameters())
    if flat_params.shape[1] != num_params:
        raise ValueError(f"flat_params must be [K, {num_params}] for this model, got {tuple(flat_params.shape)}")
    if flat_params.dtype != x.dtype:
        raise ValueError(f"flat_params has dtype {flat_params.dtype} but x has {x.dtype}")
    if y.shape[0] != x.shape[0] or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"y must be [B] = [{x.shape[0]}] integer labels, got {y.dtype} of shape {tuple(y.shape)}")
    K = flat_params.shape[0]
    if groups is None:
        if num_groups is not None:
            raise ValueError(f"num_groups is only meaningful with groups, got num_groups={num_groups!r}")
        count = x.shape[0]
    else:
        if (
            groups.shape[0] != x.shape[0]
            or groups.dtype == torch.bool
            or groups.is_floating_point()
            or groups.is_complex()
        ):
            raise ValueError(
                f"groups must be [B] = [{x.shape[0]}] integer group ids, got {groups.dtype} of shape {tuple(groups.shape)}"
            )
        groups = groups.to(torch.int64)
        count = _group_count(groups, ref_grads, num_groups)
        if _checks._value_checks and not _checks._capturing():
            sizes = torch.bincount(groups.clamp(0, count), minlength=count + 1)
            if bool((groups < 0).any()) or bool(sizes[count] > 0) or bool((sizes[:count] == 0).any()):
                raise ValueError(
                    f"groups must number its groups 0..G-1 = 0..{count - 1}, each used by at least one row"
                )
    if ref_grads.shape not in ((K, num_params), (count, K, num_params)):
        raise ValueError(
            f"ref_grads must be [K, P] = [{K}, {num_params}] or [G, K, P] = [{count}, {K}, {num_params}], "
            f"got {tuple(ref_grads.shape)}"
        )
    return y.to(torch.int64), ref_grads.to(x.dtype), groups, count


def _group_count(groups: Tensor, ref_grads: Tensor, num_groups: int | None) -> int:
    """G: num_groups if given, else the leading dim of [G, K, P] ref_grads, else (eager only) groups.max() + 1."""
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        return num_groups
    if ref_grads.dim() == 3:
        return ref_grads.shape[0]
    if _checks._capturing():
        raise ValueError(
            "num_groups must be given with groups and [K, P] ref_grads under torch.compile or CUDA-graph capture"
        )
    return int(groups.max()) + 1


def _dot_and_norm(op, model, flat_params, x, y, ref_grads, groups, num_groups, backend) -> tuple[Tensor, Tensor]:
    """grad_dot_and_norm, run by the implementation OP_BACKENDS[op] (or backend) picks: both [G, K]."""
    y, ref_grads, groups, count = _checked(model, flat_params, x, y, ref_grads, groups, num_groups)
    chosen = resolve_backend(op, backend, x.device)
    if chosen == "reference":
        return reference.grad_dot_and_norm(model, flat_params, x, y, ref_grads, groups)
    flat = flat_params.detach()
    if chosen == "fused":
        try:  # a model the fast path cannot run, planned or chunked, falls back to torch.func with a warning
            steps = _plan(model)
            graph = torch.is_grad_enabled() and (x.requires_grad or ref_grads.requires_grad)
            if backend == "auto" and not _fused_pays(steps, x, flat.shape[0], groups, graph):
                chosen = "func"
            else:
                dots, sq_norms = _chunked_dot_and_norm(steps, flat, x, y, ref_grads, groups, count)
        except _Unsupported as reason:
            warnings.warn(f"grad_cosine: falling back to torch.func (slow): {reason}", stacklevel=3)
            chosen = "func"
    if chosen == "func":
        dots, sq_norms = _func_dot_and_norm(model, flat, x, y, ref_grads, _Grouping.build(groups, count, x.dtype))
    return dots, sq_norms.clamp_min(torch.finfo(sq_norms.dtype).tiny).sqrt()


def grad_dot_and_norm(
    model: nn.Module,
    flat_params: Tensor,
    x: Tensor,
    y: Tensor,
    ref_grads: Tensor,
    groups: Tensor | None = None,
    *,
    num_groups: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(⟨g_ik, ref_grads[k]⟩, ‖g_ik‖) with g_ik = ∇_θ CE(f_θk(x_i), y_i).

    Differentiable w.r.t. x and ref_grads (to any order); flat_params is treated as a constant.

    Args:
        model: the architecture (its own parameter values are not used).
        flat_params: [K, P] parameter sets in `parameters_to_vector(model.parameters())` order, x's dtype.
        x: [B, ...] inputs.
        y: [B] integer labels.
        ref_grads: [K, P], or [G, K, P] with one reference per gradient (G = B without groups).
        groups: None or [B] group ids 0..G-1 (each used): the rows of a group give ONE gradient, that of their
            averaged CE.
        num_groups: G, needed only with groups and [K, P] ref_grads under torch.compile (eager reads
            groups.max() + 1).
        backend: "auto" (OP_BACKENDS: "fused", or on CPU "func" where the fused path does not pay: see the module
            docstring), "fused" (the fast path; models it cannot run fall back to torch.func with a warning),
            "func" (torch.func vmap(grad) per checkpoint) or "reference" (one autograd.grad per sample and set).

    Returns:
        (dots, norms), both [B, K] (or [G, K] with groups).

    Raises:
        ValueError: if an argument has the wrong type, shape, dtype or device, contains NaN/Inf, or groups /
            num_groups are inconsistent.
    """
    return _dot_and_norm("grad_dot_and_norm", model, flat_params, x, y, ref_grads, groups, num_groups, backend)


def grad_cosine(
    model: nn.Module,
    flat_params: Tensor,
    x: Tensor,
    y: Tensor,
    ref_grads: Tensor,
    groups: Tensor | None = None,
    eps: float = GRAD_COS_EPS,
    *,
    num_groups: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """cos(∇_θ CE(f_θk(x_i), y_i), ref_grads[k]).

    Both norms are clamped at eps like F.cosine_similarity. Differentiable w.r.t. x (IGD's double backward) and
    ref_grads.

    Args:
        model: see `grad_dot_and_norm`.
        flat_params: [K, P] (see `grad_dot_and_norm`).
        x: [B, ...] inputs.
        y: [B] integer labels.
        ref_grads: [K, P] or [G, K, P].
        groups: None or [B] group ids 0..G-1 (see `grad_dot_and_norm`).
        eps: norm clamp.
        num_groups: see `grad_dot_and_norm`.
        backend: see `grad_dot_and_norm`.

    Returns:
        [B, K] cosines (or [G, K] with groups).

    Raises:
        ValueError: as `grad_dot_and_norm`.
    """
    dots, norms = _dot_and_norm("grad_cosine", model, flat_params, x, y, ref_grads, groups, num_groups, backend)
    ref = ref_grads.to(dots.dtype).norm(dim=-1).clamp_min(eps)  # [K] or [G, K]
    return dots / (norms.clamp_min(eps) * ref)

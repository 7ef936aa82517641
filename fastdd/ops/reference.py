"""Plain PyTorch references of every fastdd op: the specification the fast backends are tested against.

Readable first, fast never. Each function here is differentiable by autograd where the op is, so
references also give the gradients (first and second order) the fast paths must match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

# The cosine epsilons, one per op family: cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps)). Every op of a family
# (its reference, Triton, C++ and CUDA kernels) takes its value from here.
COS_EPS = 1e-6  # memory / deviation family (max_cosine, most_similar_index, CosineMemory), as the authors' code
GRAD_COS_EPS = 1e-8  # grad_cosine family (grad_cosine, grad_dot_and_norm), as F.cosine_similarity


def normalize_rows(x: Tensor, eps: float = COS_EPS) -> Tensor:
    """x / max(‖x‖, eps) row-wise. x: [..., D]."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def valid_rows(memory: Tensor, count: Tensor | int | None) -> Tensor:
    """Boolean mask [M] of the rows < count (all rows when count is None)."""
    rows = torch.arange(memory.shape[0], device=memory.device)
    if count is None:
        return torch.ones_like(rows, dtype=torch.bool)
    return rows < torch.as_tensor(count, device=memory.device)


# --------------------------------------------------------------------------- cosine memory
def max_cosine(query: Tensor, memory: Tensor, count: Tensor | int | None = None, eps: float = COS_EPS):
    """Most similar memory row for every query.

    query: [B, D], memory: [M, D] (rows >= count ignored) -> (values [B], indices [B] int64).
    values[b] = max_j cos(query[b], memory[j]); with no valid row values = 0 and indices = 0.
    Computed in the promoted dtype of query and memory (e.g. a bfloat16 memory with float32 queries).
    Ties go to the lowest index. Differentiable w.r.t. query (the argmax is piecewise constant).
    """
    dtype = torch.promote_types(query.dtype, memory.dtype)
    cos = normalize_rows(query.to(dtype), eps) @ normalize_rows(memory.to(dtype), eps).T  # [B, M]
    mask = valid_rows(memory, count)
    cos = cos.masked_fill(~mask, float("-inf"))
    values, indices = cos.max(dim=1)
    any_valid = mask.any()
    return torch.where(any_valid, values, torch.zeros_like(values)), torch.where(any_valid, indices, 0)


def most_similar_index(memory: Tensor, count: Tensor | int | None = None, eps: float = COS_EPS) -> Tensor:
    """Index (0-dim int64) of the valid row with the largest summed cosine similarity to all valid rows
    (itself included): SAM's pop rule. memory: [M, D].

    score_i = m̂_i · Σ_{j < count} m̂_j, as the kernels compute it: row by row, with the sum taken in row order
    (a cumulative sum), so the scores depend on the valid rows only (not on the rows past count) and equal
    rows score exactly equal. Exact ties go to the lowest index (argmax).
    """
    count = torch.as_tensor(memory.shape[0] if count is None else count, device=memory.device)
    unit = normalize_rows(memory, eps)
    last = (count.clamp(1, memory.shape[0]) - 1).view(1)
    unit_sum = unit.cumsum(0).index_select(0, last)  # [1, D]: Σ of the valid rows
    scores = (unit * unit_sum).sum(dim=1).masked_fill(~valid_rows(memory, count), float("-inf"))
    return scores.argmax()


# --------------------------------------------------------------------------- Mercer distance
def mercer_kernel(a: Tensor, b: Tensor, kernel: str, *, sigma: float, degree: int, coef0: float) -> Tensor:
    """Gram matrix K(a_i, b_j) in float32 or wider. a: [B, D], b: [N, D] -> [B, N]."""
    dim = a.shape[1]
    if kernel == "linear":
        return a @ b.T
    if kernel == "rbf":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return torch.exp(-sq.clamp_min(0) / (2 * sigma**2))
    if kernel == "poly":
        return (a @ b.T / dim + coef0) ** degree
    raise ValueError(f"kernel must be 'linear', 'rbf' or 'poly', got {kernel!r}")


def mercer_self_kernel(a: Tensor, kernel: str, *, degree: int, coef0: float) -> Tensor:
    """K(a_i, a_i) for every row. a: [B, D] -> [B]."""
    if kernel == "rbf":
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)
    sq = (a * a).sum(1)
    return sq if kernel == "linear" else (sq / a.shape[1] + coef0) ** degree


def default_sigma(dim: int) -> float:
    """RBF bandwidth when none is given: √D (so ‖x−y‖²/2σ² is a per-feature mean)."""
    return math.sqrt(dim)


def mercer_distance(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    *,
    sigma: float | None = None,
    degree: int = 2,
    coef0: float = 1.0,
    y_sqnorm: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Mean kernel-induced distance of each x to the set y (DAP's representativeness energy).

    x: [B, D], y: [N, D] -> [B]:  out_b = (1/N) Σ_n √(max(K(x,x) + K(y,y) − 2K(x,y), 0) + eps).
    Kernels: linear x·y; rbf exp(−‖x−y‖²/2σ²) (σ = √D by default); poly (x·y/D + coef0)^degree.
    y_sqnorm [N] (‖y_n‖²) is only a cache and does not change the result. Computed in float32 (or x's
    dtype if wider) whatever y's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xa, ya = x.to(acc), y.to(acc)
    sigma = default_sigma(x.shape[1]) if sigma is None else sigma
    kxy = mercer_kernel(xa, ya, kernel, sigma=sigma, degree=degree, coef0=coef0)
    kxx = mercer_self_kernel(xa, kernel, degree=degree, coef0=coef0)
    kyy = mercer_self_kernel(ya, kernel, degree=degree, coef0=coef0)
    sq = (kxx[:, None] + kyy[None, :] - 2 * kxy).clamp_min(0)
    return torch.sqrt(sq + eps).mean(dim=1)


def mercer_coefficients(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    *,
    sigma: float | None = None,
    degree: int = 2,
    coef0: float = 1.0,
    eps: float = 1e-12,
) -> tuple[Tensor, Tensor]:
    """mercer_distance's backward coefficients, as the fused kernels store them: (coef [B, N], alpha [B]) with
    coef_bn = −∂out_b/∂(x_b·y_n) and alpha_b = 2 ∂out_b/∂‖x_b‖², so ∂out_b/∂x_b = alpha_b·x_b − Σ_n coef_bn·y_n.
    Gradients of clamp_min(0) pass where its input >= 0 (like torch's). Same dtype rules as mercer_distance."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa, ya = x.to(acc), y.to(acc)
    dim, rows = x.shape[1], y.shape[0]
    sigma = default_sigma(dim) if sigma is None else sigma
    dot = xa @ ya.T  # [B, N]
    x_sq, y_sq = (xa * xa).sum(1)[:, None], (ya * ya).sum(1)[None, :]
    if kernel == "linear":
        squared, d_dot, d_x_sq = x_sq + y_sq - 2 * dot, 1.0, 1.0
    elif kernel == "rbf":
        sq_dist = x_sq + y_sq - 2 * dot
        kxy = torch.exp(-sq_dist.clamp_min(0) / (2 * sigma**2))
        squared = 2 - 2 * kxy
        d_dot = d_x_sq = torch.where(sq_dist >= 0, kxy / sigma**2, 0.0)
    elif kernel == "poly":
        uxx, uxy, uyy = x_sq / dim + coef0, dot / dim + coef0, y_sq / dim + coef0
        squared = uxx**degree + uyy**degree - 2 * uxy**degree
        d_dot, d_x_sq = degree / dim * uxy ** (degree - 1), degree / dim * uxx ** (degree - 1)
    else:
        raise ValueError(f"kernel must be 'linear', 'rbf' or 'poly', got {kernel!r}")
    scale = torch.where(squared >= 0, 1 / (rows * torch.sqrt(squared.clamp_min(0) + eps)), 0.0)  # ∂out/∂squared · 2
    return d_dot * scale, (d_x_sq * scale).sum(1)


# --------------------------------------------------------------------------- D3HR group sampling
def group_skewness(groups: Tensor) -> Tensor:
    """D3HR's skewness of each member of each group, as the authors' `skewness_batch` computes it
    (lin-zhao-resoLve/D3HR `generation/group_sampling.py` lines 170-177): every feature is standardised ACROSS THE
    GROUP'S MEMBERS (mean and unbiased std over the ipc axis, no epsilon), then each member's z³ is summed over its
    features and scaled by n / ((n − 1)(n − 2)) with n = D, the feature count (sic).

    groups: [G, ipc, D] (ipc >= 2: one member has no std) -> [G, ipc].
    """
    n = groups.shape[-1]
    z = (groups - groups.mean(1, keepdim=True)) / groups.std(1, keepdim=True)
    return (z**3).sum(-1) * (n / ((n - 1) * (n - 2)))


def group_score(groups: Tensor, mean: Tensor, std: Tensor, weights=(1.0, 1.0, 0.1)) -> Tensor:
    """D3HR score of candidate groups (lower is better), the authors' `evaluate_distribution_batch` (D3HR
    `generation/group_sampling.py` lines 213-227). groups: [G, ipc, D]; mean, std: [D] -> [G].

    w0·‖mean over members − mean‖ + w1·‖std over members (unbiased) − std‖ + w2·‖`group_skewness`‖ (norms over
    features, the skew's over members). With ipc = 1 the std and skew terms are left out: both need an unbiased std
    over one member, which is undefined (the authors' script gets NaN for every group there and fails).
    """
    ipc = groups.shape[1]
    score = weights[0] * (groups.mean(1) - mean).norm(dim=-1)
    if ipc > 1:
        score = score + weights[1] * (groups.std(1) - std).norm(dim=-1)
        score = score + weights[2] * group_skewness(groups).norm(dim=-1)
    return score


def group_sampling(
    mean: Tensor,
    std: Tensor,
    ipc: int,
    n_candidates: int,
    *,
    generator: torch.Generator | None = None,
    weights=(1.0, 1.0, 0.1),
    chunk: int = 1024,
):
    """Best of n_candidates groups of ipc latents drawn from N(mean, diag(std²)).

    mean, std: [D] -> (group [ipc, D], score 0-dim). Candidates are drawn in chunks of `chunk` groups
    as randn(chunk, ipc, D) * std + mean from `generator`, in order, so the result is reproducible. A candidate
    whose score is NaN (a feature on which all its members are equal: no skewness) is never chosen.
    """
    best_score = torch.tensor(float("inf"), device=mean.device)
    best_group = None
    for start in range(0, n_candidates, chunk):
        n = min(chunk, n_candidates - start)
        noise = torch.randn(n, ipc, mean.shape[0], generator=generator, device=mean.device, dtype=mean.dtype)
        groups = noise * std + mean
        scores = group_score(groups, mean, std, weights).nan_to_num(nan=math.inf)  # undefined skew: never chosen
        i = scores.argmin()
        if best_group is None or scores[i] < best_score:
            best_score, best_group = scores[i].clone(), groups[i].clone()  # not views that keep the chunk alive
    return best_group, best_score


# --------------------------------------------------------------------------- gradient cosine
def unflatten_params(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Split a flat parameter vector ([P], `parameters_to_vector` order) into model's named shapes."""
    params, offset = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return params


def per_sample_grads(model: nn.Module, flat_params: Tensor, x: Tensor, y: Tensor, create_graph: bool = True) -> Tensor:
    """∇_θ CE(f_θ(x_i), y_i) for every sample and parameter set, one autograd.grad at a time.

    flat_params: [K, P], x: [B, C, H, W], y: [B] -> [B, K, P] (differentiable w.r.t. x when create_graph).
    """
    out = []
    for i in range(x.shape[0]):
        row = []
        for k in range(flat_params.shape[0]):
            theta = flat_params[k].detach().requires_grad_(True)
            logits = functional_call(model, unflatten_params(model, theta), (x[i : i + 1],))
            loss = F.cross_entropy(logits, y[i : i + 1])
            (g,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
            row.append(g)
        out.append(torch.stack(row))
    return torch.stack(out)


def group_mean(rows: Tensor, groups: Tensor | None) -> Tensor:
    """Mean of the rows of each group: rows [B, ...], groups [B] ids 0..G-1 -> [G, ...] (rows when None)."""
    if groups is None:
        return rows
    sizes = torch.bincount(groups)
    weights = (1.0 / sizes[groups]).to(rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
    return rows.new_zeros(len(sizes), *rows.shape[1:]).index_add(0, groups, rows * weights)


def grad_dot_and_norm(
    model: nn.Module, flat_params: Tensor, x: Tensor, y: Tensor, ref_grads: Tensor, groups: Tensor | None = None
):
    """(⟨g_jk, G_jk⟩, ‖g_jk‖), both [B, K] ([G, K] with groups), g_ik = ∇_θ CE(f_θk(x_i), y_i).

    ref_grads: [K, P] (G_jk = ref_grads[k]) or [G, K, P] (one reference per gradient). groups: None or [B]
    ids 0..G-1; the rows of a group give one gradient, that of their averaged CE (= the mean of their g_ik).
    """
    g = group_mean(per_sample_grads(model, flat_params, x, y), groups)  # [G, K, P]
    return (g * ref_grads).sum(-1), g.norm(dim=-1)


def grad_cosine(
    model: nn.Module,
    flat_params: Tensor,
    x: Tensor,
    y: Tensor,
    ref_grads: Tensor,
    groups: Tensor | None = None,
    eps: float = GRAD_COS_EPS,
) -> Tensor:
    """cos(g_jk, G_jk) -> [B, K] ([G, K] with groups); norms clamped at eps like F.cosine_similarity."""
    dots, norms = grad_dot_and_norm(model, flat_params, x, y, ref_grads, groups)
    return dots / (norms.clamp_min(eps) * ref_grads.norm(dim=-1).clamp_min(eps))

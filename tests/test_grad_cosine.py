"""fastdd.ops.grad_cosine / grad_dot_and_norm: the fast path (batched-over-K forward, per-layer identities)
against per-sample gradients from torch.func (vmap of grad, computed here) and against reference.grad_cosine;
the input gradient IGD needs (double backward), second order (gradcheck / gradgradcheck, float64), both
branches of the ghost-vs-materialise choice, more layer types, the torch.func fallback, torch.compile, and
bad input."""

from __future__ import annotations

import contextlib
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector

from fastdd.models import ConvNet
from fastdd.ops import grad_cosine, grad_dot_and_norm, reference

grad_cosine_module = importlib.import_module("fastdd.ops.grad_cosine")  # the module, not the function
RTOL = 1e-4


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """max |actual − expected| ≤ rtol · max |expected| (relative to the tensor's scale)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= rtol * max(scale, 1e-12), f"max error {error:.3g} vs scale {scale:.3g}"


def parameter_sets(make_model, K: int, dtype=torch.float32) -> torch.Tensor:
    """K independently initialised parameter vectors of make_model(): [K, P]."""
    return torch.stack([parameters_to_vector(make_model().parameters()) for _ in range(K)]).detach().to(dtype)


def vmap_grads(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients by torch.func, independent of fastdd: [B, K, P], differentiable w.r.t. x."""
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(theta, x_row, y_row):
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x_row[None],)), y_row[None])

    return torch.stack([vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y) for theta in flat], 1)


def group_rows(rows: torch.Tensor, groups: torch.Tensor | None, count: int) -> torch.Tensor:
    """Mean of the rows of each group: [B, ...] -> [G, ...]."""
    if groups is None:
        return rows
    one_hot = F.one_hot(groups, count).to(rows.dtype)  # [B, G]
    return torch.einsum("bg,b...->g...", one_hot / one_hot.sum(0), rows)


# depth, width, im_size, K, B, channels, groups, ref_grads layout
CASES = [
    (1, 4, 8, 1, 1, 1, None, "KP"),
    (2, 8, 16, 3, 4, 3, None, "GKP"),
    (3, 16, 32, 4, 5, 3, None, "KP"),
    (3, 4, 8, 2, 2, 1, None, "GKP"),
    (2, 6, 8, 2, 5, 1, [0, 1, 0, 2, 1], "KP"),
    (3, 8, 16, 4, 4, 3, [1, 0, 0, 1], "GKP"),
    (1, 16, 8, 2, 3, 3, [0, 0, 0], "GKP"),
]


def make_case(depth, width, im_size, K, B, channels, groups, layout, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    make = lambda: ConvNet(channels, 5, width=width, depth=depth, im_size=im_size)  # noqa: E731
    model = make().eval()
    flat = parameter_sets(make, K, dtype)
    x = torch.randn(B, channels, im_size, im_size, dtype=dtype)
    y = torch.randint(0, 5, (B,))
    groups = None if groups is None else torch.tensor(groups)
    count = B if groups is None else int(groups.max()) + 1
    ref = torch.randn((K, flat.shape[1]) if layout == "KP" else (count, K, flat.shape[1]), dtype=dtype) * 0.01
    return model, flat, x, y, ref, groups, count


@pytest.mark.parametrize("backend", ["auto", "fused", "func"])
@pytest.mark.parametrize(
    "case", CASES, ids=[f"d{c[0]}w{c[1]}s{c[2]}K{c[3]}B{c[4]}c{c[5]}{'g' if c[6] else ''}{c[7]}" for c in CASES]
)
def test_matches_vmap_grad_and_reference(case, backend):
    model, flat, x, y, ref, groups, count = make_case(*case)
    x.requires_grad_(True)
    per_grad = group_rows(vmap_grads(model, flat, x, y), groups, count)  # [G, K, P]
    expected_dots, expected_norms = (per_grad * ref).sum(-1), per_grad.norm(dim=-1)
    expected_cos = F.cosine_similarity(per_grad, ref.expand_as(per_grad), dim=-1, eps=1e-8)

    dots, norms = grad_dot_and_norm(model, flat, x, y, ref, groups, backend=backend)
    cos = grad_cosine(model, flat, x, y, ref, groups, backend=backend)
    assert cos.shape == (count, flat.shape[0])
    assert_rel(dots, expected_dots)
    assert_rel(norms, expected_norms)
    assert_rel(cos, expected_cos)
    reference_cos = reference.grad_cosine(model, flat, x, y, ref, groups)
    assert_rel(cos, reference_cos)

    # IGD's double backward: d(Σ weighted cosines)/dx against the reference's and torch.func's
    weights = torch.randn_like(cos)
    (fast_dx,) = torch.autograd.grad((cos * weights).sum(), x)
    (reference_dx,) = torch.autograd.grad((reference_cos * weights).sum(), x)
    (vmap_dx,) = torch.autograd.grad((expected_cos * weights).sum(), x)
    assert fast_dx.abs().max() > 0
    assert_rel(fast_dx, reference_dx)
    assert_rel(fast_dx, vmap_dx)


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("layout", ["KP", "GKP"])
def test_ghost_and_materialised_norms(monkeypatch, ghost, grouped, layout):
    """Force each branch of the per-layer ghost-vs-materialise choice; both must give the reference."""
    model, flat, x, y, ref, groups, count = make_case(2, 6, 8, 3, 4, 3, [0, 1, 1, 0] if grouped else None, layout)
    choices = []

    def forced(*args):
        choices.append(args)
        return ghost

    monkeypatch.setattr(grad_cosine_module, "_ghost_is_cheaper", forced)
    x.requires_grad_(True)
    cos = grad_cosine(model, flat, x, y, ref, groups, backend="fused")
    assert len(choices) == 2  # asked once per conv layer
    expected = reference.grad_cosine(model, flat, x, y, ref, groups)
    assert_rel(cos, expected)
    weights = torch.randn_like(cos)
    assert_rel(torch.autograd.grad((cos * weights).sum(), x)[0], torch.autograd.grad((expected * weights).sum(), x)[0])


def test_cost_model_picks_both_branches():
    """The cost model materialises large maps and uses Grams for small ones (ConvNet-6 at 256: both)."""
    cheaper = grad_cosine_module._ghost_is_cheaper
    assert not cheaper(16, 16, 4, 128 * 128, 1152, 128)
    assert cheaper(16, 16, 4, 4 * 4, 1152, 128)


@pytest.mark.parametrize("budget_pairs", [1, 3, 8])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("layout", ["KP", "GKP"])
def test_cpu_chunks_give_the_unchunked_values_and_gradients(monkeypatch, budget_pairs, grouped, layout):
    """A CPU budget of `budget_pairs` (row, checkpoint) pairs splits the fast path into chunks (checkpoints
    first, rows only without groups); values and input gradients equal the reference's."""
    model, flat, x, y, ref, groups, count = make_case(2, 6, 8, 3, 5, 3, [0, 1, 1, 0, 2] if grouped else None, layout)
    pair_bytes = 6 * 8 * 8 * x.element_size()  # widest conv output (6 channels) × the 8×8 map
    monkeypatch.setattr(grad_cosine_module, "CPU_CHUNK_BYTES", budget_pairs * pair_bytes)
    chunks = []
    fast = grad_cosine_module._fast_dot_and_norm

    def recording(steps, flat, x, *args):
        chunks.append((x.shape[0], flat.shape[0]))
        return fast(steps, flat, x, *args)

    monkeypatch.setattr(grad_cosine_module, "_fast_dot_and_norm", recording)
    x.requires_grad_(True)
    cos = grad_cosine(model, flat, x, y, ref, groups, backend="fused")
    expected = reference.grad_cosine(model, flat, x, y, ref, groups)
    assert_rel(cos, expected)
    weights = torch.randn_like(cos)
    assert_rel(torch.autograd.grad((cos * weights).sum(), x)[0], torch.autograd.grad((expected * weights).sum(), x)[0])
    expected_chunks = {  # (rows, checkpoints) per chunk: 5 rows, 3 checkpoints
        (1, False): [(1, 1)] * 15,
        (3, False): [(3, 1)] * 3 + [(2, 1)] * 3,
        (8, False): [(5, 1)] * 3,
        (1, True): [(5, 1)] * 3,
        (3, True): [(5, 1)] * 3,
        (8, True): [(5, 1)] * 3,
    }
    assert chunks == expected_chunks[budget_pairs, grouped]


def test_cpu_chunks_split_checkpoints_before_rows(monkeypatch):
    """Whole groups of checkpoints go together while every row fits; then single checkpoints and fewer rows
    (all rows with groups); no chunking off the CPU."""
    steps = grad_cosine_module._plan(ConvNet(3, 5, width=8, depth=2, im_size=16))
    x = torch.zeros(4, 3, 16, 16)
    pair_bytes = 8 * 16 * 16 * 4  # widest conv output (8 channels) × the 16×16 map, fp32
    chunks = grad_cosine_module._cpu_chunks
    monkeypatch.setattr(grad_cosine_module, "CPU_CHUNK_BYTES", 9 * pair_bytes)
    assert chunks(steps, x, 6, rows_divisible=True) == (4, 2)
    monkeypatch.setattr(grad_cosine_module, "CPU_CHUNK_BYTES", 2 * pair_bytes)
    assert chunks(steps, x, 6, rows_divisible=True) == (2, 1)
    assert chunks(steps, x, 6, rows_divisible=False) == (4, 1)
    assert chunks(steps, x.to("meta"), 6, rows_divisible=True) == (4, 6)


class Scale(nn.Module):
    """A layer the fast path does not know: x · s with a learnable per-channel s."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.scale


def layer_zoo(kind: str) -> nn.Module:
    if kind == "instance_affine_maxpool":
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            nn.InstanceNorm2d(6, affine=True),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.GroupNorm(2, 8, affine=False),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8, 5),
        )
    if kind == "nonaffine_grouped_conv":
        return nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.InstanceNorm2d(4),
            nn.Tanh(),
            nn.Conv2d(4, 6, 3, padding=1, groups=2),
            nn.GroupNorm(3, 6),
            nn.SiLU(),
            nn.Sequential(nn.AvgPool2d(2), nn.Flatten()),
            nn.Linear(6 * 3 * 3, 5, bias=False),
        )
    if kind == "unsupported":
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Scale(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["instance_affine_maxpool", "nonaffine_grouped_conv"])
@pytest.mark.parametrize("grouped", [False, True])
def test_layer_types_on_the_fast_path(kind, grouped):
    torch.manual_seed(1)
    model = layer_zoo(kind).eval()
    flat = parameter_sets(lambda: layer_zoo(kind), 2)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    groups = torch.tensor([0, 1, 0, 1]) if grouped else None
    ref = torch.randn(2, flat.shape[1]) * 0.01
    with _no_warnings():
        cos = grad_cosine(model, flat, x, y, ref, groups, backend="fused")
    expected = reference.grad_cosine(model, flat, x, y, ref, groups)
    assert_rel(cos, expected)
    weights = torch.randn_like(cos)
    assert_rel(torch.autograd.grad((cos * weights).sum(), x)[0], torch.autograd.grad((expected * weights).sum(), x)[0])


@pytest.mark.parametrize(
    "depth, width, im_size, fused",
    [
        (2, 8, 16, True),  # overhead-bound: the fused path's batching wins
        (3, 64, 32, False),
        (3, 128, 32, False),
        (3, 128, 64, True),  # 64² maps: the rows are split into CPU chunks, which win with an input gradient
        (4, 128, 64, True),
        (5, 128, 32, True),
        (6, 128, 64, True),
    ],
)
def test_auto_steps_aside_to_torch_func_where_no_layer_takes_the_gram_branch(depth, width, im_size, fused):
    """CPU auto: the fused path for small (overhead-bound) networks, where some conv layer's norm takes the Gram
    identity (ConvNet-5 w128 32², ConvNet-6 w128 64²: IGD's shapes) and, with an input gradient, where the rows are
    split into CPU chunks (64² maps); torch.func elsewhere; off the CPU always the fused path."""
    model = ConvNet(3, 10, width=width, depth=depth, im_size=im_size)
    x = torch.zeros(16, 3, im_size, im_size)
    assert grad_cosine_module._fused_pays(grad_cosine_module._plan(model), x, 4, None) is fused
    # without an input gradient the fused path must also keep all 16 rows in one CPU chunk (32², not 64²)
    no_graph = grad_cosine_module._fused_pays(grad_cosine_module._plan(model), x, 4, None, graph=False)
    assert no_graph is (fused and (im_size == 32 or width < 64))
    # with groups the rows are never chunked: the Gram rule alone, with or without an input gradient
    groups = torch.arange(16) // 2
    gram = fused and (im_size == 32 or depth == 6 or width < 64)
    for graph in (True, False):
        assert grad_cosine_module._fused_pays(grad_cosine_module._plan(model), x, 4, groups, graph=graph) is gram
    assert grad_cosine_module._fused_pays(grad_cosine_module._plan(model), x.to("meta"), 4, None)  # off the CPU


def test_auto_runs_torch_func_with_the_same_values(monkeypatch):
    calls = []
    func = grad_cosine_module._func_dot_and_norm
    monkeypatch.setattr(grad_cosine_module, "_func_dot_and_norm", lambda *a: calls.append(1) or func(*a))
    torch.manual_seed(0)
    make = lambda: ConvNet(3, 5, width=64, depth=3, im_size=32)  # noqa: E731
    model, flat = make().eval(), parameter_sets(make, 2)
    x, y = torch.randn(2, 3, 32, 32, requires_grad=True), torch.tensor([0, 3])
    ref = torch.randn(2, flat.shape[1]) * 0.01
    cos = grad_cosine(model, flat, x, y, ref)
    assert calls == [1]
    fused = grad_cosine(model, flat, x, y, ref, backend="fused")
    assert_rel(cos, fused)
    assert_rel(torch.autograd.grad(cos.sum(), x)[0], torch.autograd.grad(fused.sum(), x)[0])


@contextlib.contextmanager
def _no_warnings():
    """Any warning (e.g. the torch.func fallback's) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("model_kind", ["unsupported_layer", "no_layers"])
@pytest.mark.parametrize("grouped", [False, True])
def test_unsupported_module_falls_back_with_warning(model_kind, grouped):
    torch.manual_seed(2)
    if model_kind == "unsupported_layer":
        make, name = (lambda: layer_zoo("unsupported")), "Scale"
    else:
        make, name = (lambda: ConvNetWithoutLayers(3, 5, width=4, depth=1, im_size=8)), "ConvNetWithoutLayers"
    model = make().eval()
    flat = parameter_sets(make, 2)
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    y = torch.randint(0, 5, (3,))
    ref = torch.randn(2, flat.shape[1]) * 0.01
    groups = torch.tensor([1, 0, 1]) if grouped else None
    with pytest.warns(UserWarning, match=name):
        cos = grad_cosine(model, flat, x, y, ref, groups)
    expected = reference.grad_cosine(model, flat, x, y, ref, groups)
    assert_rel(cos, expected)
    assert_rel(torch.autograd.grad(cos.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


class ConvNetWithoutLayers(ConvNet):
    layers = None  # hides ConvNet.layers(): the fast path cannot walk it


def test_without_autograd_and_backend_reference():
    model, flat, x, y, ref, groups, count = make_case(2, 4, 8, 2, 3, 3, None, "KP")
    expected = reference.grad_cosine(model, flat, x, y, ref)
    with torch.no_grad():
        cos = grad_cosine(model, flat, x, y, ref)
    assert cos.grad_fn is None
    assert_rel(cos, expected.detach())
    assert_rel(grad_cosine(model, flat, x, y, ref, backend="reference"), expected)


# --------------------------------------------------------------------------- second order, float64
def tiny_float64(groups=None):
    torch.manual_seed(3)
    make = lambda: ConvNet(1, 3, width=2, depth=1, im_size=4)  # noqa: E731
    model = make().eval().double()
    flat = parameter_sets(make, 2, torch.float64)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2])
    ref = (torch.randn(2, flat.shape[1], dtype=torch.float64) * 0.1).requires_grad_(True)
    return model, flat, x, y, ref


def test_gradcheck_reference():
    model, flat, x, y, ref = tiny_float64()
    assert torch.autograd.gradcheck(lambda x, r: reference.grad_cosine(model, flat, x, y, r), (x, ref), fast_mode=True)


@pytest.mark.parametrize("backend", ["fused", "func"])
@pytest.mark.parametrize("grouped", [False, True])
def test_gradcheck_and_gradgradcheck_fast_path(grouped, backend):
    model, flat, x, y, ref = tiny_float64()
    groups = torch.tensor([0, 0]) if grouped else None
    fn = lambda x, r: grad_cosine(model, flat, x, y, r, groups, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, ref), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x: fn(x, ref.detach()), (x,), fast_mode=True)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize(
    "grouping, backend",
    [("none", "aot_eager"), ("per_group_refs", "inductor"), ("num_groups", "aot_eager")],
)
def test_torch_compile_fullgraph(grouping, backend):
    """One graph (fullgraph=True fails on any graph break), values and input gradients equal eager."""
    torch._dynamo.reset()
    groups = None if grouping == "none" else [0, 1, 0, 1]
    model, flat, x, y, ref, groups, count = make_case(
        2, 4, 8, 2, 4, 3, groups, "GKP" if grouping == "per_group_refs" else "KP"
    )
    num_groups = count if grouping == "num_groups" else None
    fn = lambda x: grad_cosine(model, flat, x, y, ref, groups, num_groups=num_groups)  # noqa: E731
    x.requires_grad_(True)
    compiled = torch.compile(fn, fullgraph=True, backend=backend)(x)
    eager = fn(x)
    assert_rel(compiled, eager)
    weights = torch.randn_like(eager)
    assert_rel(
        torch.autograd.grad((compiled * weights).sum(), x)[0], torch.autograd.grad((eager * weights).sum(), x)[0]
    )


# --------------------------------------------------------------------------- bad input
def _valid_args() -> dict:
    model, flat, x, y, ref, _, _ = make_case(1, 4, 8, 2, 3, 3, None, "KP")
    return dict(model=model, flat_params=flat, x=x, y=y, ref_grads=ref, groups=None)


_nan = lambda t: t.clone().index_fill_(-1, torch.tensor([0]), float("nan"))  # noqa: E731
BAD_INPUTS = {  # "<argument> <what is wrong>": how the valid argument is spoiled
    "model": lambda v: v.state_dict(),
    "flat_params K/P": lambda v: v[:, :-1],
    "flat_params ndim": lambda v: v[0],
    "flat_params dtype": lambda v: v.double(),
    "flat_params device": lambda v: v.to("meta"),
    "flat_params NaN": _nan,
    "ref_grads K": lambda v: torch.cat([v, v]),
    "ref_grads P": lambda v: v[:, 1:],
    "ref_grads NaN": _nan,
    "ref_grads device": lambda v: v.to("meta"),
    "x channels": lambda v: v[:, :1],
    "x ndim": lambda v: v.flatten(1),
    "x integer": lambda v: v.long(),
    "x NaN": _nan,
    "y float": lambda v: v.float(),
    "y length": lambda v: v[:2],
    "y ndim": lambda v: v[:, None],
    "groups length": lambda v: torch.tensor([0, 1]),
    "groups float": lambda v: torch.tensor([0.0, 1.0, 0.0]),
    "groups negative": lambda v: torch.tensor([0, -1, 0]),
    "groups gap": lambda v: torch.tensor([0, 2, 0]),
    "groups device": lambda v: torch.tensor([0, 1, 0], device="meta"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    argument, args = case.split()[0], _valid_args()
    args[argument] = BAD_INPUTS[case](args[argument])
    with pytest.raises(ValueError, match=argument):
        grad_cosine(**args)


def test_bad_num_groups_and_backend():
    args = _valid_args()
    args["model"] = ConvNet(3, 5, width=4, depth=1, im_size=8)
    with pytest.raises(ValueError, match="num_groups"):
        grad_cosine(**args, num_groups=2)
    with pytest.raises(ValueError, match="num_groups"):
        grad_cosine(**{**args, "groups": torch.tensor([0, 1, 0])}, num_groups=0)
    with pytest.raises(ValueError, match="groups"):  # ids 0..2 but num_groups says 2
        grad_cosine(**{**args, "groups": torch.tensor([0, 1, 2])}, num_groups=2)
    with pytest.raises(ValueError, match="backend"):
        grad_cosine(**args, backend="triton")

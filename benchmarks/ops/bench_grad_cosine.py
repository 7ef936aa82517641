"""Benchmark of fastdd.ops.grad_cosine with its input gradient (IGD's double backward) against the strongest
ways a user would compute the same thing: the [B, K] per-sample gradient cosines cos(∇_θ CE(f_θk(x_i), y_i), G_k)
and the gradient of their sum w.r.t. x.

Methods (every one is checked against torch.func's values and input gradient before it is timed):
- fastdd (auto): grad_cosine as installed, backend "auto" (the fused path, or torch.func where the fused path
  does not pay), + one autograd.grad to x. "fastdd fused (forced)" shows the fused path alone.
- torch.func: written competently: per checkpoint the parameters unflattened once (a dict of views) outside vmap,
  vmap(grad(loss)) per checkpoint, the cosine per checkpoint from per-tensor dots and norms, one autograd.grad to x.
- authors' loop: IGD's official code: per image and checkpoint a flat-parameter autograd.grad(create_graph=True)
  and a backward to x.
- Opacus GradSampleModule (per-sample gradients by hooks, loss_reduction="sum"): its grad_sample tensors are
  detached (no graph back to x), so Opacus cannot give IGD's second-order input gradient: it is timed on the
  cosines alone (op "cosines only"), against fastdd and torch.func without the input gradient.
- BackPACK BatchGrad: with create_graph=True its grad_batch stays in the graph, but the input gradient through it is
  wrong (off by about its own magnitude against torch.func's; tests/test_bench_ops.py shows it), so BackPACK cannot
  give IGD's input gradient either; and it has no GroupNorm extension (ConvNet's GroupNorm affine parameters silently
  get no per-sample gradient). It is timed on the cosines alone of a ConvNet without GroupNorm (conv → ReLU →
  AvgPool), the one thing it computes right.

Shapes: ConvNet width 64/128, depth 3-6, 32² and 64², B = 16, K = 4 (IGD: ConvNet-5 w128 32² and ConvNet-6 w128
64²; ConvNet-6 needs ≥ 64 px). The work of a shape is counted with torch.utils.flop_counter on the plain computation
(the authors' loop for one image and checkpoint, × B·K) and put against the machine's fp32 peak measured in the same
run (the faster of a matmul and a 3×3 convolution); peak memory is the most one call's allocations hold at once; on
CPU, the share of fastdd's and torch.func's operator time spent in convolutions (torch.profiler) says what bounds
them.

Opacus and BackPACK are optional (left out when missing). Install them without their dependencies (BackPACK's pull
torchvision and a torch of their choosing): pip install --no-deps opacus backpack-for-pytorch opt-einsum einops
unfoldNd.

Run: python benchmarks/ops/bench_grad_cosine.py [--device cuda] [--repeats 5] [--quick] [--allow-reference]
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector, vector_to_parameters

if __package__ in (None, ""):  # run as a script: fastdd as installed, then this repository's benchmarks/ first
    with contextlib.suppress(ImportError):  # (a pip package may ship a top-level "benchmarks" too)
        import fastdd  # noqa: F401
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import conv_time_share, count_flops, op_benchmark_main, time_methods  # noqa: E402
from fastdd.models import ConvNet  # noqa: E402
from fastdd.ops import grad_cosine, value_checks  # noqa: E402
from fastdd.ops.grad_cosine import auto_choice  # noqa: E402
from fastdd.ops.reference import GRAD_COS_EPS, unflatten_params  # noqa: E402

CLASSES = 10
# (depth, width, image size, batch, checkpoints)
SHAPES = [(3, 64, 32, 16, 4), (3, 128, 32, 16, 4), (5, 128, 32, 16, 4), (4, 128, 64, 16, 4), (6, 128, 64, 16, 4)]
IGD_SHAPES = [(5, 128, 32, 16, 4), (6, 128, 64, 16, 4)]
QUICK_SHAPES = [(2, 8, 16, 4, 2)]
OPS = ["grad_cosine"]


class ConvNetNoNorm(nn.Sequential):
    """depth × [conv3×3 → ReLU → AvgPool2d(2)] → Flatten → Linear: the ConvNet BackPACK's BatchGrad can handle."""

    def __init__(self, width: int, depth: int, im_size: int):
        layers, channels = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
            channels = width
        super().__init__(*layers, nn.Flatten(), nn.Linear(width * (im_size >> depth) ** 2, CLASSES))


def make_case(shape, device: torch.device | str = "cpu", norm: bool = True, dtype: torch.dtype = torch.float32):
    depth, width, im_size, batch, checkpoints = shape
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # the models' parameters
    try:
        return _make_case(depth, width, im_size, batch, checkpoints, device, norm)
    finally:
        torch.set_default_dtype(torch.float32)


def _make_case(depth, width, im_size, batch, checkpoints, device, norm):

    def make():
        return (
            ConvNet(3, CLASSES, width=width, depth=depth, im_size=im_size)
            if norm
            else ConvNetNoNorm(width, depth, im_size)
        )

    model = make().eval().to(device)
    flat = torch.stack([parameters_to_vector(make().parameters()) for _ in range(checkpoints)]).detach().to(device)
    x = torch.randn(batch, 3, im_size, im_size, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    ref = torch.randn(checkpoints, flat.shape[1], device=device) * 1e-2
    return model, flat, x, y, ref


def label(shape, norm: bool = True) -> str:
    depth, width, im_size, batch, checkpoints = shape
    return f"ConvNet-{depth}{'' if norm else '-nonorm'} w{width} {im_size}² B{batch} K{checkpoints}"


# --------------------------------------------------------------------------- the methods
def fastdd_method(backend: str, input_grad: bool):
    def run(model, flat, x, y, ref):
        if not input_grad:
            return grad_cosine(model, flat, x, y, ref, backend=backend).detach(), None
        x = x.detach().requires_grad_(True)
        cos = grad_cosine(model, flat, x, y, ref, backend=backend)
        return cos.detach(), torch.autograd.grad(cos.sum(), x)[0]

    return run


def torch_func_method(input_grad: bool):
    """torch.func written competently (see the module docstring)."""

    def run(model, flat, x, y, ref):
        x = x.detach().requires_grad_(input_grad)
        names = [n for n, _ in model.named_parameters()]

        def loss(params, x_row, y_row):
            return F.cross_entropy(functional_call(model, params, (x_row[None],)), y_row[None])

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        cosines = []
        for k in range(flat.shape[0]):
            params = unflatten_params(model, flat[k])  # views, made once per checkpoint, outside vmap
            refs = unflatten_params(model, ref[k])
            grads = per_sample(params, x, y)  # name -> [B, *shape]
            dot = sum(torch.linalg.vecdot(grads[n].flatten(1), refs[n].flatten()) for n in names)
            sq_norm = sum(grads[n].flatten(1).square().sum(1) for n in names)
            norm = sq_norm.sqrt().clamp_min(GRAD_COS_EPS) * ref[k].norm().clamp_min(GRAD_COS_EPS)
            cosines.append(dot / norm)
        cos = torch.stack(cosines, 1)
        return cos.detach(), torch.autograd.grad(cos.sum(), x)[0] if input_grad else None

    return run


def authors_loop(model, flat, x, y, ref):
    """IGD's official code: one image, one checkpoint per autograd.grad(create_graph=True) and per backward."""
    x = x.detach().requires_grad_(True)
    cos, x_grad = x.new_empty(x.shape[0], flat.shape[0]), torch.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(flat.shape[0]):
            theta = flat[k].detach().clone().requires_grad_(True)
            logits = functional_call(model, unflatten_params(model, theta), (x[i : i + 1],))
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), theta, create_graph=True)
            c = F.cosine_similarity(g, ref[k], dim=0, eps=GRAD_COS_EPS)
            x_grad += torch.autograd.grad(c, x)[0]
            cos[i, k] = c.detach()
    return cos, x_grad


class OpacusCosines:
    """Opacus GradSampleModule per checkpoint: load θ_k, forward, Σ CE backward, cosines of grad_sample."""

    def __init__(self, model: nn.Module):
        from opacus import GradSampleModule

        # Opacus records activations in training mode only (ConvNet has no dropout / batch norm: same function)
        self.module = GradSampleModule(_copy(model).train(), batch_first=True, loss_reduction="sum")

    def __call__(self, model, flat, x, y, ref):
        params = list(self.module.parameters())
        cosines = []
        for k in range(flat.shape[0]):
            vector_to_parameters(flat[k], params)
            for p in params:
                p.grad = p.grad_sample = None
            F.cross_entropy(self.module(x), y, reduction="sum").backward()
            per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], 1)  # [B, P]
            cosines.append(F.cosine_similarity(per_sample, ref[k][None], dim=1, eps=GRAD_COS_EPS))
        return torch.stack(cosines, 1).detach(), None


class BackpackCosines:
    """BackPACK BatchGrad per checkpoint with create_graph=True, the cosines, one autograd.grad to x."""

    def __init__(self, model: nn.Module, input_grad: bool):
        from backpack import extend

        self.module, self.loss = extend(_copy(model)), extend(nn.CrossEntropyLoss(reduction="sum"))
        self.input_grad = input_grad

    def __call__(self, model, flat, x, y, ref):
        from backpack import backpack
        from backpack.extensions import BatchGrad

        x = x.detach().requires_grad_(self.input_grad)
        params = list(self.module.parameters())
        cosines = []
        for k in range(flat.shape[0]):
            vector_to_parameters(flat[k], params)
            for p in params:
                p.grad = None
            with backpack(BatchGrad()):
                self.loss(self.module(x), y).backward(create_graph=self.input_grad)
            per_sample = torch.cat([p.grad_batch.flatten(1) for p in params], 1)  # [B, P]
            cosines.append(F.cosine_similarity(per_sample, ref[k][None], dim=1, eps=GRAD_COS_EPS))
        cos = torch.stack(cosines, 1)
        for p in params:  # the graph that create_graph left on the parameters
            p.grad = p.grad_batch = None
        return cos.detach(), torch.autograd.grad(cos.sum(), x)[0] if self.input_grad else None


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def methods_for(model: nn.Module, variant: str, x: torch.Tensor, checkpoints: int) -> dict[str, tuple[str, object]]:
    """{name: (kind, fn(model, flat, x, y, ref) -> (cos, x_grad or None))} of one variant: "input grad",
    "cosines only" or "no norm" (cosines only, on ConvNetNoNorm)."""
    auto = f"fastdd grad_cosine (auto: {auto_choice(model, x, checkpoints, graph=variant == 'input grad')})"
    if variant in ("cosines only", "no norm"):
        found = {
            auto: ("fastdd", fastdd_method("auto", False)),
            "torch.func vmap(grad), params once": ("baseline", torch_func_method(False)),
        }
        name, library = (
            ("BackPACK BatchGrad", "backpack") if variant == "no norm" else ("Opacus GradSampleModule", "opacus")
        )
        if importlib.util.find_spec(library) is not None:  # optional: see the module docstring
            found[name] = ("baseline", BackpackCosines(model, False) if library == "backpack" else OpacusCosines(model))
        return found
    found = {
        auto: ("fastdd", fastdd_method("auto", True)),
        "fastdd fused (forced)": ("fastdd-forced", fastdd_method("fused", True)),
        "torch.func vmap(grad), params once": ("baseline", torch_func_method(True)),
        "authors' loop": ("baseline", authors_loop),
    }
    return found


# op name -> (variant, shapes of the full sweep)
OPS_AND_SHAPES = {
    "grad_cosine + input grad": ("input grad", SHAPES),
    "grad_cosine, cosines only (no input grad)": ("cosines only", IGD_SHAPES),
    "grad_cosine, cosines only, ConvNet without GroupNorm": ("no norm", IGD_SHAPES),
}


def work_flops(model, flat, x, y, ref, input_grad: bool) -> float:
    """The FLOPs of the computation done the plain way: torch.utils.flop_counter on the authors' loop for one
    (image, checkpoint) pair (forward, parameter gradient with its graph, and with input_grad the backward of the
    cosine to the image), times B·K. The same work for every method of a shape (the counter miscounts the grouped
    convolutions of the batched methods' backward, so their own counts are not used)."""
    one = (flat[:1], x[:1], y[:1], ref[:1])
    if input_grad:
        flops = count_flops(lambda: authors_loop(model, *one))
    else:
        flops = count_flops(lambda: torch.func.grad(_one_loss(model, one[1], one[2]))(one[0][0]))
    return float(flops) * x.shape[0] * flat.shape[0]


def _one_loss(model, x, y):
    def loss(theta):
        return F.cross_entropy(functional_call(model, unflatten_params(model, theta), (x,)), y)

    return loss


def check(shape, variant: str) -> None:
    """Every method computes torch.func's cosines (and input gradient, where it gives one), in float64 (float32's
    rounding in the long sums of the input gradient is not what is checked) on the shape's network with B = K = 2,
    before it is timed: to 1e-9 (cosines) and 1e-6 of the gradient's scale."""
    depth, width, im_size = shape[:3]
    args = make_case((depth, width, im_size, 2, 2), "cpu", variant != "no norm", torch.float64)
    expected_cos, expected_grad = torch_func_method(True)(*args)
    for name, (_, fn) in methods_for(args[0], variant, args[2], 2).items():
        cos, x_grad = fn(*args)
        assert torch.allclose(cos, expected_cos, atol=1e-9, rtol=1e-6), f"{name}: cosines differ"
        if x_grad is not None:
            error = (x_grad - expected_grad).abs().max()
            assert error <= 1e-6 * expected_grad.abs().max(), f"{name}: input gradient differs ({error:.3g})"


def run(device: torch.device, repeats: int, quick: bool) -> tuple[list[dict], str]:
    records = []
    warnings.filterwarnings("ignore", module="opacus|backpack")
    with value_checks(False):  # as in a sampling loop: no NaN scans / host syncs
        for op, (variant, shapes) in OPS_AND_SHAPES.items():
            norm = variant != "no norm"
            for shape in QUICK_SHAPES if quick else shapes:
                args = make_case(shape, device, norm)
                check(shape, variant)
                methods = methods_for(args[0], variant, args[2], shape[4])
                flops = work_flops(*args, input_grad=variant == "input grad")
                bound = {n: (kind, lambda f=f, a=args: f(*a)) for n, (kind, f) in methods.items()}
                for record in time_methods(op, label(shape, norm), bound, device, repeats, flops):
                    kind, fn = bound[record["method"]]
                    if kind == "fastdd" or record["method"].startswith("torch.func"):  # what bounds it
                        share = conv_time_share(fn, device)  # convolutions or the rest (None off CPU)
                        if share is not None:
                            record["conv_time_pct"] = share
                    records.append(record)
    return records, NOTES


NOTES = """
Opacus cannot give IGD's input gradient (its grad_sample is detached from the graph), so it is compared on the
cosines alone. BackPACK's BatchGrad keeps grad_batch in the graph with create_graph=True, but the input gradient
through it is wrong (checked here: off by about its own magnitude), and it has no GroupNorm extension: it is compared
on the cosines alone of a ConvNet without GroupNorm. FLOPs: torch.utils.flop_counter on the plain computation (the
authors' loop for one image and checkpoint, × B·K), the same for every method of a shape; % of roofline = (FLOPs /
measured fp32 peak, the faster of matmul and 3×3 convolution) / time; conv_time_pct = the share of the operator time
spent in aten convolution ops (torch.profiler, one call): the rest is everything else (elementwise passes, the fused
path's Gram matmuls and unfold, the linear layer, dispatch). auto (fastdd.ops.grad_cosine._fused_pays) runs the fused
path where some conv layer's per-sample gradient norm takes the Gram identity (it then does fewer FLOPs) and, with an
input gradient, where the rows are split into CPU chunks (64² maps); torch.func elsewhere ("auto: func": the same
algorithm as the torch.func baseline, so about 1×), and without an input gradient wherever the rows would be split.
"""


def main() -> None:
    op_benchmark_main(run, "grad_cosine", __doc__, OPS)


if __name__ == "__main__":
    main()

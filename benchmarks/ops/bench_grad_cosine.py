"""Benchmark of fastdd.ops.grad_cosine with its input gradient (IGD's double backward) against what a user
would write otherwise. Every method computes the same thing: the [B, K] per-sample gradient cosines
cos(∇_θ CE(f_θk(x_i), y_i), G_k) and the gradient of their sum w.r.t. x.

- fastdd: grad_cosine (batched over K, per-layer identities) + one autograd.grad to x.
- torch.func: per checkpoint vmap(grad) per-sample gradients [B, K, P], F.cosine_similarity, autograd to x.
- authors' loop: per image and checkpoint a flat-parameter autograd.grad(create_graph=True) and a backward
  to x (IGD's official code, one image per call, one backward per checkpoint).

Configs: ConvNet (width 128), B = 16, K = 4. ConvNet-6 needs inputs of at least 64×64 (six 2× poolings), so
CPU runs ConvNet-5 at 32×32 and ConvNet-6 at 64×64; CUDA adds ConvNet-6 at 256×256 (the IGD setting).

Run: PYTHONPATH=. python -m benchmarks.ops.bench_grad_cosine [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector

from benchmarks.common import device_name, run_op_benchmark, timeit
from fastdd.models import ConvNet
from fastdd.ops import grad_cosine, value_checks
from fastdd.ops.reference import unflatten_params

BATCH, CHECKPOINTS, WIDTH, CLASSES = 16, 4, 128, 10
CPU_CONFIGS = [(5, 32), (6, 64)]  # (depth, image size)
CUDA_CONFIGS = [(6, 64), (6, 256)]


def fastdd_cosines(model, flat, x, y, ref) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    cos = grad_cosine(model, flat, x, y, ref)
    return cos.detach(), torch.autograd.grad(cos.sum(), x)[0]


def vmap_cosines(model, flat, x, y, ref) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)

    def sample_loss(theta, x_row, y_row):
        return F.cross_entropy(functional_call(model, unflatten_params(model, theta), (x_row[None],)), y_row[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    grads = torch.stack([per_sample(theta, x, y) for theta in flat], 1)  # [B, K, P]
    cos = F.cosine_similarity(grads, ref[None], dim=-1)
    return cos.detach(), torch.autograd.grad(cos.sum(), x)[0]


def authors_loop_cosines(model, flat, x, y, ref) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    cos, x_grad = torch.empty(x.shape[0], flat.shape[0], device=x.device), torch.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(flat.shape[0]):
            theta = flat[k].detach().clone().requires_grad_(True)
            logits = functional_call(model, unflatten_params(model, theta), (x[i : i + 1],))
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), theta, create_graph=True)
            c = F.cosine_similarity(g, ref[k], dim=0)
            x_grad += torch.autograd.grad(c, x)[0]
            cos[i, k] = c.detach()
    return cos, x_grad


METHODS = {"fastdd": fastdd_cosines, "torch.func vmap(grad)": vmap_cosines, "authors' loop": authors_loop_cosines}


def _setup(depth: int, im_size: int, device: torch.device):
    torch.manual_seed(0)
    make = lambda: ConvNet(3, CLASSES, width=WIDTH, depth=depth, im_size=im_size)  # noqa: E731
    model = make().eval().to(device)
    flat = torch.stack([parameters_to_vector(make().parameters()) for _ in range(CHECKPOINTS)]).detach().to(device)
    x = torch.randn(BATCH, 3, im_size, im_size, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    ref = torch.randn(CHECKPOINTS, flat.shape[1], device=device) * 1e-2
    return model, flat, x, y, ref


def _interleaved_cpu_times(methods: dict, args, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (median wall s, median process CPU s)}, the methods taking turns in every repeat so that a
    shared machine's changing load hits them alike."""
    wall, cpu = {name: [] for name in methods}, {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            method(*args)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in methods}


def run(device: torch.device | str = "cpu", repeats: int = 3) -> list[dict]:
    device = torch.device(device)
    records = []
    configs = CUDA_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    with value_checks(False):  # as in a sampling loop: no NaN scans / host syncs
        for depth, im_size in configs:
            args = _setup(depth, im_size, device)
            shape = f"ConvNet-{depth} w{WIDTH} {im_size}x{im_size} B={BATCH} K={CHECKPOINTS}"
            expected_cos, expected_grad = fastdd_cosines(*args)
            for name, method in METHODS.items():  # also the warm-up; the methods must agree
                cos, x_grad = method(*args)
                assert torch.allclose(cos, expected_cos, atol=1e-4), name
                assert (x_grad - expected_grad).abs().max() <= 1e-3 * expected_grad.abs().max(), name
            if device.type == "cuda":
                times = {
                    name: (timeit(lambda m=m, a=args: m(*a), device, repeats), None) for name, m in METHODS.items()
                }
            else:
                times = _interleaved_cpu_times(METHODS, args, repeats)
            for name, (seconds, cpu_seconds) in times.items():
                record = {"op": "grad_cosine + input grad", "backend": name, "shape": shape, "median_ms": seconds * 1e3}
                record["fastdd_speedup"] = seconds / times["fastdd"][0]
                if cpu_seconds is not None:  # process CPU time: less sensitive to other jobs on the machine
                    record["median_cpu_ms"] = cpu_seconds * 1e3
                    record["fastdd_cpu_speedup"] = cpu_seconds / times["fastdd"][1]
                records.append({**record, "device": device_name(device)})
    return records


def main() -> None:
    run_op_benchmark(run, "grad_cosine", __doc__.splitlines()[0], repeats=3)


if __name__ == "__main__":
    main()

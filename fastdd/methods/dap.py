"""`--method dap`: DAP's run wiring (the math is in `fastdd.guidance.dap`).

φ is the output of DiT block `block` (default depth // 2); real features are computed once per class from the
encoder-mean latents at t = 0 (or noised to the current t) and kept in bf16 on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..guidance.dap import KERNELS, T_MODES, JLProjection, MercerGuidance, RealFeatures
from ..options import documented, option, parse_range
from .base import Cost, Method, MethodSetup, Models, RealData, RunSpec, check, check_pool, guided_range, real_latents

DAP_GUIDED_STEP_CALLS = 3.0  # a guided step in model forwards (the backward through the first blocks; digits)
DAP_GAMMA_PRESETS = {"digits": 0.1}  # pixel-space prior: γ = 1 turns the digits into noise (checked visually)


@documented
@dataclass(frozen=True)
class DAPOptions:
    """DAP (Su et al.): Mercer-kernel representativeness guidance on DiT block features."""

    block: int | None = option(
        None,
        "DiT block whose output is φ (default: depth // 2, i.e. 14 for DiT-XL/2 (paper: "
        "blocks 4-12 work best, e.g. 8), 2 for the digits prior)",
        flag="--dap-block",
    )
    gamma: float | None = option(
        None,
        "guidance scale γ >= 0 (default 1.0, the paper's (0.5 and 1 tried); digits: "
        "0.1, as 0.3 already leaves pixel noise on the 16×16 pixel prior)",
        flag="--dap-gamma",
    )
    kernel: str = option("linear", "Mercer kernel (paper: linear)", flag="--dap-kernel", choices=KERNELS)
    t_mode: str = option(
        "zero",
        "real features at t = 0 (cached per class) or of real images noised to the current t",
        flag="--dap-t-mode",
        choices=T_MODES,
    )
    proj_dim: int = option(
        0,
        "Johnson-Lindenstrauss projection of the features to this many dimensions (0: none; "
        "e.g. 1439 keeps 1300 distances within √(1±0.2) with probability 0.99)",
        flag="--dap-proj-dim",
    )
    range: tuple[int, int] = option(
        (0, 49), "guided steps low,high for 50 steps (default: every step)", flag="--dap-range"
    )


class ModelLabelsDiT(nn.Module):
    """The prior seen with local class indices: forward_features(x, t, y_local, block) runs the DiT with the model
    label of each local class. The label table lives on `device`, so a step does no host-to-device copy."""

    def __init__(self, model: nn.Module, class_labels: list[int], device: torch.device | str = "cpu"):
        super().__init__()
        self.model = model
        self.register_buffer("table", torch.as_tensor(class_labels, dtype=torch.long, device=device), persistent=False)
        self.depth, self.grid_size, self.hidden_size = model.depth, model.grid_size, model.hidden_size

    def forward_features(self, x: Tensor, t: Tensor, y: Tensor, block_index: int) -> Tensor:
        """x: [B, C, h, w], t: [B], y: [B] local classes -> block output [B, tokens, hidden]."""
        return self.model.forward_features(x, t, self.table[y], block_index)


def build(options: DAPOptions, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """γ-scaled gradient of the mean kernel distance of φ(x_t) to the class's real features."""
    prior = models.prior
    block = prior.depth // 2 if options.block is None else options.block
    gamma = DAP_GAMMA_PRESETS.get(data.dataset, 1.0) if options.gamma is None else options.gamma
    check(
        0 <= block < prior.depth,
        f"--dap-block must be in 0..{prior.depth - 1} (the prior has {prior.depth} blocks), got {block}",
    )
    check(math.isfinite(gamma) and gamma >= 0, f"--dap-gamma must be >= 0, got {gamma}")
    check(options.proj_dim >= 0, f"--dap-proj-dim must be >= 0, got {options.proj_dim}")
    check(
        not (options.proj_dim and options.kernel == "poly"),
        "--dap-proj-dim: the projection bound covers distances; use --dap-kernel linear or rbf",
    )
    low, high = guided_range(spec, parse_range(options.range, "--dap-range"))
    check_pool(spec, data, 1, "DAP", ipc_bound=False)
    dtype = torch.bfloat16 if models.device.type == "cuda" else torch.float32
    params = {
        "block": block,
        "gamma": gamma,
        "kernel": options.kernel,
        "t_mode": options.t_mode,
        "projection_dim": options.proj_dim or None,
        "guided_range": [low, high],
        "feature_dtype": str(dtype).removeprefix("torch."),
    }
    counts = data.class_counts()

    def real_feature_seconds(probe, count: int) -> float:
        """The real features of the classes left: one block-feature forward per 64 images."""
        return math.ceil(count / 64) * probe.model_call(min(count, 64)) if count else 0.0

    cost = Cost(
        guided_steps=high - low + 1,
        guided_step_calls=DAP_GUIDED_STEP_CALLS,
        state=lambda probe, classes: real_feature_seconds(probe, sum(counts[c] for c in classes)),
    )
    if spec.dry_run:
        return MethodSetup(params=params, cost=cost)
    model = ModelLabelsDiT(prior, models.class_labels, models.device)
    projection = None
    if options.proj_dim:
        projection = JLProjection(
            prior.grid_size**2 * prior.hidden_size, options.proj_dim, seed=spec.seed, device=models.device
        )
    real = RealFeatures(
        model,
        real_latents(spec, models, data),
        None,
        block,
        options.t_mode,
        diffusion=models.diffusion,
        seed=spec.seed,
        projection=projection,
        dtype=dtype,
        max_cached_classes=max(8, min(spec.class_batch, data.num_classes)),
    )
    guidance = MercerGuidance(model, real, block, options.kernel, gamma, low=low, high=high)
    return MethodSetup(guidances=[guidance], params=params, cost=cost)


METHOD = Method(
    "dap",
    DAPOptions,
    build,
    needs_data=True,
    help="DAP (Su et al.): Mercer-kernel representativeness guidance on DiT block features",
)

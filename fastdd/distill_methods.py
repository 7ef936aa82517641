"""`fastdd distill --method {dap,mgd3,d3hr,sam,igds}`: builders on the method registry (fastdd/methods.py).

Every method has its own `--<method>-...` options. Defaults are the SPEC / paper values for ImageNet-scale DiT
runs; where the digits default (16×16 pixel prior, 4 blocks, 20 sampling steps is typical) needs another value
the default is `None` and a per-dataset preset is used (listed in each option's help). Step ranges are given for
50 sampling steps and rescaled to --steps (`MethodContext.guided_range`). Every resolved hyper-parameter is
recorded in the manifest (MethodSetup.params). Expensive per-run state (SAM's fine-tuned weights, the IGDS
estimator, D3HR's class statistics, MGD3's modes) is cached in the run's state folder, written atomically, so a
resumed run does not redo it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .data.atomic import save_safetensors_atomic
from .methods import MethodContext, MethodSetup, parse_range, register_method, rescale_index


# ----------------------------------------------------------------------------------------- shared helpers
def _digest(params: dict) -> str:
    """A short hash of JSON-able params (names a cache file after what it depends on)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _class_counts(ctx: MethodContext) -> list[int]:
    _, labels = ctx.data.load()
    return torch.bincount(labels, minlength=ctx.num_classes).tolist()


def _check_pool(ctx: MethodContext, minimum: int, why: str, ipc_bound: bool = True) -> None:
    """Every class has >= minimum real images and, with ipc_bound (methods that pick IPC items from the class),
    >= --ipc of them (ValueError naming --data / --ipc otherwise)."""
    for name, count in zip(ctx.class_names, _class_counts(ctx)):
        _check(count > 0, f"--data: class {name!r} has no real images")
        _check(count >= minimum, f"--data: class {name!r} has {count} real images, {why} needs at least {minimum}")
        _check(not ipc_bound or ctx.args.ipc <= count, f"--ipc {ctx.args.ipc} is larger than class {name!r} ({count} real images)")


def real_latents(ctx: MethodContext, sample: bool = False) -> tuple[Tensor, Tensor]:
    """(latents [N, C, h, w] on the model device, local labels [N]) of the real images: the codec's encoder mean
    (sample=False) or a draw seeded with --seed (sample=True). VAE latents are cached in the state folder."""
    from .guidance.mode import encode_latents
    from .models.vae import PixelCodec

    images, labels = ctx.data.load()
    device, codec = ctx.models.device, ctx.models.codec
    if isinstance(codec, PixelCodec):
        return images.to(device), labels
    cache = ctx.state_dir / f"latents_{'sample' if sample else 'mean'}_seed{ctx.args.seed}.safetensors"
    if cache.is_file():
        return load_file(str(cache))["latents"].to(device), labels
    generator = torch.Generator(device=device).manual_seed(ctx.args.seed) if sample else None
    latents = encode_latents(codec, images.to(device), sample=sample, generator=generator, progress=ctx.progress)
    save_safetensors_atomic({"latents": latents}, cache)
    return latents, labels


class ModelLabelsDiT(nn.Module):
    """The prior seen with local class indices: forward_features(x, t, y_local, block) runs the DiT with the
    model label of each local class (DAP's truncated forward and real features use class indices). The label
    table lives on `device`, so a step does no host-to-device copy."""

    def __init__(self, model: nn.Module, class_labels: list[int], device: torch.device | str = "cpu"):
        super().__init__()
        self.model = model
        self.register_buffer("table", torch.as_tensor(class_labels, dtype=torch.long, device=device), persistent=False)
        self.depth, self.grid_size, self.hidden_size = model.depth, model.grid_size, model.hidden_size

    def forward_features(self, x: Tensor, t: Tensor, y: Tensor, block_index: int) -> Tensor:
        return self.model.forward_features(x, t, self.table[y], block_index)


def _default_sample(ctx: MethodContext, sampler, labels, ids, latent_shape, device) -> Tensor:
    """The CLI's own sampling call (ancestral, or DDIM with --sampler ddim)."""
    if ctx.args.sampler == "ddim":
        return sampler.ddim_sample(labels, ids, latent_shape, device, eta=ctx.args.eta, progress=False)
    return sampler.sample(labels, ids, latent_shape, device, progress=False)


# ----------------------------------------------------------------------------------------- DAP
DAP_GAMMA_PRESETS = {"digits": 0.1}  # pixel-space prior: γ = 1 turns the digits into noise (checked visually)

def add_dap_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dap (Mercer-kernel representativeness guidance, Su et al.)")
    group.add_argument("--dap-block", type=int, default=None,
                       help="DiT block whose output is φ (default: depth // 2, i.e. 14 for DiT-XL/2 (paper: blocks 4-12 "
                       "work best, e.g. 8), 2 for the digits prior)")  # fmt: skip
    group.add_argument("--dap-gamma", type=float, default=None,
                       help="guidance scale γ >= 0 (default 1.0, the paper's (0.5 and 1 tried); digits: 0.1, as 0.3 "
                       "already leaves pixel noise on the 16×16 pixel prior)")  # fmt: skip
    group.add_argument("--dap-kernel", default="linear", choices=("linear", "rbf", "poly"), help="Mercer kernel (paper: linear)")
    group.add_argument("--dap-t-mode", default="zero", choices=("zero", "noised"),
                       help="real features at t = 0 (cached per class) or of real images noised to the current t")  # fmt: skip
    group.add_argument("--dap-proj-dim", type=int, default=0,
                       help="Johnson-Lindenstrauss projection of the features to this many dimensions (0: none; "
                       "e.g. 1439 keeps 1300 distances within √(1±0.2) with probability 0.99)")  # fmt: skip
    group.add_argument("--dap-range", default="0,49", help="guided steps low,high for 50 steps (default: every step)")


def build_dap(ctx: MethodContext) -> MethodSetup:
    """DAP: γ-scaled gradient of the mean kernel distance of φ(x_t) to the class's real features."""
    from .guidance.mercer import JLProjection, MercerGuidance, RealFeatures

    args, prior = ctx.args, ctx.models.prior
    block = prior.depth // 2 if args.dap_block is None else args.dap_block
    gamma = DAP_GAMMA_PRESETS.get(ctx.dataset, 1.0) if args.dap_gamma is None else args.dap_gamma
    _check(0 <= block < prior.depth, f"--dap-block must be in 0..{prior.depth - 1} (the prior has {prior.depth} blocks), got {block}")
    _check(math.isfinite(gamma) and gamma >= 0, f"--dap-gamma must be >= 0, got {gamma}")
    _check(args.dap_proj_dim >= 0, f"--dap-proj-dim must be >= 0, got {args.dap_proj_dim}")
    _check(not (args.dap_proj_dim and args.dap_kernel == "poly"), "--dap-proj-dim: the projection bound covers distances; use --dap-kernel linear or rbf")
    low, high = ctx.guided_range(*parse_range(args.dap_range, "--dap-range"))
    _check_pool(ctx, 1, "DAP", ipc_bound=False)
    dtype = torch.bfloat16 if ctx.models.device.type == "cuda" else torch.float32
    params = {"block": block, "gamma": gamma, "kernel": args.dap_kernel, "t_mode": args.dap_t_mode,
              "projection_dim": args.dap_proj_dim or None, "guided_range": [low, high],
              "feature_dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    if ctx.dry_run:
        return MethodSetup(params=params)
    model = ModelLabelsDiT(prior, ctx.models.class_labels, ctx.models.device)
    projection = None
    if args.dap_proj_dim:
        projection = JLProjection(prior.grid_size**2 * prior.hidden_size, args.dap_proj_dim, seed=args.seed, device=ctx.models.device)
    latents, labels = real_latents(ctx)
    real = RealFeatures(model, latents, labels, block, args.dap_t_mode, diffusion=ctx.models.diffusion, seed=args.seed,
                        projection=projection, dtype=dtype, max_cached_classes=max(8, min(args.class_batch, ctx.num_classes)))  # fmt: skip
    guidance = MercerGuidance(model, real, block, args.dap_kernel, gamma, low=low, high=high)
    return MethodSetup(guidances=[guidance], params=params)


# ----------------------------------------------------------------------------------------- MGD3
def add_mgd3_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mgd3 (mode-guided diffusion)")
    group.add_argument("--mgd3-lambda", type=float, default=0.1, help="mode guidance scale λ >= 0 (SPEC: 0.1)")
    group.add_argument("--mgd3-stop", type=int, default=25,
                       help="last unguided step for 50 steps: steps above it are guided (SPEC: 25, i.e. 24 of 50); -1 guides all")  # fmt: skip
    group.add_argument("--mgd3-kmeans-seed", type=int, default=0, help="k-means++ seed (the authors' random_state=0)")


def build_mgd3(ctx: MethodContext) -> MethodSetup:
    """MGD3: k-means (IPC modes) of each class's real latents; mode j pulls image j on the early steps."""
    from .guidance.mode import ModeGuidance, fit_modes

    args = ctx.args
    _check(math.isfinite(args.mgd3_lambda) and args.mgd3_lambda >= 0, f"--mgd3-lambda must be >= 0, got {args.mgd3_lambda}")
    _check(-1 <= args.mgd3_stop <= 49, f"--mgd3-stop must be in -1..49, got {args.mgd3_stop}")
    stop = -1 if args.mgd3_stop == -1 else rescale_index(args.mgd3_stop, args.steps)
    _check_pool(ctx, 1, "MGD3")
    params = {"lambda": args.mgd3_lambda, "stop_index": stop, "guided_range": [stop + 1, args.steps - 1],
              "kmeans_seed": args.mgd3_kmeans_seed, "modes": f"k-means of the encoder-mean latents, {args.ipc} per class"}  # fmt: skip
    if ctx.dry_run:
        return MethodSetup(params=params)
    cache = ctx.state_dir / f"mgd3_modes_{_digest({'ipc': args.ipc, 'seed': args.mgd3_kmeans_seed})}.safetensors"
    if cache.is_file():
        modes = load_file(str(cache))["modes"]
    else:
        latents, labels = real_latents(ctx)
        fitted = fit_modes(latents, labels, args.ipc, range(ctx.num_classes), seed=args.mgd3_kmeans_seed, progress=ctx.progress)
        modes = torch.stack([fitted[c] for c in range(ctx.num_classes)])
        save_safetensors_atomic({"modes": modes}, cache)
    guidance = ModeGuidance(modes.to(ctx.models.device), lam=args.mgd3_lambda, stop_index=stop, compat=args.compat)
    return MethodSetup(guidances=[guidance], params=params)


# ----------------------------------------------------------------------------------------- D3HR
def add_d3hr_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("d3hr (DDIM inversion + representative group sampling)")
    group.add_argument("--d3hr-target", type=int, default=31,
                       help="inversion target / generation start step for 50 steps (SPEC: 31, timestep 620 = step 18 of 50)")  # fmt: skip
    group.add_argument("--d3hr-candidates", type=int, default=10_000, help="candidate groups drawn per class (SPEC: 10,000)")
    group.add_argument("--d3hr-batch", type=int, default=64, help="images per DDIM-inversion batch")
    group.add_argument("--d3hr-spacing", default="leading", choices=("leading", "iddpm"),
                       help="timestep spacing of the inversion and generation (SPEC: diffusers' DDIM 'leading')")  # fmt: skip
    group.add_argument("--d3hr-stats", default=None,
                       help="folder of per-class inverted statistics to reuse across runs (default: in the run folder); "
                       "a file made with other settings is refused")  # fmt: skip


def build_d3hr(ctx: MethodContext) -> MethodSetup:
    """D3HR: per class, DDIM-invert the real latents to the target step, fit a diagonal Gaussian, keep the most
    representative of n candidate groups of IPC latents, and DDIM (η = 0) from there, on a --steps-step schedule
    with --d3hr-spacing (the CLI's CFG scale). Ignores --sampler and --eta."""
    from .guidance.d3hr import group_seed, inverted_class_statistics, select_group, statistics_path
    from .sampling import GaussianDiffusion, GuidedSampler

    args = ctx.args
    _check(0 <= args.d3hr_target <= 49, f"--d3hr-target must be in 0..49, got {args.d3hr_target}")
    _check(args.d3hr_candidates > 0, f"--d3hr-candidates must be > 0, got {args.d3hr_candidates}")
    _check(args.d3hr_batch > 0, f"--d3hr-batch must be > 0, got {args.d3hr_batch}")
    _check(not args.compat, "--compat: d3hr samples with CFG on every channel (diffusers); drop --compat")
    target = rescale_index(args.d3hr_target, args.steps)
    _check_pool(ctx, 2, "D3HR's unbiased variance")
    params = {"target_index": target, "n_candidates": args.d3hr_candidates, "inversion_batch": args.d3hr_batch,
              "weights": [1.0, 1.0, 0.1], "timestep_spacing": args.d3hr_spacing,
              "sampler": "ddim, eta 0 (from the selected latents)", "stats_dir": args.d3hr_stats}  # fmt: skip
    if ctx.dry_run:
        return MethodSetup(params=params)
    stats_dir = Path(args.d3hr_stats) if args.d3hr_stats else ctx.state_dir / f"d3hr_stats_seed{args.seed}"
    diffusion = GaussianDiffusion(args.steps, learn_sigma=ctx.models.prior.learn_sigma, timestep_spacing=args.d3hr_spacing)
    samplers: dict[int, GuidedSampler] = {}
    groups: dict[int, Tensor] = {}
    latent_cache: list[tuple[Tensor, Tensor]] = []

    def class_group(sampler, c: int) -> Tensor:
        """The selected IPC latents of local class c [ipc, C, h, w] (statistics on disk, group recomputed)."""
        if c not in groups:
            label = ctx.models.class_labels[c]
            latents = None
            if not statistics_path(stats_dir, label).is_file():
                if not latent_cache:
                    latent_cache.append(real_latents(ctx, sample=True))
                all_latents, labels = latent_cache[0]
                latents = all_latents[(labels == c).to(all_latents.device)]
            stats = inverted_class_statistics(sampler, latents, label, target, stats_dir=stats_dir,
                                              batch_size=args.d3hr_batch, progress=ctx.progress)  # fmt: skip
            device = ctx.models.device
            stats = stats._replace(mean=stats.mean.to(device), variance=stats.variance.to(device))
            generator = torch.Generator(device=device).manual_seed(group_seed(args.seed, label))
            groups[c], _ = select_group(stats, args.ipc, args.d3hr_candidates, generator=generator)
        return groups[c]

    def sample(sampler, labels, ids, latent_shape, device) -> Tensor:
        """The CLI's sampler settings (CFG, labels) on D3HR's own DDIM schedule."""
        key = id(sampler)
        if key not in samplers:
            samplers[key] = sampler.replace(diffusion=diffusion)
        d3hr_sampler = samplers[key]
        x_start = torch.stack([class_group(d3hr_sampler, c)[i] for c, i, _ in ids]).to(device)
        return d3hr_sampler.ddim_sample(labels, ids, start_index=target, x_start=x_start, progress=False)

    return MethodSetup(params=params, sample=sample)


# ----------------------------------------------------------------------------------------- SAM
SAM_EMA_PRESETS = {"digits": 0.99}  # digits: ~1.4k fine-tuning steps, so 0.9999 would keep ~87% of the prior


def add_sam_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sam (DiffFit fine-tuning with self-adaptive memories; Minimax with fifo)")
    group.add_argument("--sam-epochs", type=int, default=8, help="fine-tuning epochs over the real latents (SPEC: 8)")
    group.add_argument("--sam-batch", type=int, default=8, help="fine-tuning batch size (SPEC: 8)")
    group.add_argument("--sam-lr", type=float, default=1e-3, help="AdamW learning rate (SPEC: 1e-3, weight decay 0)")
    group.add_argument("--sam-lambda-real", type=float, default=0.002, help="λ_r of L_real (SPEC: 0.002)")
    group.add_argument("--sam-lambda-gen", type=float, default=0.008, help="λ_g of L_gen (SPEC: 0.008)")
    group.add_argument("--sam-capacity", type=int, default=64, help="memory capacity per class (SPEC: 64)")
    group.add_argument("--sam-policy", default="most_similar", choices=("most_similar", "fifo"),
                       help="memory pop rule: most_similar (SAM) or fifo (Minimax)")  # fmt: skip
    group.add_argument("--sam-ema-decay", type=float, default=None,
                       help="EMA decay of the DiffFit weights that are sampled (default 0.9999 as the authors; digits: 0.99)")  # fmt: skip


def build_sam(ctx: MethodContext) -> MethodSetup:
    """SAM: fine-tune a DiffFit copy of the prior with the memory losses (cached in the state folder), then
    sample its EMA weights with the CLI's sampler settings."""
    from .guidance.memory import finetune_sam, to_difffit
    from .models.dit import DiT
    from .sampling import GaussianDiffusion, GuidedSampler

    args, prior = ctx.args, ctx.models.prior
    for option, value in (("--sam-epochs", args.sam_epochs), ("--sam-batch", args.sam_batch), ("--sam-capacity", args.sam_capacity)):
        _check(value > 0, f"{option} must be > 0, got {value}")
    _check(args.sam_lr > 0, f"--sam-lr must be > 0, got {args.sam_lr}")
    _check(args.sam_lambda_real >= 0, f"--sam-lambda-real must be >= 0, got {args.sam_lambda_real}")
    _check(args.sam_lambda_gen >= 0, f"--sam-lambda-gen must be >= 0, got {args.sam_lambda_gen}")
    ema_decay = SAM_EMA_PRESETS.get(ctx.dataset, 0.9999) if args.sam_ema_decay is None else args.sam_ema_decay
    _check(0 <= ema_decay <= 1, f"--sam-ema-decay must be in [0, 1], got {ema_decay}")
    _check(isinstance(prior, DiT) and not prior.diffit, "--model: sam fine-tunes a fastdd DiT without DiffFit gammas")
    counts = _class_counts(ctx)
    _check(args.sam_batch <= sum(counts), f"--sam-batch {args.sam_batch} is larger than the {sum(counts)} real images")
    _check_pool(ctx, 1, "SAM", ipc_bound=False)
    params = {"epochs": args.sam_epochs, "batch_size": args.sam_batch, "lr": args.sam_lr,
              "lambda_real": args.sam_lambda_real, "lambda_gen": args.sam_lambda_gen, "capacity": args.sam_capacity,
              "policy": args.sam_policy, "ema_decay": ema_decay, "fine_tune_seed": args.seed,
              "trained": "DiffFit subset (bias, norm, gamma, class embedding) of a copy of the prior"}  # fmt: skip
    if ctx.dry_run:
        return MethodSetup(params=params)
    cache = ctx.state_dir / f"sam_difffit_{_digest(params)}.safetensors"
    finetuned = to_difffit(prior)
    if cache.is_file():
        finetuned.load_state_dict(load_file(str(cache)))
    else:
        latents, labels = real_latents(ctx)
        model_labels = torch.as_tensor(ctx.models.class_labels)[labels]
        diffusion = GaussianDiffusion(1000, learn_sigma=prior.learn_sigma)
        result = finetune_sam(finetuned, diffusion, latents, model_labels, epochs=args.sam_epochs, batch_size=args.sam_batch,
                              lr=args.sam_lr, lambda_real=args.sam_lambda_real, lambda_gen=args.sam_lambda_gen,
                              capacity=args.sam_capacity, policy=args.sam_policy, ema_decay=ema_decay, compat=args.compat,
                              seed=args.seed, progress=ctx.progress)  # fmt: skip
        finetuned = result.ema_model()
        save_safetensors_atomic(finetuned.state_dict(), cache)
    finetuned = finetuned.to(ctx.models.device).eval().requires_grad_(False)
    params["weights"] = str(cache)
    samplers: dict[int, GuidedSampler] = {}

    def sample(sampler, labels, ids, latent_shape, device) -> Tensor:
        key = id(sampler)
        if key not in samplers:
            samplers[key] = sampler.replace(model=finetuned)
        return _default_sample(ctx, samplers[key], labels, ids, latent_shape, device)

    return MethodSetup(params=params, sample=sample)


# ----------------------------------------------------------------------------------------- IGDS
IGDS_ETA_PRESETS = {"digits": 2.0}  # no published η: only the digits default is set (changes the images about as much as DAP)


def add_igds_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("igds (information-guided diffusion sampling; assumptions in fastdd/guidance/information.py)")
    group.add_argument("--igds-eta", type=float, default=None,
                       help="step size η >= 0 (no published value: digits default 2.0; required for other data)")  # fmt: skip
    group.add_argument("--igds-beta", type=float, default=None,
                       help="weight β of the KL term (default by IPC: 0.5·log(IPC)/log(50) clipped to [0, 0.5])")  # fmt: skip
    group.add_argument("--igds-range", default="0,49", help="guided steps low,high for 50 steps (default: every step)")
    group.add_argument("--igds-source", default="xstart", choices=("xstart", "sample"),
                       help="the estimator sees the decoded x̂0 (default) or the ancestral sample x'_{t-1} (paper)")  # fmt: skip
    group.add_argument("--igds-epochs", type=int, default=50, help="contrastive training epochs of the estimator encoder")
    group.add_argument("--igds-classifier-epochs", type=int, default=100, help="linear-probe epochs of the estimator classifier")
    group.add_argument("--igds-lambda", type=float, default=1.0, help="weight λ of the KL term in the estimator's training loss")


def build_igds(ctx: MethodContext) -> MethodSetup:
    """IGDS: train (or load the cached) variational estimator, then η-scaled ascent of
    E log P(ŷ|y) + H(Ŷ) + β·KL on the decoded images."""
    from .guidance.information import InformationEstimator, InformationGuidance, beta_for_ipc, train_information_estimator

    args = ctx.args
    eta = IGDS_ETA_PRESETS.get(ctx.dataset) if args.igds_eta is None else args.igds_eta
    _check(eta is not None, "--igds-eta: IGDS publishes no step size; give one (the digits default is 2.0)")
    _check(math.isfinite(eta) and eta >= 0, f"--igds-eta must be >= 0, got {eta}")
    beta = beta_for_ipc(args.ipc) if args.igds_beta is None else args.igds_beta
    _check(math.isfinite(beta) and beta >= 0, f"--igds-beta must be >= 0, got {beta}")
    _check(args.igds_epochs > 0, f"--igds-epochs must be > 0, got {args.igds_epochs}")
    _check(args.igds_classifier_epochs > 0, f"--igds-classifier-epochs must be > 0, got {args.igds_classifier_epochs}")
    _check(math.isfinite(args.igds_lambda) and args.igds_lambda >= 0, f"--igds-lambda must be >= 0, got {args.igds_lambda}")
    _check(args.igds_source == "xstart" or args.sampler == "ddpm", "--igds-source sample needs --sampler ddpm")
    low, high = ctx.guided_range(*parse_range(args.igds_range, "--igds-range"))
    _check_pool(ctx, 1, "IGDS's estimator", ipc_bound=False)
    _check(sum(_class_counts(ctx)) >= 2, "--data: the estimator needs at least 2 real images")
    params = {"eta": eta, "beta": beta, "guided_range": [low, high], "source": args.igds_source,
              "estimator": {"epochs": args.igds_epochs, "classifier_epochs": args.igds_classifier_epochs,
                            "lambda": args.igds_lambda, "tau": 0.07, "seed": args.seed, "flip": ctx.dataset != "digits"}}  # fmt: skip
    if ctx.dry_run:
        return MethodSetup(params=params)
    device = ctx.models.device
    cache = ctx.state_dir / f"igds_estimator_{_digest(params['estimator'])}.safetensors"
    if cache.is_file():
        estimator = InformationEstimator.load(cache, device)
    else:
        images, labels = ctx.data.load()
        estimator = train_information_estimator(
            images, labels, ctx.num_classes, lam=args.igds_lambda, epochs=args.igds_epochs,
            batch_size=min(256, len(labels)), classifier_epochs=args.igds_classifier_epochs,
            flip=ctx.dataset != "digits", seed=args.seed, device=device, progress=ctx.progress,
        )  # fmt: skip
        estimator.save(cache)
    params["estimator_file"] = str(cache)
    guidance = InformationGuidance(ctx.models.codec.decode, estimator, eta, beta, low=low, high=high, source=args.igds_source)
    return MethodSetup(guidances=[guidance], params=params)


register_method("dap", build_dap, add_arguments=add_dap_arguments, needs_data=True,
                help="DAP (Su et al.): Mercer-kernel representativeness guidance on DiT block features")  # fmt: skip
register_method("mgd3", build_mgd3, add_arguments=add_mgd3_arguments, needs_data=True,
                help="MGD3 (ICML 2025): k-means modes of the real latents guide the early steps")  # fmt: skip
register_method("d3hr", build_d3hr, add_arguments=add_d3hr_arguments, needs_data=True,
                help="D3HR (2025): DDIM inversion, per-class Gaussian, representative group, DDIM generation")  # fmt: skip
register_method("sam", build_sam, add_arguments=add_sam_arguments, needs_data=True,
                help="SAM (ICIP 2025): DiffFit fine-tuning with self-adaptive memories, then sampling (Minimax: --sam-policy fifo)")  # fmt: skip
register_method("igds", build_igds, add_arguments=add_igds_arguments, needs_data=True,
                help="IGDS (Ye et al. 2025): information-guided sampling with a trained variational estimator")  # fmt: skip

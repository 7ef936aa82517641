"""DAP (fastdd.guidance.dap) against a plain restatement of the paper's Algorithm 1 (fastdd.authors_reference):
batch 1, loops over the real samples, D_K written from its kernel, the DiT blocks run by hand, over full
sampling runs."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_dit import relative_error, tiny_denoising_dit  # random DiT + the exact N(0, I) denoiser

from fastdd.authors_reference import authors_dap_sample, dap_block_features, dap_energy, dap_real_features
from fastdd.guidance.dap import JLProjection, MercerGuidance, RealFeatures, jl_min_dim, real_features
from fastdd.sampling import GaussianDiffusion, GuidedSampler, StepContext

NUM_CLASSES, NULL = 3, 3
C, H = 4, 8
STEPS = 8
CFG = 2.0
SEED = 7
BLOCK = 1


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_denoising_dit(
        NUM_CLASSES, input_size=H, depth=3, restore_rng=False, final_adaln_bias=False, final_linear_bias=False
    )


@pytest.fixture(scope="module")
def reals():
    """Real latents of classes 0 and 1 (class 2 has none): [10, C, H, W], labels [10]."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(10, C, H, H, generator=generator) * 0.8
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 1])
    return latents, labels


def fastdd_sample(model, diffusion, guidances, labels, image_ids):
    sampler = GuidedSampler(model, diffusion, guidances, cfg_scale=CFG, num_classes=NUM_CLASSES)
    return sampler.sample(labels, image_ids, (C, H, H), "cpu", progress=False)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    "kernel, t_mode, gamma",
    [("linear", "zero", 0.5), ("rbf", "zero", 40.0), ("poly", "zero", 2.0), ("linear", "noised", 0.5)],
)
def test_full_run_matches_reference(model, reals, kernel, t_mode, gamma):
    latents, labels = reals
    diffusion = GaussianDiffusion(STEPS)
    bank = RealFeatures(model, latents, labels, BLOCK, t_mode, diffusion=diffusion, seed=SEED, dtype=torch.float32)
    guidance = MercerGuidance(model, bank, BLOCK, kernel, gamma)
    batch_labels = [0, 1, 0]
    image_ids = [(0, 0, SEED), (1, 0, SEED), (0, 1, SEED)]
    guided = fastdd_sample(model, diffusion, [guidance], batch_labels, image_ids)
    unguided = fastdd_sample(model, diffusion, [], batch_labels, image_ids)
    for b, (label, image_index, _) in enumerate(image_ids):
        expected = authors_dap_sample(
            model,
            diffusion,
            label,
            image_index,
            latents,
            labels,
            block_index=BLOCK,
            kernel=kernel,
            gamma=gamma,
            t_mode=t_mode,
            seed=SEED,
            cfg_scale=CFG,
            null_class=NULL,
        )
        assert relative_error(guided[b], expected) < 1e-4
        assert relative_error(unguided[b], expected) > 1e-2  # the guidance does change the image


def test_precomputed_bfloat16_features_and_step_window(model, reals):
    """Precomputed bf16 features (a dict) guiding only indices 2..5 equal the reference on bf16-rounded reals."""
    latents, labels = reals
    diffusion = GaussianDiffusion(STEPS)
    features = {c: real_features(model, latents[labels == c], labels[labels == c], BLOCK) for c in (0, 1)}
    assert features[0].dtype == torch.bfloat16 and features[0].shape == (5, 16 * 32)
    guidance = MercerGuidance(model, features, BLOCK, "linear", 0.5, low=2, high=5)
    x = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(4))
    t = torch.full((2,), diffusion.timestep_list[3])
    y = torch.tensor([1, 0])
    x_fast = x.clone().requires_grad_(True)
    (grad_fast,) = torch.autograd.grad(guidance.energy(x_fast, t, y, [1, 0], 3), x_fast)
    for b in range(2):
        reals_b = dap_real_features(model, latents, labels, int(y[b]), BLOCK, "zero", storage=torch.bfloat16)
        x_ref = x[b].clone().requires_grad_(True)
        energy = dap_energy(dap_block_features(model, x_ref, int(t[b]), int(y[b]), BLOCK), reals_b, "linear")
        (grad_ref,) = torch.autograd.grad(energy, x_ref)
        assert relative_error(grad_fast[b], grad_ref) < 1e-4
    image_ids = [(0, 0, SEED)]
    guided = fastdd_sample(model, diffusion, [guidance], [0], image_ids)
    unguided = fastdd_sample(model, diffusion, [], [0], image_ids)
    assert relative_error(guided, unguided) > 1e-3
    assert guidance.active(2) and guidance.active(5) and not guidance.active(1) and not guidance.active(6)


def test_jl_projection_distortion_within_bound():
    """For N = 20 pairs, ε = 0.5, δ = 0.1: over 40 seeded projections at most δ·40 have any squared distance
    outside (1 ± ε), and the linear DAP energy stays within [√(1−ε), √(1+ε)] of the unprojected one."""
    epsilon, delta, pairs = 0.5, 0.1, 20
    m = jl_min_dim(pairs, epsilon, delta)
    assert m == math.ceil(2 * math.log(2 * pairs / delta) / (epsilon**2 / 2 - epsilon**3 / 3))
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 512, generator=generator)
    real = torch.randn(pairs, 512, generator=generator) * 0.5 + 0.3
    exact = (query - real).norm(dim=1)
    failures = 0
    for seed in range(40):
        projection = JLProjection(512, m, seed=seed)
        projected = (projection(query) - projection(real)).norm(dim=1)
        ratio = (projected / exact) ** 2
        if bool(((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).any()):
            failures += 1
            continue
        energy_ratio = float(projected.mean() / exact.mean())
        assert math.sqrt(1 - epsilon) <= energy_ratio <= math.sqrt(1 + epsilon)
    assert failures <= delta * 40
    # a projection off by a scale would break the bound
    projection = JLProjection(512, m, seed=0)
    assert float((projection(query) * 2 - projection(real) * 2).norm(dim=1).pow(2).div(exact**2).min()) > 1 + epsilon


def test_projected_guidance_matches_reference(model, reals):
    latents, labels = reals
    dim = 16 * 32
    projection = JLProjection(dim, 64, seed=3)
    bank = RealFeatures(model, latents, labels, BLOCK, projection=projection, dtype=torch.float32)
    guidance = MercerGuidance(model, bank, BLOCK, "linear", 1.0)
    x = torch.randn(1, C, H, H, generator=torch.Generator().manual_seed(5))
    x_fast = x.clone().requires_grad_(True)
    (grad_fast,) = torch.autograd.grad(guidance.energy(x_fast, torch.tensor([500]), torch.tensor([1]), [1], 0), x_fast)
    reals_1 = [r @ projection.matrix for r in dap_real_features(model, latents, labels, 1, BLOCK, "zero")]
    x_ref = x[0].clone().requires_grad_(True)
    energy = dap_energy(dap_block_features(model, x_ref, 500, 1, BLOCK) @ projection.matrix, reals_1, "linear")
    (grad_ref,) = torch.autograd.grad(energy, x_ref)
    assert relative_error(grad_fast[0], grad_ref) < 1e-4
    assert bank.get(1, 0)[0].shape == (5, 64)


def test_compat_rows_and_class_cache(model, reals):
    """Compat layout [cond; shadow]: the cond rows get the clean delta, shadow rows zero. A one-class cache
    recomputes evicted classes to the same values."""
    latents, labels = reals
    diffusion = GaussianDiffusion(STEPS)
    bank = RealFeatures(model, latents, labels, BLOCK, dtype=torch.float32, max_cached_classes=1)
    guidance = MercerGuidance(model, bank, BLOCK, "linear", 0.5)
    x = torch.randn(4, C, H, H, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, NULL, NULL])
    index = 4

    zeros = torch.zeros_like(x)
    fields = dict(
        x_t=x,
        index=index,
        timestep=diffusion.timestep_list[index],
        alpha_bar=diffusion.alpha_bar(index),
        y=y,
        model_output=zeros,
        eps=zeros,
        pred_xstart=zeros,
        mean=zeros,
        log_variance=zeros,
        sample=zeros,
        rows=2,
        image_ids=[(0, 0, SEED), (1, 0, SEED)],
    )
    compat = guidance.step(StepContext(**fields))
    first = bank.get(0, index)[0].clone()
    assert list(bank._cache) == [0]  # class 1 was evicted when class 0 came back
    clean = guidance.step(StepContext(**{**fields, "x_t": x[:2], "y": y[:2], "sample": zeros[:2], "image_ids": []}))
    assert torch.equal(compat[2:], torch.zeros_like(compat[2:]))
    assert torch.allclose(compat[:2], clean, rtol=1e-6, atol=1e-7) and clean.abs().max() > 0
    assert torch.equal(bank.get(0, index)[0], first)


def test_bad_hyper_parameters(model, reals):
    latents, labels = reals
    bank = RealFeatures(model, latents, labels, BLOCK)
    with pytest.raises(ValueError, match="gamma"):
        MercerGuidance(model, bank, BLOCK, gamma=-1.0)
    for block_index in (-1, 3, 1.0):
        with pytest.raises(ValueError, match="block_index"):
            MercerGuidance(model, bank, block_index)
        with pytest.raises(ValueError, match="block_index"):
            RealFeatures(model, latents, labels, block_index)
    with pytest.raises(ValueError, match="kernel"):
        MercerGuidance(model, bank, BLOCK, kernel="cosine")
    with pytest.raises(ValueError, match="t_mode"):
        RealFeatures(model, latents, labels, BLOCK, t_mode="half")
    with pytest.raises(ValueError, match="diffusion"):
        RealFeatures(model, latents, labels, BLOCK, t_mode="noised")
    with pytest.raises(ValueError, match="projection"):
        MercerGuidance(model, {0: torch.zeros(2, 8)}, BLOCK, "poly", projection=JLProjection(16 * 32, 8))
    for args in [(0, 0.5), (10, 1.5), (10, 0.5, 0.0)]:
        with pytest.raises(ValueError):
            jl_min_dim(*args)
    diffusion = GaussianDiffusion(STEPS)
    # class 2 has no real latents: refused before the first step
    with pytest.raises(ValueError, match="class 2"):
        fastdd_sample(model, diffusion, [MercerGuidance(model, bank, BLOCK)], [2], [(2, 0, SEED)])
    with pytest.raises(ValueError, match="class 1"):
        fastdd_sample(model, diffusion, [MercerGuidance(model, {0: torch.zeros(2, 512)}, BLOCK)], [1], [(1, 0, SEED)])
    with pytest.raises(ValueError, match="class 0"):
        fastdd_sample(model, diffusion, [MercerGuidance(model, {0: torch.zeros(0, 512)}, BLOCK)], [0], [(0, 0, SEED)])

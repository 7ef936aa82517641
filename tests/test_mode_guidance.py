"""MGD3 (fastdd.guidance.mgd3): torch k-means against a plain Lloyd loop, and ModeGuidance on the sampler
against the MGD3 ancestral loop restated from SPEC in fastdd.authors_reference (batch 1)."""

from __future__ import annotations

import pytest
import torch
from tiny_dit import relative_error, tiny_denoising_dit

from fastdd.authors_reference import authors_dit_sample
from fastdd.data.latents import encode_latents
from fastdd.guidance.mgd3 import (
    ModeGuidance,
    class_modes,
    fit_modes,
    kmeans,
    kmeans_plus_plus,
    mode_update,
)
from fastdd.models import PixelCodec
from fastdd.sampling import GaussianDiffusion, GuidedSampler

NUM_CLASSES, NULL_CLASS = 4, 4
LATENT_SHAPE = (4, 8, 8)
NUM_STEPS, STOP_INDEX, LAM, CFG_SCALE = 50, 25, 0.1, 4.0
SEED, IPC = 3, 3
RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------- k-means
def reference_kmeans_plus_plus(points, k, generator):
    """k-means++ written out: uniform first pick, then D²-weighted picks (same generator calls)."""
    chosen = [int(torch.randint(points.shape[0], (1,), generator=generator))]
    for _ in range(1, k):
        d2 = torch.tensor(
            [min(float(((p - points[c]) ** 2).sum()) for c in chosen) for p in points], dtype=torch.float64
        )
        chosen.append(int(torch.multinomial(d2, 1, generator=generator)))
    return chosen


def reference_lloyd(points, init, max_iter=300):
    """Plain Lloyd iterations with loops: assign, move to means (empty cluster -> farthest point), until stable."""
    centroids = [c.clone() for c in init]

    def assign():
        return [min(range(len(centroids)), key=lambda j: float(((p - centroids[j]) ** 2).sum())) for p in points]

    labels = assign()
    for _ in range(max_iter):
        new, empty = [], []
        for j in range(len(centroids)):
            members = [p for p, label in zip(points, labels) if label == j]
            if members:
                new.append(torch.stack(members).mean(0))
            else:
                new.append(None)
                empty.append(j)
        if empty:
            own = [float(((p - centroids[label]) ** 2).sum()) for p, label in zip(points, labels)]
            farthest = sorted(range(len(points)), key=lambda n: -own[n])[: len(empty)]
            for j, n in zip(empty, farthest):
                new[j] = points[n].clone()
        centroids = new
        new_labels = assign()
        if new_labels == labels:
            break
        labels = new_labels
    return torch.stack(centroids), torch.tensor(labels)


def blobs(num_blobs=4, per_blob=20, dim=16, spread=0.3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_blobs, dim, generator=generator, dtype=dtype) * 10
    noise = torch.randn(num_blobs * per_blob, dim, generator=generator, dtype=dtype)
    points = centers.repeat_interleave(per_blob, 0) + spread * noise
    return points, torch.arange(num_blobs).repeat_interleave(per_blob)


def test_kmeans_plus_plus_matches_reference_draws():
    points = torch.randn(40, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    init = kmeans_plus_plus(points, 5, torch.Generator().manual_seed(7))
    chosen = reference_kmeans_plus_plus(points, 5, torch.Generator().manual_seed(7))
    assert torch.equal(init, points[chosen])
    assert len(set(chosen)) == 5


def test_kmeans_matches_reference_lloyd_with_same_init():
    # overlapping data, so Lloyd needs several iterations
    points = torch.randn(60, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    init = points[[0, 1, 2, 3, 4]].clone()
    result = kmeans(points, 5, init=init)
    centroids, labels = reference_lloyd(points, init)
    assert result.converged and result.iterations > 2
    assert torch.equal(result.assignments, labels)
    torch.testing.assert_close(result.centroids, centroids, rtol=1e-12, atol=1e-12)
    inertia = sum(float(((p - centroids[label]) ** 2).sum()) for p, label in zip(points, labels))
    assert result.inertia == pytest.approx(inertia, rel=1e-10)


def test_kmeans_empty_cluster_takes_the_farthest_point():
    points, _ = blobs(num_blobs=3, per_blob=10, dim=4)
    init = torch.stack([points[0], points[10], torch.full((4,), 1e6, dtype=torch.float64)])  # cluster 2 starts empty
    result = kmeans(points, 3, init=init)
    centroids, labels = reference_lloyd(points, init)
    assert torch.equal(result.assignments, labels)
    torch.testing.assert_close(result.centroids, centroids, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(result.centroids).all()
    assert torch.bincount(result.assignments, minlength=3).min() > 0


def test_kmeans_finds_well_separated_clusters_and_is_seeded():
    points, truth = blobs(num_blobs=4, per_blob=20, dim=16, dtype=torch.float32)
    result = kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    assert result.converged
    for j in range(4):  # each found cluster is exactly one blob, its centroid that blob's mean
        members = truth[result.assignments == j]
        assert members.numel() == 20 and (members == members[0]).all()
        torch.testing.assert_close(result.centroids[j], points[truth == members[0]].mean(0), rtol=1e-5, atol=1e-5)
    again = kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.centroids, result.centroids) and torch.equal(again.assignments, result.assignments)
    latents = points.view(80, 1, 4, 4)
    torch.testing.assert_close(class_modes(latents, 4, seed=5), class_modes(latents, 4, seed=5), rtol=0, atol=0)


def test_kmeans_and_modes_reject_bad_input():
    points = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k=6"):
        kmeans(points, 6)
    with pytest.raises(ValueError, match="empty"):
        kmeans(torch.randn(0, 3), 1)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="distinct"):
        kmeans(torch.ones(4, 3), 2)
    with pytest.raises(ValueError, match="init"):
        kmeans(points, 2, init=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="k must"):
        kmeans(points, 0)
    with pytest.raises(ValueError, match="IPC larger"):
        class_modes(torch.randn(2, 4, 2, 2), 3)
    with pytest.raises(ValueError, match="class 1 has no latents"):
        fit_modes(torch.randn(4, 4, 2, 2), torch.zeros(4, dtype=torch.long), 2, [0, 1])


def test_encode_latents_batches_the_codec():
    images = torch.randn(7, 3, 4, 4)
    torch.testing.assert_close(encode_latents(PixelCodec(3), images, batch_size=3, progress=False), images)
    with pytest.raises(ValueError, match="batch_size"):
        encode_latents(PixelCodec(3), images, batch_size=0)


# ------------------------------------------------------------------------------------------- guidance
@pytest.fixture(scope="module")
def model():
    return tiny_denoising_dit(NUM_CLASSES)


@pytest.fixture(scope="module")
def modes():
    """Modes from k-means of fake 'real latents' per class (blobs around a class offset)."""
    generator = torch.Generator().manual_seed(11)
    latents, labels = [], []
    for c in range(NUM_CLASSES):
        centers = torch.randn(IPC, *LATENT_SHAPE, generator=generator)
        latents.append(centers.repeat(6, 1, 1, 1) + 0.2 * torch.randn(6 * IPC, *LATENT_SHAPE, generator=generator))
        labels.append(torch.full((6 * IPC,), c))
    return fit_modes(torch.cat(latents), torch.cat(labels), IPC, range(NUM_CLASSES), progress=False)


def fastdd_run(model, modes, compat, lam=LAM, stop=STOP_INDEX, cfg_channels=None):
    guidance = ModeGuidance(modes, lam=lam, stop_index=stop, compat=compat)
    sampler = GuidedSampler(
        model,
        GaussianDiffusion(NUM_STEPS),
        [guidance],
        cfg_scale=CFG_SCALE,
        null_class=NULL_CLASS,
        cfg_channels=cfg_channels,
        compat=compat,
        num_classes=NUM_CLASSES,
    )
    # one batch mixing classes and mode indices, in no particular order
    image_ids = [(2, 1, SEED), (0, 0, SEED), (3, 2, SEED), (0, 2, SEED)]
    finals = sampler.sample([c for c, _, _ in image_ids], image_ids, LATENT_SHAPE, "cpu", progress=False)
    return {(c, j): final for (c, j, _), final in zip(image_ids, finals)}


@pytest.mark.parametrize("compat", [False, True])
def test_mode_guidance_matches_reference_loop(model, modes, compat):
    finals = fastdd_run(model, modes, compat)
    for (c, j), final in finals.items():
        expected = authors_dit_sample(
            model,
            c,
            j,
            LATENT_SHAPE,
            num_steps=NUM_STEPS,
            cfg_scale=CFG_SCALE,
            null_class=NULL_CLASS,
            seed=SEED,
            compat=compat,
            mode=modes[c][j],
            lam=LAM,
            stop_index=STOP_INDEX,
        )
        assert torch.isfinite(final).all()
        assert relative_error(final, expected) <= RTOL, (c, j, relative_error(final, expected))


def test_mode_guidance_is_not_vacuous_and_respects_stop_index(model, modes):
    guided = fastdd_run(model, modes, compat=False)
    unguided = fastdd_run(model, modes, compat=False, lam=0.0)
    never = fastdd_run(model, modes, compat=False, stop=NUM_STEPS - 1)  # no index > 49: never active
    for key in guided:
        assert relative_error(guided[key], unguided[key]) > 100 * RTOL
        assert torch.equal(never[key], unguided[key])
        # the pull goes toward the image's own mode
        mode = modes[key[0]][key[1]]
        assert (guided[key] - mode).norm() < (unguided[key] - mode).norm()


def test_mode_update_formula():
    x0, mode, log_variance = torch.randn(2, 4, 3, 3), torch.randn(4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = -0.3 * (x0 - mode) * torch.sqrt(torch.exp(log_variance))
    torch.testing.assert_close(mode_update(x0, mode, log_variance, 0.3), expected)


def test_mode_guidance_rejects_bad_settings(model, modes):
    with pytest.raises(ValueError, match="lam"):
        ModeGuidance(modes, lam=-0.1)
    with pytest.raises(ValueError, match="stop_index"):
        ModeGuidance(modes, stop_index=-2)
    with pytest.raises(ValueError, match="modes"):
        ModeGuidance(torch.zeros(2, 3, 4, 4))
    nan_modes = ModeGuidance({0: torch.full((2, 4, 8, 8), float("nan"))})  # modes may be looked up lazily
    with pytest.raises(ValueError, match="finite"):
        nan_modes.begin_batch(torch.zeros(1, dtype=torch.long), [(0, 0, 0)])
    stacked = torch.stack([modes[c] for c in range(NUM_CLASSES)])
    sampler = GuidedSampler(
        model, GaussianDiffusion(NUM_STEPS), [ModeGuidance(stacked)], null_class=NULL_CLASS, num_classes=NUM_CLASSES
    )
    with pytest.raises(ValueError, match="image 3 of class 1 has no mode"):
        sampler.sample([1], [(1, IPC, SEED)], LATENT_SHAPE, "cpu", progress=False)
    sampler = GuidedSampler(
        model,
        GaussianDiffusion(NUM_STEPS),
        [ModeGuidance({0: modes[0]})],
        null_class=NULL_CLASS,
        num_classes=NUM_CLASSES,
    )
    with pytest.raises(ValueError, match="class 2 has no modes"):
        sampler.sample([2], [(2, 0, SEED)], LATENT_SHAPE, "cpu", progress=False)


def test_compat_shadow_rows_get_the_conditional_difference_with_their_own_sigma(modes):
    """The authors add −λ(x̂0_cond − mode)·exp(0.5·log_variance) to the whole [cond; uncond] mean."""
    from fastdd.sampling import StepContext

    image_ids = [(1, 0, SEED), (3, 2, SEED)]
    generator = torch.Generator().manual_seed(0)
    x_t, pred_xstart, log_variance = (torch.randn(4, *LATENT_SHAPE, generator=generator) for _ in range(3))
    zeros = torch.zeros_like(x_t)
    ctx = StepContext(
        x_t=x_t,
        index=40,
        timestep=800,
        alpha_bar=0.1,
        y=torch.tensor([1, 3, NULL_CLASS, NULL_CLASS]),
        model_output=zeros,
        eps=zeros,
        pred_xstart=pred_xstart,
        mean=zeros,
        log_variance=log_variance,
        sample=zeros,
        rows=2,
        image_ids=image_ids,
    )
    targets = torch.stack([modes[1][0], modes[3][2]])
    guidance = ModeGuidance(modes, compat=True)
    guidance.begin_batch(torch.tensor([1, 3]), image_ids)
    delta = guidance.step(ctx)
    difference = pred_xstart[:2] - targets
    torch.testing.assert_close(delta[:2], -LAM * difference * torch.exp(0.5 * log_variance[:2]))
    torch.testing.assert_close(delta[2:], -LAM * difference * torch.exp(0.5 * log_variance[2:]))
    clean = ModeGuidance(modes, compat=False)
    clean.begin_batch(torch.tensor([1, 3]), image_ids)
    delta = clean.step(ctx)
    torch.testing.assert_close(delta[:2], -LAM * difference * torch.exp(0.5 * log_variance[:2]))
    assert torch.equal(delta[2:], torch.zeros_like(delta[2:]))

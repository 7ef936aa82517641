"""IGD's building blocks as drop-in functions: the influence and deviation gradients a user calls from their
own loop, the per-class real gradients and the checkpoint selection of Algorithm 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from fastdd import authors_reference as authors_igd
from fastdd.guidance import adaptive_scale, deviation_gradient, influence_gradient, real_gradients, select_checkpoints
from fastdd.guidance.igd import (
    SurrogateConfig,
    authors_selection_indices,
    build_surrogate_bundle,
    class_mean_gradient,
    selection_statistics,
    train_trajectory,
    walk_checkpoints,
)
from fastdd.models import ConvNet
from fastdd.ops.reference import unflatten_params


def tiny_setup(seed: int = 0, K: int = 3, classes: int = 4):
    torch.manual_seed(seed)
    surrogate = ConvNet(3, classes, width=6, depth=2, im_size=8).eval()
    flat_params = torch.stack(
        [parameters_to_vector(ConvNet(3, classes, width=6, depth=2, im_size=8).parameters()) for _ in range(K)]
    ).detach()
    real_grads = torch.randn(classes, K, flat_params.shape[1]) * 0.01
    return surrogate, flat_params, real_grads


def decode(latents: torch.Tensor) -> torch.Tensor:
    """A differentiable, non-linear stand-in for a VAE decoder: [B, 4, 4, 4] -> [B, 3, 8, 8]."""
    return torch.tanh(F.interpolate(latents[:, :3], scale_factor=2.0, mode="bilinear", align_corners=False))


def predicted_xstart(x_t: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for x̂0(x_t) through a model."""
    return 0.8 * x_t + 0.1 * torch.sin(3 * x_t)


def test_influence_gradient_drop_in_matches_the_authors_per_checkpoint_loop():
    surrogate, flat_params, real_grads = tiny_setup()
    label = 2
    # the authors decode [cond; uncond] and average CE over both rows: fastdd's groups argument says so
    x_t = torch.randn(2, 4, 4, 4, requires_grad=True)
    expected = authors_igd.influence_gradient(
        x_t, predicted_xstart(x_t), decode, surrogate, flat_params, real_grads[label], label
    )
    x_t2 = x_t.detach().clone().requires_grad_(True)
    actual = influence_gradient(
        x_t2,
        predicted_xstart(x_t2),
        decode,
        surrogate,
        flat_params,
        real_grads[label],
        torch.tensor([label, label]),
        groups=torch.tensor([0, 0]),
    )
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)
    assert expected.abs().max() > 0


def test_influence_gradient_rows_are_independent_images():
    """Without groups each row is its own image: the batched gradient equals the rows computed alone."""
    surrogate, flat_params, real_grads = tiny_setup(seed=1)
    labels = torch.tensor([0, 3, 1])
    x_t = torch.randn(3, 4, 4, 4, requires_grad=True)
    batched = influence_gradient(x_t, predicted_xstart(x_t), decode, surrogate, flat_params, real_grads[labels], labels)
    for b in range(3):
        row = x_t[b : b + 1].detach().clone().requires_grad_(True)
        alone = influence_gradient(
            row, predicted_xstart(row), decode, surrogate, flat_params, real_grads[labels[b]], labels[b : b + 1]
        )
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-4, atol=1e-8)


def test_adaptive_scale_formula():
    eps, grad = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4) * 3
    scale = adaptive_scale(eps, grad, alpha_bar=0.36, k=5.0)
    rms = lambda t: t.flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
    torch.testing.assert_close(scale.flatten(), 0.0015 * 0.8 * rms(eps) / rms(grad) * 5.0)


def test_deviation_gradient_drop_in_matches_the_authors():
    torch.manual_seed(3)
    memory_rows = [torch.randn(1, 4, 4, 4) for _ in range(5)]
    x_t = torch.randn(2, 4, 4, 4, requires_grad=True)
    expected = authors_igd.deviation_gradient(x_t, memory_rows)
    memory = torch.cat([m.flatten(1) for m in memory_rows])
    actual = deviation_gradient(x_t[:1].detach(), memory)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-8)
    # rows beyond count are ignored, an empty memory gives no push
    torch.testing.assert_close(deviation_gradient(x_t[:1].detach(), memory, count=5), expected, rtol=1e-5, atol=1e-8)
    assert torch.equal(deviation_gradient(x_t[:1].detach(), memory, count=0), torch.zeros(1, 4, 4, 4))


def test_class_mean_gradient_is_the_mean_over_chunks_of_the_first_images():
    surrogate, flat_params, _ = tiny_setup(seed=4)
    images, label = torch.randn(13, 3, 8, 8), 1
    got = class_mean_gradient(surrogate, flat_params[0], images, label, max_images=10, chunk=4)
    chunk_grads = []
    for chunk in (images[0:4], images[4:8], images[8:10]):
        theta = flat_params[0].clone().requires_grad_(True)
        loss = F.cross_entropy(
            functional_call(surrogate, unflatten_params(surrogate, theta), (chunk,)), torch.full((len(chunk),), label)
        )
        chunk_grads.append(torch.autograd.grad(loss, theta)[0])
    torch.testing.assert_close(got, torch.stack(chunk_grads).mean(0))
    with pytest.raises(ValueError, match="class 1 has no images"):
        class_mean_gradient(surrogate, flat_params[0], images[:0], label)


def test_real_gradients_shape_and_per_class_selection():
    surrogate, flat_params, _ = tiny_setup(seed=5, K=2, classes=3)
    images, labels = torch.randn(9, 3, 8, 8), torch.tensor([0, 1, 2] * 3)
    grads = real_gradients(surrogate, flat_params, images, labels, num_classes=3, chunk=2)
    assert grads.shape == (3, 2, flat_params.shape[1])
    torch.testing.assert_close(
        grads[2, 1], class_mean_gradient(surrogate, flat_params[1], images[labels == 2], 2, chunk=2)
    )


def test_select_checkpoints_algorithm_2():
    """Epoch e is kept when its mean gradient has cosine < threshold with the last kept epoch's."""
    angles = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0, 1.5, 1.6])  # cos(Δ) < 0.7 ⇔ Δ > 0.795 rad
    directions = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)], dim=1)  # [E, 3]
    per_class = torch.stack([directions * 2.0, directions * 0.5], dim=1)  # [E, classes, P]: class mean = direction
    # 0 kept; 0.9 is the first > 0.795 away from 0 (kept); 1.5, 1.6 are within 0.795 of 0.9
    assert select_checkpoints(per_class) == [0, 3]
    assert select_checkpoints(per_class, threshold=0.99) == [0, 1, 2, 3, 5]  # cos < 0.99 ⇔ Δ > 0.142 rad
    with pytest.raises(ValueError, match="threshold"):
        select_checkpoints(per_class, threshold=0.0)


def test_the_authors_algorithm_2_averages_per_class_cosines():
    """Class 0's large fixed gradient dominates the class mean (the paper's rule keeps only epoch 0); the authors'
    script averages the per-class cosines, (1 + cos θ_e) / 2 < 0.7 ⇔ θ > 1.159 rad from the reference."""
    angles = torch.tensor([0.0, 0.5, 1.0, 1.2, 1.5, 2.5])
    rotating = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)], dim=1)
    fixed = torch.tensor([10.0, 0.0, 0.0]).expand(len(angles), 3)
    per_class = torch.stack([fixed, rotating], dim=1)  # [E, 2 classes, P]
    assert select_checkpoints(per_class) == [0]
    assert select_checkpoints(per_class, rule="authors") == [0, 3, 5]  # 1.2 from 0, then 2.5 (1.3 from 1.2)

    def authors_similarity(grads, reference):  # test_ckpts_grad_sim.py, one class at a time
        values = [float(g @ r / (g.norm() * r.norm() + 1e-6)) for g, r in zip(grads, reference)]
        return sum(values) / len(values)

    silent = per_class.clone()
    silent[:, 1] = 0  # a class with zero gradient counts as cosine 0 (the +1e-6), not NaN
    assert authors_similarity(silent[2], silent[0]) == pytest.approx(0.5)
    assert select_checkpoints(silent, threshold=0.51, rule="authors") == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="rule"):
        select_checkpoints(per_class, rule="mean")


@pytest.fixture(scope="module")
def five_class_trajectory():
    """A 16-epoch ConvNet trajectory on 5 synthetic classes of 150 images (750: one full loader batch of 500)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(150)
    centers = torch.randn(5, 1, 8, 8, generator=generator)
    images = (0.6 * centers[labels] + torch.randn(len(labels), 1, 8, 8, generator=generator)).clamp(-1, 1)
    config = SurrogateConfig(channel=1, num_classes=5, width=8, depth=2, im_size=8)
    snapshots = train_trajectory(config, images, labels, epochs=15, flip=False, seed=0, progress=False)
    return config, snapshots, images, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_authors_algorithm_2_with_their_inputs_picks_what_the_restated_script_picks(five_class_trajectory, seed):
    """selection="authors" = DD_IGD's test_ckpts_grad_sim.py restated (fastdd.authors_reference): one shuffled draw of
    80 images per class reused for every checkpoint, one chunk, the mean of per-class cosines, the moving
    reference; same picks for every loader seed, at their threshold (0.7) and at one that keeps four epochs."""
    config, snapshots, images, labels = five_class_trajectory
    for threshold in (0.7, 0.95):
        fastdd_picks = build_surrogate_bundle(
            config, snapshots, images, labels, threshold=threshold, selection="authors", seed=seed, max_checkpoints=None
        ).epochs
        restated = authors_igd.authors_select_checkpoints(
            config.build().eval(), snapshots, images, labels, 5, seed, threshold
        )
        assert fastdd_picks == restated
    assert len(fastdd_picks) == 4  # at 0.95 the walk is not trivial


def test_the_authors_draw_is_one_shuffled_pass_of_500_image_batches():
    """authors_selection_indices: the first 80 images of each class in the stream of a seeded shuffled loader over the
    first 500 images of every class, batches of 500, the last partial batch dropped; fewer than 500 images: one
    batch of all; a class with no image in the draw is refused."""
    labels = torch.arange(3).repeat_interleave(600)[torch.randperm(1800, generator=torch.Generator().manual_seed(1))]
    chosen = authors_selection_indices(labels, 3, seed=5)
    pool = torch.cat([torch.nonzero(labels == c).flatten()[:500] for c in range(3)])
    stream = [pool[i] for batch in DataLoader(range(len(pool)), 500, shuffle=True, drop_last=True,
                                              generator=torch.Generator().manual_seed(5)) for i in batch]  # fmt: skip
    for c in range(3):
        expected = [int(i) for i in stream if labels[i] == c][:80]
        assert chosen[c].tolist() == expected and len(expected) == 80
    assert all(int(i) in set(pool.tolist()) for x in chosen for i in x)  # never past a class's first 500
    small = authors_selection_indices(torch.tensor([0, 1, 0, 1]), 2, seed=0)
    assert sorted(torch.cat(small).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="class 2"):
        authors_selection_indices(torch.tensor([0, 1, 0, 1]), 3, seed=0)


def test_algorithm_2_statistics_accumulated_by_class_equal_the_in_memory_rules():
    """selection_statistics (one class at a time) gives the similarities select_checkpoints computes from all the
    gradients at once, for both rules."""
    config = SurrogateConfig(channel=1, num_classes=3, width=8, depth=1, im_size=8)
    generator = torch.Generator().manual_seed(0)
    params = sum(p.numel() for p in config.build().parameters())
    snapshots = 0.1 * torch.randn(6, params, generator=generator)
    images = torch.randn(60, 1, 8, 8, generator=generator)
    labels = torch.arange(60) % 3
    model = config.build().eval()
    stats = selection_statistics(model, snapshots, lambda c: images[labels == c], 3, chunk=7)
    grads = torch.stack(
        [
            torch.stack([class_mean_gradient(model, s, images[labels == c], c, chunk=7) for c in range(3)])
            for s in snapshots
        ]
    )
    for rule in ("paper", "authors"):
        for threshold in (0.5, 0.9, 0.99, 1.0):
            assert walk_checkpoints(stats.similarity(rule), threshold) == select_checkpoints(grads, threshold, rule)
    with pytest.raises(ValueError, match="selection"):
        build_surrogate_bundle(config, snapshots, images, labels, selection="mean")

"""IGD's building blocks as drop-in functions: the influence and deviation gradients a user calls from their
own loop, the per-class real gradients and the checkpoint selection of Algorithm 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from fastdd import authors_reference as authors_igd
from fastdd.guidance import adaptive_scale, deviation_gradient, influence_gradient, real_gradients, select_checkpoints
from fastdd.guidance.igd import class_mean_gradient
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


def test_the_authors_selection_takes_80_shuffled_images_per_class_and_their_rule():
    """build_surrogate_bundle(selection="authors"): Algorithm 2's gradients on 80 images per class in a shuffled order
    drawn from the seed (not the first ones), then the authors' rule; "paper": the first max_images and its rule."""
    from fastdd.guidance.igd import SurrogateConfig, build_surrogate_bundle, epoch_class_gradients

    config = SurrogateConfig(channel=1, num_classes=2, width=8, depth=1, im_size=8)
    generator = torch.Generator().manual_seed(0)
    params = sum(p.numel() for p in config.build().parameters())
    snapshots = 0.1 * torch.randn(3, params, generator=generator)
    images = torch.randn(200, 1, 8, 8, generator=generator)
    labels = torch.arange(200) % 2
    shuffled = epoch_class_gradients(config, snapshots, images, labels, shuffle_seed=7, max_images=80)
    order = torch.Generator().manual_seed(7)
    model = config.build().eval()
    expected = []
    for snapshot in snapshots:  # a new order of each class's images at every snapshot, from one generator
        per_class = []
        for c in range(2):
            chosen = images[labels == c]
            chosen = chosen[torch.randperm(len(chosen), generator=order)]
            per_class.append(class_mean_gradient(model, snapshot, chosen, c, max_images=80))
        expected.append(torch.stack(per_class))
    torch.testing.assert_close(shuffled, torch.stack(expected))
    first = epoch_class_gradients(config, snapshots, images, labels, max_images=80)
    assert (shuffled - first).abs().max() > 1e-4
    for selection in ("paper", "authors"):
        bundle = build_surrogate_bundle(config, snapshots, images, labels, threshold=1.0, selection=selection, seed=7)
        grads = shuffled if selection == "authors" else epoch_class_gradients(config, snapshots, images, labels)
        assert bundle.epochs == select_checkpoints(grads, 1.0, selection)
    with pytest.raises(ValueError, match="selection"):
        build_surrogate_bundle(config, snapshots, images, labels, selection="mean")

"""SAM / Minimax fine-tuning (fastdd.guidance.sam) against a plain restatement of the authors' training step:
rows one at a time, python-list memories with the O(M²) most-similar pop, the ADM loss terms written out."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tiny_dit import randomised_dit, relative_error

from fastdd.guidance.sam import (
    LatentMemory,
    SamMemory,
    difffit_parameters,
    diffusion_training_loss,
    finetune_sam,
    save_finetuned,
    to_difffit,
    variational_bound_terms,
)
from fastdd.models import DiT
from fastdd.sampling import GaussianDiffusion

NUM_CLASSES = 3
C, H = 4, 8
DIM = C * H * H
CAPACITY = 3
BATCH = 4
EPOCHS = 2
SEED = 5
DROPOUT = 0.25
EMA_DECAY = 0.9


pytestmark = pytest.mark.usefixtures("single_thread")


def build_model(diffit: bool = True) -> DiT:
    dit = randomised_dit(
        NUM_CLASSES,
        model_class=DiT,
        input_size=H,
        hidden_size=16,
        restore_rng=False,
        final_adaln_bias=False,
        class_dropout_prob=0.1,
        diffit=diffit,
    )
    return dit.double().eval()


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(10, C, H, H, generator=generator, dtype=torch.float64)
    latents[0, 0, 0, 0] = 1.5  # one value at the data edge bins of the decoder term
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 0, 2, 1, 0])
    return latents, labels


# ------------------------------------------------------------------------------------------- reference
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
ALPHAS_CUMPROD_PREV = np.append(1.0, ALPHAS_CUMPROD[:-1])
BETAS = np.linspace(1e-4, 0.02, 1000)
POSTERIOR_VARIANCE = BETAS * (1 - ALPHAS_CUMPROD_PREV) / (1 - ALPHAS_CUMPROD)
POSTERIOR_LOG_VARIANCE = np.log(np.append(POSTERIOR_VARIANCE[1], POSTERIOR_VARIANCE[1:]))


def cosine(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def normal_cdf_tanh(x):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_row_loss(model, x0, t, noise, y):
    """One row: (ε-MSE + L_t in bits/dim with the mean frozen, ẑ = x̂0 flattened)."""
    ab, ab_prev, beta = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD_PREV[t], BETAS[t]
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
    out = model(x_t[None], torch.tensor([t]), torch.tensor([y]))[0]
    eps, v = out[:C], out[C:]
    mse = ((noise - eps) ** 2).mean()
    z_hat = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    frozen_x0 = (x_t - math.sqrt(1 - ab) * eps.detach()) / math.sqrt(ab)
    coef1 = beta * math.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
    model_mean = coef1 * frozen_x0 + coef2 * x_t
    frac = (v + 1) / 2
    model_log_var = frac * math.log(beta) + (1 - frac) * POSTERIOR_LOG_VARIANCE[t]
    if t > 0:
        true_mean = coef1 * x0 + coef2 * x_t
        true_log_var = POSTERIOR_LOG_VARIANCE[t]
        kl = 0.5 * (
            -1
            + model_log_var
            - true_log_var
            + torch.exp(true_log_var - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )
        vb = kl.mean() / math.log(2)
    else:
        inv_std = torch.exp(-0.5 * model_log_var)
        upper = normal_cdf_tanh(inv_std * (x0 - model_mean + 1 / 255))
        lower = normal_cdf_tanh(inv_std * (x0 - model_mean - 1 / 255))
        log_p = torch.where(
            x0 < -0.999,
            torch.log(upper.clamp(min=1e-12)),
            torch.where(
                x0 > 0.999, torch.log((1 - lower).clamp(min=1e-12)), torch.log((upper - lower).clamp(min=1e-12))
            ),
        )
        vb = -log_p.mean() / math.log(2)
    return mse + vb, z_hat.flatten()


def reference_pop(memory, policy):
    """Pop once: the oldest (fifo) or the element with the largest row sum of the O(M²) cosine matrix."""
    if policy == "fifo":
        memory.pop(0)
        return
    sums = [sum(float(cosine(a, b)) for b in memory) for a in memory]
    memory.pop(sums.index(max(sums)))


def reference_finetune(model, latents, labels, policy, compat):
    """The authors' loop, batch rows one at a time, memories as python lists."""
    names = [n for n, _ in model.named_parameters() if any(k in n for k in ("bias", "norm", "gamma", "y_embed"))]
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=1e-3, weight_decay=0)
    ema = {n: params[n].detach().clone() for n in names}
    real_memory = {c: [] for c in range(NUM_CLASSES)}
    gen_memory = {c: [] for c in range(NUM_CLASSES)}
    generator = torch.Generator().manual_seed(SEED)
    step_losses = []
    for _ in range(EPOCHS):
        order = torch.randperm(len(latents), generator=generator)
        for step in range(len(latents) // BATCH):
            rows = order[step * BATCH : (step + 1) * BATCH].tolist()
            t = torch.randint(0, 1000, (BATCH,), generator=generator).tolist()
            noise = torch.randn((BATCH, C, H, H), generator=generator).double()
            dropped = (torch.rand(BATCH, generator=generator) < DROPOUT).tolist()
            losses, z_hats = [], []
            for b, row in enumerate(rows):
                y = NUM_CLASSES if dropped[b] else int(labels[row])
                loss, z_hat = reference_row_loss(model, latents[row], t[b], noise[b], y)
                losses.append(loss)
                z_hats.append(z_hat)
            total = sum(losses) / BATCH
            batch_labels = [int(labels[row]) for row in rows]
            classes = list(set(np.array(batch_labels)))
            accumulated = 0.0
            for c in classes:
                members = [b for b in range(BATCH) if batch_labels[b] == c]
                if gen_memory[c]:
                    min_real = min(cosine(z_hats[b], m) for b in members for m in real_memory[c])
                    max_gen = max(cosine(z_hats[b], m) for b in members for m in gen_memory[c])
                    accumulated = accumulated + (0.002 * (1 - min_real) + 0.008 * max_gen) / len(classes)
                for b in members:
                    real_memory[c].append(latents[rows[b]].flatten())
                    gen_memory[c].append(z_hats[b].detach())
                while len(real_memory[c]) > CAPACITY:
                    reference_pop(real_memory[c], policy)
                while len(gen_memory[c]) > CAPACITY:
                    reference_pop(gen_memory[c], policy)
                if compat:
                    total = total + accumulated
            if not compat:
                total = total + accumulated
            step_losses.append(float(total.detach()))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            with torch.no_grad():
                for n in names:
                    ema[n].mul_(EMA_DECAY).add_(params[n], alpha=1 - EMA_DECAY)
    return model, ema, real_memory, gen_memory, step_losses


def fastdd_finetune(model, latents, labels, policy, compat, **overrides):
    kwargs = dict(
        epochs=EPOCHS,
        batch_size=BATCH,
        capacity=CAPACITY,
        policy=policy,
        class_dropout_prob=DROPOUT,
        ema_decay=EMA_DECAY,
        compat=compat,
        seed=SEED,
        progress=False,
    )
    return finetune_sam(model, GaussianDiffusion(1000), latents, labels, **{**kwargs, **overrides})


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("policy, compat", [("most_similar", False), ("most_similar", True), ("fifo", False)])
def test_finetune_matches_reference(data, policy, compat):
    latents, labels = data
    initial = build_model()
    result = fastdd_finetune(copy.deepcopy(initial), latents, labels, policy, compat)
    reference, ref_ema, ref_real, ref_gen, ref_losses = reference_finetune(
        copy.deepcopy(initial), latents, labels, policy, compat
    )
    trained = difffit_parameters(result.model)
    before = dict(initial.named_parameters())
    after = dict(reference.named_parameters())
    for name, p in result.model.named_parameters():
        if name in trained:  # compare the change of every trained parameter
            change, expected = p.detach() - before[name], after[name].detach() - before[name]
            assert expected.abs().max() > 1e-6, name
            assert relative_error(change, expected, floor=1e-30) < 1e-4, name
            ema_change, ref_ema_change = result.ema[name] - before[name], ref_ema[name] - before[name]
            assert relative_error(ema_change, ref_ema_change, floor=1e-30) < 1e-4, name
        else:  # only DiffFit parameters change
            assert torch.equal(p, before[name]), name
    assert any("gamma" in n for n in trained) and "y_embedder.embedding_table.weight" in trained
    for c in range(NUM_CLASSES):
        assert len(result.memory.real[c]) == len(ref_real[c]) >= 1
        assert torch.allclose(result.memory.real[c].view(), torch.stack(ref_real[c]))
        assert torch.allclose(result.memory.gen[c].view(), torch.stack(ref_gen[c]), rtol=1e-6, atol=1e-9)
    assert max(len(m) for m in result.memory.real) == CAPACITY  # pops happened
    assert all(p.requires_grad for p in result.model.parameters() if p is not result.model.pos_embed)
    assert len(result.losses) == len(ref_losses) == EPOCHS * (len(latents) // BATCH)
    assert np.allclose(result.losses, ref_losses, rtol=1e-6, atol=0)


def test_diffusion_loss_matches_reference_at_all_timesteps(data):
    """Every branch of the loss: the decoder NLL at t = 0 (edge bins included) and the KL at t > 0."""
    latents, _ = data
    model = build_model()
    x0 = latents[:4] * 1.5  # many values beyond ±0.999
    t = torch.tensor([0, 0, 1, 999])
    noise = torch.randn(4, C, H, H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2])
    with torch.no_grad():
        loss, pred_xstart = diffusion_training_loss(model, GaussianDiffusion(1000), x0, t, noise, y)
    for b in range(4):
        with torch.no_grad():
            expected, z_hat = reference_row_loss(model, x0[b], int(t[b]), noise[b], int(y[b]))
        assert abs(float(loss[b]) - float(expected)) < 1e-10 * abs(float(expected))
        assert relative_error(pred_xstart[b].flatten(), z_hat, floor=1e-30) < 1e-10


def test_variational_bound_gradcheck():
    """float64 gradcheck of L_t w.r.t. the variance channels, on the KL (t > 0) and decoder (t = 0) branches."""
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, C, 2, 2, generator=generator, dtype=torch.float64) * 0.5
    x_t = torch.randn(2, C, 2, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, C, 2, 2, generator=generator, dtype=torch.float64)
    values = (torch.rand(2, C, 2, 2, generator=generator, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    diffusion, t = GaussianDiffusion(1000), torch.tensor([0, 37])
    assert torch.autograd.gradcheck(
        lambda v: variational_bound_terms(diffusion, torch.cat([eps, v], dim=1), x0, x_t, t), (values,)
    )


def test_memory_terms_change_the_result(data):
    latents, labels = data
    initial = build_model()
    with_terms = fastdd_finetune(copy.deepcopy(initial), latents, labels, "most_similar", False)
    without = fastdd_finetune(
        copy.deepcopy(initial), latents, labels, "most_similar", False, lambda_real=0.0, lambda_gen=0.0
    )
    gamma = "blocks.0.gamma1"
    change = dict(with_terms.model.named_parameters())[gamma] - dict(initial.named_parameters())[gamma]
    plain = dict(without.model.named_parameters())[gamma] - dict(initial.named_parameters())[gamma]
    assert relative_error(change, plain, floor=1e-30) > 1e-3


def test_memory_pop_order_follows_authors():
    """Appending a class's rows first, then popping, differs from popping after every row (CosineMemory)."""
    base, new = [[1.0, 2.0], [0.0, 1.0]], [[0.0, -1.0], [-2.0, 1.0]]
    memory = LatentMemory(2, 2, "most_similar", dtype=torch.float64)
    memory.add(torch.tensor(base, dtype=torch.float64))
    memory.add(torch.tensor(new, dtype=torch.float64))
    reference = [torch.tensor(r, dtype=torch.float64) for r in base + new]
    while len(reference) > 2:
        reference_pop(reference, "most_similar")
    assert torch.equal(memory.view(), torch.stack(reference))
    row_by_row = [torch.tensor(r, dtype=torch.float64) for r in base]
    for row in new:
        row_by_row.append(torch.tensor(row, dtype=torch.float64))
        reference_pop(row_by_row, "most_similar")
    assert not torch.equal(memory.view(), torch.stack(row_by_row))
    fifo = LatentMemory(2, 2, "fifo")
    fifo.add(torch.arange(8.0).view(4, 2))
    assert torch.equal(fifo.view(), torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_saved_weights_reload(data, tmp_path):
    latents, labels = data
    result = fastdd_finetune(build_model(), latents, labels, "most_similar", False, epochs=1)
    path = tmp_path / "sam.pt"
    save_finetuned(path, result.model, result.ema)
    loaded = DiT.from_checkpoint(path, num_heads=2)  # picks the EMA weights, detects DiffFit
    assert loaded.diffit
    ema_model = result.ema_model()
    for name, value in ema_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].double(), value), name
    plain = tmp_path / "sam_model.safetensors"
    save_finetuned(plain, result.model)
    reloaded = DiT.from_checkpoint(plain, num_heads=2)  # builds float32: the float64 weights are rounded
    for name, value in result.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value.float()), name
    assert not list(tmp_path.glob("*.tmp"))


def test_to_difffit_keeps_outputs():
    vanilla = build_model(diffit=False)
    converted = to_difffit(vanilla)
    assert converted.diffit and any("gamma" in n for n in difffit_parameters(converted))
    x = torch.randn(2, C, H, H, dtype=torch.float64)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 3])
    assert torch.equal(converted(x, t, y), vanilla(x, t, y))


def test_bad_hyper_parameters(data):
    latents, labels = data
    model = build_model()
    diffusion = GaussianDiffusion(1000)
    bad = [
        (dict(lambda_real=-0.1), "lambda_real"),
        (dict(lambda_gen=-1.0), "lambda_gen"),
        (dict(capacity=0), "capacity"),
        (dict(capacity=-3), "capacity"),
        (dict(policy="lru"), "policy"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=11), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(ema_decay=1.5), "ema_decay"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            finetune_sam(model, diffusion, latents, labels, progress=False, **kwargs)
    with pytest.raises(ValueError, match="latents"):
        finetune_sam(model, diffusion, latents[:0], labels[:0], progress=False)
    with pytest.raises(ValueError, match="labels"):
        finetune_sam(model, diffusion, latents, labels + 3, progress=False)
    with pytest.raises(ValueError, match="DiffFit"):
        finetune_sam(build_model(diffit=False), diffusion, latents, labels, progress=False)
    with pytest.raises(ValueError, match="diffusion"):
        finetune_sam(model, GaussianDiffusion(50), latents, labels, progress=False)
    with pytest.raises(ValueError, match="capacity"):
        SamMemory(NUM_CLASSES, DIM, capacity=0)
    with pytest.raises(ValueError, match="labels"):
        SamMemory(NUM_CLASSES, DIM).loss(torch.zeros(1, DIM), [5])

"""fastdd.sampling against independent float64 restatements of the ADM/IDDPM formulas, diffusers' DDIM
schedulers, the official forward_with_cfg formula and analytic probability-flow solutions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastdd.sampling import (
    GaussianDiffusion,
    Guidance,
    GuidedSampler,
    cfg_model_output,
    compat_cfg_model_output,
    ddim_invert,
    image_seed,
    space_timesteps,
    splitmix64,
    trajectory_noise,
)
from fastdd.sampling.seeds import batch_trajectory_noise

C, H = 4, 8
NUM_CLASSES = 5
NULL = NUM_CLASSES


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------- toy models
class ToyNet(nn.Module):
    """Tiny deterministic conv net: model(x [B,C,H,W], t [B], y [B]) -> [B, 2C, H, W] (eps, v in (-1, 1))."""

    def __init__(self, learn_sigma: bool = True, seed: int = 0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.learn_sigma = learn_sigma
        self.embed = nn.Embedding(NUM_CLASSES + 1, 16)
        self.conv1 = nn.Conv2d(C, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 2 * C if learn_sigma else C, 3, padding=1)
        torch.random.set_rng_state(generator_state)

    def forward(self, x, t, y):
        frequencies = torch.arange(8, device=x.device, dtype=x.dtype)
        t_features = torch.sin(t.to(x.dtype)[:, None] / 1000.0 * (frequencies + 1) * 3.0)  # [B, 8]
        condition = self.embed(y) + torch.cat([t_features, t_features], dim=1)  # [B, 16]
        h = torch.tanh(self.conv1(x) + condition[:, :, None, None])
        out = self.conv2(h)
        if not self.learn_sigma:
            return out
        return torch.cat([out[:, :C], torch.tanh(out[:, C:])], dim=1)


def reference_alphas_cumprod() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


class GaussianToy(nn.Module):
    """The exact eps-predictor for data x0 ~ N(mu_y, s² I) (mu of the null class = 0):
    E[eps | x_t] = sqrt(1 - ᾱ) (x_t - sqrt(ᾱ) mu) / (ᾱ s² + 1 - ᾱ); variance channels v = 0."""

    def __init__(self, scale: float = 0.5):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        means = torch.randn(NUM_CLASSES + 1, C, H, H, generator=generator, dtype=torch.float64)
        means[NULL] = 0
        self.register_buffer("means", means)
        self.register_buffer("alphas_cumprod", torch.from_numpy(reference_alphas_cumprod()))
        self.scale = scale

    def forward(self, x, t, y):
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
        mu = self.means[y].to(x.dtype)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * self.scale**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    def ode_solution(self, x_T, t_T, y):
        """Probability-flow ODE from x_T at original timestep t_T to t = 0 with ᾱ = 1: mu + s · z."""
        ab = float(self.alphas_cumprod[t_T])
        mu = self.means[y].to(x_T.dtype)
        z = (x_T - math.sqrt(ab) * mu) / math.sqrt(ab * self.scale**2 + 1 - ab)
        return mu + self.scale * z


# --------------------------------------------------------------------------------- float64 reference
class ReferenceTables:
    """IDDPM tables written out from the formulas, numpy float64, respaced with round(k · (T-1)/(N-1))."""

    def __init__(self, num_steps: int = 50):
        base = reference_alphas_cumprod()
        stride = 999 / (num_steps - 1)
        self.kept = [round(k * stride) for k in range(num_steps)]
        ac = base[self.kept]
        ac_prev = np.concatenate([[1.0], ac[:-1]])
        self.betas = 1 - ac / ac_prev
        self.ac, self.ac_prev = ac, ac_prev
        self.posterior_variance = self.betas * (1 - ac_prev) / (1 - ac)
        self.log_var_clipped = np.log(np.concatenate([[self.posterior_variance[1]], self.posterior_variance[1:]]))
        self.coef1 = self.betas * np.sqrt(ac_prev) / (1 - ac)
        self.coef2 = (1 - ac_prev) * np.sqrt(1 - self.betas) / (1 - ac)

    def p_mean_variance(self, model_output, x, i):
        """ADM p_mean_variance, learned range, no clipping, one respaced index i for the batch."""
        eps, v = model_output[:, :C], model_output[:, C:]
        frac = (v + 1) / 2
        log_var = frac * math.log(self.betas[i]) + (1 - frac) * self.log_var_clipped[i]
        pred_x0 = math.sqrt(1 / self.ac[i]) * x - math.sqrt(1 / self.ac[i] - 1) * eps
        mean = self.coef1[i] * pred_x0 + self.coef2[i] * x
        return mean, log_var, pred_x0


def reference_cfg(model, x, t, y, scale, channels):
    """Clean CFG written out: two separate forwards, guided on the first `channels` outputs."""
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def reference_forward_with_cfg(model, x, t, y, scale):
    """The official DiT forward_with_cfg written out for a 2-row pair [cond; uncond] (channels :3 guided)."""
    model_out = model(torch.cat([x[:1], x[:1]]), t, y)
    eps3 = model_out[1:, :3] + scale * (model_out[:1, :3] - model_out[1:, :3])
    return torch.cat([torch.cat([eps3, eps3]), model_out[:, 3:]], dim=1)


@torch.no_grad()
def reference_sample_loop(model, label, noise, scale, channels=C, num_steps=50):
    """ADM p_sample_loop, batch 1, clean CFG, as a plain loop. noise: trajectory_noise of the image."""
    tables = ReferenceTables(num_steps)
    x = noise.initial[None].double()
    y = torch.tensor([label])
    for i in reversed(range(num_steps)):
        t = torch.tensor([tables.kept[i]])
        out = reference_cfg(model, x, t, y, scale, channels)
        mean, log_var, _ = tables.p_mean_variance(out, x, i)
        x = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * log_var) * noise.steps[i, :1].double()
    return x


class Recorder(Guidance):
    """Zero delta on every step; records what the guidance interface exposes."""

    def __init__(self):
        self.x_t, self.sample, self.requires_grad_seen, self.indices = {}, {}, {}, []

    def step(self, ctx):
        self.indices.append(ctx.index)
        self.x_t[ctx.index] = ctx.x_t.detach().clone()
        self.sample[ctx.index] = ctx.sample.clone()
        self.requires_grad_seen[ctx.index] = ctx.x_t.requires_grad
        return torch.zeros_like(ctx.sample)


class ConstantGuidance(Guidance):
    def __init__(self, value, low, high):
        self.value, self.low, self.high, self.calls = value, low, high, []

    def step(self, ctx):
        self.calls.append(ctx.index)
        return torch.full_like(ctx.sample, self.value)


# ------------------------------------------------------------------------------------------- tables
def test_respaced_timesteps_50_of_1000():
    kept = GaussianDiffusion(50).timestep_list
    assert kept == [round(k * 999 / 49) for k in range(50)]
    assert kept[0] == 0 and kept[-1] == 999 and len(set(kept)) == 50


def test_space_timesteps_sections_and_ddim():
    # sections of 100 steps each (300 = 3 × 100): counts 10, 15, 20 strided within each section. IDDPM
    # accumulates the float stride: in section 2 (stride 99/14) the 8th position is 49.4999… (not 7 · 99/14 = 49.5
    # which round() would send to 50), so the kept step is 149.
    expected = []
    for section, count in enumerate([10, 15, 20]):
        positions = np.cumsum([0.0] + [99 / (count - 1)] * (count - 1))
        expected += [100 * section + round(float(p)) for p in positions]
    assert space_timesteps(300, "10,15,20") == expected
    assert 149 in expected and 150 not in expected
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert GaussianDiffusion(50, timestep_spacing="leading").timestep_list == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(10, "20")


def test_tables_match_float64_formulas():
    diffusion, ref = GaussianDiffusion(50), ReferenceTables(50)
    for name, expected in [
        ("betas", ref.betas),
        ("alphas_cumprod", ref.ac),
        ("alphas_cumprod_prev", ref.ac_prev),
        ("posterior_variance", ref.posterior_variance),
        ("posterior_log_variance_clipped", ref.log_var_clipped),
        ("posterior_mean_coef1", ref.coef1),
        ("posterior_mean_coef2", ref.coef2),
        ("sqrt_recip_alphas_cumprod", np.sqrt(1 / ref.ac)),
        ("sqrt_recipm1_alphas_cumprod", np.sqrt(1 / ref.ac - 1)),
    ]:
        actual = getattr(diffusion, name)
        assert actual.dtype == torch.float64 and actual.shape == (50,)
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-12, atol=0, err_msg=name)
    assert diffusion.alpha_bar(49) == pytest.approx(ref.ac[49], rel=1e-15)
    float32 = diffusion.tables("cpu", torch.float32)["betas"]
    assert float32.dtype == torch.float32 and torch.equal(float32, diffusion.betas.float())


def test_p_mean_variance_matches_reference():
    diffusion, ref = GaussianDiffusion(50), ReferenceTables(50)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, C, H, H, generator=generator, dtype=torch.float64)
    model_output = torch.cat(
        [
            torch.randn(3, C, H, H, generator=generator, dtype=torch.float64),
            torch.rand(3, C, H, H, generator=generator, dtype=torch.float64) * 2 - 1,
        ],
        dim=1,
    )
    for i in (0, 1, 17, 49):
        out = diffusion.p_mean_variance(model_output, x, i)
        mean, log_var, pred_x0 = ref.p_mean_variance(model_output, x, i)
        torch.testing.assert_close(out["mean"], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["log_variance"], log_var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["variance"], torch.exp(log_var), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["pred_xstart"], pred_x0, rtol=1e-12, atol=1e-12)
    # a [B] tensor of per-row indices gives each row its own index's result
    indices = torch.tensor([49, 3, 0])
    out = diffusion.p_mean_variance(model_output, x, indices)
    for row, i in enumerate(indices.tolist()):
        mean, log_var, _ = ref.p_mean_variance(model_output[row : row + 1], x[row : row + 1], i)
        torch.testing.assert_close(out["mean"][row : row + 1], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["log_variance"][row : row + 1], log_var, rtol=1e-12, atol=1e-12)
    # ddpm_step: no noise at index 0, per row with tensor indices
    noise = torch.randn(3, C, H, H, generator=generator, dtype=torch.float64)
    stepped = diffusion.ddpm_step(out, noise, indices)
    expected = (
        out["mean"]
        + torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).view(3, 1, 1, 1)
        * torch.exp(0.5 * out["log_variance"])
        * noise
    )
    torch.testing.assert_close(stepped, expected, rtol=1e-14, atol=1e-14)
    # clip_denoised clamps x̂0 before the mean
    clipped = diffusion.p_mean_variance(model_output, x, 30, clip_denoised=True)
    _, _, pred_x0 = ref.p_mean_variance(model_output, x, 30)
    expected_mean = ref.coef1[30] * pred_x0.clamp(-1, 1) + ref.coef2[30] * x
    torch.testing.assert_close(clipped["mean"], expected_mean, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="model_output"):
        diffusion.p_mean_variance(model_output[:, :C], x, 3)
    with pytest.raises(ValueError, match="i must be"):
        diffusion.p_mean_variance(model_output, x, 50)


def test_q_sample_matches_formula():
    diffusion, ref = GaussianDiffusion(50), ReferenceTables(50)
    x0, noise = torch.randn(2, C, H, H, dtype=torch.float64), torch.randn(2, C, H, H, dtype=torch.float64)
    expected = math.sqrt(ref.ac[20]) * x0 + math.sqrt(1 - ref.ac[20]) * noise
    torch.testing.assert_close(diffusion.q_sample(x0, 20, noise), expected, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------------- diffusers DDIM
def test_ddim_step_matches_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    diffusion = GaussianDiffusion(50, timestep_spacing="leading")
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=np.linspace(1e-4, 0.02, 1000),
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == diffusion.timestep_list[::-1]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, H, H, generator=generator)
    for k, t in enumerate(scheduler.timesteps.tolist()):
        i = 49 - k
        eps = torch.randn(2, C, H, H, generator=generator)
        noise = torch.randn(2, C, H, H, generator=generator)
        for eta in (0.0, 0.7):
            expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            actual = diffusion.ddim_step(eps, x, i, eta=eta, noise=noise)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)


def test_ddim_inversion_step_matches_diffusers_inverse_scheduler():
    from diffusers import DDIMInverseScheduler

    diffusion = GaussianDiffusion(50, timestep_spacing="leading")
    scheduler = DDIMInverseScheduler(
        num_train_timesteps=1000,
        trained_betas=np.linspace(1e-4, 0.02, 1000),
        clip_sample=False,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, C, H, H, generator=generator)
    for t in scheduler.timesteps.tolist()[1:]:  # t = 20 k: from timestep 20 (k - 1) to 20 k = index k-1 -> k
        eps = torch.randn(2, C, H, H, generator=generator)
        expected = scheduler.step(eps, t, x).prev_sample
        actual = diffusion.ddim_inversion_step(eps, x, t // 20 - 1)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)
        x = expected
    with pytest.raises(ValueError, match="i must be"):
        diffusion.ddim_inversion_step(eps, x, 49)


# -------------------------------------------------------------------------------------------- CFG
def test_cfg_model_output_matches_two_forwards():
    model = ToyNet().double()
    x = torch.randn(3, C, H, H, dtype=torch.float64)
    t, y = torch.tensor([999, 500, 3]), torch.tensor([0, 2, 4])
    for channels in (None, 3):
        expected = reference_cfg(model, x, t, y, 4.0, C if channels is None else channels)
        torch.testing.assert_close(
            cfg_model_output(model, x, t, y, 4.0, NULL, channels), expected, rtol=1e-12, atol=1e-12
        )
    with pytest.raises(ValueError, match="cfg_channels"):
        cfg_model_output(model, x, t, y, 4.0, NULL, 9)


def test_compat_cfg_matches_forward_with_cfg_formula():
    model = ToyNet().double()
    x = torch.randn(2, C, H, H, dtype=torch.float64)  # the uncond row differs: it must be ignored
    t, y = torch.tensor([700, 700]), torch.tensor([3, NULL])
    out = compat_cfg_model_output(model, x, t, y, 4.0, cfg_channels=3)
    torch.testing.assert_close(out, reference_forward_with_cfg(model, x, t, y, 4.0), rtol=1e-12, atol=1e-12)
    own = model(torch.cat([x[:1], x[:1]]), t, y)
    assert torch.equal(out[0, :3], out[1, :3])  # guided channels duplicated on both halves
    assert torch.equal(out[1, 3:], own[1, 3:])  # uncond row keeps its own eps channel 4 and variance
    assert not torch.allclose(out[0, 3], out[1, 3])
    with pytest.raises(ValueError, match="even"):
        compat_cfg_model_output(model, x[:1], t[:1], y[:1], 4.0)


# ------------------------------------------------------------------------------------ sampling loop
def test_ancestral_loop_matches_reference_loop():
    model = ToyNet().double()
    image = (2, 7, 11)  # (class, index, seed)
    sampler = GuidedSampler(model, GaussianDiffusion(50), cfg_scale=4.0, num_classes=NUM_CLASSES)
    out = sampler.sample([2], [image], (C, H, H), "cpu", progress=False, dtype=torch.float64)
    noise = trajectory_noise(11, 2, 7, (C, H, H), 50)
    expected = reference_sample_loop(model, 2, noise, 4.0)
    assert out.dtype == torch.float64 and out.shape == (1, C, H, H)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)
    # float32 state: same trajectory within float32 accuracy
    out32 = GuidedSampler(model.float(), GaussianDiffusion(50), cfg_scale=4.0, num_classes=NUM_CLASSES).sample(
        [2], [image], (C, H, H), "cpu", progress=False
    )
    assert (out32.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@torch.no_grad()
def test_compat_loop_matches_official_two_row_loop():
    model = ToyNet().double()
    recorder = Recorder()
    sampler = GuidedSampler(
        model, GaussianDiffusion(50), [recorder], cfg_scale=4.0, compat=True, num_classes=NUM_CLASSES
    )
    out = sampler.sample([1], [(1, 0, 5)], (C, H, H), "cpu", progress=False, dtype=torch.float64)
    # the official loop: z = cat([z, z]); forward_with_cfg; independent noise per row, none at the last step
    tables, noise = ReferenceTables(50), trajectory_noise(5, 1, 0, (C, H, H), 50, rows=2)
    x = torch.cat([noise.initial[None], noise.initial[None]]).double()
    y = torch.tensor([1, NULL])
    for i in reversed(range(50)):
        torch.testing.assert_close(recorder.x_t[i], x, rtol=0, atol=1e-8)
        model_out = reference_forward_with_cfg(model, x, torch.tensor([tables.kept[i]] * 2), y, 4.0)
        mean, log_var, _ = tables.p_mean_variance(model_out, x, i)
        x = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * log_var) * noise.steps[i].double()
    torch.testing.assert_close(out, x[:1], rtol=0, atol=1e-8)
    assert not torch.allclose(recorder.x_t[10][0], recorder.x_t[10][1])  # the shadow row has its own noise
    # the conditional row equals a clean run guiding only the first 3 channels (same initial and row-0 noise)
    clean = GuidedSampler(model, GaussianDiffusion(50), cfg_scale=4.0, cfg_channels=3, num_classes=NUM_CLASSES)
    torch.testing.assert_close(
        clean.sample([1], [(1, 0, 5)], (C, H, H), "cpu", progress=False, dtype=torch.float64), out, rtol=0, atol=1e-12
    )


def test_image_identical_alone_in_batch_and_reordered():
    model = ToyNet()
    sampler = GuidedSampler(model, GaussianDiffusion(20), cfg_scale=4.0, num_classes=NUM_CLASSES)
    ids = [(0, 3, 9), (4, 3, 9), (2, 1, 9)]
    alone = sampler.sample([4], [ids[1]], (C, H, H), "cpu", progress=False)
    batch = sampler.sample([0, 4, 2], ids, (C, H, H), "cpu", progress=False)
    reordered = sampler.sample([2, 4, 0], ids[::-1], (C, H, H), "cpu", progress=False)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(reordered.flip(0), batch, rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[2])


def test_seeds():
    # SplitMix64 reference outputs for state 0 (first two outputs of the generator)
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    h = splitmix64(splitmix64(splitmix64(7) ^ 3) ^ 5)
    assert image_seed(7, 3, 5) == h >> 1 < 2**63
    assert len({image_seed(0, c, i) for c in range(20) for i in range(20)}) == 400
    first = trajectory_noise(1, 2, 3, (C, H, H), 10)
    assert torch.equal(first.initial, trajectory_noise(1, 2, 3, (C, H, H), 10).initial)
    compat = trajectory_noise(1, 2, 3, (C, H, H), 10, rows=2)
    assert compat.steps.shape == (10, 2, C, H, H)
    assert torch.equal(compat.initial, first.initial) and torch.equal(compat.steps[:, 0], first.steps[:, 0])
    assert torch.equal(trajectory_noise(1, 2, 3, (C, H, H), 30).initial, first.initial)
    batch = batch_trajectory_noise([(2, 3, 1), (0, 0, 1)], (C, H, H), 10, rows=2)
    assert torch.equal(batch.steps[:, 0], compat.steps[:, 0]) and torch.equal(batch.steps[:, 2], compat.steps[:, 1])
    with pytest.raises(ValueError, match="class_index"):
        image_seed(0, -1, 0)


# ------------------------------------------------------------------------------------------ guidance
def test_guidance_changes_exactly_its_steps():
    model = ToyNet()
    ids = [(1, 0, 0), (3, 0, 0)]

    def run(guidances):
        sampler = GuidedSampler(model, GaussianDiffusion(30), guidances, cfg_scale=4.0, num_classes=NUM_CLASSES)
        return sampler.sample([1, 3], ids, (C, H, H), "cpu", progress=False)

    base = Recorder()
    base_out = run([base])
    constant, other, recorder = ConstantGuidance(0.25, 12, 15), ConstantGuidance(-0.1, 15, 15), Recorder()
    out = run([recorder, constant, other])
    assert constant.calls == [15, 14, 13, 12] and other.calls == [15]
    for i in range(29, 15, -1):  # before the first guided step: unchanged
        assert torch.equal(recorder.x_t[i], base.x_t[i])
    # step 15 sees the same x_t; the next latent is the unguided sample plus both deltas
    assert torch.equal(recorder.x_t[15], base.x_t[15]) and torch.equal(recorder.sample[15], base.sample[15])
    torch.testing.assert_close(recorder.x_t[14], base.sample[15] + 0.25 - 0.1, rtol=0, atol=1e-6)
    torch.testing.assert_close(recorder.x_t[12], recorder.sample[13] + 0.25, rtol=0, atol=1e-6)
    torch.testing.assert_close(recorder.x_t[11], recorder.sample[12] + 0.25, rtol=0, atol=1e-6)
    torch.testing.assert_close(recorder.x_t[10], recorder.sample[11], rtol=0, atol=0)
    assert not torch.allclose(out, base_out)
    assert not any(recorder.requires_grad_seen.values())


class GradNormGuidance(Guidance):
    """requires_grad guidance: delta = -scale · ∇_{x_t} Σ x̂0² (real rows), on [low, high]; the gradient via
    ctx.grad, or via a plain torch.autograd.grad (fine for the last gradient guidance of a step)."""

    requires_grad = True

    def __init__(self, low, high, scale=0.01, plain_autograd=False):
        self.low, self.high, self.scale, self.plain_autograd, self.grads = low, high, scale, plain_autograd, {}

    def step(self, ctx):
        loss = (ctx.pred_xstart[: ctx.rows] ** 2).sum()
        gradient = torch.autograd.grad(loss, ctx.x_t)[0] if self.plain_autograd else ctx.grad(loss)
        self.grads[ctx.index] = (ctx.x_t.detach().clone(), gradient)
        return -self.scale * gradient


def test_requires_grad_guidance_gets_gradient_through_the_model():
    grad_enabled = {}

    class Probe(ToyNet):
        def forward(self, x, t, y):
            grad_enabled[int(t[0])] = torch.is_grad_enabled()
            return super().forward(x, t, y)

    model = Probe().double()
    diffusion, ref = GaussianDiffusion(20), ReferenceTables(20)
    first, second, recorder = GradNormGuidance(5, 8), GradNormGuidance(8, 8, 0.02, plain_autograd=True), Recorder()
    sampler = GuidedSampler(model, diffusion, [recorder, first, second], cfg_scale=3.0, num_classes=NUM_CLASSES)
    sampler.sample([2, 0], [(2, 0, 1), (0, 0, 1)], (C, H, H), "cpu", progress=False, dtype=torch.float64)
    assert sorted(first.grads) == [5, 6, 7, 8] and sorted(second.grads) == [8]
    for i in range(20):
        assert recorder.requires_grad_seen[i] == (5 <= i <= 8)
        assert grad_enabled[diffusion.timestep_list[i]] == (5 <= i <= 8)
    for guidance in (first, second):
        for i, (x_t, gradient) in guidance.grads.items():
            x = x_t.clone().requires_grad_(True)
            t = torch.full((2,), ref.kept[i])
            out = reference_cfg(model, x, t, torch.tensor([2, 0]), 3.0, C)
            _, _, pred_x0 = ref.p_mean_variance(out, x, i)
            (expected,) = torch.autograd.grad((pred_x0**2).sum(), x)
            torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    # at step 8 both guidances act: the next latent is the sample plus both deltas
    expected_next = recorder.sample[8] - 0.01 * first.grads[8][1] - 0.02 * second.grads[8][1]
    torch.testing.assert_close(recorder.x_t[7], expected_next, rtol=0, atol=1e-12)


def test_bad_delta_shape_and_labels_raise():
    class Wrong(Guidance):
        def step(self, ctx):
            return torch.zeros(1)

    sampler = GuidedSampler(ToyNet(), GaussianDiffusion(5), [Wrong()], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="delta"):
        sampler.sample([0], [(0, 0, 0)], (C, H, H), "cpu", progress=False)
    with pytest.raises(ValueError, match="labels"):
        sampler.sample([NUM_CLASSES], [(0, 0, 0)], (C, H, H), "cpu", progress=False)
    with pytest.raises(ValueError, match="image_ids"):
        sampler.sample([0, 1], [(0, 0, 0)], (C, H, H), "cpu", progress=False)


# ---------------------------------------------------------------------------- DDIM, inversion, DPM
def test_ddim_and_dpm_solver_converge_to_probability_flow_solution():
    model = GaussianToy()
    ids = [(1, 0, 4), (3, 2, 4)]
    labels = torch.tensor([1, 3])
    initial = batch_trajectory_noise(ids, (C, H, H), 1, dtype=torch.float64).initial
    expected = model.ode_solution(initial, 999, labels)

    def ddim_error(num_steps):
        sampler = GuidedSampler(model, GaussianDiffusion(num_steps), cfg_scale=1.0, num_classes=NUM_CLASSES)
        return (
            (sampler.ddim_sample(labels, ids, (C, H, H), "cpu", progress=False, dtype=torch.float64) - expected)
            .abs()
            .max()
        )

    # DDIM is first order: 4x the steps, about 1/4 of the error
    error_50, error_200 = ddim_error(50), ddim_error(200)
    assert error_50 < 0.1 and error_200 < 0.3 * error_50
    sampler = GuidedSampler(model, GaussianDiffusion(50), cfg_scale=1.0, num_classes=NUM_CLASSES)
    dpm = sampler.dpm_solver_sample(labels, ids, (C, H, H), "cpu", num_steps=50, progress=False, dtype=torch.float64)
    torch.testing.assert_close(dpm.double(), expected, rtol=0, atol=2e-3)
    # the ancestral sampler is stochastic: it lands elsewhere
    ancestral = sampler.sample(labels, ids, (C, H, H), "cpu", progress=False, dtype=torch.float64)
    assert (ancestral - expected).abs().max() > 0.1


class SmoothToy(nn.Module):
    """eps depends smoothly on x and t: eps = a_y + x_weight · sin(x) + 0.2 · t/1000 (v = 0)."""

    def __init__(self, x_weight: float):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.register_buffer("offsets", torch.randn(NUM_CLASSES + 1, C, H, H, generator=generator, dtype=torch.float64))
        self.x_weight = x_weight

    def forward(self, x, t, y):
        eps = self.offsets[y].to(x.dtype) + self.x_weight * torch.sin(x) + 0.2 * t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_ddim_invert_then_sample_round_trips(cfg_scale):
    labels = torch.tensor([0, 2])
    x0 = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ab = reference_alphas_cumprod()

    def round_trip(model, num_steps, target):
        diffusion = GaussianDiffusion(num_steps, timestep_spacing="leading")
        inverted = ddim_invert(model, diffusion, x0, labels, target, cfg_scale, NULL)
        sampler = GuidedSampler(model, diffusion, cfg_scale=cfg_scale, num_classes=NUM_CLASSES)
        restored = sampler.ddim_sample(
            labels, start_index=target, x_start=inverted, progress=False, dtype=torch.float64
        )
        # sampling ends with the step from index 0 (ᾱ at timestep 0) to ᾱ = 1, i.e. x̂0 of x0 at timestep 0
        eps = reference_cfg(model, x0, torch.zeros(2, dtype=torch.long), labels, cfg_scale, C)[:, :C]
        final = (x0 - math.sqrt(1 - ab[0]) * eps) / math.sqrt(ab[0])
        return inverted, (restored - final).abs().max()

    # eps independent of x: inversion and sampling use the same eps per step pair, so the round trip is exact
    inverted, error = round_trip(SmoothToy(0.0), 50, 31)
    assert (inverted - x0).abs().max() > 1.0 and error < 1e-10
    # eps depending smoothly on x: close, and first order in the step size
    error_50, error_100 = round_trip(SmoothToy(0.05), 50, 31)[1], round_trip(SmoothToy(0.05), 100, 62)[1]
    assert error_50 < 0.03 and error_100 < 0.6 * error_50

    model, diffusion = SmoothToy(0.05), GaussianDiffusion(50, timestep_spacing="leading")
    trajectory = ddim_invert(model, diffusion, x0, labels, 31, cfg_scale, NULL, return_intermediates=True)
    assert trajectory.shape == (32, 2, C, H, H) and torch.equal(trajectory[0], x0)
    torch.testing.assert_close(
        ddim_invert(model, diffusion, x0, labels, 31, cfg_scale, NULL), trajectory[-1], rtol=0, atol=0
    )
    # one inversion step by hand: model at the target timestep on the current latent (D3HR convention)
    eps = reference_cfg(model, trajectory[4], torch.full((2,), 100), labels, cfg_scale, C)[:, :C]
    x0_pred = (trajectory[4] - math.sqrt(1 - ab[80]) * eps) / math.sqrt(ab[80])
    expected_step = math.sqrt(ab[100]) * x0_pred + math.sqrt(1 - ab[100]) * eps
    torch.testing.assert_close(trajectory[5], expected_step, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_ddim_sample_loop_with_eta_and_compat():
    model = ToyNet().double()
    diffusion = GaussianDiffusion(20, timestep_spacing="leading")
    ab = reference_alphas_cumprod()
    kept = list(range(0, 1000, 50))
    ids, labels = [(3, 1, 2)], torch.tensor([3])
    sampler = GuidedSampler(model, diffusion, cfg_scale=2.0, num_classes=NUM_CLASSES)
    out = sampler.ddim_sample(labels, ids, (C, H, H), "cpu", eta=0.5, progress=False, dtype=torch.float64)
    noise = trajectory_noise(2, 3, 1, (C, H, H), 20)
    x = noise.initial[None].double()
    for i in reversed(range(20)):  # DDIM (Song et al. eq. 12) written out
        a, a_prev = ab[kept[i]], (ab[kept[i - 1]] if i > 0 else 1.0)
        eps = reference_cfg(model, x, torch.tensor([kept[i]]), labels, 2.0, C)[:, :C]
        x0_pred = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x = math.sqrt(a_prev) * x0_pred + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise.steps[i, :1].double()
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)
    # compat DDIM: the conditional row equals a clean run guiding the first 3 channels
    compat = GuidedSampler(model, diffusion, cfg_scale=2.0, compat=True, num_classes=NUM_CLASSES)
    clean3 = GuidedSampler(model, diffusion, cfg_scale=2.0, cfg_channels=3, num_classes=NUM_CLASSES)
    start = torch.randn(1, C, H, H, dtype=torch.float64)
    torch.testing.assert_close(
        compat.ddim_sample(labels, start_index=12, x_start=start, progress=False, dtype=torch.float64),
        clean3.ddim_sample(labels, start_index=12, x_start=start, progress=False, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )

"""The sampler's speed options: bf16 autocast with fp32 guidance reductions, the model-Jacobian-free fast mode,
torch.compile of the model, and whole steps replayed from recorded graphs (here with a CPU recorder that
traces each step once, so a per-batch value that does not travel through the step's inputs or in-place
device state goes stale exactly as in a CUDA graph)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_dit import relative_error, tiny_denoising_dit
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils import parameters_to_vector

from fastdd import ops
from fastdd.guidance import DeviationGuidance, InfluenceGuidance, ModeGuidance
from fastdd.models import ConvNet
from fastdd.sampling import (
    GaussianDiffusion,
    Guidance,
    GuidedSampler,
    StepGraphs,
    acceleration,
    mixed_precision,
    sample_step,
)

CLASSES, STEPS, LATENT = 3, 10, (4, 8, 8)


def decode(latents):
    """A differentiable stand-in decoder: [B, 4, 8, 8] -> [B, 3, 8, 8]."""
    return torch.tanh(latents[:, :3] + 0.1 * latents[:, 3:4])


@pytest.fixture(scope="module")
def igd_parts():
    torch.manual_seed(0)
    surrogate = ConvNet(3, CLASSES, width=6, depth=2, im_size=8).eval()
    flat = torch.stack(
        [parameters_to_vector(ConvNet(3, CLASSES, width=6, depth=2, im_size=8).parameters()) for _ in range(2)]
    )
    real_grads = torch.randn(CLASSES, *flat.shape) * 0.01
    return surrogate, flat.detach(), real_grads


def igd_guidances(igd_parts, decoder=decode, device="cpu"):
    surrogate, flat, real_grads = (t.to(device) for t in igd_parts)
    dim = LATENT[0] * LATENT[1] * LATENT[2]
    return [
        DeviationGuidance(CLASSES, dim, gamma=2.0, low=3, high=8, device=device),
        InfluenceGuidance(decoder, surrogate, flat, real_grads, k=5.0, low=3, high=8),
    ]


def run_batches(sampler, batches=3, device="cpu"):
    """IPC `batches` of every class, one image per class per batch, in order -> [batches, CLASSES, C, H, W]."""
    out = []
    for image_index in range(batches):
        ids = [(c, image_index, 17) for c in range(CLASSES)]
        out.append(sampler.sample(list(range(CLASSES)), ids, LATENT, device, progress=False))
    return torch.stack(out)


# --------------------------------------------------------------------------- bf16
def test_mixed_precision_runs_bf16_and_returns_fp32():
    seen = []
    layer = torch.nn.Linear(8, 8)
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = torch.randn(4, 8)
    out = mixed_precision(layer, "bf16")(x)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert mixed_precision(layer, "fp32") is layer
    torch.testing.assert_close(out, layer(x), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="precision"):
        mixed_precision(layer, "fp16")


def test_bf16_sampler_keeps_guidance_reductions_fp32_and_stays_close(igd_parts, monkeypatch):
    model = tiny_denoising_dit(CLASSES)
    dtypes, grad_cosine = [], ops.grad_cosine

    def recording_grad_cosine(model, flat_params, x, *args, **kwargs):
        dtypes.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return grad_cosine(model, flat_params, x, *args, **kwargs)

    monkeypatch.setattr(ops, "grad_cosine", recording_grad_cosine)

    def sampler(precision):
        guidances = igd_guidances(igd_parts, mixed_precision(decode, precision))
        return GuidedSampler(
            model, GaussianDiffusion(STEPS), guidances, cfg_scale=2.0, num_classes=CLASSES, precision=precision
        )

    fp32 = run_batches(sampler("fp32"), batches=2)
    bf16 = run_batches(sampler("bf16"), batches=2)
    assert bf16.dtype == torch.float32 and set(dtypes) == {(torch.float32, False)}
    assert 0 < relative_error(bf16, fp32) < 0.05
    with pytest.raises(ValueError, match="precision"):
        GuidedSampler(model, GaussianDiffusion(STEPS), precision="half", num_classes=CLASSES)


# --------------------------------------------------------------------------- fast mode: no model Jacobian
class XstartProbe(Guidance):
    """A gradient guidance whose loss depends on x̂0 only: records ∂L/∂x_t and ∂L/∂x̂0."""

    requires_grad = True

    def step(self, ctx):
        loss = (ctx.pred_xstart[: ctx.rows] ** 2).sum()
        self.by_xstart = torch.autograd.grad(loss, ctx.pred_xstart, retain_graph=True)[0]
        self.by_xt = ctx.grad(loss)
        return torch.zeros_like(ctx.sample)


def test_model_jacobian_off_uses_the_ideal_denoiser_jacobian():
    model, diffusion = tiny_denoising_dit(CLASSES), GaussianDiffusion(STEPS)
    x, y, index = torch.randn(2, *LATENT), torch.tensor([0, 2]), 6
    model_fn = GuidedSampler(model, diffusion, cfg_scale=2.0, num_classes=CLASSES).model_fn
    probe, grad_mode = XstartProbe(), []
    model.register_forward_hook(lambda module, args, out: grad_mode.append(torch.is_grad_enabled()))
    sample_step(model_fn, diffusion, x, index, y, torch.randn_like(x), [probe], model_jacobian=False)
    assert grad_mode == [False]  # the model ran without autograd
    scale = diffusion.alpha_bar(index) ** 0.5  # ∂x̂0/∂x_t of the ideal unit-variance denoiser
    torch.testing.assert_close(probe.by_xt, scale * probe.by_xstart)
    sample_step(model_fn, diffusion, x, index, y, torch.randn_like(x), [probe])
    assert grad_mode == [False, True] and relative_error(probe.by_xt, scale * probe.by_xstart) > 1e-3


def test_fast_mode_changes_only_guided_steps(igd_parts):
    model = tiny_denoising_dit(CLASSES)

    def sampler(guidances, exact):
        return GuidedSampler(
            model, GaussianDiffusion(STEPS), guidances, cfg_scale=2.0, num_classes=CLASSES, model_jacobian=exact
        )

    torch.testing.assert_close(run_batches(sampler([], False), 1), run_batches(sampler([], True), 1), rtol=0, atol=0)
    exact = run_batches(sampler(igd_guidances(igd_parts), True), 2)
    fast = run_batches(sampler(igd_guidances(igd_parts), False), 2)
    assert 0 < relative_error(fast, exact) < 0.5


def test_replace_keeps_every_setting_but_the_swapped_part(igd_parts):
    """SAM (fine-tuned model) and D3HR (own schedule) sample with sampler.replace(...): the speed options carry
    over, so the result equals a sampler built directly with them."""
    model, other_model = tiny_denoising_dit(CLASSES), tiny_denoising_dit(CLASSES)
    options = dict(cfg_scale=2.0, num_classes=CLASSES, precision="bf16", cuda_graphs=True, model_jacobian=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CUDA graphs on CPU: eager, said once
        base = GuidedSampler(model, GaussianDiffusion(STEPS), igd_guidances(igd_parts), **options)
        replaced = base.replace(model=other_model, diffusion=GaussianDiffusion(STEPS, timestep_spacing="leading"))
        direct = GuidedSampler(
            other_model, GaussianDiffusion(STEPS, timestep_spacing="leading"), igd_guidances(igd_parts), **options
        )
        assert (replaced.precision, replaced.model_jacobian, replaced.graphs is not None) == ("bf16", False, True)
        assert replaced.guidances == base.guidances and replaced.model is other_model
        torch.testing.assert_close(run_batches(replaced, 1), run_batches(direct, 1), rtol=0, atol=0)


# --------------------------------------------------------------------------- compile
def test_compiled_model_gives_the_eager_result(igd_parts):
    model = tiny_denoising_dit(CLASSES)
    eager = GuidedSampler(model, GaussianDiffusion(STEPS), igd_guidances(igd_parts), cfg_scale=2.0, num_classes=CLASSES)
    compiled = GuidedSampler(
        model, GaussianDiffusion(STEPS), igd_guidances(igd_parts), cfg_scale=2.0, num_classes=CLASSES, compile=True
    )
    torch.testing.assert_close(run_batches(compiled, 2), run_batches(eager, 2), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- recorded steps
class TracingRecorder:
    """CPU stand-in for CudaGraphRecorder with a graph's semantics: `record` traces the step once with make_fx
    (Python runs once; tensors it reads that are not inputs are baked in by reference, as a CUDA graph bakes
    their addresses) and replay runs the traced graph on the static inputs, writing the static output in place."""

    def __init__(self):
        self.recorded = self.replayed = self.warmed = 0

    def supports(self, inputs):
        return True

    def warm_up(self, fn, inputs):
        self.warmed += 1
        return fn(*inputs)

    def record(self, fn, static_inputs):
        self.recorded += 1
        present = [i for i, t in enumerate(static_inputs) if t is not None]

        def on_tensors(*tensors):
            args = list(static_inputs)
            for i, t in zip(present, tensors):
                args[i] = t
            return fn(*args)

        tensors = [static_inputs[i] for i in present]
        graph = make_fx(on_tensors)(*tensors)
        static_output = graph(*tensors)

        def replay():
            self.replayed += 1
            static_output.copy_(graph(*tensors))

        return replay, static_output


def recorded(sampler):
    sampler.graphs = StepGraphs(TracingRecorder())
    return sampler


@pytest.mark.parametrize("guided", [False, True])
def test_recorded_steps_replay_to_the_eager_result(igd_parts, guided):
    model = tiny_denoising_dit(CLASSES)

    def sampler():
        guidances = igd_guidances(igd_parts) if guided else []
        return GuidedSampler(model, GaussianDiffusion(STEPS), guidances, cfg_scale=2.0, num_classes=CLASSES)

    replayed = recorded(sampler())
    torch.testing.assert_close(run_batches(replayed), run_batches(sampler()), rtol=0, atol=0)
    recorder = replayed.graphs.recorder
    assert (recorder.warmed, recorder.recorded, recorder.replayed) == (STEPS, STEPS, 2 * STEPS)


def test_mode_guidance_replays_with_each_batch_targets():
    """ModeGuidance's per-image modes change every batch: they must reach the recorded step in place."""
    model = tiny_denoising_dit(CLASSES)
    modes = torch.randn(CLASSES, 3, *LATENT)

    def sampler():
        return GuidedSampler(
            model,
            GaussianDiffusion(STEPS),
            [ModeGuidance(modes, lam=0.1, stop_index=4)],
            cfg_scale=2.0,
            num_classes=CLASSES,
        )

    torch.testing.assert_close(run_batches(recorded(sampler())), run_batches(sampler()), rtol=0, atol=0)


class HostState(Guidance):
    """Not capturable: its delta comes from a Python number that changes every batch."""

    def __init__(self):
        self.offset = 0.0

    def step(self, ctx):
        return torch.full_like(ctx.sample, self.offset)

    def begin_batch(self, labels, image_ids):
        self.offset += 0.01


def test_guidance_that_is_not_capturable_runs_eagerly_and_is_named(monkeypatch):
    monkeypatch.setattr(acceleration, "_said", set())
    model = tiny_denoising_dit(CLASSES)

    def sampler(**options):
        return GuidedSampler(
            model, GaussianDiffusion(STEPS), [HostState()], cfg_scale=2.0, num_classes=CLASSES, **options
        )

    with pytest.warns(RuntimeWarning, match="HostState cannot be recorded"):
        replayed = recorded(sampler(cuda_graphs=True))
    torch.testing.assert_close(run_batches(replayed), run_batches(sampler()), rtol=0, atol=0)
    assert replayed.graphs.recorder.recorded == 0


def test_cuda_graphs_on_cpu_fall_back_to_eager_and_say_so_once(monkeypatch, igd_parts):
    monkeypatch.setattr(acceleration, "_said", set())
    model = tiny_denoising_dit(CLASSES)
    eager = GuidedSampler(model, GaussianDiffusion(STEPS), igd_guidances(igd_parts), cfg_scale=2.0, num_classes=CLASSES)
    graphs = GuidedSampler(
        model, GaussianDiffusion(STEPS), igd_guidances(igd_parts), cfg_scale=2.0, num_classes=CLASSES, cuda_graphs=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_batches(graphs, 2)
    messages = [str(w.message) for w in caught if "cuda_graphs" in str(w.message)]
    assert messages == ["cuda_graphs: CUDA graphs need CUDA tensors; running the sampler steps eagerly"]
    torch.testing.assert_close(result, run_batches(eager, 2), rtol=0, atol=0)


def test_failed_capture_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(acceleration, "_said", set())

    class Refusing(TracingRecorder):
        def record(self, fn, static_inputs):
            raise RuntimeError("operation not permitted when stream is capturing")

    graphs = StepGraphs(Refusing())
    x = torch.randn(3)
    assert torch.equal(graphs.run("k", torch.sin, x), torch.sin(x))  # warm-up
    with pytest.warns(RuntimeWarning, match="capture failed"):
        assert torch.equal(graphs.run("k", torch.sin, x), torch.sin(x))
    assert not graphs.enabled and torch.equal(graphs.run("k", torch.cos, x), torch.cos(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager_on_gpu(igd_parts):
    device = torch.device("cuda")
    model = tiny_denoising_dit(CLASSES).to(device)

    def sampler(graphs):
        return GuidedSampler(
            model,
            GaussianDiffusion(STEPS),
            igd_guidances(igd_parts, device=device),
            cfg_scale=2.0,
            num_classes=CLASSES,
            cuda_graphs=graphs,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide a capture failure
        replayed = run_batches(sampler(True), device=device)
    torch.testing.assert_close(replayed, run_batches(sampler(False), device=device), rtol=1e-5, atol=1e-6)

"""Per-image time of plain and guided sampling: the authors' algorithm vs fastdd, side by side on one device.

    python benchmarks/bench_sampler.py [--config tiny|dit-s2-128|dit-xl2-256] [--device cpu|cuda]
                                       [--repeats 3] [--batch 4] [--no-compile]

Paths, per method (plain = the same sampler with no guidance):
  (a) authors   the authors' Algorithm 1 as tests/authors_igd.py restates it from SPEC: batch 1, the [cond; uncond]
                pair, autograd on every step, K backward passes per guided step, shadow row decoded, fp32.
  (b) eager     fastdd's GuidedSampler, clean mode, `--batch` classes per call, one backward per guided step.
  (c) compiled  (b) with the DiT, decoder and surrogate forwards under torch.compile (CUDA graphs are not used
                here; on CPU compile time is excluded by a warm-up run).
Also the ratio the cost model predicts: FLOPs of a guided image over a plain one, counted by
torch.utils.flop_counter on fastdd's eager path (what the arithmetic alone would cost).
Random weights (timing only). Writes benchmarks/results/sampler_<config>_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the authors' restatement lives beside the test that proves it faithful

from authors_igd import authors_igd_sample  # noqa: E402
from benchmarks.common import device_name, write_report  # noqa: E402
from fastdd.guidance import DeviationGuidance, InfluenceGuidance  # noqa: E402
from fastdd.models import DiT, LatentCodec  # noqa: E402
from fastdd.models.convnet import ConvNet  # noqa: E402
from fastdd.sampling import GaussianDiffusion, GuidedSampler, trajectory_noise  # noqa: E402

NUM_STEPS, LOW, HIGH, K_SCALE, GAMMA, CFG_SCALE, NUM_CLASSES, CHECKPOINTS = 50, 30, 45, 5.0, 120.0, 4.0, 10, 4

CONFIGS = {
    # latent side, DiT kwargs, VAE block widths (None: the SD VAE), surrogate width/depth
    "tiny": dict(latent=8, dit=dict(patch_size=2, hidden_size=32, depth=2, num_heads=2), vae=(8, 8), surrogate=(8, 2)),
    "dit-s2-128": dict(latent=16, dit=dict(patch_size=2, hidden_size=384, depth=12, num_heads=6), vae=None, surrogate=(128, 6)),
    "dit-xl2-256": dict(latent=32, dit=dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16), vae=None, surrogate=(128, 6)),
}


@dataclass
class Models:
    dit: DiT
    codec: LatentCodec
    surrogate: ConvNet
    flat_params: torch.Tensor
    real_grads: torch.Tensor
    latent_shape: tuple[int, int, int]


def build_models(config: str, device: torch.device) -> Models:
    from diffusers import AutoencoderKL

    spec = CONFIGS[config]
    torch.manual_seed(0)
    dit = DiT(input_size=spec["latent"], in_channels=4, num_classes=NUM_CLASSES, learn_sigma=True, **spec["dit"])
    with torch.no_grad():  # the official init zeroes the output layer: give the model a non-trivial output
        dit.final_layer.linear.weight.normal_(0, 0.02)
    dit = dit.to(device).eval().requires_grad_(False)
    widths = spec["vae"]
    if widths is None:  # the architecture of stabilityai/sd-vae-ft-mse
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
    else:
        vae = AutoencoderKL(block_out_channels=widths, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths))  # fmt: skip
    codec = LatentCodec(vae.to(device).eval().requires_grad_(False))
    image_size = spec["latent"] * codec.downsample
    width, depth = spec["surrogate"]
    surrogate = ConvNet(3, NUM_CLASSES, width=width, depth=depth, im_size=image_size).to(device).eval()
    flat_params = torch.stack(
        [parameters_to_vector(ConvNet(3, NUM_CLASSES, width=width, depth=depth, im_size=image_size).parameters()) for _ in range(CHECKPOINTS)]
    ).to(device)
    real_grads = torch.randn(NUM_CLASSES, *flat_params.shape, device=device) * 1e-3
    return Models(dit, codec, surrogate, flat_params.detach(), real_grads, (4, spec["latent"], spec["latent"]))


# --------------------------------------------------------------------------- the three paths
def authors_images(models: Models, device: torch.device, guided: bool) -> None:
    """One image of class 0 by the authors' loop (batch 1)."""

    def noise(class_index: int, image_index: int):
        tn = trajectory_noise(0, class_index, image_index, models.latent_shape, NUM_STEPS, device, rows=2)
        return tn.initial, tn.steps.flip(0)

    authors_igd_sample(
        models.dit, models.codec.decode, models.surrogate, models.flat_params, models.real_grads, [0], 1, NUM_STEPS, noise,
        k=K_SCALE, gamma=GAMMA, low=LOW if guided else NUM_STEPS, high=HIGH, cfg_scale=CFG_SCALE, null_class=NUM_CLASSES,
    )  # fmt: skip


def fastdd_sampler(models: Models, guided: bool, decode, surrogate, model) -> GuidedSampler:
    guidances = []
    if guided:
        dim = int(torch.tensor(models.latent_shape).prod())
        guidances = [
            DeviationGuidance(NUM_CLASSES, dim, gamma=GAMMA, low=LOW, high=HIGH, device=models.flat_params.device),
            InfluenceGuidance(decode, surrogate, models.flat_params, models.real_grads, k=K_SCALE, low=LOW, high=HIGH),
        ]
    return GuidedSampler(model, GaussianDiffusion(NUM_STEPS), guidances, cfg_scale=CFG_SCALE, num_classes=NUM_CLASSES)


def fastdd_images(sampler: GuidedSampler, models: Models, device: torch.device, batch: int, image_index: int = 0) -> None:
    classes = [c % NUM_CLASSES for c in range(batch)]
    sampler.sample(classes, [(c, image_index, 0) for c in classes], models.latent_shape, device, progress=False)


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def predicted_ratio(models: Models, device: torch.device) -> float:
    """FLOPs of one guided image over one plain image on fastdd's eager path (batch 1, one warm memory)."""
    counts = []
    for guided in (False, True):
        sampler = fastdd_sampler(models, guided, models.codec.decode, models.surrogate, models.dit)
        fastdd_images(sampler, models, device, 1)  # fills the class memory so deviation guidance runs
        with FlopCounterMode(display=False) as counter:
            fastdd_images(sampler, models, device, 1, image_index=1)
        counts.append(counter.get_total_flops())
    return counts[1] / counts[0]


def run(config: str, device: torch.device, repeats: int, batch: int, compile_paths: bool) -> list[dict]:
    models = build_models(config, device)
    per_image: dict[tuple[str, str], float] = {}
    for guided in (False, True):
        method = "dit-igd" if guided else "dit (plain)"
        authors = lambda: authors_images(models, device, guided)  # noqa: E731
        authors()  # warm-up
        per_image[("authors", method)] = timed(authors, device, repeats)
        eager = fastdd_sampler(models, guided, models.codec.decode, models.surrogate, models.dit)
        fastdd_images(eager, models, device, batch)
        per_image[("eager", method)] = timed(lambda: fastdd_images(eager, models, device, batch), device, repeats) / batch
        if compile_paths:
            decode = torch.compile(models.codec.decode)
            compiled = fastdd_sampler(models, guided, decode, models.surrogate, torch.compile(models.dit))
            fastdd_images(compiled, models, device, batch)  # compile
            per_image[("compiled", method)] = timed(lambda: fastdd_images(compiled, models, device, batch), device, repeats) / batch
        print(f"{config} {method}: " + ", ".join(f"{p} {t:.3f}s" for (p, m), t in per_image.items() if m == method), flush=True)
    ratio_model = predicted_ratio(models, device)
    records = []
    for (path, method), seconds in per_image.items():
        plain = per_image[(path, "dit (plain)")]
        reference = per_image[("authors", method)]
        best = min(t for (p, m), t in per_image.items() if m == method and p != "authors")
        records.append(dict(
            config=config, device=device_name(device), method=method, path=path, batch=1 if path == "authors" else batch,
            seconds_per_image=seconds, images_per_second=1.0 / seconds, guided_over_plain=seconds / plain,
            cost_model_ratio=ratio_model if method != "dit (plain)" else 1.0,
            speedup_vs_reference=reference / best if path == "authors" else reference / seconds,
        ))  # fmt: skip
    return records


def bar_chart(records: list[dict], path: Path) -> None:
    """Seconds per image, one bar per (method, path): a PNG drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, bar, gap, left = 720, 26, 10, 230
    height = 40 + len(records) * (bar + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    longest = max(r["seconds_per_image"] for r in records)
    colours = {"authors": (200, 80, 60), "eager": (60, 120, 200), "compiled": (40, 160, 90)}
    draw.text((10, 10), f"seconds per image — {records[0]['config']} on {records[0]['device']}", fill="black")
    for i, r in enumerate(records):
        y = 34 + i * (bar + gap)
        length = int((width - left - 90) * r["seconds_per_image"] / longest)
        draw.text((10, y + 7), f"{r['method']} / {r['path']}", fill="black")
        draw.rectangle([left, y, left + max(length, 1), y + bar], fill=colours.get(r["path"], (120, 120, 120)))
        draw.text((left + length + 6, y + 7), f"{r['seconds_per_image']:.3g} s", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="classes per fastdd call (one image each)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    args = parser.parse_args()
    device = torch.device(args.device)
    records = run(args.config, device, args.repeats, args.batch, not args.no_compile)
    name = f"sampler_{args.config}_{device.type}"
    json_path = write_report(records, name)
    bar_chart(records, json_path.with_suffix(".png"))


if __name__ == "__main__":
    main()

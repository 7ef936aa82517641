"""Memory that does not grow with the data: every method end to end on an ImageNet-shaped folder at two sizes.

Builds offline a synthetic ImageNet-shaped ImageFolder (1,000 class folders named by the ImageNet-1K wnids, odd-sized
RGB JPEGs) with --per-class images per class, and a second one with --factor × as many, and a tiny DiTPipeline in
the real diffusers format (1,000 classes). Runs `fastdd distill --method M --ipc 1 --classes imagenet1k` for every
method on both folders (each in its own process; light method settings, listed in the JSON), and `fastdd eval
--real-val` on both folders (the dit run's set, 1 epoch). Records per run the wall time, the peak RSS of the process
(`os.wait4`; --workers 0, so image decoding happens in that process) and the state folder's size on disk per class.
The claim checked: peak RSS at the larger size <= 1.25 × the smaller one, for every method and for eval.

    python benchmarks/scale_imagefolder.py [--per-class 2] [--factor 10] [--methods dit,igd,...] [--device cpu]

Writes benchmarks/results/scale_imagefolder_<device>.json / .md. Peak CUDA memory is not measured (CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import require_compiled  # noqa: E402
from benchmarks.tiny_assets import tiny_pipeline  # noqa: E402
from fastdd.bench.common import device_name, markdown_table  # noqa: E402
from fastdd.data.classes import IMAGENET1K  # noqa: E402
from fastdd.ops import OP_BACKENDS  # noqa: E402

METHODS = ("dit", "igd", "dap", "mgd3", "d3hr", "sam", "igds")
LIGHT = {  # the methods' preparation made light (the memory path is the same; only epochs and counts shrink)
    "igd": ["--surrogate-epochs", "1", "--igd-max-checkpoints", "1"],  # K fixed: Algorithm 2 keeps more on more data
    "d3hr": ["--d3hr-candidates", "100"],
    "sam": ["--sam-epochs", "1"],
    "igds": ["--igds-eta", "2", "--igds-epochs", "1", "--igds-classifier-epochs", "1"],
}
GROWTH_BOUND = 1.25


def imagenet_folder(root: Path, per_class: int) -> Path:
    """1,000 wnid folders of per_class JPEGs, sizes 40-63 × 40-63 px (a class colour plus noise)."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for c, wnid in enumerate(IMAGENET1K):
        (root / wnid).mkdir(parents=True)
        base = np.array([(37 * c) % 255, (91 * c) % 255, 128], dtype=np.float64)
        for i in range(per_class):
            height, width = rng.integers(40, 64, 2)
            pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.JPEG")
    return root


def measured(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python -m fastdd ARGS` in its own process; RuntimeError when it fails."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "fastdd", *args], env=env, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"fastdd {' '.join(args)} exited {proc.returncode}: {err[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: KiB


def disk_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def igd_real_gradients_cost(device: str) -> dict:
    """IGD's real gradients of one ImageNet-1K class at the real size (ConvNet-6 at 256², 1,000 outputs, K = 4
    checkpoints, the class's first 200 images): seconds to compute them, to write them per class, to read them back,
    and their size: what caching them per class trades against computing them again."""
    from fastdd.data.latents import ClassCache
    from fastdd.data.real import as_real_data
    from fastdd.guidance.igd import class_real_gradients, surrogate_config_for

    config = surrogate_config_for((3, 256, 256), len(IMAGENET1K))
    model = config.build().to(device).eval()
    flat = torch.stack([torch.nn.utils.parameters_to_vector(config.build().parameters()) for _ in range(4)]).to(device)
    images = torch.rand(200, 3, 256, 256) * 2 - 1
    data = as_real_data(images, torch.zeros(200, dtype=torch.long))
    with tempfile.TemporaryDirectory() as folder:
        cache = ClassCache([0], lambda c: class_real_gradients(model, flat, data, c), folder, keep=1)
        start = time.perf_counter()
        value = cache[0]  # computed and written
        computed_and_written = time.perf_counter() - start
        start = time.perf_counter()
        ClassCache([0], lambda c: None, folder, keep=1)[0].clone()  # clone: read every byte, not only map the file
        read = time.perf_counter() - start
    return {"run": "igd real gradients, one class (ConvNet-6 256², K 4, 200 images)",
            "compute_and_write_s": round(computed_and_written, 2), "read_s": round(read, 3),
            "mib_per_class": round(value.numel() * 4 / 2**20, 1),
            "gib_imagenet1k": round(value.numel() * 4 * len(IMAGENET1K) / 2**30, 1), "device": device_name(device)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=2, help="images per class of the smaller folder (default 2)")
    parser.add_argument("--factor", type=int, default=10, help="the larger folder's multiple (default 10)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: every method)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-reference", action="store_true", help="time ops that would run on their reference")
    args = parser.parse_args()
    require_compiled(sorted(OP_BACKENDS), torch.device(args.device), args.allow_reference)
    methods = [m for m in args.methods.split(",") if m]
    device = device_name(args.device)
    records = []
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        tiny_pipeline(root / "pipe", len(IMAGENET1K))
        sizes = [args.per_class, args.per_class * args.factor]
        for per_class in sizes:
            data = imagenet_folder(root / f"data{per_class}", per_class)
            for method in methods:
                out = root / f"{method}_{per_class}"
                command = ["distill", "--method", method, "--ipc", "1", "--out", str(out), "--data", str(data),
                           "--classes", "imagenet1k", "--model", str(root / "pipe"), "--steps", "4",
                           "--class-batch", "100", "--workers", "0", "--device", args.device, "--quiet",
                           *LIGHT.get(method, [])]  # fmt: skip
                seconds, rss = measured(command)
                state = disk_mib(out / ".fastdd")
                records.append({"run": f"distill {method}", "images_per_class": per_class,
                                "images": per_class * len(IMAGENET1K), "wall_s": round(seconds, 1),
                                "peak_rss_mib": round(rss), "state_mib": round(state, 1),
                                "state_kib_per_class": round(1024 * state / len(IMAGENET1K), 1),
                                "options": " ".join(LIGHT.get(method, [])), "device": device})  # fmt: skip
                print(records[-1], flush=True)
            if "dit" in methods:
                command = ["eval", str(root / f"dit_{sizes[0]}"), "--real-val", str(data), "--epochs", "1",
                           "--seeds", "0", "--arch", "convnet3", "--device", args.device, "--quiet",
                           "--json", str(root / f"eval_{per_class}.json")]  # fmt: skip
                seconds, rss = measured(command)
                records.append({"run": "eval --real-val", "images_per_class": per_class,
                                "images": per_class * len(IMAGENET1K), "wall_s": round(seconds, 1),
                                "peak_rss_mib": round(rss), "state_mib": None, "state_kib_per_class": None,
                                "options": "--epochs 1 --seeds 0 --arch convnet3", "device": device})  # fmt: skip
                print(records[-1], flush=True)
            shutil.rmtree(data)
    cost = igd_real_gradients_cost(args.device)
    print(cost, flush=True)
    summary = []
    for run in dict.fromkeys(r["run"] for r in records):
        small, large = (r for r in records if r["run"] == run)
        growth = large["peak_rss_mib"] / small["peak_rss_mib"]
        summary.append({"run": run, f"rss_mib_{small['images_per_class']}_per_class": small["peak_rss_mib"],
                        f"rss_mib_{large['images_per_class']}_per_class": large["peak_rss_mib"],
                        "rss_growth": round(growth, 3), f"within_{GROWTH_BOUND}": growth <= GROWTH_BOUND,
                        "wall_s_small": small["wall_s"], "wall_s_large": large["wall_s"],
                        "state_kib_per_class_large": large["state_kib_per_class"], "device": device})  # fmt: skip
    name = f"scale_imagefolder_{torch.device(args.device).type}"
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    report = {"summary": summary, "igd_real_gradients": cost, "records": records}
    (results / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    tables = [markdown_table(summary), markdown_table([cost]), "Every run:", markdown_table(records)]
    (results / f"{name}.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()

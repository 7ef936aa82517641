"""IGD on a small 4-class ImageFolder with a tiny diffusers pipeline (issue: Algorithm 2 used to keep K = 17
checkpoints there, and sampling 8 images took 21 minutes). Runs `fastdd distill --method igd --data FOLDER --ipc 2`
end to end (surrogate trajectory + Algorithm 2 + sampling) and records the wall time and the checkpoints kept.

Run: python benchmarks/igd_small_folder.py [--images-per-class 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import device_name  # noqa: E402
from benchmarks.tiny_assets import image_folder, tiny_pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tiny_pipeline(work / "pipe", 4)
        image_folder(work / "data", 4, args.images_per_class)
        command = [sys.executable, "-m", "fastdd", "distill", "--method", "igd", "--data", str(work / "data"),
                   "--model", str(work / "pipe"), "--ipc", "2", "--out", str(work / "run"), "--device", "cpu"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        manifest = json.loads((work / "run" / "manifest.json").read_text())
    result = {
        "command": "fastdd distill --method igd --data <4-class folder> --model <tiny pipeline> --ipc 2",
        "images_per_class": args.images_per_class,
        "image_size": manifest["config"]["image_size"],
        "images": len(manifest["images"]),
        "checkpoints_kept": manifest["method_params"]["surrogate_epochs_kept"],
        "surrogate_epochs": 20,
        "wall_seconds": round(seconds, 1),
        "stderr_cap_line": next((line for line in proc.stderr.splitlines() if "Algorithm 2 kept" in line), None),
        "device": device_name("cpu"),
    }
    out = Path(args.out)
    (out / "igd_small_folder_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "igd_small_folder_cpu.md").write_text(
        "| run | images | K (epochs kept) | wall time | device |\n|---|---|---|---|---|\n"
        f"| {result['command']} ({args.images_per_class} images per class, {result['image_size']}²) | "
        f"{result['images']} | {len(result['checkpoints_kept'])} ({result['checkpoints_kept']}) | "
        f"{result['wall_seconds']} s | {result['device']} |\n"
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

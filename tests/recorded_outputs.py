"""The recorded outputs of the digits default (`fastdd distill --method M --ipc 2`, default options) and the guard that
holds them on any CPU.

Two records, in tests/data:
- digits_ipc2_sha256.json: {platform key: {method: ["<class>/<i>.png <sha256>", ...]}}: exact bytes, per platform.
  A CPU family rounds floats its own way (oneDNN / MKL code paths by vendor and instruction set), so bytes are
  compared only on a platform that has its own entry.
- digits_ipc2_pixels.npz: {method: uint8 [20, 16, 16]}: the decoded pixels, compared on every platform within
  PIXEL_TOLERANCES (mean and largest absolute difference in 8-bit levels). The tolerances are about 2-3x the spread
  measured across instruction sets on one machine (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL settings, one
  thread; scratch measurement, 2026-12-07): 0 for dit, dap, d3hr and 1 level in one pixel for mgd3, 1 level in
  0.08% of pixels for igd, mean ≤ 0.16 and max 3 levels for sam (its fine-tuning), mean ≤ 0.88 and max 27 for igds
  (its estimator's 50 contrastive epochs amplify rounding). Each method's guard is broken by a small real change
  (`REAL_CHANGES`, tested in tests/test_api.py).

Add a platform (or re-record after a deliberate change of outputs):

    python tests/recorded_outputs.py            # writes this platform's sha256 entry
    python tests/recorded_outputs.py --pixels   # also replaces the pixel reference (only for deliberate changes)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fastdd

DATA = Path(__file__).parent / "data"
SHA256_RECORD = DATA / "digits_ipc2_sha256.json"
PIXEL_RECORD = DATA / "digits_ipc2_pixels.npz"
METHODS = ("dit", "igd", "dap", "mgd3", "d3hr", "sam", "igds")
PIXEL_TOLERANCES = {  # method: (mean, max) absolute difference in 8-bit levels
    "dit": (0.02, 2),
    "dap": (0.02, 2),
    "mgd3": (0.02, 2),
    "d3hr": (0.02, 2),
    "igd": (0.02, 2),
    "sam": (0.4, 8),
    "igds": (2.0, 60),
}
REAL_CHANGES = {  # method: (options, settings) a small real change whose images the pixel guard refuses
    "dit": (fastdd.DiTOptions(), {"cfg_scale": 2.2}),  # CFG 2.0 -> 2.2: mean 1.76
    "igd": (fastdd.IGDOptions(k=5.5), {}),  # k 5 -> 5.5: mean 0.035
    "dap": (fastdd.DAPOptions(gamma=0.11), {}),  # γ 0.1 -> 0.11: mean 0.35
    "mgd3": (fastdd.MGD3Options(lam=0.11), {}),  # λ 0.1 -> 0.11: mean 0.34
    "d3hr": (fastdd.D3HROptions(candidates=12_000), {}),  # 10,000 -> 12,000 candidates: mean 3.0
    "sam": (fastdd.SAMOptions(epochs=7), {}),  # 8 -> 7 fine-tuning epochs: mean 1.5
    "igds": (fastdd.IGDSOptions(eta=0.0), {}),  # no guidance: mean 3.6 (η 2 -> 4 gives 1.15, inside the noise)
}


def platform_key() -> str:
    """What decides a CPU's float rounding here: architecture, vendor, torch's CPU capability, torch version."""
    vendor = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("vendor_id", "CPU implementer")):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()}-{vendor}-{capability}-torch{torch.__version__}"


def image_list(out: Path) -> list[str]:
    """["<class>/<i>.png <sha256>", ...] of a finished run, in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]
    return [f"{r['class']}/{r['index']}.png {r['sha256']}" for r in manifest["images"]]


def pixels(out: Path) -> np.ndarray:
    """uint8 [images, H, W] of a finished run's PNGs, in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return np.stack([np.asarray(Image.open(out / r["path"])) for r in manifest["images"]])


def recorded_sha256(method: str) -> list[str] | None:
    """This platform's recorded image list of `method`, or None when the platform has no entry."""
    records = json.loads(SHA256_RECORD.read_text())
    return records.get(platform_key(), {}).get(method)


def pixel_difference(method: str, out: Path) -> tuple[float, int]:
    """(mean, max) absolute difference in 8-bit levels between a run's images and the recorded pixels."""
    with np.load(PIXEL_RECORD) as record:
        expected = record[method].astype(np.int64)
    actual = pixels(out).astype(np.int64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = np.abs(actual - expected)
    return float(difference.mean()), int(difference.max())


def within_tolerance(method: str, out: Path) -> bool:
    mean, largest = pixel_difference(method, out)
    tolerance_mean, tolerance_max = PIXEL_TOLERANCES[method]
    return mean <= tolerance_mean and largest <= tolerance_max


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixels", action="store_true", help="also replace the pixel reference")
    args = parser.parse_args()
    records = json.loads(SHA256_RECORD.read_text()) if SHA256_RECORD.exists() else {}
    entry, arrays = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            out = Path(tmp) / method
            fastdd.distill(method, 2, out, quiet=True, device="cpu")
            entry[method], arrays[method] = image_list(out), pixels(out)
            print(f"{method}: {len(entry[method])} images")
    records[platform_key()] = entry
    SHA256_RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    print(f"wrote {SHA256_RECORD} [{platform_key()}]")
    if args.pixels:
        np.savez_compressed(PIXEL_RECORD, **arrays)
        print(f"wrote {PIXEL_RECORD}")


if __name__ == "__main__":
    main()

"""Evidence of quality on the offline digits default: ConvNet top-1 of sets distilled by every method, under the
hard-label and the soft-label protocol.

For IPC 1 and 10 and seeds 0, 1, 2: `fastdd distill --method M --ipc K --seed s` (the real CLI, the shipped
16×16 pixel prior, default method options) then training a fresh ConvNet (`fastdd eval`'s convnet6: depth 3
at 16 px, width 128) using training seed s, best top-1 on the digits test split, under each protocol of
`fastdd.evaluation`: hard labels (IGD's: epochs by IPC, CutMix) and soft labels (RDED's: 300 epochs, a teacher
relabelling every CutMix-ed batch at T = 20; the teacher: `fastdd teacher`'s ResNet-18 trained on the digits train
split, made once under --work). Rows: random real images (IPC random train images per class, drawn with seed s),
the unguided prior (dit), each method, and the full training set (1,347 images, hard labels only; 300 epochs instead
of the protocol's 1,000 to keep the CPU time sane). Mean ± population std over the seeds.

    python benchmarks/quality_digits.py                 # full: 3 seeds, protocol epochs, 50 sampling steps
    python benchmarks/quality_digits.py --quick         # 1 seed, epochs / 10, 20 steps, lighter method settings
    python benchmarks/quality_digits.py --methods mgd3 --ipcs 10       # the dit and mgd3 rows only
    python benchmarks/quality_digits.py --methods igd,igds --variants   # + the speed approximations (rows "igd --fast", ...)
    python benchmarks/quality_digits.py --labels hard    # one protocol

Writes benchmarks/results/quality_digits{_quick}{_variants | _<methods>}.json / .md (the full table only when
every method runs without --variants) and one preview grid per row (…_<row>_ipc10.png, the seed-0 set). Distilled sets and per-set scores are kept under
--work, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, require_compiled  # noqa: E402
from fastdd.cli.main import main as fastdd_main  # noqa: E402
from fastdd.data.atomic import write_bytes_atomic  # noqa: E402
from fastdd.data.dataset import TensorImages  # noqa: E402
from fastdd.data.digits import DIGITS_CLASSES, load_digits_split  # noqa: E402
from fastdd.evaluation import epochs_for_ipc, load_teacher, read_manifest, soft, train_and_evaluate  # noqa: E402
from fastdd.evaluation.common import ImageSet, make_model_factory, training_set  # noqa: E402
from fastdd.ops import OP_BACKENDS  # noqa: E402

METHODS = ("igd", "dap", "mgd3", "d3hr", "sam", "igds")
FULL_SET_EPOCHS = 300
PROTOCOLS = ("hard", "soft")
# --quick: the methods' expensive preparation made lighter (recorded in the JSON)
QUICK_METHOD_ARGS = {
    "d3hr": ["--d3hr-candidates", "1000"],
    "sam": ["--sam-epochs", "2"],
    "igds": ["--igds-epochs", "10", "--igds-classifier-epochs", "30"],
}
IMAGE_SIZE, CHANNELS = 16, 1
# --variants: the opt-in speed approximations of `fastdd distill`, each measured against its exact method
VARIANTS = {
    "igd --fast": ("igd", ["--fast"]),
    "igds --fast": ("igds", ["--fast"]),
    "igd --precision bf16": ("igd", ["--precision", "bf16"]),
}


def slug(row: str) -> str:
    """File-name form of a row: "igd --precision bf16" -> "igd_precision_bf16"."""
    return row.replace(" --", "_").replace(" ", "_")


def random_real(ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IPC random digits train images per class (seeded): ([10·ipc, 1, 16, 16], [10·ipc])."""
    images, labels = load_digits_split("train", IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(len(DIGITS_CLASSES)):
        rows = (labels == c).nonzero().flatten()
        keep.append(rows[torch.randperm(len(rows), generator=generator)[:ipc]])
    keep = torch.cat(keep)
    return images[keep], labels[keep]


def distilled(method: str, ipc: int, seed: int, folder: Path, steps: int, extra: list[str], device: str) -> ImageSet:
    """Run `fastdd distill` (resumes an interrupted folder) and read the set its manifest lists."""
    args = ["distill", "--method", method, "--ipc", str(ipc), "--seed", str(seed), "--out", str(folder),
            "--steps", str(steps), "--device", device, "--quiet", *extra]  # fmt: skip
    code = fastdd_main(args)
    if code != 0:
        raise RuntimeError(f"fastdd {' '.join(args)} exited with {code}")
    return training_set(folder, read_manifest(folder), IMAGE_SIZE, CHANNELS)[0]


def in_memory(images: torch.Tensor, labels: torch.Tensor, description: str) -> ImageSet:
    return ImageSet(TensorImages(images, labels), labels, description)


def teacher_file(work: Path, device: str, quick: bool) -> Path:
    """The soft protocol's teacher: `fastdd teacher` (ResNet-18, digits train split), made once under work."""
    path = work / f"teacher_resnet18{'_quick' if quick else ''}.safetensors"
    if not path.is_file():
        args = ["teacher", "--out", str(path), "--device", device, "--quiet", *(["--epochs", "3"] if quick else [])]
        if fastdd_main(args) != 0:
            raise RuntimeError(f"fastdd {' '.join(args)} failed")
    return path


def score(train: ImageSet, val: ImageSet, protocol: str, teacher, seed: int, epochs: int, device: str) -> float:
    """Best top-1 (%) of a fresh convnet6 trained from seed under the protocol (`fastdd eval`'s engines)."""
    factory = make_model_factory("convnet6", CHANNELS, len(DIGITS_CLASSES), IMAGE_SIZE)
    if protocol == "hard":
        result = train_and_evaluate(factory, train, val, seed=seed, epochs=epochs, device=device)
    else:
        ipc = max(int((train.labels == c).sum()) for c in range(len(DIGITS_CLASSES)))
        result = soft.train_soft(factory, teacher, train, val, seed=seed, epochs=epochs,
                                 batch_size=soft.rded_batch_size(ipc, len(DIGITS_CLASSES)), lr=soft.rded_lr("convnet6"),
                                 input_size=IMAGE_SIZE, device=device)  # fmt: skip
    return 100.0 * result.best_top1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, epochs / 10, 20 sampling steps, lighter method settings"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--variants", action="store_true", help=f"add rows {list(VARIANTS)} for the selected methods")
    parser.add_argument("--ipcs", default="1,10")
    parser.add_argument("--labels", default="hard,soft", help="protocols, comma-separated (default: hard,soft)")
    parser.add_argument("--seeds", default=None, help="default 0,1,2 (quick: 0)")
    parser.add_argument(
        "--work", default=None, help="distilled sets and per-set scores (default /tmp/fastdd_quality_digits[_quick])"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-reference", action="store_true", help="time ops that would run on their reference")
    args = parser.parse_args(argv)
    require_compiled(sorted(OP_BACKENDS), torch.device(args.device), args.allow_reference)

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    ipcs = [int(v) for v in args.ipcs.split(",")]
    seeds = [int(v) for v in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    suffix = "_quick" if args.quick else ""
    work = Path(args.work or f"/tmp/fastdd_quality_digits{suffix}")
    if args.variants:  # a partial run never overwrites the full table
        suffix += "_variants"
    elif set(methods) != set(METHODS):
        suffix += "_" + "-".join(methods)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 20 if args.quick else 50
    epoch_scale = 0.1 if args.quick else 1.0
    protocols = [p for p in args.labels.split(",") if p]
    if set(protocols) - set(PROTOCOLS):
        parser.error(f"--labels: choose from {PROTOCOLS}")
    val = in_memory(*load_digits_split("test", IMAGE_SIZE), "digits test split")
    epochs_by_set = {str(ipc): max(1, round(epoch_scale * epochs_for_ipc(ipc))) for ipc in ipcs}
    epochs_by_set["full train set"] = max(1, round(epoch_scale * FULL_SET_EPOCHS))
    epochs_by_set["soft"] = max(1, round(epoch_scale * soft.RDED_EPOCHS))
    teacher = None
    if "soft" in protocols:
        teacher_path = teacher_file(work, args.device, args.quick)
        teacher = load_teacher(teacher_path, list(DIGITS_CLASSES), list(range(len(DIGITS_CLASSES))), CHANNELS)[0]

    variants = [v for v, (method, _) in VARIANTS.items() if args.variants and method in methods]
    rows = ["random real", "dit", *methods, *variants, "full train set"]
    records = []
    for ipc in ipcs:
        for row in rows:
            if row == "full train set" and ipc != ipcs[0]:
                continue  # does not depend on the IPC
            for protocol in protocols:
                if row == "full train set" and protocol == "soft":
                    continue  # hard labels only: the teacher was trained on this very set
                per_seed, seconds = [], []
                for seed in seeds:
                    name = f"{slug(row)}_ipc{ipc}_seed{seed}"
                    cached = work / f"{name}.{protocol}.score.json"
                    if cached.is_file():
                        saved = json.loads(cached.read_text())
                        per_seed.append(saved["top1"])
                        seconds.append(saved["seconds"])
                        continue
                    start = time.perf_counter()
                    if protocol == "soft":
                        epochs = epochs_by_set["soft"]
                    else:
                        epochs = epochs_by_set["full train set" if row == "full train set" else str(ipc)]
                    if row == "random real":
                        train = in_memory(*random_real(ipc, seed), f"{ipc} random train images per class")
                    elif row == "full train set":
                        train = in_memory(*load_digits_split("train", IMAGE_SIZE), "digits train split")
                    else:
                        method, flags = VARIANTS.get(row, (row, []))
                        extra = (QUICK_METHOD_ARGS.get(method, []) if args.quick else []) + flags
                        train = distilled(method, ipc, seed, work / name, steps, extra, args.device)
                    top1 = score(train, val, protocol, teacher, seed, epochs, args.device)
                    elapsed = time.perf_counter() - start
                    saved = {"top1": top1, "seconds": elapsed, "epochs": epochs}
                    write_bytes_atomic(json.dumps(saved).encode(), cached)
                    per_seed.append(top1)
                    seconds.append(elapsed)
                    print(f"{row:15s} IPC {ipc:3d} {protocol} seed {seed}: top-1 {top1:6.2f}%  ({elapsed:.0f} s)",
                          flush=True)  # fmt: skip
                records.append({
                    "set": row,
                    "ipc": "all" if row == "full train set" else ipc,
                    "labels": protocol,
                    "top1_mean": statistics.fmean(per_seed),
                    "top1_std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0,
                    "per_seed": per_seed,
                    "seeds": seeds,
                    "seconds_per_seed": statistics.fmean(seconds),
                })  # fmt: skip
            previewed = variants if args.variants else ("dit", *methods)  # the full table has the exact rows' grids
            if row in previewed and ipc == max(ipcs):
                preview = work / f"{slug(row)}_ipc{ipc}_seed{seeds[0]}" / "preview.png"
                shutil.copyfile(preview, out / f"quality_digits{suffix}_{slug(row)}_ipc{ipc}.png")

    settings = {
        "device": device_name(args.device),
        "quick": args.quick,
        "sampling_steps": steps,
        "seeds": seeds,
        "eval": "convnet6 (depth 3 at 16 px, width 128), best top-1 on the digits test split; hard: fastdd.evaluation "
        "hard-label protocol; soft: RDED's protocol with a fastdd teacher ResNet-18 trained on the digits train split",
        "epochs": epochs_by_set,
        "method_args": {m: QUICK_METHOD_ARGS.get(m, []) if args.quick else [] for m in methods},
    }
    write_bytes_atomic(
        json.dumps({"settings": settings, "records": records}, indent=2).encode(), out / f"quality_digits{suffix}.json"
    )
    columns = [(ipc, protocol) for ipc in ipcs for protocol in protocols]
    lines = [
        f"Digits default, {settings['device']}, {len(seeds)} seed(s), {steps} sampling steps, top-1 % mean ± std"
        f"{' (--quick: eval epochs / 10, lighter method settings)' if args.quick else ''}.",
        "",
        "| set | " + " | ".join(f"IPC {ipc} {protocol}" for ipc, protocol in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = []
        for ipc, protocol in columns:
            match = [r for r in records if r["set"] == row and r["ipc"] in (ipc, "all") and r["labels"] == protocol]
            cells.append(f"{match[0]['top1_mean']:.1f} ± {match[0]['top1_std']:.1f}" if match else "—")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    write_bytes_atomic(("\n".join(lines) + "\n").encode(), out / f"quality_digits{suffix}.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

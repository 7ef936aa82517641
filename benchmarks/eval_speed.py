"""The main job's `fastdd eval` (3 seeds, the hard-label protocol's 2,000 epochs of convnet6 on the digits IPC 10
set of `fastdd distill --method igd --ipc 10`): the seeds one after another (the default, the engine every
earlier fastdd used) against the seeds trained together as one batched ensemble (`torch.func.stack_module_state` +
`vmap`, `--ensemble`), timed in the same process, interleaved, median of --repeats. Both report each seed's best
top-1: the same protocol, the same random draws, float rounding apart.

    python benchmarks/eval_speed.py [--repeats 3] [--epochs N] [--device cpu]

Writes benchmarks/results/eval_speed_<device>.json / .md (per repeat: seconds and top-1 per seed; the summary: the
median seconds of each engine, their ratio, and the mean top-1 of each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import require_compiled  # noqa: E402
from fastdd.bench.common import device_name, markdown_table  # noqa: E402
from fastdd.cli.main import main as fastdd_main  # noqa: E402
from fastdd.evaluation import evaluate  # noqa: E402
from fastdd.ops import OP_BACKENDS  # noqa: E402

ENGINES = {"sequential": False, "ensemble": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed evals per engine, interleaved (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the protocol's (2,000 at IPC 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-reference", action="store_true", help="time ops that would run on their reference")
    args = parser.parse_args()
    require_compiled(sorted(OP_BACKENDS), torch.device(args.device), args.allow_reference)
    device = device_name(args.device)
    records = []
    with tempfile.TemporaryDirectory() as root:
        run = Path(root) / "digits-igd"
        if fastdd_main(["distill", "--method", "igd", "--ipc", "10", "--out", str(run), "--quiet"]) != 0:
            raise RuntimeError("fastdd distill failed")
        for repeat in range(args.repeats):
            for engine, together in ENGINES.items():
                start = time.perf_counter()
                summary = evaluate(run, epochs=args.epochs, device=args.device, quiet=True, ensemble=together,
                                   json_path=Path(root) / f"{engine}.json")  # fmt: skip
                seconds = time.perf_counter() - start
                assert summary["engine"] == engine
                records.append({"engine": engine, "repeat": repeat, "seconds": round(seconds, 1),
                                "top1_per_seed": summary["per_seed"], "top1_mean": summary["top1_mean"],
                                "epochs": summary["epochs"], "seeds": summary["seeds"], "device": device})  # fmt: skip
                print(records[-1], flush=True)
    medians = {e: statistics.median(r["seconds"] for r in records if r["engine"] == e) for e in ENGINES}
    summary = [{"engine": engine, "median_s": medians[engine], "repeats": args.repeats,
                "over_sequential": round(medians[engine] / medians["sequential"], 3),
                "top1_mean_over_repeats": round(statistics.fmean(r["top1_mean"] for r in records
                                                                 if r["engine"] == engine), 2),
                "device": device} for engine in ENGINES]  # fmt: skip
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    name = f"eval_speed_{torch.device(args.device).type}"
    (results / f"{name}.json").write_text(json.dumps({"summary": summary, "records": records}, indent=2) + "\n")
    tables = [markdown_table(summary), "Every repeat:", markdown_table(records)]
    (results / f"{name}.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()

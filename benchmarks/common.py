"""Helpers shared by the op benchmarks in benchmarks/ops/ (timing, peak memory, the machine's own peak, FLOPs,
reports and the refusal to time the PyTorch reference by accident). Timing and the report writer live in
fastdd.bench.common, which `fastdd bench` uses too.

Every benchmark script: `python benchmarks/ops/bench_<op>.py [--device cpu|cuda] [--repeats N] [--quick]
[--allow-reference] [--out DIR]`. It times the INSTALLED fastdd and refuses (exit 2, one line) when an op would run
on its PyTorch reference because fastdd._C (or Triton) is missing, unless --allow-reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastdd.bench.common import device_name, markdown_table, synchronize, timeit

__all__ = [
    "device_name",
    "timeit",
    "interleaved_times",
    "time_methods",
    "peak_memory_bytes",
    "count_flops",
    "conv_time_share",
    "machine_peaks",
    "reference_fallbacks",
    "auto_backend",
    "require_compiled",
    "finish_records",
    "op_benchmark_main",
]


# --------------------------------------------------------------------------- what is being timed
def reference_fallbacks(ops: list[str], device: torch.device) -> list[str]:
    """The ops that would run on their PyTorch reference on `device` although the registry lists a faster
    implementation for it (fastdd._C not built / not loadable, Triton missing)."""
    from fastdd.ops._backend import OP_BACKENDS, resolve_backend

    missing = []
    for op in ops:
        listed = OP_BACKENDS[op].get(device.type, ("reference",))
        if listed[0] != "reference" and resolve_backend(op, "auto", device) == "reference":
            missing.append(op)
    return missing


def auto_backend(op: str, device: torch.device) -> str:
    """The implementation "auto" runs for op on device (from the registry)."""
    from fastdd.ops._backend import resolve_backend

    return resolve_backend(op, "auto", torch.device(device))


def require_compiled(ops: list[str], device: torch.device, allow_reference: bool) -> None:
    """Exit 2 with one line on stderr when any of `ops` would run on its reference here (unless allow_reference)."""
    import warnings

    import fastdd
    from fastdd.ops._backend import extension_error

    with warnings.catch_warnings():  # the missing-extension warning: the one line below says it
        warnings.simplefilter("ignore")
        missing = reference_fallbacks(ops, device)
        why = extension_error() or "no compiled kernel for this device"
    if missing and not allow_reference:
        print(
            f"refusing to benchmark: {', '.join(missing)} would run on the PyTorch reference on {device.type} "
            f"(fastdd imported from {Path(fastdd.__file__).parent}; fastdd._C: {why}); build it "
            "(`pip install -e .`, or run where the built package is installed) or pass --allow-reference",
            file=sys.stderr,
        )
        raise SystemExit(2)


# --------------------------------------------------------------------------- time, memory, FLOPs
def interleaved_times(methods: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    """{name: median seconds}: after one warm-up call each, the methods take turns in every repeat so that a
    shared machine's changing load hits them alike."""
    for fn in methods.values():
        fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """The most memory one fn() call's own allocations hold at once.

    CUDA: torch.cuda.max_memory_allocated over what was allocated before. CPU: the high-water mark of the bytes torch's
    CPU allocator hands out during the call, replayed in order from torch.profiler's allocation events (tensors and
    temporaries as the profiler sees them; buffers a library allocates itself, e.g. oneDNN's scratchpad, are not
    counted); None if this torch's profiler does not expose them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
    except (AttributeError, RuntimeError):  # a private API: absent in some torch builds
        return None
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker (its hooks refuse some autograd.grad calls)."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def conv_time_share(fn: Callable[[], object], device: torch.device) -> float | None:
    """The share (%) of one fn() call's operator time spent in convolutions: the self CPU times (torch.profiler) of
    the aten convolution ops (forward, backward and double backward: aten::mkldnn_convolution,
    aten::convolution_backward, aten::_convolution, ...) over all ops' (None off CPU: CUDA kernels are not named by
    the aten op they serve)."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::") and "conv" in e.key)
    return 100 * conv / total if total else None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one fn() call as torch.utils.flop_counter counts them (matmuls and convolutions, forward and
    backward; element-wise ops count 0, and ops it does not know, such as fastdd._C kernels, too)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return counter.get_total_flops()


def machine_peaks(device: torch.device, quick: bool = False) -> dict:
    """The machine's own peak, measured now: fp32 GFLOP/s of a square matmul (n×n, best of several sizes) and of a
    3×3 convolution (128 → 128 channels, 16² and 32² maps, batch 64), copy GB/s (bytes read + written by a large
    tensor copy). The compute peak is the faster of the two: on this project's AMD CPU torch's matmul (MKL) ran at
    ~180 GFLOP/s while oneDNN's convolution ran at ~235, so a matmul-only peak overstated every conv-bound op's
    fraction of the machine. Both in strict fp32 (no TF32 on CUDA: torch's matmul default, and cuDNN's switched off for
    the convolution)."""
    repeats = 3 if quick else 7
    matmul = 0.0
    for n in (512, 1024) if quick else (1024, 2048, 3072):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        seconds = timeit(lambda a=a, b=b: a @ b, device, repeats=repeats, warmup=1, do_bench=False)
        matmul = max(matmul, 2 * n**3 / seconds / 1e9)
    conv = 0.0
    weight = torch.randn(128, 128, 3, 3, device=device)
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    ):
        for size in (16,) if quick else (16, 32):  # fp32 on CUDA too (cuDNN's default would take TF32)
            x = torch.randn(16 if quick else 64, 128, size, size, device=device)
            seconds = timeit(
                lambda x=x: torch.nn.functional.conv2d(x, weight, padding=1), device, repeats, warmup=1, do_bench=False
            )
            conv = max(conv, 2 * x.shape[0] * size * size * 128 * 128 * 9 / seconds / 1e9)
    numel = (16 if quick else 64) << 20  # 64 Mi floats = 256 MiB: far beyond the caches
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    seconds = timeit(lambda: dst.copy_(src), device, repeats=repeats, warmup=1, do_bench=False)
    return {
        "peak_gflops": max(matmul, conv),
        "matmul_gflops": matmul,
        "conv_gflops": conv,
        "copy_gbps": 2 * numel * 4 / seconds / 1e9,
        "device": device_name(device),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def time_methods(
    op: str,
    shape: str,
    methods: dict[str, tuple[str, Callable[[], object]]],
    device: torch.device,
    repeats: int,
    flops: float | None = None,
    bytes_moved: float | None = None,
) -> list[dict]:
    """Records of one (op, shape): methods = {name: (kind, fn)}; interleaved median times, peak memory of one
    call each, and the work (FLOPs, bytes; by formula, the same for every method) for the fraction of peak."""
    times = interleaved_times({name: fn for name, (_, fn) in methods.items()}, device, repeats)
    records = []
    for name, (kind, fn) in methods.items():
        memory = peak_memory_bytes(fn, device)
        record = {"op": op, "shape": shape, "method": name, "kind": kind, "median_ms": times[name] * 1e3}
        if flops:
            record["flops"] = flops
        if bytes_moved:
            record["bytes"] = bytes_moved
        record["peak_mib"] = None if memory is None else memory / 2**20
        records.append(record)
    print(f"{op} {shape}: " + ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in times.items()), flush=True)
    return records


# --------------------------------------------------------------------------- records and reports
def finish_records(records: list[dict], peaks: dict) -> list[dict]:
    """Adds to every record its rates and fraction of the machine's peak, and per (op, shape) the speed-up of
    fastdd's auto path over each method and the strongest (fastest) baseline.

    A record has: op, shape, method, kind ("fastdd" for auto, "fastdd-forced" for an explicit backend,
    "baseline"), median_ms, and optionally flops, bytes (work done, by count or formula) and peak_mib."""
    for r in records:
        seconds = r["median_ms"] / 1e3
        compute = memory = None
        if r.get("flops"):
            r["gflops"] = r["flops"] / seconds / 1e9
            r["pct_peak_flops"] = 100 * r["gflops"] / peaks["peak_gflops"]
            compute = r["flops"] / (peaks["peak_gflops"] * 1e9)
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / seconds / 1e9
            r["pct_peak_bw"] = 100 * r["gbps"] / peaks["copy_gbps"]
            memory = r["bytes"] / (peaks["copy_gbps"] * 1e9)
        if compute is not None or memory is not None:
            bound = max(x for x in (compute, memory) if x is not None)
            r["pct_of_roofline"] = 100 * bound / seconds
            r["bound"] = "compute" if memory is None or (compute is not None and compute >= memory) else "memory"
    by_shape: dict[tuple, list[dict]] = {}
    for r in records:
        by_shape.setdefault((r["op"], r["shape"]), []).append(r)
    for group in by_shape.values():
        auto = next((r for r in group if r["kind"] == "fastdd"), None)
        baselines = [r for r in group if r["kind"] == "baseline"]
        strongest = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
        for r in group:
            if auto is not None:
                r["fastdd_speedup"] = r["median_ms"] / auto["median_ms"]
            if strongest is not None:
                r["strongest_baseline"] = strongest["method"]
    return records


def summary(records: list[dict]) -> list[dict]:
    """One row per (op, shape): fastdd auto vs the strongest baseline."""
    rows = []
    seen = dict.fromkeys((r["op"], r["shape"]) for r in records)
    for op, shape in seen:
        group = [r for r in records if r["op"] == op and r["shape"] == shape]
        auto = next((r for r in group if r["kind"] == "fastdd"), None)
        baselines = [r for r in group if r["kind"] == "baseline"]
        if auto is None or not baselines:
            continue
        best = min(baselines, key=lambda r: r["median_ms"])
        row = {
            "op": op,
            "shape": shape,
            "fastdd (auto)": auto["method"],
            "fastdd_ms": auto["median_ms"],
            "strongest baseline": best["method"],
            "baseline_ms": best["median_ms"],
            "speedup": best["median_ms"] / auto["median_ms"],
        }
        for key in ("pct_of_roofline", "bound", "conv_time_pct", "peak_mib"):
            if key in auto:
                row[f"fastdd_{key}"] = auto[key]
        if "peak_mib" in best:
            row["baseline_peak_mib"] = best["peak_mib"]
        rows.append(row)
    return rows


def bar_chart(records: list[dict], path: Path, title: str) -> None:
    """fastdd's speed-up over every method, one bar per (shape, method), drawn with Pillow (log scale)."""
    import math

    from PIL import Image, ImageDraw

    rows = [r for r in records if r["kind"] != "fastdd" and "fastdd_speedup" in r]
    width, bar, gap, left = 1260, 16, 4, 740
    height = 50 + len(rows) * (bar + gap) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    draw.text((10, 24), "fastdd (auto) speed-up over each method; log scale, line at 1x", fill="black")
    top = max([r["fastdd_speedup"] for r in rows] + [2.0])
    bottom = min([r["fastdd_speedup"] for r in rows] + [0.5])
    scale = (width - left - 80) / (math.log(top) - math.log(bottom))
    one = left + int(-math.log(bottom) * scale)
    for i, r in enumerate(rows):
        y = 44 + i * (bar + gap)
        x = left + int((math.log(r["fastdd_speedup"]) - math.log(bottom)) * scale)
        colour = (60, 140, 80) if r["fastdd_speedup"] >= 1 else (200, 70, 60)
        if r["kind"] == "fastdd-forced":
            colour = (150, 150, 150)
        draw.text((10, y + 2), _ascii(f"{r['op'][:30]} | {r['shape'][:36]} | {r['method'][:34]}"), fill="black")
        draw.rectangle([min(one, x), y, max(one, x) + 1, y + bar], fill=colour)
        draw.text((max(one, x) + 6, y + 2), f"{r['fastdd_speedup']:.2f}x", fill="black")
    draw.line([one, 40, one, height - 10], fill="black")
    image.save(path)


def _ascii(text: str) -> str:
    """Pillow's default font has no ², ×, ‖, ᵀ, −."""
    for a, b in (("²", "^2"), ("×", "x"), ("‖", "|"), ("ᵀ", "T"), ("−", "-")):
        text = text.replace(a, b)
    return text


def write_outputs(records: list[dict], peaks: dict, name: str, out_dir: Path, title: str, notes: str) -> None:
    """<out>/<name>.json (peaks, records, summary), .md (summary + notes + every record) and .png (speed-ups)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary(records)
    (out_dir / f"{name}.json").write_text(
        json.dumps({"device": peaks["device"], "machine_peak": peaks, "summary": rows, "records": records}, indent=2)
    )
    md = [
        f"# {title}",
        "",
        f"Device: {peaks['device']}; measured peak in the same run: {peaks['peak_gflops']:.1f} GFLOP/s fp32 (the "
        f"faster of matmul, {peaks['matmul_gflops']:.1f}, and 3×3 convolution, {peaks['conv_gflops']:.1f}), "
        f"{peaks['copy_gbps']:.1f} GB/s copy; torch {peaks['torch']}. Median of repeats.",
        "",
        notes.strip(),
        "",
        "## fastdd (auto) vs the strongest baseline",
        "",
        markdown_table(rows),
        "",
        "## Every method",
        "",
        markdown_table([{k: v for k, v in r.items() if k != "device"} for r in records]),
        "",
    ]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    bar_chart(records, out_dir / f"{name}.png", f"{title} on {peaks['device']}")
    print(markdown_table(rows))


def op_benchmark_main(run: Callable, name: str, doc: str, ops: list[str]) -> None:
    """The command line of one benchmarks/ops/bench_<name>.py.

    run(device, repeats, quick) -> (records, notes). Writes <out>/<name>_<device type>[_quick].{json,md,png}."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: small shapes, few repeats")
    parser.add_argument("--allow-reference", action="store_true", help="time even if ops run on the reference")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    require_compiled(ops, device, args.allow_reference)
    repeats = args.repeats or (2 if args.quick else 5)
    peaks = machine_peaks(device, quick=args.quick)
    records, notes = run(device, repeats, args.quick)
    for r in records:
        r["device"] = peaks["device"]
    finish_records(records, peaks)
    suffix = "_quick" if args.quick else ""
    write_outputs(records, peaks, f"{name}_{device.type}{suffix}", args.out, name, notes)

"""`fastdd report DIR...`: the eval summaries of several runs in one table like the papers' (method × IPC rows,
architecture × protocol columns, top-1 mean ± std over seeds), as markdown and a PNG chart.

A column holds one protocol on one validation set: summaries whose protocol settings (epochs, teacher, temperature)
or validation set (its files' fingerprint) differ from the column's first are refused, naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.atomic import write_bytes_atomic


def gather(folders: list[str | Path]) -> list[dict]:
    """Every eval summary (eval_*.json) of the run folders, each with its run's method, IPC and dataset."""
    rows = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        summaries = sorted(folder.glob("eval_*.json"))
        if not summaries:
            raise ValueError(f"{folder} holds no eval_*.json (run `fastdd eval {folder}` first)")
        try:
            config = json.loads((folder / "manifest.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            config = {}
        for path in summaries:
            try:
                summary = json.loads(path.read_text())
                summary["top1_mean"], summary["arch"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"{path} is not a fastdd eval summary") from None
            rows.append(
                summary
                | {
                    "file": str(path),
                    "method": config.get("method", folder.name),
                    "run_ipc": config.get("ipc", summary.get("ipc")),
                    "dataset": config.get("dataset", "?"),
                }
            )
    return rows


def column_key(summary: dict) -> tuple[str, str]:
    return summary["arch"], summary.get("protocol", {}).get("name", "hard")


def _identity(summary: dict) -> dict:
    """What must agree within a column: the protocol's settings and the validation set."""
    protocol = dict(summary.get("protocol", {}))
    return {"protocol": protocol, "val": summary.get("val", {}).get("fingerprint"), "epochs": summary.get("epochs")}


def table(rows: list[dict]) -> tuple[str, list[tuple[str, str]], dict]:
    """(markdown, columns, cells {(row, column): summary}); ValueError when a column would mix protocols or
    validation sets."""
    columns, first, cells = [], {}, {}
    for summary in rows:
        column = column_key(summary)
        if column not in first:
            columns.append(column)
            first[column] = summary
        elif _identity(summary) != _identity(first[column]):
            other = first[column]
            raise ValueError(
                f"report: {summary['file']} and {other['file']} are both {column[0]} / {column[1]} but with other "
                "protocol settings or validation sets; report them separately"
            )
        row = (summary["dataset"], summary["method"], summary["run_ipc"])
        if (row, column) in cells:
            raise ValueError(
                f"report: two summaries for {row} {column}: {cells[(row, column)]['file']}, {summary['file']}"
            )
        cells[(row, column)] = summary
    ordered = sorted({row for row, _ in cells}, key=lambda r: (str(r[0]), str(r[1]), r[2] or 0))
    header = "| dataset | method | IPC | " + " | ".join(f"{a} ({p})" for a, p in columns) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(columns)]
    for row in ordered:
        values = []
        for column in columns:
            summary = cells.get((row, column))
            values.append(
                "" if summary is None
                else f"{summary['top1_mean']:.2f} ± {summary['top1_std']:.2f} ({len(summary.get('per_seed', []))})"
            )  # fmt: skip
        lines.append(f"| {row[0]} | {row[1]} | {row[2]} | " + " | ".join(values) + " |")
    notes = [
        f"- {a} ({p}): {first[(a, p)].get('epochs')} epochs, validation {first[(a, p)].get('val', {}).get('source', '?')}"
        for a, p in columns
    ]
    markdown = "\n".join(lines) + "\n\ntop-1 % mean ± std over seeds (number of seeds).\n" + "\n".join(notes) + "\n"
    return markdown, columns, cells


def chart(cells: dict, columns: list[tuple[str, str]], path: Path) -> None:
    """One bar per (row, column), top-1 with its ± std whisker, drawn with Pillow."""
    from PIL import Image, ImageDraw

    items = sorted(cells.items(), key=lambda kv: (str(kv[0][0]), columns.index(kv[0][1])))
    bar, gap, left, width = 16, 4, 420, 1100
    image = Image.new("RGB", (width, 40 + len(items) * (bar + gap) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "top-1 % (mean, whisker = std over seeds)", fill="black")
    scale = (width - left - 60) / 100.0
    for i, ((row, column), summary) in enumerate(items):
        y = 36 + i * (bar + gap)
        label = f"{row[0]} {row[1]} ipc {row[2]} | {column[0]} ({column[1]})"
        draw.text((10, y + 2), label.encode("ascii", "replace").decode(), fill="black")
        mean, std = summary["top1_mean"], summary["top1_std"]
        draw.rectangle([left, y, left + int(mean * scale), y + bar], fill=(60, 110, 170))
        draw.line([left + int((mean - std) * scale), y + bar // 2, left + int((mean + std) * scale), y + bar // 2],
                  fill="black", width=2)  # fmt: skip
        draw.text((left + int(mean * scale) + 8, y + 2), f"{mean:.1f}", fill="black")
    image.save(path)


def report(folders: list[str | Path], out: str | Path) -> Path:
    """Write <out>.md and <out>.png for the runs' summaries; returns the markdown path."""
    rows = gather(folders)
    markdown, columns, cells = table(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown_path = out.with_suffix(".md")
    write_bytes_atomic(markdown.encode(), markdown_path)
    chart(cells, columns, out.with_suffix(".png"))
    return markdown_path

"""`fastdd eval` at tiny settings: digits default validation split, JSON and table, bad input."""
from __future__ import annotations

import json

from fastdd.cli.main import main
from fastdd.data.digits import DIGITS_CLASSES, load_digits_split
from fastdd.data.imagefolder import save_png_atomic
from fastdd.pipeline import write_json_atomic


def real_digits_set(root, ipc: int, manifest: bool = True):
    """An ImageFolder of the first `ipc` real training digits per class (what a perfect distiller could output)."""
    images, labels = load_digits_split("train")
    for c, name in enumerate(DIGITS_CLASSES):
        for i, image in enumerate(images[labels == c][:ipc]):
            save_png_atomic(image, root / name / f"{i}.png")
    if manifest:
        config = {"dataset": "digits", "classes": DIGITS_CLASSES, "image_size": 16, "channels": 1}
        write_json_atomic(root / "manifest.json", {"config": config, "images": []})
    return root


def test_eval_trains_on_real_digits_above_chance_on_the_test_split(tmp_path, capsys):
    folder = real_digits_set(tmp_path / "set", ipc=10)
    assert main(["eval", str(folder), "--epochs", "40", "--seeds", "0,1", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| set | arch | IPC | epochs | top-1 (mean ± std over 2 seeds) |"), out
    summary = json.loads((folder / "eval_convnet6.json").read_text())
    assert summary["ipc"] == 10 and summary["epochs"] == 40 and len(summary["per_seed"]) == 2
    assert summary["top1_mean"] > 50.0, summary  # 10 classes: chance is 10 %


def test_eval_rejects_bad_input(tmp_path, capsys):
    bare = real_digits_set(tmp_path / "bare", ipc=1, manifest=False)
    assert main(["eval", str(bare), "--epochs", "1", "--quiet"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main(["eval", str(bare), "--epochs", "1", "--image-size", "16", "--quiet"]) == 2
    assert "--real-val is required" in capsys.readouterr().err
    folder = real_digits_set(tmp_path / "set", ipc=1)
    assert main(["eval", str(folder), "--seeds", "a,b", "--quiet"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--quiet"]) == 2

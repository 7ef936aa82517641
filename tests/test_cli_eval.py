"""`fastdd eval` at tiny settings: digits default validation split, JSON and table, bad input."""

from __future__ import annotations

import json

from fastdd.cli.main import main
from fastdd.data.digits import DIGITS_CLASSES, load_digits_split
from fastdd.data.imagefolder import save_png_atomic
from fastdd.pipeline import write_json_atomic


def real_digits_set(root, ipc: int, manifest: bool = True, complete: bool = True):
    """An ImageFolder of the first `ipc` real training digits per class (what a perfect distiller could output),
    with a manifest listing them as `fastdd distill` writes it."""
    images, labels = load_digits_split("train")
    records = []
    for c, name in enumerate(DIGITS_CLASSES):
        for i, image in enumerate(images[labels == c][:ipc]):
            sha = save_png_atomic(image, root / name / f"{i}.png")
            records.append({"class_index": c, "class": name, "index": i, "path": f"{name}/{i}.png", "sha256": sha})
    if manifest:
        config = {"dataset": "digits", "classes": DIGITS_CLASSES, "image_size": 16, "channels": 1}
        write_json_atomic(root / "manifest.json", {"config": config, "images": records, "complete": complete})
    return root


def test_eval_trains_on_real_digits_above_chance_on_the_test_split(tmp_path, capsys):
    folder = real_digits_set(tmp_path / "set", ipc=10)
    assert main(["eval", str(folder), "--epochs", "40", "--seeds", "0,1", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| set | arch | labels | IPC | epochs | top-1 (mean ± std over 2 seeds) |"), (
        out
    )
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


def test_eval_refuses_unfinished_runs_corrupt_manifests_and_bad_epochs(tmp_path, capsys):
    unfinished = real_digits_set(tmp_path / "unfinished", ipc=1, complete=False)
    assert main(["eval", str(unfinished), "--epochs", "1", "--quiet", "--device", "cpu"]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                str(unfinished),
                "--epochs",
                "1",
                "--seeds",
                "0",
                "--quiet",
                "--device",
                "cpu",
                "--allow-incomplete",
            ]
        )
        == 0
    )
    for epochs in ("0", "-5"):
        assert main(["eval", str(unfinished), "--epochs", epochs, "--allow-incomplete", "--quiet"]) == 2
        assert "--epochs must be >= 1" in capsys.readouterr().err
    corrupt = real_digits_set(tmp_path / "corrupt", ipc=1)
    (corrupt / "manifest.json").write_text('{"config": ')
    assert main(["eval", str(corrupt), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not a readable fastdd manifest" in err and len(err.strip().splitlines()) == 1
    folder = real_digits_set(tmp_path / "set", ipc=1)
    assert (
        main(["eval", str(folder), "--epochs", "1", "--json", str(tmp_path / "no" / "such" / "x.json"), "--quiet"]) == 2
    )
    assert "--json" in capsys.readouterr().err


def test_eval_trains_on_the_manifest_images_only(tmp_path, capsys):
    folder = real_digits_set(tmp_path / "set", ipc=1)
    (folder / "3" / "extra.png").write_bytes((folder / "4" / "0.png").read_bytes())
    assert main(["eval", str(folder), "--epochs", "2", "--seeds", "0", "--quiet", "--device", "cpu"]) == 0
    assert "left out 1 file(s) that the manifest does not list: 3/extra.png" in capsys.readouterr().err
    summary = json.loads((folder / "eval_convnet6.json").read_text())
    assert summary["ipc"] == 1 and summary["complete"]
    (folder / "5" / "0.png").write_bytes((folder / "6" / "0.png").read_bytes())  # swapped: not the recorded image
    assert main(["eval", str(folder), "--epochs", "2", "--seeds", "0", "--quiet", "--device", "cpu"]) == 2
    assert "not the image the manifest records" in capsys.readouterr().err


def test_eval_saves_each_seed_as_it_finishes(tmp_path, capsys):
    folder = real_digits_set(tmp_path / "set", ipc=1)
    assert main(["eval", str(folder), "--epochs", "2", "--seeds", "0,1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "eval seed 0: top-1" in captured.out and "eval seed 1: top-1" in captured.out
    assert "eval convnet6: 100%" in captured.err and "\r" not in captured.err  # not a terminal: whole lines

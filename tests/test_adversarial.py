"""Adversarial input, round 2 (issue 21): each case ends with a one-line refusal (exit 2, nothing written), a repair
that is said, or a correct result; never exit 0 with wrong data, a traceback, a hang or a state that cannot be
resumed. `CASES` is the table of commands -> (exit code, first line of stderr); the cases that need a kill, a second
process or a swapped file have their own tests below."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_distill import free_port, run_cli
from test_run_integrity import image_folder, tree
from tiny_dit import TINY_PIXEL_DIT, save_tiny_dit_pipeline, save_tiny_prior, tiny_vae

import fastdd
from fastdd.cli.main import main
from fastdd.data.digits import DIGITS_CLASSES
from fastdd.methods.base import cache_path
from fastdd.models.dit import DiT

REVISION = "0123456789abcdef0123456789abcdef01234567"
OTHER_REVISION = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Small models and data folders the cases share (nothing of a case's own output lives here)."""
    root = tmp_path_factory.mktemp("world")
    data = image_folder(root / "data", 1)
    odd = root / "odd"  # an ImageFolder whose class b holds one image of a given pixel format
    for name in "ab":
        (odd / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((np.arange(256).reshape(16, 16) * (i + 1) % 256).astype(np.uint8)).save(
                odd / name / f"{i}.png"
            )
    torch.manual_seed(0)
    zero = DiT(**TINY_PIXEL_DIT, num_classes=10)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    from fastdd.prior import save_prior

    save_prior(zero, root / "zero.safetensors", {"classes": DIGITS_CLASSES, "dataset": "digits", "image_size": 16,
                                                  "channels": 1, "latent": "pixel"})  # fmt: skip
    pipeline = save_tiny_dit_pipeline(root / "pipe", num_classes=10)
    red = root / "red_vae"  # decodes every latent to pure red
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.copy_(torch.tensor([1.0, -1.0, -1.0]))
    vae.save_pretrained(red)
    return {
        "root": root,
        "data": data,
        "odd": odd,
        "abc_prior": save_tiny_prior(root / "abc.safetensors", list("abc"), "custom"),
        "digits_prior": save_tiny_prior(root / "digits.safetensors", DIGITS_CLASSES, "digits"),
        "zero_prior": root / "zero.safetensors",
        "pipeline": pipeline,
        "red_vae": red,
    }


def distill(out: Path, *extra: str, method: str = "dit", ipc: int = 1, steps: int = 3) -> list[str]:
    return ["distill", "--method", method, "--ipc", str(ipc), "--out", str(out), "--steps", str(steps), "--quiet",
            "--device", "cpu", *extra]  # fmt: skip


def first_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def same_run(a: Path, b: Path) -> bool:
    """The same files with the same bytes (JSON files compared with each run's own folder name replaced)."""

    def files(root: Path) -> dict[str, bytes]:
        return {k: (root / k).read_bytes().replace(str(root).encode(), b"<out>") for k in tree(root)}

    return files(a) == files(b)


# --------------------------------------------------------------------------------------------- the table
def _case_cfg_explodes(w, tmp):  # 4: saturated noise from an exploded CFG scale
    return distill(tmp / "out", "--cfg-scale", "1e4", steps=10)


def _case_eta_explodes(w, tmp):  # 4: ... or an exploded η
    return distill(tmp / "out", "--sampler", "ddim", "--eta", "1e6", steps=10)


def _case_zero_prior(w, tmp):  # 4: a prior whose weights are all zero
    return distill(tmp / "out", "--model", str(w["zero_prior"]), steps=10)


def _case_red_vae(w, tmp):  # 4: a VAE that decodes to solid red
    return distill(tmp / "out", "--model", str(w["pipeline"]), "--vae", str(w["red_vae"]))


def _case_image_mode(mode):  # 6: 32-bit integer and float images are refused, in distill and in eval --real-val
    def case(w, tmp):
        data = tmp / "data"
        shutil.copytree(w["odd"], data)
        array = np.arange(256, dtype=np.float32).reshape(16, 16)
        Image.fromarray(array.astype(np.int32) if mode == "I" else array / 255, mode=mode).save(data / "b" / "2.tif")
        return distill(tmp / "out", "--method", "mgd3", "--model", str(w["abc_prior"]), "--data", str(data),
                       "--classes", str(write_classes(tmp, "ab")), method="mgd3")  # fmt: skip

    return case


def write_classes(tmp: Path, names: str) -> Path:
    path = tmp / "classes.txt"
    path.write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    return path


def _case_eval_json_manifest(w, tmp):  # 8
    return ["eval", str(finished_run(w, tmp)), "--json", str(tmp / "run" / "manifest.json"), "--epochs", "1"]


def _case_eval_json_image(w, tmp):  # 8
    return ["eval", str(finished_run(w, tmp)), "--json", str(tmp / "run" / "3" / "0.png"), "--epochs", "1"]


def finished_run(w, tmp: Path) -> Path:
    out = tmp / "run"
    assert main(distill(out, "--model", str(w["digits_prior"]))) == 0
    return out


def _case_corrupt_manifest(edit):  # 9: a corrupt manifest is refused in one line
    def case(w, tmp):
        out = finished_run(w, tmp)
        manifest = json.loads((out / "manifest.json").read_text())
        edit(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
        return ["eval", str(out), "--epochs", "1", "--seeds", "0", "--quiet"]

    return case


def _case_fifo(w, tmp):  # 10
    data = tmp / "data"
    shutil.copytree(w["data"], data)
    os.mkfifo(data / "b" / "zz.png")
    return distill(tmp / "out", "--model", str(w["abc_prior"]), "--data", str(data), method="mgd3")


def _case_out_in_data(w, tmp):  # 11
    data = tmp / "data"
    shutil.copytree(w["data"], data)
    return distill(data / "runs", "--model", str(w["abc_prior"]), "--data", str(data), method="mgd3")


def _case_out_in_model(w, tmp):  # 11
    model = tmp / "pipe"
    shutil.copytree(w["pipeline"], model)
    return distill(model / "runs", "--model", str(model))


def _case_reserved_class(name):  # 12
    def case(w, tmp):
        data = tmp / "data"
        shutil.copytree(w["data"], data)
        (data / "c").rename(data / name)
        (tmp / "classes.txt").write_text(f"a 0\nb 1\n{name} 2\n")
        return distill(tmp / "out", "--model", str(w["pipeline"]), "--data", str(data), "--classes",
                       str(tmp / "classes.txt"), method="mgd3")  # fmt: skip

    return case


def _case_stats_file(*extra):  # 13: --d3hr-stats naming a file, also in a dry run
    def case(w, tmp):
        (tmp / "stats").write_text("not a folder")
        return distill(tmp / "out", "--model", str(w["abc_prior"]), "--data", str(w["data"]), "--d3hr-stats",
                       str(tmp / "stats"), *extra, method="d3hr")  # fmt: skip

    return case


def _case_bad_ipc(w, tmp):  # 17
    return distill(tmp / "out", "--ipc", "abc")


def _case_garbage_checkpoint(w, tmp):  # 17
    (tmp / "garbage.pt").write_bytes(os.urandom(3000))
    return distill(tmp / "out", "--model", str(tmp / "garbage.pt"))


def _case_diffusers_without_weights(w, tmp):  # 17
    folder = tmp / "pipe"
    shutil.copytree(w["pipeline"], folder)
    for weights in folder.glob("transformer/diffusion_pytorch_model*"):
        weights.unlink()
    return distill(tmp / "out", "--model", str(folder))


def _case_convnet_state_dict(w, tmp):  # 17
    from fastdd.models import ConvNet

    torch.save(ConvNet(3, 10, width=8, depth=2, im_size=16).state_dict(), tmp / "convnet.pt")
    return distill(tmp / "out", "--model", str(tmp / "convnet.pt"), "--allow-missing-keys")


CASES = {  # id: (argv maker, exit code, text of the single stderr line, output folder that must not exist)
    "cfg-scale-1e4": (_case_cfg_explodes, 2, "decoded to saturated noise", None),
    "ddim-eta-1e6": (_case_eta_explodes, 2, "decoded to saturated noise", None),
    "all-zero-prior": (_case_zero_prior, 2, "decoded to saturated noise", None),
    "red-vae": (_case_red_vae, 2, "decoded to one flat colour", None),
    "int32-tiff": (_case_image_mode("I"), 2, "32-bit integer pixels (PIL mode I) have no standard range", "out"),
    "float-tiff": (_case_image_mode("F"), 2, "floating-point pixels (PIL mode F) have no standard range", "out"),
    "eval-json-manifest": (_case_eval_json_manifest, 2, "only a top-level eval_*.json may be written", None),
    "eval-json-image": (_case_eval_json_image, 2, "only a top-level eval_*.json may be written", None),
    "record-without-sha256": (_case_corrupt_manifest(lambda m: m["images"][0].pop("sha256")), 2, "lacks sha256", None),
    "record-an-int": (
        _case_corrupt_manifest(lambda m: m["images"].__setitem__(0, 7)),
        2,
        "is a int, not a record",
        None,
    ),
    "class-index-99": (
        _case_corrupt_manifest(lambda m: m["images"][0].update(class_index=99)),
        2,
        "outside the 10 classes",
        None,
    ),  # fmt: skip
    "class-index-minus-1": (
        _case_corrupt_manifest(lambda m: m["images"][0].update(class_index=-1)),
        2,
        "outside the 10 classes",
        None,
    ),  # fmt: skip
    "class-index-0-everywhere": (
        _case_corrupt_manifest(lambda m: [r.update(class_index=0) for r in m["images"]]),
        2,
        "but class_index 0 is '0'",
        None,
    ),  # fmt: skip
    "image-size-text": (
        _case_corrupt_manifest(lambda m: m["config"].update(image_size="16")),
        2,
        "config.image_size is '16', not a valid image_size",
        None,
    ),  # fmt: skip
    "fifo-in-data": (_case_fifo, 2, "is not a regular file", "out"),
    "out-inside-data": (_case_out_in_data, 2, "lies inside --data", None),
    "out-inside-model": (_case_out_in_model, 2, "lies inside --model", None),
    "class-named-preview": (_case_reserved_class("preview.png"), 2, "fastdd writes a file of that name", "out"),
    "class-named-manifest": (_case_reserved_class("manifest.json"), 2, "fastdd writes a file of that name", "out"),
    "d3hr-stats-a-file": (_case_stats_file(), 2, "is a file, not a folder", "out"),
    "d3hr-stats-a-file-dry-run": (_case_stats_file("--dry-run"), 2, "is a file, not a folder", "out"),
    "ipc-abc": (_case_bad_ipc, 2, "argument --ipc: invalid int value: 'abc'", "out"),
    "garbage-checkpoint": (
        _case_garbage_checkpoint,
        2,
        "cannot read checkpoint: it is not a checkpoint of tensors",
        "out",
    ),  # fmt: skip
    "diffusers-without-weights": (_case_diffusers_without_weights, 2, "holds no weights", "out"),
    "convnet-state-dict": (_case_convnet_state_dict, 2, "not a DiT checkpoint", "out"),
}


def exit_code(argv: list[str]) -> int:
    """`fastdd ...` in this process: main's return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("case", sorted(CASES))
def test_adversarial_command(tmp_path, world, capsys, case):
    make, code, text, untouched = CASES[case]
    argv = make(world, tmp_path)
    capsys.readouterr()
    result = exit_code(argv)
    line = first_error_line(capsys)
    assert result == code and text in line, (result, line)
    assert "Traceback" not in line and "weights_only=False" not in line
    if untouched:
        assert not (tmp_path / untouched).exists()
    if text.startswith("decoded to"):  # nothing of the failing batch is written: no PNG, the run resumable
        assert not list((tmp_path / "out").rglob("*.png"))


# --------------------------------------------------------------------------------------------- 1. hub VAE snapshots
def test_a_hub_vae_is_fingerprinted_and_a_moved_snapshot_makes_the_folder_another_run(tmp_path, world):
    """--vae as a hub id (the default alias resolves the same way) records the snapshot it resolved to and its
    fingerprint; moving refs/main to another snapshot between a kill and the rerun is refused, not mixed."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--tiny--vae"
    for revision, seed in ((REVISION, 0), (OTHER_REVISION, 1)):
        torch.manual_seed(seed)
        tiny_vae().save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "fastdd", *distill(tmp_path / "out", "--model", str(world["pipeline"]), "--vae",
                                                     "tiny/vae", ipc=2)]  # fmt: skip
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    config = json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]
    assert config["vae_snapshot"] == REVISION and config["vae_sha256"].startswith("folder:")
    (tmp_path / "out" / ".fastdd" / "batches" / "1.json").unlink()  # as if killed before the last batch
    (repo / "refs" / "main").write_text(OTHER_REVISION)
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "differs in: vae_sha256, vae_snapshot" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- 2./3. cache keys
def test_every_cache_key_names_numerics_precision_and_compat(tmp_path, world):
    """The one key function (`cache_inputs`) names numerics, precision and compat: the SAM weights, the latents, the
    D3HR statistics and every other cache differ when one of them does."""
    base = fastdd.prepare(fastdd.RunSpec(method="sam", ipc=1, out=str(tmp_path / "o"), quiet=True, device="cpu",
                                         dry_run=True))  # fmt: skip
    spec = dataclasses.replace(base.spec, dry_run=False)
    keys = set()
    for changed in ({}, {"compat": True}, {"precision": "bf16"}):
        other = dataclasses.replace(spec, **changed)
        for numerics in ("official", "diffusers"):
            models = base.models
            models.description["numerics"] = numerics
            keys.add(cache_path(other, models, base.data, "sam_difffit", {}).name)
    assert len(keys) == 6


def test_a_shared_d3hr_folder_is_refused_across_numerics(tmp_path, world, capsys):
    stats = tmp_path / "stats"
    common = ["--model", str(world["abc_prior"]), "--data", str(world["data"]), "--d3hr-candidates", "20",
              "--d3hr-stats", str(stats)]  # fmt: skip
    assert main(distill(tmp_path / "a", *common, method="d3hr")) == 0
    capsys.readouterr()
    assert main(distill(tmp_path / "b", *common, "--numerics", "diffusers", method="d3hr")) == 2
    assert "holds statistics made with other settings (differs in: inputs)" in first_error_line(capsys)
    assert not (tmp_path / "b").exists()


def test_two_runs_started_together_on_one_empty_statistics_folder(tmp_path, world):
    """Started at the same moment with different settings: one claims the folder, the other is refused in one line
    before it writes anything; every file in the folder is the winner's."""
    stats = tmp_path / "stats"
    common = ["--model", str(world["abc_prior"]), "--data", str(world["data"]), "--d3hr-candidates", "20",
              "--d3hr-stats", str(stats)]  # fmt: skip
    procs = [
        run_cli(distill(tmp_path / "a", *common, method="d3hr")),
        run_cli(distill(tmp_path / "b", *common, "--numerics", "diffusers", method="d3hr")),
    ]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], (codes, errors)
    loser = codes.index(2)
    assert len(errors[loser].strip().splitlines()) == 1 and "made with other settings" in errors[loser]
    assert not (tmp_path / "ab"[loser] / "manifest.json").exists()
    winner = json.loads((tmp_path / "ab"[1 - loser] / "manifest.json").read_text())["config"]["numerics"]
    assert json.loads((stats / "statistics.json").read_text())["inputs"]["numerics"] == winner


# --------------------------------------------------------------------------------------------- 5. resume content
@pytest.mark.parametrize("damage", ["swapped", "signs-flipped"])
def test_resume_regenerates_a_batch_whose_latents_are_not_the_recorded_ones(tmp_path, world, capsys, damage):
    """IGD restores its memories from the saved latents: a latents file replaced by another batch's, or with every
    float's sign flipped (header intact), is not restored but generated again, said on stderr, and the run ends
    byte-identical to an uninterrupted one."""
    argv = lambda out: distill(out, "--model", str(world["digits_prior"]), method="igd", ipc=3, steps=4)  # noqa: E731
    assert main(argv(tmp_path / "whole")) == 0
    out = tmp_path / "run"
    assert main(argv(out)) == 0
    latents = out / ".fastdd" / "latents"
    (out / ".fastdd" / "batches" / "2.json").unlink()  # killed before its last batch
    if damage == "swapped":
        shutil.copy(latents / "1.safetensors", latents / "0.safetensors")
    else:
        from safetensors.torch import load_file, save_file

        save_file({"latents": -load_file(latents / "0.safetensors")["latents"]}, latents / "0.safetensors")
    capsys.readouterr()
    assert main(argv(out)) == 0
    assert "did not match the manifest; they are generated again" in capsys.readouterr().err
    assert tree(out) == tree(tmp_path / "whole")


# --------------------------------------------------------------------------------------------- 6. 16-bit images
def test_sixteen_bit_images_keep_their_range(tmp_path):
    from fastdd.data.imagefolder import load_image

    gray = (np.linspace(0, 65535, 256).reshape(16, 16)).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    loaded = load_image(tmp_path / "g16.png", 16, 3)
    expected = torch.from_numpy(gray.astype(np.float32) / 65535 * 2 - 1)
    torch.testing.assert_close(loaded, expected.expand(3, 16, 16), atol=1e-5, rtol=0)
    assert 0.0 < float(loaded.mean() + 1) / 2 < 1.0  # not the 99% white of an 8-bit clip


# --------------------------------------------------------------------------------------------- 14. the Python API
@pytest.mark.parametrize("settings, message", [({"seed": 0.5}, "--seed must be int, got 0.5"),
                                               ({"steps": "5"}, "--steps must be int, got '5'")])  # fmt: skip
def test_python_api_refuses_wrong_types_before_writing(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        fastdd.distill("dit", 1, tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_python_api_refuses_out_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--out must be str, got None"):
        fastdd.distill("dit", 1, None)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- 15. Ctrl-C, torchrun
def interrupt_when(proc: subprocess.Popen, ready) -> None:
    """SIGINT proc once ready() holds (polled; it must still be running)."""
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)


STAGES = {  # stage: (method, ipc, steps) of a run interrupted there
    "sampling": ("dit", 20, 60),
    "sam-fine-tuning": ("sam", 1, 3),
}


@pytest.mark.parametrize("stage", [*STAGES, "eval"])
def test_ctrl_c_says_one_line_exits_130_and_resumes(tmp_path, world, stage):
    out = tmp_path / "out"
    if stage == "eval":
        assert main(distill(out, "--model", str(world["digits_prior"]))) == 0
        argv = ["eval", str(out), "--epochs", "2000", "--seeds", "0", "--quiet"]
        expected = "fastdd eval: interrupted; run the same command again"
    else:
        method, ipc, steps = STAGES[stage]
        argv = distill(out, method=method, ipc=ipc, steps=steps)
        expected = "fastdd distill: interrupted; run the same command to resume"
    proc = run_cli(argv)
    if stage == "sampling":  # once the first batch is written
        batches = out / ".fastdd" / "batches"
        interrupt_when(proc, lambda: batches.is_dir() and any(batches.iterdir()))
    else:  # fine-tuning / training: a few seconds in
        started = time.time()
        interrupt_when(proc, lambda: time.time() > started + 5)
    code = proc.wait(timeout=120)
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert code == 130 and lines == [expected], lines
    if stage != "eval":
        assert main(argv) == 0  # resumable, and the same as an uninterrupted run
        assert main(distill(tmp_path / "whole", method=method, ipc=ipc, steps=steps)) == 0
        assert same_run(out, tmp_path / "whole")


def test_every_rank_of_a_second_torchrun_job_on_a_busy_folder_exits_with_one_line(tmp_path, world):
    out = tmp_path / "run"
    (out / ".fastdd").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(out / '.fastdd' / 'lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('1');"
         " f.flush(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        port = free_port()
        procs = [
            run_cli(distill(out, "--model", str(world["digits_prior"])),
                    env_extra={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
            for r in range(2)
        ]  # fmt: skip
        for rank, proc in enumerate(procs):
            assert proc.wait(timeout=180) == 2
            err = [line for line in proc.stderr.read().splitlines() if line.strip()]
            assert len(err) == 1 and "another fastdd process" in err[0], (rank, err)
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------- 16. eval of a run in progress
def test_eval_of_an_unfinished_run_says_so_in_its_summary(tmp_path, world, capsys):
    out = tmp_path / "run"
    assert main(distill(out, "--model", str(world["digits_prior"]), ipc=4)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"], manifest["images"] = False, manifest["images"][:4]  # as read while batch 1 is written
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["eval", str(out), "--allow-incomplete", "--epochs", "1", "--seeds", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "eval_convnet6.json").read_text())
    assert summary["run_complete"] is False and (summary["images"], summary["images_planned"]) == (4, 40)
    assert "not a complete run (4 of 40 images)" in captured.err and "incomplete run: 4 of 40 images" in captured.out

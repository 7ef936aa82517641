"""A run never yields a silently wrong dataset: caches keyed by their inputs, resume checks the disk, non-finite
values and unsafe class names refused before anything is written, a lock against a second process, temp files of
killed runs cleaned. Tiny settings on small models the tests make."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_dit import TINY_PIXEL_DIT, bounded_pixel_dit_, save_tiny_prior

import fastdd
from fastdd.cli.main import main
from fastdd.data.digits import DIGITS_CLASSES
from fastdd.models.dit import DiT


def image_folder(root: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    for name in "abc":
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(16, 16, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "digits_prior": save_tiny_prior(root / "digits.safetensors", DIGITS_CLASSES, "digits"),
        "abc_prior": save_tiny_prior(root / "abc.safetensors", list("abc"), "custom"),
        "nan_prior": save_tiny_prior(root / "nan.safetensors", DIGITS_CLASSES, "digits", nan=True),
        "data_a": image_folder(root / "a", 1),
        "data_b": image_folder(root / "b", 2),
    }


def args(out: Path, prior: Path, *extra: str, method: str = "dit", ipc: int = 2) -> list[str]:
    return [
        "distill",
        "--method",
        method,
        "--ipc",
        str(ipc),
        "--out",
        str(out),
        "--model",
        str(prior),
        "--steps",
        "4",
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".fastdd" not in p.parts
    }


def refused(capsys, argv: list[str], out: Path, expected: str, exists_before: bool = False) -> None:
    """Exit 2 with one line naming `expected`, and the output folder as it was (absent, or untouched)."""
    before = tree(out) if exists_before else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    if exists_before:
        assert tree(out) == before
    else:
        assert not out.exists()


# ----------------------------------------------------------------------------------------- 1. caches keyed by inputs
def test_shared_d3hr_statistics_of_other_data_are_refused(tmp_path, assets, capsys):
    stats = tmp_path / "stats"
    d3hr = ["--method", "d3hr", "--d3hr-candidates", "20", "--d3hr-stats", str(stats), "--class-batch", "3"]
    first = args(tmp_path / "x", assets["abc_prior"], "--data", str(assets["data_a"]))
    assert main(first + d3hr) == 0
    refused(
        capsys,
        args(tmp_path / "y", assets["abc_prior"], "--data", str(assets["data_b"])) + d3hr,
        tmp_path / "y",
        "made with other settings (differs in: inputs)",
    )
    other_cfg = args(tmp_path / "z", assets["abc_prior"], "--data", str(assets["data_a"]), "--cfg-scale", "1.5")
    refused(capsys, other_cfg + d3hr, tmp_path / "z", "differs in: cfg_scale")


SMALL_STATE = {  # (CLI flags, options) of each method that caches state, at small settings
    "igd": (["--surrogate-epochs", "2"], {"surrogate_epochs": 2}),
    "mgd3": ([], {}),
    "d3hr": (["--d3hr-candidates", "20"], {"candidates": 20}),
    "sam": (["--sam-epochs", "1", "--sam-batch", "4"], {"epochs": 1, "batch": 4}),
    "igds": (["--igds-eta", "0.5", "--igds-epochs", "1", "--igds-classifier-epochs", "2"],
             {"eta": 0.5, "epochs": 1, "classifier_epochs": 2}),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(SMALL_STATE))
def test_state_of_a_run_killed_before_its_manifest_is_not_reused_with_other_data(tmp_path, assets, method):
    """Killed after its cache was written and before manifest.json: the restart with other --data recomputes."""
    out = tmp_path / "run"
    spec = fastdd.RunSpec(
        method=method,
        ipc=2,
        out=str(out),
        model=str(assets["abc_prior"]),
        data=str(assets["data_a"]),
        steps=4,
        quiet=True,
        device="cpu",
    )
    extra, values = SMALL_STATE[method]
    options = fastdd.METHODS[method].options(**values)
    prepared = fastdd.prepare(spec, options)  # builds the method (writes its cache), then "dies" before start()
    if method in ("d3hr", "mgd3"):  # per-class state (statistics, modes) is computed at the class's first batch
        prepared.sample_batch(prepared.plan[0])
    assert list((out / ".fastdd").iterdir()) and not (out / "manifest.json").exists()
    b = args(out, assets["abc_prior"], "--data", str(assets["data_b"]), *extra, method=method)
    fresh = args(tmp_path / "fresh", assets["abc_prior"], "--data", str(assets["data_b"]), *extra, method=method)
    assert main(b) == 0 and main(fresh) == 0
    pngs = {k: v for k, v in tree(out).items() if k.endswith(".png")}
    assert len(pngs) == 7 and pngs == {k: v for k, v in tree(tmp_path / "fresh").items() if k.endswith(".png")}


# ----------------------------------------------------------------------------------------- 2. resume checks the disk
def test_resume_repairs_missing_replaced_and_truncated_images(tmp_path, assets, capsys):
    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    assert main(args(whole, assets["digits_prior"], ipc=3)) == 0
    assert main(args(damaged, assets["digits_prior"], ipc=3)) == 0
    (damaged / "0" / "0.png").unlink()
    (damaged / "1" / "1.png").write_bytes((damaged / "2" / "1.png").read_bytes())  # another valid PNG
    truncated = damaged / "3" / "2.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    (damaged / ".fastdd" / "latents" / "2.safetensors").write_bytes(b"garbage")
    (damaged / ".fastdd" / "batches" / "1.json").write_text("{not json")
    capsys.readouterr()
    assert main(args(damaged, assets["digits_prior"], ipc=3)) == 0
    err = capsys.readouterr().err
    assert "resume: " in err and "generated again" in err
    assert tree(damaged) == tree(whole)
    manifest = json.loads((damaged / "manifest.json").read_text())
    assert manifest["complete"] and all(
        hashlib.sha256((damaged / r["path"]).read_bytes()).hexdigest() == r["sha256"] for r in manifest["images"]
    )


def test_a_complete_run_says_so(tmp_path, assets, capsys):
    """... and --quiet says nothing (errors aside)."""
    out = tmp_path / "run"
    assert main(args(out, assets["digits_prior"])) == 0
    assert capsys.readouterr().out == ""
    loud = [a for a in args(out, assets["digits_prior"]) if a != "--quiet"]
    assert main(loud) == 0
    assert "already complete" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- 3. non-finite values
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        (["--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number"),
        (["--method", "igd", "--igd-k", "inf"], "--igd-k must be a finite number"),
        (["--method", "igd", "--igd-gamma", "nan"], "--igd-gamma must be a finite number"),
        (["--seed", "-1"], "--seed must be in [0, 2**63)"),
        (["--seed", str(2**63)], "--seed must be in [0, 2**63)"),
        (["--ipc", "1000000000", "--dry-run"], "limit of 2,000,000 images"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, assets, capsys, extra, expected):
    out = tmp_path / "run"
    refused(capsys, args(out, assets["digits_prior"]) + extra, out, expected)


def test_weights_with_nan_are_refused(tmp_path, assets, capsys):
    out = tmp_path / "run"
    refused(capsys, args(out, assets["nan_prior"]), out, "parameter blocks.0.attn.qkv.weight holds NaN or Inf")


def test_non_finite_final_latents_stop_the_run_naming_the_image(tmp_path, assets, capsys):
    out = tmp_path / "run"
    huge = args(out, assets["digits_prior"], "--cfg-scale", "1e308")
    assert main(huge) == 2
    assert "image 0 of class '0': the sampler produced NaN or Inf" in capsys.readouterr().err
    assert not list(out.glob("*/*.png"))


# ----------------------------------------------------------------------------------------- 4. class names
@pytest.mark.parametrize("name", ["../../ESCAPED", "/abs/olute", ".fastdd", "..", "a\\b"])
def test_class_names_must_be_one_safe_path_component(tmp_path, assets, capsys, name):
    classes = tmp_path / "classes.txt"
    classes.write_text(f"{name} 0\nfine 1\n")
    out = tmp_path / "deep" / "run"
    refused(capsys, args(out, assets["digits_prior"], "--classes", str(classes)), out, "is not a safe folder name")
    assert not list(tmp_path.rglob("*.png"))


# ----------------------------------------------------------------------------------------- 8. a second process
def test_a_second_process_on_the_same_folder_is_refused_naming_the_holder(tmp_path, assets, capsys):
    out = tmp_path / "run"
    (out / ".fastdd").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"f = open({str(out / '.fastdd' / 'lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid()));"
                " f.flush(); print('locked', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(args(out, assets["digits_prior"])) == 2
        assert f"another fastdd process (pid {holder.pid}) is writing this run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(args(out, assets["digits_prior"])) == 0  # the lock dies with its process


# ----------------------------------------------------------------------------------------- 10. temp files
def test_temp_files_of_a_killed_run_are_removed_at_the_next_start(tmp_path, assets):
    out = tmp_path / "run"
    assert main(args(out, assets["digits_prior"])) == 0
    leftovers = [
        out / ".fastdd" / "latents" / ".3.safetensors.x1y2.tmp",
        out / ".fastdd" / "state.safetensors.tmpAb12",
        out / ".fastdd" / "d3hr_stats_0" / ".class_00001.safetensors.q.tmp",
        out / "0" / ".1.png.z.tmp",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert main(args(out, assets["digits_prior"])) == 0
    assert not any(p.exists() for p in leftovers)


# ----------------------------------------------------------------------------------------- 5./6. weights
@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A 10-class pixel DiT saved as an official state dict (.pt), whole and without one block's qkv weight."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    model = DiT(**(TINY_PIXEL_DIT | {"hidden_size": 384, "num_heads": 6}), num_classes=10)  # DiT-S width, 1 block
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = bounded_pixel_dit_(model).state_dict()
    torch.save(state, root / "whole.pt")
    torch.save({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}, root / "partial.pt")
    return root


def test_official_checkpoints_load_strictly_unless_missing_keys_are_allowed(tmp_path, official, capsys):
    assert main(args(tmp_path / "whole", official / "whole.pt", "--vae", "none")) == 0
    out = tmp_path / "partial"
    refused(capsys, args(out, official / "partial.pt", "--vae", "none"), out, "missing keys: blocks.0.attn.qkv.weight")
    assert main(args(out, official / "partial.pt", "--vae", "none", "--allow-missing-keys")) == 0
    assert "blocks.0.attn.qkv.weight" in capsys.readouterr().err
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert "blocks.0.attn.qkv.weight" in config["missing_keys"]


def test_a_vae_folder_that_is_not_a_vae_is_refused(tmp_path, official, capsys):
    folder = tmp_path / "not_a_vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    out = tmp_path / "run"
    refused(capsys, args(out, official / "whole.pt", "--vae", str(folder)), out, "not a diffusers AutoencoderKL folder")


def test_weights_changed_in_place_make_the_folder_another_run(tmp_path, official, capsys):
    model = tmp_path / "model.pt"
    model.write_bytes((official / "whole.pt").read_bytes())
    out = tmp_path / "run"
    assert main(args(out, model, "--vae", "none")) == 0
    state = torch.load(model)
    state["final_layer.linear.bias"] += 1.0
    torch.save(state, model)
    refused(capsys, args(out, model, "--vae", "none"), out, "differs in: model_sha256", exists_before=True)


def test_a_surrogate_that_is_not_safetensors_is_refused(tmp_path, assets, capsys):
    fake = tmp_path / "surrogate.safetensors"
    fake.write_bytes(b"PK\x03\x04 not a safetensors file")
    out = tmp_path / "run"
    refused(
        capsys,
        args(out, assets["digits_prior"], "--surrogate", str(fake), method="igd"),
        out,
        "is not a readable safetensors file",
    )


def test_an_unreadable_cache_is_computed_again(tmp_path, assets, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    mgd3 = ["--data", str(assets["data_a"])]
    assert main(args(first, assets["abc_prior"], *mgd3, method="mgd3")) == 0
    modes = sorted((first / ".fastdd").glob("mgd3_modes_*/*.safetensors"))  # one file per class
    assert len(modes) == 3
    modes[1].write_bytes(b"garbage")
    for png in first.glob("*/*.png"):
        png.unlink()
    capsys.readouterr()
    assert main(args(first, assets["abc_prior"], *mgd3, method="mgd3")) == 0
    assert "is unreadable" in capsys.readouterr().err
    assert main(args(second, assets["abc_prior"], *mgd3, method="mgd3")) == 0
    assert {k: v for k, v in tree(first).items() if k.endswith(".png")} == {
        k: v for k, v in tree(second).items() if k.endswith(".png")
    }


def test_a_decompression_bomb_in_the_data_is_refused_in_one_line(tmp_path, assets, capsys):
    data = tmp_path / "data"
    for name in "abc":
        (data / name).mkdir(parents=True)
        for i in range(2):
            (data / name / f"{i}.png").write_bytes((assets["data_a"] / name / f"{i}.png").read_bytes())
    Image.new("1", (14_000, 14_000)).save(data / "b" / "bomb.png")  # 196 Mpixel: over twice PIL's limit
    for method in ("dit", "mgd3"):  # checked up front (dit), or when the images load (mgd3)
        out = tmp_path / method
        refused(capsys, args(out, assets["abc_prior"], "--data", str(data), method=method), out, "bomb.png")


def test_a_diffusers_folder_changed_in_place_makes_the_folder_another_run(tmp_path, capsys):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                                  num_layers=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10)  # fmt: skip
    bounded_pixel_dit_(model)
    folder, out = tmp_path / "transformer", tmp_path / "run"
    model.save_pretrained(folder)
    assert main(args(out, folder, "--vae", "none")) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["model_sha256"].startswith("folder:")
    with torch.no_grad():
        model.proj_out_2.bias.add_(1.0)
    model.save_pretrained(folder)  # the same file names, new weights
    refused(capsys, args(out, folder, "--vae", "none"), out, "differs in: model_sha256", exists_before=True)


# ----------------------------------------------------------------------------------------- 8. the file system
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 96 KiB tmpfs mounted at tmp_path / 'fs' (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_a_full_disk_and_a_read_only_file_system_fail_in_one_line_and_stay_resumable(tmp_path, assets, small_tmpfs):
    """Each attempt is its own process (as a user's would be), so the file system can be remounted between them."""
    out, whole = small_tmpfs / "run", tmp_path / "whole"
    argv = args(out, assets["digits_prior"], ipc=4, method="dit")
    assert main(args(whole, assets["digits_prior"], ipc=4, method="dit")) == 0

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastdd", *argv], capture_output=True, text=True, timeout=300)

    full = attempt()  # 40 PNGs, latents and records do not fit in 96 KiB
    err = full.stderr.strip()
    assert full.returncode == 2 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "run the same command again to resume" in err, err
    remount(small_tmpfs, "ro")
    read_only = attempt()
    err = read_only.stderr.strip()
    assert read_only.returncode == 2 and "Read-only file system" in err and len(err.splitlines()) == 1, err
    remount(small_tmpfs, "rw,size=16m")
    assert attempt().returncode == 0
    assert {k: v for k, v in tree(out).items() if k.endswith(".png")} == {
        k: v for k, v in tree(whole).items() if k.endswith(".png")
    }

"""`fastdd distill` end to end at tiny settings: outputs, IGD, several images per batch, resume after SIGKILL, bad
input, dry run, 2 processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_dit import TINY_PIXEL_DIT, save_tiny_prior

import fastdd.pipeline as pipeline
from fastdd.cli.main import main
from fastdd.data.digits import DIGITS_CLASSES
from fastdd.guidance.igd import SurrogateBundle, SurrogateConfig
from fastdd.models.dit import DiT
from fastdd.prior import save_prior
from fastdd.sampling import acceleration


def tiny_bundle(path: Path, num_classes: int, k: int = 2) -> Path:
    torch.manual_seed(1)
    config = SurrogateConfig(channel=1, num_classes=num_classes, width=8, depth=3, im_size=16)
    size = sum(p.numel() for p in config.build().parameters())
    SurrogateBundle(config, 0.1 * torch.randn(k, size), torch.randn(num_classes, k, size), list(range(k))).save(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    data = root / "data"
    for name in "abc":
        (data / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(16, 16) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    return {
        "digits_prior": save_tiny_prior(root / "digits.safetensors", DIGITS_CLASSES, "digits"),
        "abc_prior": save_tiny_prior(root / "abc.safetensors", list("abc"), "custom"),
        "bundle": tiny_bundle(root / "bundle.safetensors", 10),
        "data": data,
    }


def distill_args(out: Path, assets, *extra: str, method: str = "igd", ipc: int = 2) -> list[str]:
    args = [
        "distill",
        "--method",
        method,
        "--ipc",
        str(ipc),
        "--out",
        str(out),
        "--model",
        str(assets["digits_prior"]),
        "--steps",
        "5",
        "--quiet",
        "--device",
        "cpu",
    ]
    if method == "igd" and "--surrogate" not in extra:
        args += ["--surrogate", str(assets["bundle"])]
    return args + list(extra)


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root but the run's lock (it holds the pid of its last writer)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root) != Path(".fastdd", "lock")
    }


# ----------------------------------------------------------------------------------------- outputs
def test_distill_writes_imagefolder_manifest_and_preview(tmp_path, assets):
    out = tmp_path / "run"
    assert main(distill_args(out, assets, method="dit", ipc=3)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["config"]["method"] == "dit" and manifest["config"]["ipc"] == 3 and manifest["config"]["steps"] == 5
    assert "torch" in manifest["versions"]
    records = manifest["images"]
    assert len(records) == 30 and len({r["path"] for r in records}) == 30 and len({r["seed"] for r in records}) == 30
    for r in records:
        data = (out / r["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert r["path"] == f"{r['class']}/{r['index']}.png"
    pngs = sorted(p.relative_to(out) for p in out.glob("*/*.png"))
    assert len(pngs) == 30
    with Image.open(out / "0" / "0.png") as img:
        assert img.size == (16, 16) and img.mode == "L"
    with Image.open(out / "preview.png") as preview:
        assert preview.size == (3 * 32 + 2 * 2, 10 * 32 + 9 * 2)  # 3 columns, one row per class, 16 px tiles ×2
    # a different seed gives different images, the same seed the same ones
    again, other_seed = tmp_path / "again", tmp_path / "other_seed"
    assert main(distill_args(again, assets, method="dit", ipc=3)) == 0
    assert tree(again) == tree(out)
    assert main(distill_args(other_seed, assets, "--seed", "1", method="dit", ipc=3)) == 0
    first_image = lambda run: (run / "0" / "0.png").read_bytes()  # noqa: E731
    assert first_image(other_seed) != first_image(out)


def test_igd_guidance_changes_images_and_records_its_parameters(tmp_path, assets):
    plain, guided = tmp_path / "dit", tmp_path / "igd"
    assert main(distill_args(plain, assets, method="dit")) == 0
    assert main(distill_args(guided, assets, "--igd-gamma", "5", "--igd-k", "10")) == 0
    params = json.loads((guided / "manifest.json").read_text())["method_params"]
    assert params["k"] == 10 and params["gamma"] == 5 and params["guided_range"] == [2, 4]
    for batch in range(2):  # every image's final latent moved (PNGs may coincide where pixels saturate)
        a, b = (load_file(str(d / ".fastdd" / "latents" / f"{batch}.safetensors"))["latents"] for d in (plain, guided))
        assert ((a - b).flatten(1).abs().amax(1) > 1e-3).all()


def test_igd_compat_mode_runs_and_differs_from_the_default(tmp_path, assets):
    clean, compat = tmp_path / "clean", tmp_path / "compat"
    assert main(distill_args(clean, assets, ipc=1)) == 0
    assert main(distill_args(compat, assets, "--compat", ipc=1)) == 0
    assert json.loads((compat / "manifest.json").read_text())["config"]["compat"] is True
    a, b = (load_file(str(d / ".fastdd" / "latents" / "0.safetensors"))["latents"] for d in (clean, compat))
    assert a.shape == b.shape == (10, 1, 16, 16) and not torch.allclose(a, b)


def test_speed_flags_run_and_the_approximations_are_recorded(tmp_path, assets, monkeypatch):
    """--compile and --cuda-graphs (eager fallback on CPU) keep the images; --precision bf16 and --fast are
    approximations: recorded in the manifest (a resume must not mix them) and close to the exact run."""
    monkeypatch.setattr(acceleration, "_said", set())  # the fallback is said once per process
    runs = {name: tmp_path / name for name in ("exact", "speed", "approx")}
    assert main(distill_args(runs["exact"], assets, ipc=1)) == 0
    with pytest.warns(RuntimeWarning, match="cuda_graphs"):
        assert main(distill_args(runs["speed"], assets, "--compile", "--cuda-graphs", ipc=1)) == 0
    assert main(distill_args(runs["approx"], assets, "--precision", "bf16", "--fast", ipc=1)) == 0
    latents = {n: load_file(str(d / ".fastdd" / "latents" / "0.safetensors"))["latents"] for n, d in runs.items()}
    torch.testing.assert_close(latents["speed"], latents["exact"], rtol=1e-4, atol=1e-4)
    assert 0 < (latents["approx"] - latents["exact"]).norm() < 0.1 * latents["exact"].norm()
    config = json.loads((runs["approx"] / "manifest.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["model_jacobian"] is False
    assert main(distill_args(runs["approx"], assets, ipc=1)) == 2  # an exact run may not resume an approximate one


def test_igd_computes_and_caches_the_surrogate_from_data(tmp_path, assets):
    out = tmp_path / "run"
    args = [
        "distill",
        "--method",
        "igd",
        "--ipc",
        "1",
        "--out",
        str(out),
        "--model",
        str(assets["abc_prior"]),
        "--data",
        str(assets["data"]),
        "--steps",
        "5",
        "--surrogate-epochs",
        "1",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    cache = list((out / ".fastdd").glob("surrogate*.safetensors"))
    assert len(cache) == 1
    bundle = SurrogateBundle.load(cache[0])
    assert bundle.config.num_classes == 3 and bundle.real_grads is None and bundle.epochs[0] == 0
    real_grads = sorted(out.glob(".fastdd/surrogate_*_real_grads/*.safetensors"))  # per class, beside the checkpoints
    assert [p.name for p in real_grads] == ["0.safetensors", "1.safetensors", "2.safetensors"]
    assert load_file(real_grads[0])["value"].shape == bundle.flat_params.shape
    assert sorted(p.parent.name for p in out.glob("*/*.png")) == ["a", "b", "c"]


def test_igd_caps_the_surrogate_at_four_checkpoints_and_says_so(tmp_path, assets, capsys, monkeypatch):
    """Small noisy data makes Algorithm 2 keep almost every epoch (a 4-class folder kept K = 17); here it keeps
    every epoch: the cap keeps the first 4 it selects (--igd-max-checkpoints), said on stderr."""
    import fastdd.guidance.igd as igd

    monkeypatch.setattr(igd, "walk_checkpoints", lambda similarity, threshold: list(range(len(similarity))))
    out = tmp_path / "run"
    args = ["distill", "--method", "igd", "--ipc", "1", "--out", str(out), "--model", str(assets["abc_prior"]),
            "--data", str(assets["data"]), "--steps", "3", "--surrogate-epochs", "8", "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    kept = json.loads((out / "manifest.json").read_text())["method_params"]["surrogate_epochs_kept"]
    assert kept == [0, 1, 2, 3], kept
    assert "Algorithm 2 kept 9 checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- several images per batch
def image_records(out: Path) -> list[dict]:
    """The manifest's per-image records without the batch number."""
    return [
        {k: v for k, v in r.items() if k != "batch"} for r in json.loads((out / "manifest.json").read_text())["images"]
    ]


def pngs(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree(out).items() if name.endswith(".png") and name != "preview.png"}


@pytest.mark.parametrize("method, extra", [("dit", []), ("mgd3", []), ("d3hr", ["--d3hr-candidates", "20"])])
def test_several_images_per_batch_make_the_same_images_as_one(tmp_path, assets, method, extra):
    """ipc 4, 3 images per batch: batches of 30 and 10 rows. mgd3 picks mode j for image j; d3hr's own sampling
    call picks latent j of its class's group for image j."""
    runs = {per_batch: tmp_path / str(per_batch) for per_batch in (1, 3)}
    for per_batch, out in runs.items():
        assert main(distill_args(out, assets, *extra, "--images-per-batch", str(per_batch), method=method, ipc=4)) == 0
    assert len(list((runs[3] / ".fastdd" / "batches").glob("*.json"))) == 2
    assert len(pngs(runs[3])) == 40 and pngs(runs[3]) == pngs(runs[1])
    assert image_records(runs[3]) == image_records(runs[1])


def test_igd_memory_refuses_several_images_per_batch(tmp_path, assets, capsys):
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        fails_cleanly(
            capsys,
            distill_args(out, assets, "--images-per-batch", "2", *extra),
            out,
            "--images-per-batch 2: igd: its deviation guidance (--igd-gamma > 0)",
        )
    fails_cleanly(
        capsys,
        distill_args(out, assets, "--images-per-batch", "0", method="dit"),
        out,
        "--images-per-batch must be > 0",
    )
    assert main(distill_args(tmp_path / "no_memory", assets, "--images-per-batch", "2", "--igd-gamma", "0")) == 0
    assert main(distill_args(out, assets, "--images-per-batch", "2", ipc=1)) == 0  # one image per class anyway
    # the resume state is kept per batch: a run resumes with the value it began with
    fails_cleanly(capsys, distill_args(out, assets, ipc=1), out, "differs in: images_per_batch")


def test_interrupted_run_with_several_images_per_batch_resumes_byte_identical(tmp_path, assets, monkeypatch):
    extra = ["--class-batch", "5", "--images-per-batch", "3"]  # 4 batches: 15, 5, 15, 5 rows
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(distill_args(whole, assets, *extra, method="dit", ipc=4)) == 0
    write_json_atomic = pipeline.write_json_atomic

    def killed_before_the_third_record(path, data):
        if path == resumed / ".fastdd" / "batches" / "2.json":  # its PNGs and latents are written by now
            raise RuntimeError("killed")
        write_json_atomic(path, data)

    monkeypatch.setattr(pipeline, "write_json_atomic", killed_before_the_third_record)
    with pytest.raises(RuntimeError, match="killed"):
        main(distill_args(resumed, assets, *extra, method="dit", ipc=4))
    monkeypatch.undo()
    assert sorted(p.name for p in (resumed / ".fastdd" / "batches").iterdir()) == ["0.json", "1.json"]
    assert main(distill_args(resumed, assets, *extra, method="dit", ipc=4)) == 0
    assert tree(resumed) == tree(whole)


# ----------------------------------------------------------------------------------------- resume
def run_cli(args: list[str], env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    # PYTHONSAFEPATH: the child imports the installed fastdd, as a user's shell does, not the checkout it runs in
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fastdd", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def kill_after(proc: subprocess.Popen, batches: Path, count: int) -> None:
    """SIGKILL proc once `count` batch records exist."""
    deadline = time.time() + 240
    while not (batches.is_dir() and len(list(batches.glob("*.json"))) >= count):
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkill_twice_then_resume_is_byte_identical_to_an_uninterrupted_run(tmp_path, assets):
    """IGD (memories carried across images) with two class chunks; killed after 2 finished batches, restarted,
    killed again after 4 (the second kill lands in a resumed run), then finished."""
    extra = ["--steps", "8", "--class-batch", "5", "--igd-range", "0,49"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run_cli(distill_args(whole, assets, *extra, ipc=4))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    batches = resumed / ".fastdd" / "batches"
    kill_after(run_cli(distill_args(resumed, assets, *extra, ipc=4)), batches, 2)
    assert 2 <= len(list(batches.glob("*.json"))) < 8
    assert json.loads((resumed / "manifest.json").read_text())["complete"] is False
    kill_after(run_cli(distill_args(resumed, assets, *extra, ipc=4)), batches, 4)
    assert 4 <= len(list(batches.glob("*.json"))) < 8

    proc = run_cli(distill_args(resumed, assets, *extra, ipc=4))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert tree(resumed) == tree(whole)
    assert len(list(resumed.glob("*/*.png"))) == 40
    assert not list(resumed.rglob("*.tmp"))


def test_sigkill_after_the_cache_and_before_the_manifest_then_other_data(tmp_path, assets):
    """A process SIGKILLs itself right after MGD3 stored its first modes (before manifest.json exists); the same command
    with other --data recomputes them instead of reusing the first data's modes (the images match a fresh run)."""
    other = copy_data(assets["data"], tmp_path / "other")
    for png in sorted(other.glob("*/*.png"))[::2]:
        Image.fromarray((torch.rand(16, 16) * 255).to(torch.uint8).numpy()).save(png)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    code = (
        "import os, signal, fastdd\n"
        f"spec = fastdd.RunSpec(method='mgd3', ipc=2, out={str(out)!r}, data={str(assets['data'])!r}, "
        f"model={str(assets['abc_prior'])!r}, steps=5, quiet=True, device='cpu')\n"
        "prepared = fastdd.prepare(spec)\n"
        "prepared.sample_batch(prepared.plan[0])\n"  # the modes of the first batch's classes are computed and stored
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list((out / ".fastdd").glob("mgd3_modes_*")) and not (out / "manifest.json").exists()
    for folder in (out, fresh):
        args = abc_args(folder, assets, other, "--method", "mgd3", "--ipc", "2", "--steps", "5")
        assert run_cli(args).wait(timeout=300) == 0
    assert pngs(out) == pngs(fresh)


# ----------------------------------------------------------------------------------------- bad input
def fails_cleanly(capsys, args: list[str], out: Path, expected: str, created: bool = False) -> None:
    before = tree(out) if out.exists() else None
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if before is None:
        assert not out.exists()
    else:
        assert tree(out) == before


def abc_args(out: Path, assets, data: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--method",
        "dit",
        "--ipc",
        "1",
        "--out",
        str(out),
        "--model",
        str(assets["abc_prior"]),
        "--data",
        str(data),
        "--steps",
        "3",
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


def copy_data(src: Path, dst: Path) -> Path:
    for p in src.rglob("*.png"):
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / p.parent.name / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_empty_and_unreadable_class_data(tmp_path, assets, capsys):
    out = tmp_path / "out"
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\n")
    data = copy_data(assets["data"], tmp_path / "data")
    for p in (data / "c").iterdir():
        p.unlink()
    fails_cleanly(capsys, abc_args(out, assets, data, "--classes", str(classes)), out, "holds no images")
    (data / "c").rmdir()
    fails_cleanly(
        capsys, abc_args(out, assets, data, "--classes", str(classes)), out, f"class folder {data / 'c'} does not exist"
    )
    data = copy_data(assets["data"], tmp_path / "data2")
    (data / "b" / "9.png").write_bytes(b"not a png")
    fails_cleanly(capsys, abc_args(out, assets, data), out, "cannot read image")  # checked before sampling
    mgd3 = [("mgd3" if a == "dit" else a) for a in abc_args(out, assets, data)]  # a method that loads the data at once
    fails_cleanly(capsys, mgd3, out, f"cannot read image {data / 'b' / '9.png'}")
    fails_cleanly(capsys, abc_args(out, assets, tmp_path / "nowhere"), out, "does not exist")


def test_bad_arguments_fail_with_one_line_and_write_nothing(tmp_path, assets, capsys):
    out = tmp_path / "out"
    fails_cleanly(capsys, distill_args(out, assets, method="dit", ipc=0), out, "--ipc must be > 0")
    fails_cleanly(capsys, distill_args(out, assets, method="dit", ipc=-3), out, "--ipc must be > 0")
    with pytest.raises(SystemExit) as exit_:  # argparse's choices, in one line
        main(distill_args(out, assets, method="nope"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice: 'nope'" in err and not out.exists()
    fails_cleanly(
        capsys, distill_args(out, assets, "--classes", "imagenet-foo", method="dit"), out, "--classes must be one of"
    )
    args = distill_args(out, assets, method="dit")
    args[args.index("--model") + 1] = str(out.parent / "missing.safetensors")
    fails_cleanly(capsys, args, out, "missing.safetensors does not exist")


def test_checkpoints_of_the_wrong_shape(tmp_path, assets, capsys):
    out = tmp_path / "out"
    # surrogate made for 3 classes, digits have 10
    fails_cleanly(
        capsys,
        distill_args(out, assets, "--surrogate", str(tiny_bundle(tmp_path / "s3.safetensors", 3))),
        out,
        "made for 3 classes",
    )
    # surrogate whose parameter vector does not fit its ConvNet
    bundle = SurrogateBundle.load(assets["bundle"])
    bundle.flat_params = bundle.flat_params[:, :-5]
    bundle.real_grads = bundle.real_grads[:, :, :-5]
    bundle.save(tmp_path / "short.safetensors")
    fails_cleanly(
        capsys, distill_args(out, assets, "--surrogate", str(tmp_path / "short.safetensors")), out, "flat_params"
    )
    # prior whose tensors do not match the config in its metadata
    big = DiT(**{**TINY_PIXEL_DIT, "hidden_size": 48}, num_classes=10)
    save_prior(big, tmp_path / "bad.safetensors", {"dataset": "digits", "classes": DIGITS_CLASSES})
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "bad.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    metadata["fastdd_dit_config"] = json.dumps(DiT(**TINY_PIXEL_DIT, num_classes=10).config())
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata)
    args = distill_args(out, assets, method="dit")
    args[args.index("--model") + 1] = str(tmp_path / "bad.safetensors")
    fails_cleanly(capsys, args, out, "bad.safetensors")
    # a prior for classes a, b, c asked for the digits
    args[args.index("--model") + 1] = str(assets["abc_prior"])
    classes = tmp_path / "digits.txt"
    classes.write_text("\n".join(DIGITS_CLASSES))
    fails_cleanly(capsys, args + ["--classes", str(classes)], out, "the prior knows no class '0'")


def test_output_folder_of_another_run_is_refused_untouched(tmp_path, assets, capsys):
    out = tmp_path / "out"
    assert main(distill_args(out, assets, method="dit", ipc=1)) == 0
    fails_cleanly(capsys, distill_args(out, assets, "--seed", "1", method="dit", ipc=1), out, "differs in: seed")
    fails_cleanly(capsys, distill_args(out, assets, ipc=1), out, "differs in: method")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    fails_cleanly(capsys, distill_args(stranger, assets, method="dit"), stranger, "holds no fastdd manifest")
    # the same command again is a no-op resume
    assert main(distill_args(out, assets, method="dit", ipc=1)) == 0


def test_dry_run_prints_plan_and_estimate_and_writes_nothing(tmp_path, assets, capsys):
    out = tmp_path / "out"
    assert main(distill_args(out, assets, "--dry-run", "--class-batch", "4")) == 0
    text = capsys.readouterr().out
    assert "20 images in 6 batches" in text and "estimate" in text and "guided steps" in text
    assert not out.exists()
    assert (
        main(
            distill_args(out, assets, "--dry-run", "--class-batch", "4", "--images-per-batch", "3", method="dit", ipc=4)
        )
        == 0
    )
    assert (
        "40 images in 6 batches of ≤12 (≤4 classes × ≤3 images)" in capsys.readouterr().out
    )  # chunks of 4, 4, 2 × images 0-2, 3
    assert not out.exists()


# ----------------------------------------------------------------------------------------- two processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_make_the_same_dataset_as_one(tmp_path, assets):
    extra = ["--class-batch", "5"]
    single, double = tmp_path / "one", tmp_path / "two"
    proc = run_cli(distill_args(single, assets, *extra))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(run_cli(distill_args(double, assets, *extra), env_extra=env))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert tree(double) == tree(single)

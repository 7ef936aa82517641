"""Load the generator a run samples from: a fastdd prior, an official DiT checkpoint or a diffusers DiT, with its codec.

`--model`: a fastdd prior (.safetensors from `fastdd prior train`, pixel space), an official DiT checkpoint (.pt /
.pth / .safetensors) or a diffusers DiT (hub id or folder); default: the bundled digits prior without --data, else
facebook/DiT-XL-2-256. `--vae`: mse | ema | none | NAME_OR_PATH for latent models.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_PRIOR_PATH = ASSETS / "digits_prior.safetensors"
DEFAULT_DIT = "facebook/DiT-XL-2-256"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")  # a --model naming a file, never a hub id


def file_digest(path: Path, limit: int = 200 * 2**20) -> str:
    """sha256 of a file up to `limit` bytes; a larger one: its size, mtime and the sha256 of its first and last MiB
    (reading 2.7 GB of DiT-XL weights at every start would cost seconds)."""
    stat = path.stat()
    if stat.st_size <= limit:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as f:
        head = f.read(2**20)
        f.seek(-(2**20), 2)
        ends = hashlib.sha256(head + f.read()).hexdigest()
    return f"size:{stat.st_size}:mtime:{stat.st_mtime_ns}:ends:{ends}"


def weights_fingerprint(path: Path) -> str:
    """What a weight source is, so a changed checkpoint is noticed: a file's sha256 (`file_digest`), or for a folder
    (diffusers model or pipeline) the sha256 of every file's path, size and mtime."""
    if path.is_file():
        return file_digest(path)
    listing = sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()
    )
    return "folder:" + hashlib.sha256(repr(listing).encode()).hexdigest()


def is_fastdd_prior(path: Path) -> bool:
    """Whether a file is a fastdd prior (a safetensors file with fastdd's DiT config in its metadata)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "fastdd_dit_config" in (f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"--model {path} is not a readable safetensors file ({err})") from None


def looks_like_hub_id(spec: str) -> bool:
    """'org/name': one '/', no leading '.', '/' or '~', no weight-file suffix, not an existing path."""
    return (
        spec.count("/") == 1
        and not spec.startswith((".", "/", "~"))
        and Path(spec).suffix not in WEIGHT_SUFFIXES
        and not Path(spec).exists()
    )


def resolve_hub_id(spec: str, option: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a Hugging Face hub repository: downloaded when online, else the cached one
    (HF_HOME, HF_HUB_OFFLINE and a revision honoured as huggingface_hub does); ValueError naming the option."""
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return Path(huggingface_hub.snapshot_download(spec, revision=revision))
    except (HfHubHTTPError, OSError, ValueError) as err:
        offline = " and offline (HF_HUB_OFFLINE=1)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"{option} {spec}: not in the Hugging Face cache{offline} ({type(err).__name__}); download it with "
            f"`hf download {spec}{f' --revision {revision}' if revision else ''}` where the hub is reachable, or pass "
            "a local folder"
        ) from None


SCHEDULER_KEYS = (
    "_class_name",
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "trained_betas",
    "steps_offset",
    "set_alpha_to_one",
    "timestep_spacing",
    "prediction_type",
)


def read_scheduler(path: Path) -> tuple[dict, dict] | None:
    """(what the manifest records of it, GaussianDiffusion's schedule keywords) of a diffusers pipeline's
    `scheduler/scheduler_config.json` (of `path`, or of the pipeline holding a `transformer` folder `path`); None
    without one. ValueError naming the file for what fastdd cannot follow (`schedule_from_diffusers`)."""
    import json

    from ..sampling.diffusion import schedule_from_diffusers

    folders = [path / "scheduler"] + ([path.parent / "scheduler"] if path.name == "transformer" else [])
    for folder in folders:
        file = folder / "scheduler_config.json"
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"--model: {file} is not readable JSON ({err})") from None
            recorded = {key: config[key] for key in SCHEDULER_KEYS if key in config}
            return recorded, schedule_from_diffusers(config, f"--model: {file}")
    return None


def load_checkpoint(
    path: Path, device: torch.device, allow_missing_keys: bool, description: dict, num_heads: int | None = None
) -> nn.Module:
    """An official / EMA / Minimax DiT checkpoint, strictly; with allow_missing_keys a checkpoint lacking keys loads
    too, and the keys are listed on stderr and in description["missing_keys"]."""
    from .dit import load_dit_checkpoint

    heads = {} if num_heads is None else {"num_heads": num_heads}
    try:
        return load_dit_checkpoint(str(path), strict=True, device=device, **heads)
    except ValueError as err:
        key_mismatch = "does not match the DiT" in str(err) and "shape mismatch" not in str(err)
        if not allow_missing_keys or not key_mismatch:
            if "num_heads" in str(err):
                raise ValueError(f"--model {path}: {str(err).replace('pass num_heads=', 'pass --num-heads')}") from None
            hint = "; pass --allow-missing-keys to load it anyway" if key_mismatch else ""
            raise ValueError(f"--model {path}: {err}{hint}") from None
        network = load_dit_checkpoint(str(path), strict=False, device=device, **heads)
        description["missing_keys"] = str(err)
        print(f"fastdd: --allow-missing-keys: {err}", file=sys.stderr)
        return network


def load_codec(vae: str, device: torch.device, precision: str):
    """(the LatentCodec of --vae, the folder it was loaded from): an alias (mse | ema), a hub id (resolved through the
    cache to a snapshot folder) or a folder."""
    from .vae import VAE_ALIASES, LatentCodec

    name = VAE_ALIASES.get(vae, vae)
    source = resolve_hub_id(name, "--vae") if looks_like_hub_id(name) else Path(name)
    try:
        codec = LatentCodec.from_pretrained(str(source), device=device, channels_last=device.type == "cuda",
                                            precision=precision)  # fmt: skip
    except ValueError as err:
        raise ValueError(f"--vae {vae}: {err}") from None
    return codec, source


def describe_weights(description: dict, key: str, path: Path, hub_id: bool) -> None:
    """Record what the weights at `path` are under description[key + "_sha256"] (`weights_fingerprint`) and, for a hub
    id, description[key + "_snapshot"]: the snapshot (commit) the cache resolved it to."""
    if path.exists():
        description[f"{key}_sha256"] = weights_fingerprint(path)
    if hub_id:
        description[f"{key}_snapshot"] = path.resolve().name


def load_generator(
    model: str | None,
    vae: str | None,
    data: str | None,
    device: torch.device,
    precision: str = "fp32",
    allow_missing_keys: bool = False,
    num_heads: int | None = None,
    numerics: str | None = None,
    revision: str | None = None,
) -> tuple[nn.Module, object, dict]:
    """(DiT in eval mode without gradients, codec, description for the manifest) for --model / --vae; `data` (the
    --data folder or None) picks the default model. A diffusers pipeline's scheduler config is read (description
    "scheduler": what is recorded; "schedule": GaussianDiffusion's keywords). An official checkpoint loads strictly unless
    allow_missing_keys (then the keys it lacks are listed on stderr and recorded). revision: of a --model hub id (a
    pipeline's own VAE comes from the same snapshot)."""
    from ..prior import load_prior
    from .vae import PixelCodec

    spec = model or (str(DIGITS_PRIOR_PATH) if data is None else DEFAULT_DIT)
    if revision is not None and not looks_like_hub_id(spec):
        raise ValueError(f"--revision {revision}: --model {spec} is not a hub id (a revision picks a hub snapshot)")
    hub_model = looks_like_hub_id(spec)
    path = resolve_hub_id(spec, "--model", revision) if hub_model else Path(spec)
    if model is None and data is None and not path.is_file():
        raise ValueError(f"the bundled digits prior {path} is missing; make it with `fastdd prior train --out {path}`")
    description = {"model": model if model else ("bundled digits prior" if data is None else spec)}
    if revision is not None:
        description["revision"] = revision
    describe_weights(description, "model", path, hub_model)
    description["model_path"] = path
    if path.is_file() and is_fastdd_prior(path):
        try:
            network, extra = load_prior(path, device)
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"--model {path}: checkpoint does not match its DiT config ({err})") from None
        description.update(prior_extra=extra)
        if extra.get("latent") == "vae":  # a latent prior: the VAE it was trained in, unless --vae names another
            vae = vae or str(path.parent / extra["vae"])
            codec, vae_path = load_codec(vae, device, precision)
            description.update(vae=vae)
            describe_weights(description, "vae", vae_path, vae_path != Path(vae))
        else:
            if vae not in (None, "none"):
                raise ValueError(f"--vae: {path} is a pixel-space prior; it takes no VAE")
            codec = PixelCodec(network.in_channels)
    else:
        from .dit import load_diffusers_dit

        if not path.exists() and (path.suffix in WEIGHT_SUFFIXES or spec.startswith((".", "/"))):
            raise ValueError(f"--model {spec} does not exist")
        try:
            if path.is_file():
                network = load_checkpoint(path, device, allow_missing_keys, description, num_heads)
            else:
                try:
                    network = load_diffusers_dit(path).to(device)
                except ValueError as err:
                    raise ValueError(f"--model {spec}: {err}") from None
                scheduler = read_scheduler(path)
                if scheduler is not None:
                    description["scheduler"], description["schedule"] = scheduler
        except (OSError, RuntimeError, KeyError, TypeError) as err:
            raise ValueError(
                f"--model {spec}: cannot load a DiT ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from None
        if vae is None:  # a pipeline's own VAE, else the SD VAE the DiT was trained with
            vae = str(path) if (path / "vae" / "config.json").is_file() else "mse"
        description.update(vae=vae)
        if vae == "none":
            codec = PixelCodec(network.in_channels)
        else:
            codec, vae_path = load_codec(vae, device, precision)
            describe_weights(description, "vae", vae_path, vae_path != Path(vae))
        extra = {}
    if numerics is not None:
        network.set_numerics(numerics)
    description["numerics"] = network.numerics
    if codec.latent_channels != network.in_channels:
        raise ValueError(f"--model {spec} takes {network.in_channels} channels, the VAE makes {codec.latent_channels}")
    return network.eval().requires_grad_(False), codec, description | {"extra": extra}

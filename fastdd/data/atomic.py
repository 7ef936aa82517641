"""Atomic file writes: write a temp file in the target's folder, fsync it, then os.replace() it onto the target.

A reader sees either the old file or the complete new one, never a half-written file; on any error the temp
file is removed and an existing target is left as it was. Temp files are named `.<name>.<random>.tmp`, so a
folder's left-overs of a killed process match the glob `.*.tmp`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(temp_path) to fill a temp file beside path (parent folders are created), then rename it to path.
    The file gets the permissions open() would give it (mkstemp alone makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write data to path atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)


def save_safetensors_atomic(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (any device, layout or autograd state; stored as detached contiguous CPU copies) and the
    string metadata to a safetensors file at path, atomically."""
    wrong = [name for name, tensor in tensors.items() if not isinstance(tensor, Tensor)]
    if wrong:
        raise ValueError(f"tensors: entries {wrong[:4]} are not tensors")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata: keys and values must be strings")
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata))


@contextmanager
def computed_once(path: str | os.PathLike, active: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock` for the block: processes that would compute the same artefact (torchrun
    ranks, a second run sharing a state folder) take turns, so the later ones find it written and only read it. The
    kernel drops the lock of a killed process. active=False (a dry run) takes no lock and writes nothing."""
    if not active:
        yield
        return
    import fcntl

    lock = Path(f"{os.fspath(path)}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

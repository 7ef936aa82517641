"""fastdd.data.atomic: temp file + rename writes leave either the old file or the complete new one, never a temp file."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastdd.data import atomic
from fastdd.data.atomic import save_safetensors_atomic, write_atomic, write_bytes_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_safetensors_atomic_round_trips_tensors_and_metadata(tmp_path):
    weight = torch.randn(3, 4, requires_grad=True)
    tensors = {"weight": weight, "transposed": torch.arange(12.0).view(3, 4).T, "count": torch.tensor([7])}
    path = tmp_path / "new" / "folder" / "state.safetensors"  # parent folders are created
    save_safetensors_atomic(tensors, path, {"config": '{"a": 1}'})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"config": '{"a": 1}'}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() would make it, not mkstemp's 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.safetensors"]
    save_safetensors_atomic({"other": torch.ones(2)}, path)  # replaces an existing file
    assert load_file(str(path)).keys() == {"other"}


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_temp_file_and_the_old_target(tmp_path, monkeypatch, existing):
    path = tmp_path / "state.safetensors"
    if existing:
        save_safetensors_atomic({"old": torch.zeros(5)}, path)
    before = path.read_bytes() if existing else None
    temp_names = []

    def half_write_then_fail(tensors, filename, metadata=None):
        temp_names.append(filename)
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic({"new": torch.ones(5)}, path)
    # the temp file was beside the target, named so that a folder's `.*.tmp` clean-up finds it
    (temp,) = temp_names
    assert os.path.dirname(temp) == str(tmp_path)
    assert os.path.basename(temp).startswith(".state.safetensors.") and temp.endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["state.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == before


def test_write_atomic_cleans_up_on_interrupt_and_write_bytes_round_trips(tmp_path):
    path = tmp_path / "data.bin"
    write_bytes_atomic(b"first", path)

    def interrupted(tmp):
        with open(tmp, "wb") as f:
            f.write(b"par")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)
    assert path.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]
    write_bytes_atomic(b"second", str(path))
    assert path.read_bytes() == b"second"


def test_save_safetensors_atomic_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="tensors"):
        save_safetensors_atomic({"a": [1.0, 2.0]}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors_atomic({"a": torch.ones(1)}, tmp_path / "x.safetensors", {"epochs": 3})
    assert not list(tmp_path.iterdir())

"""Package-level behaviour: the compiled extension, its fallback, `fastdd info`, the ConvNet surrogate."""

import os
import subprocess
import sys

import pytest
import torch

from fastdd.models.convnet import ConvNet
from fastdd.ops import reference


def test_extension_builds_in_ci():
    """CI installs with `pip install .`: there the extension must exist (a broken build would silently fall back)."""
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI, where the package is installed from scratch")
    import fastdd._C  # noqa: F401


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings; sys.modules['fastdd._C'] = None\n"
        "import torch\n"
        "from fastdd import ops\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    q, m = torch.randn(3, 5), torch.randn(4, 5)\n"
        "    for _ in range(3):\n"
        "        v, i = ops.max_cosine(q, m)\n"
        "    ops.most_similar_index(m)\n"
        "msgs = [str(w.message) for w in caught if 'fastdd._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(ops.resolve_backend('max_cosine', 'auto', q.device))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_info_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "fastdd", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from fastdd.ops import OP_BACKENDS

    for op in OP_BACKENDS:
        assert op in out.stdout
    assert "torch" in out.stdout and "fastdd._C" in out.stdout


def test_convnet6_matches_the_published_parameter_count():
    model = ConvNet(channel=3, num_classes=10, width=128, depth=6, im_size=256)
    assert sum(p.numel() for p in model.parameters()) == 763_530
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "features.0.weight" and names[-1] == "classifier.bias"


def test_convnet_layers_reproduce_forward():
    model = ConvNet(channel=1, num_classes=4, width=8, depth=2, im_size=16)
    x = torch.randn(3, 1, 16, 16)
    out = x
    for layer in model.layers():
        out = layer(out)
    torch.testing.assert_close(out, model(x))


def test_bad_backend_and_bad_inputs_name_the_argument():
    from fastdd import ops

    q, m = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="backend"):
        ops.max_cosine(q, m, backend="fortran")
    with pytest.raises(ValueError, match="query"):
        ops.max_cosine(torch.randn(2, 4, 1), m)
    with pytest.raises(ValueError, match="memory"):
        ops.max_cosine(q, torch.randn(0, 4))
    with pytest.raises(ValueError, match="query"):
        ops.max_cosine(torch.full((2, 4), float("nan")), m)
    with pytest.raises(ValueError, match="count"):
        ops.max_cosine(q, m, count=7)
    with pytest.raises(ValueError, match="features"):
        ops.max_cosine(torch.randn(2, 5), m)


def test_reference_cosine_memory_gradcheck_float64():
    q = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    m = torch.randn(5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: reference.max_cosine(q, m, 3)[0], (q,))


def test_missing_extension_advice_recognises_a_source_checkout(monkeypatch, tmp_path):
    """Run from a checkout without a built _C, the advice is `pip install -e .` or another folder (a plain
    `pip install .` does not help: the checkout shadows the installed package)."""
    from pathlib import Path

    import fastdd
    from fastdd.ops import _backend

    in_checkout = (Path(fastdd.__file__).resolve().parent.parent / "setup.py").is_file()
    assert (_backend.source_checkout() is not None) == in_checkout
    monkeypatch.delenv("FASTDD_NO_EXT", raising=False)
    monkeypatch.setattr(_backend, "source_checkout", lambda: tmp_path)
    advice = _backend._how_to_build()
    assert f"source checkout {tmp_path}" in advice and "pip install -e ." in advice
    monkeypatch.setattr(_backend, "source_checkout", lambda: None)
    assert "pip install ." in _backend._how_to_build()
    monkeypatch.setenv("FASTDD_NO_EXT", "1")
    assert "FASTDD_NO_EXT" in _backend._how_to_build()

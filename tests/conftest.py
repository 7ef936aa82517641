"""Shared pytest set-up. Fixtures: opt in per module with `pytestmark = pytest.mark.usefixtures("single_thread")`.

TRITON_INTERPRET=1 is set here, before any test module imports torch or fastdd: Triton reads it when its
own @triton.jit helpers (tl.max, tl.argmax, ...) are decorated at import, and importing fastdd.guidance pulls
Triton in through torch, so setting it later in a test module leaves those helpers uncallable in the interpreter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add contention on a shared CPU (restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

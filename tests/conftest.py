"""Shared pytest fixtures. Opt in per module with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add contention on a shared CPU (restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

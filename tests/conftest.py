"""Fixtures and settings shared by every test module.

Every test runs torch on ONE thread: the suite's models are small, CI machines have 2 cores, and
several tests start node processes that share them; extra intra-op threads only spin and turn
timing margins into flakes. Child processes (nodes, discovery children) inherit the same limit
through OMP_NUM_THREADS / MKL_NUM_THREADS, unless the caller set those explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before torch is imported, and inherited by child processes

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's tests on one torch thread, restoring the previous count afterwards.

    One thread is already the suite-wide default (see above); modules whose timing depends on it
    still opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`, so a test that
    raised the count for itself cannot leak it into them.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

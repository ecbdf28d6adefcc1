"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's tests on one torch thread, restoring the previous count afterwards.

    The simulator's batched steps are small: extra threads only spin when other work shares the
    cores. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` so the
    rest of the suite keeps torch's default.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fixtures of the generation tests (helpers live in generation_helpers.py: a
conftest module name is shared by every test directory, so it is not imported)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core machine are ~1000x slower with 2 intra-op
    # threads contending than with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from tests.parity import load_check_fixture


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small networks run faster on one thread, and far faster on a busy 2-core machine (two
    OpenMP threads spin-wait for each other there). Use with ``pytest.mark.usefixtures``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def check_fixture() -> ModuleType:
    """The shared parity checker (../shared/parity/check_fixture.py)."""
    return load_check_fixture()

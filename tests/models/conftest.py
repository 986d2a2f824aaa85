"""Helpers shared by the model tests: running a function on P gloo ranks (CPU)."""

from __future__ import annotations

import pytest

from braze.testing import run_on_ranks


@pytest.fixture
def tp_runner():
    return run_on_ranks

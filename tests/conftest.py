"""Test session set-up: Triton's interpreter on CPU-only machines, private caches, hypothesis profile, gloo ranks."""

from __future__ import annotations

import os
import tempfile

import torch

# The interpreter must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CACHE = tempfile.mkdtemp(prefix="braze-tests-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("BRAZE_CACHE_DIR", os.path.join(_CACHE, "braze"))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from ranks import RankPools  # noqa: E402

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("BRAZE_HYPOTHESIS_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("default")

HAS_CUDA = torch.cuda.is_available()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `device` runs on cpu, and on cuda (marked gpu, skipped without one)."""
    if "device" in metafunc.fixturenames:
        cuda = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])
        metafunc.parametrize("device", ["cpu", cuda])


@pytest.fixture(scope="session")
def tp_runner():
    """tp_runner(world_size, fn, *args): fn(rank, world_size, *args) on gloo ranks kept for the session
    (tests/ranks.py: each fresh spawn cost ~10-15 s of imports)."""
    pools = RankPools()
    try:
        yield pools
    finally:
        pools.close()

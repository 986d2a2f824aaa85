"""The compile-time check of which launches of a fused collective take the one-shot kernel (`one_shot_gap`):
the pass fuses an all-reduce + norm on CUDA only where every launch it can see does, because braze's NCCL +
kernel path is slower than stock Inductor's (benchmarks/results/allreduce_norm_tp2.md, _tp4.md)."""

from __future__ import annotations

import pytest
import torch

from braze.runtime import symm_mem
from braze.runtime.collective import one_shot_gap
from braze.testing import single_rank_group

CUDA = torch.device("cuda", 0)
HALF = (symm_mem.LAZY_BYTES // 2) & ~15


@pytest.fixture
def group_name(monkeypatch):
    monkeypatch.setattr(symm_mem, "available", lambda: None)  # as on a GPU host with symmetric memory
    with single_rank_group() as group:
        yield group.group_name


def test_without_symmetric_memory_every_cuda_launch_would_take_nccl():
    why = one_shot_gap(CUDA, 1, 16, "any", 256)
    assert why is not None and why.startswith("no symmetric memory here (")


def test_cpu_launches_have_no_gap(group_name):
    assert one_shot_gap(torch.device("cpu"), None, 1 << 30, group_name, 256) is None


def test_bounded_token_counts_within_the_workspace_take_the_one_shot_kernel(group_name):
    assert one_shot_gap(CUDA, 256, 7168 * 2, group_name, 256) is None
    assert one_shot_gap(CUDA, 1, HALF, group_name, 256) is None  # exactly a half (one rank)


@pytest.mark.parametrize("max_rows, row_bytes, expected", [
    (None, 14336, "the token count has no upper bound"),
    (257, 14336, "up to 257 tokens, above symm_max_tokens=256"),
    (2, HALF, f"2 tokens x {HALF} bytes x 1 ranks = {2 * HALF} bytes exceed the workspace half of {HALF} bytes"),
])
def test_launches_that_could_take_nccl_are_named(group_name, max_rows, row_bytes, expected):
    assert one_shot_gap(CUDA, max_rows, row_bytes, group_name, 256) == expected


def test_an_unknown_group_is_a_gap_not_an_error(monkeypatch):
    monkeypatch.setattr(symm_mem, "available", lambda: None)
    why = one_shot_gap(CUDA, 1, 16, "no-such-group", 256)
    assert why is not None and why.startswith("the size of group 'no-such-group' is unknown here")

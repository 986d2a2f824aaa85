"""The all-reduce recognizer on ATen graphs: functional collectives + wait, the group read from the graph."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from braze.patterns.collective import AllReduceMatch, all_reduce_reference, is_wait, match_all_reduce
from braze.patterns.fx import Miss
from braze.testing import aten_graph, single_rank_group


@pytest.fixture(scope="module")
def world():
    with single_rank_group() as group:
        yield group


def waits(gm) -> list:
    return [n for n in gm.graph.nodes if is_wait(n)]


def test_functional_all_reduce_is_recognized_with_the_group_it_names(world):
    sub = dist.new_group([0])  # a second group: its name, not the default group's, is in the graph
    x = torch.randn(3, 8)
    gm = aten_graph(lambda x: funcol.all_reduce(x * 2, "sum", sub) + 1, x)
    [wait] = waits(gm)
    m = match_all_reduce(wait)
    assert isinstance(m, AllReduceMatch), m
    assert m.group_name == sub.group_name != world.group_name
    assert m.op == "sum" and m.input.target is torch.ops.aten.mul.Tensor
    torch.testing.assert_close(all_reduce_reference(x, m.group_name), x)  # one rank: the sum is x


def test_a_max_reduce_is_a_near_miss_that_says_what_braze_fuses(world):
    gm = aten_graph(lambda x: funcol.all_reduce(x, "max", world), torch.randn(2, 4))
    [wait] = waits(gm)
    m = match_all_reduce(wait)
    assert isinstance(m, Miss) and m.candidate
    assert m.reason == "the all_reduce reduces with 'max'; braze fuses sum"


def test_an_integer_sum_and_other_waits_are_not_candidates(world):
    gm = aten_graph(lambda x: funcol.all_reduce(x, "sum", world), torch.arange(6).view(2, 3))
    [wait] = waits(gm)
    m = match_all_reduce(wait)
    assert isinstance(m, Miss) and not m.candidate and "float sums" in m.reason
    gm = aten_graph(lambda x: funcol.broadcast(x, 0, world) + 1, torch.randn(2, 3))
    for w in waits(gm):
        m = match_all_reduce(w)
        assert isinstance(m, Miss) and not m.candidate and "not an all_reduce" in m.reason

"""Canonicalization removes spelling differences without changing a single value."""

from __future__ import annotations

import torch

from braze.passes.canonicalize import Canonicalize
from braze.patterns.fx import aten, is_op
from braze.testing import aten_graph, run_passes


def run_canon(fn, *args):
    gm = aten_graph(fn, *args)
    ref = fn(*args)
    record = run_passes(gm, passes=(Canonicalize,))
    out = gm(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(a, b) and a.stride() == b.stride()
    return gm, record.stats.get("canonicalize", {})


def test_noop_views_permutes_and_casts_disappear():
    def fn(x):
        y = x.view(x.shape).permute(0, 1).reshape(x.shape).float().float()
        return (y * 2).to(torch.bfloat16)

    gm, stats = run_canon(fn, torch.randn(3, 5, dtype=torch.bfloat16))
    assert not any(is_op(n, aten.view, aten.permute) for n in gm.graph.nodes)
    assert sum(stats.values()) >= 2


def test_lossless_cast_chain_becomes_one_cast():
    def fn(x):
        return x.float().half() * 3

    gm, stats = run_canon(fn, torch.randn(4, dtype=torch.bfloat16))
    assert stats.get("cast-chains", 0) == 1


def test_split_becomes_slices():
    def fn(x):
        a, b, c = torch.split(x, [2, 3, 1], dim=-1)
        return a * 2, b + 1, c

    gm, stats = run_canon(fn, torch.randn(4, 6))
    assert stats.get("split-to-slices") == 1
    assert not any(is_op(n, aten.split, aten.split_with_sizes) for n in gm.graph.nodes)
    assert sum(is_op(n, aten.slice) for n in gm.graph.nodes) == 3


def test_view_chain_collapses():
    def fn(x):
        return x.view(2, 6).view(3, 4).view(12) + 1

    gm, stats = run_canon(fn, torch.randn(4, 3))
    assert stats.get("view-chains", 0) >= 1


def test_a_byte_view_is_not_a_shape_view():
    # DeepSeek's MLA cache packs scales as bytes: view(t, 4).view(uint8) must keep both views
    def fn(s):
        return torch.cat([s.view(s.shape[0], 4).view(torch.uint8), torch.zeros(s.shape[0], 2, dtype=torch.uint8)], -1)

    gm, _ = run_canon(fn, torch.randn(3, 2, 2))
    assert gm(torch.ones(3, 2, 2)).shape == (3, 18)

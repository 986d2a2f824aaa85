"""The TP-reduced norm pass (MiniMax-M2.5's QK-norm) on ATen graphs: packed or separate variance all-reduces
at any widths, number of norms and TP size become one op with one packed all-reduce, equal to eager; near
misses say why. One gloo rank here (the all-reduce returns its input; the graph's `/ P` still applies);
tests/passes/test_collective_tp.py runs two."""

from __future__ import annotations

import pytest
import torch
import torch.distributed._functional_collectives as funcol
from hypothesis import given
from hypothesis import strategies as st

from braze.patterns.collective import is_wait
from braze.patterns.stages import Cast, RMSNorm, UnaryOp, WeightMul
from braze.patterns.tp_norm import TPNorm, TPNormGroup, tp_norm_reference
from braze.testing import aten_graph, fused_ops, run_passes, single_rank_group
from braze import FusionConfig

# the collective family is off by default (slower than stock on 2 H100s so far); these tests turn it on
ON = FusionConfig(collective=True)


@pytest.fixture(scope="module")
def world():
    with single_rank_group() as group:
        yield group


def tp_norms(group, n: int, packed: bool, p: int, scale: str, weight: str, eps: float):
    """n norms of slices x_i [T, D_i] whose variances are summed over `group` and scaled to a mean over p ranks."""
    def rescale(v):
        return v / p if scale == "div" else v * (1.0 / p)

    def fn(*xw):
        xs, ws = xw[:n], xw[n:]
        dtype = xs[0].dtype
        f = [x.float() for x in xs]
        means = [x.pow(2).mean(-1, keepdim=True) for x in f]
        if packed:
            var = rescale(funcol.all_reduce(torch.cat(means, dim=-1), "sum", group))  # [T, n]
            var = [var[:, i:i + 1] for i in range(n)]
        else:
            var = [rescale(funcol.all_reduce(m, "sum", group)) for m in means]
        outs = []
        for x, v, w in zip(f, var, ws):
            y = x * torch.rsqrt(v + eps)
            outs.append(w * y.to(dtype) if weight == "after-cast" else (y * w.float()).to(dtype))
        return tuple(outs)

    return fn


@given(n=st.sampled_from([1, 2, 3]), packed=st.booleans(), widths=st.lists(st.sampled_from([1, 3, 41, 64, 257]),
       min_size=3, max_size=3), p=st.sampled_from([1, 2, 4]), scale=st.sampled_from(["div", "mul"]),
       weight=st.sampled_from(["after-cast", "fp32"]), dtype=st.sampled_from([torch.bfloat16, torch.float16,
       torch.float32]), eps=st.sampled_from([1e-6, 1e-5]), rows=st.sampled_from([1, 5]), seed=st.integers(0, 999))
def test_packed_or_separate_variance_all_reduces_fuse_into_one_op_and_match_eager(world, n, packed, widths, p, scale,
                                                                                  weight, dtype, eps, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(rows, widths[i], generator=gen).to(dtype) for i in range(n)]
    ws = [(1 + 0.3 * torch.randn(widths[i], generator=gen)).to(dtype) for i in range(n)]
    fn = tp_norms(world, n, packed, p, scale, weight, eps)
    gm = aten_graph(fn, *xs, *ws)
    record = run_passes(gm, ON)
    [rm] = [rm for rm in record.remarks if rm.pass_name == "tp-norm"]
    assert (rm.kind, rm.name) == ("applied", "tp-norm"), str(rm)
    args = dict(rm.args)
    assert args["widths"] == widths[:n] and args["group"] == world.group_name
    assert args["all_reduces_replaced"] == (1 if packed else n)
    assert fused_ops(gm) == ["braze.tp_rmsnorm.default"]
    assert not any(is_wait(n_) or "rsqrt" in str(n_.target) for n_ in gm.graph.nodes)
    assert not [r for r in record.remarks if r.pass_name == "allreduce-norm"]  # not reported twice
    for got, ref in zip(gm(*xs, *ws), fn(*xs, *ws)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-5)


def test_the_reference_sums_local_means_over_ranks():
    """Two ranks' halves of one row, reduced by the reference, equal the full-width norm."""
    f32 = "float32"
    norm = RMSNorm(1e-6, 4, f32, f32, f32, f32, (Cast("float32"), WeightMul(f32, f32)), True)
    group = TPNormGroup((TPNorm(norm, (UnaryOp("div", f32, 2.0),)),))
    x, w = torch.randn(3, 8), torch.randn(8)
    halves = [[x[:, :4], w[:4]], [x[:, 4:], w[4:]]]
    from braze.patterns.tp_norm import local_means_reference

    total = sum(local_means_reference(group, [h[0]]) for h in halves)
    outs = [tp_norm_reference(group, h, lambda m: total)[0] for h in halves]
    full = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(torch.cat(outs, -1), full)


def test_a_variance_with_another_reader_is_missed_and_kept(world):
    def fn(q, k, wq, wk):
        var = funcol.all_reduce(torch.cat([q.pow(2).mean(-1, keepdim=True), k.pow(2).mean(-1, keepdim=True)], -1),
                                "sum", world) / 2
        return wq * (q * torch.rsqrt(var[:, 0:1] + 1e-6)), wk * (k * torch.rsqrt(var[:, 1:2] + 1e-6)), var

    q, k, wq, wk = torch.randn(2, 8), torch.randn(2, 4), torch.randn(8), torch.randn(4)
    gm = aten_graph(fn, q, k, wq, wk)
    record = run_passes(gm, ON)
    [rm] = record.remarks
    assert (rm.pass_name, rm.kind, rm.name) == ("tp-norm", "missed", "tp-norm-not-fusable")
    assert rm.reason == "the reduced variances are read by `output` (output), not one column slice per norm"
    assert sum(is_wait(n) for n in gm.graph.nodes) == 1
    assert all(torch.equal(a, b) for a, b in zip(gm(q, k, wq, wk), fn(q, k, wq, wk)))


def test_a_packed_all_reduce_of_something_else_and_a_bf16_variance_are_missed(world):
    def packs_a_sum(q, w):
        var = funcol.all_reduce(torch.cat([q.pow(2).mean(-1, keepdim=True), q.sum(-1, keepdim=True)], -1),
                                "sum", world)
        return w * (q * torch.rsqrt(var[:, 0:1] + 1e-6)), var[:, 1:2]

    def bf16_variance(q, w):
        var = funcol.all_reduce(q.pow(2).mean(-1, keepdim=True), "sum", world)
        return w * (q * torch.rsqrt(var + 1e-6))

    for fn, dtype, reason in (
            (packs_a_sum, torch.float32, "the packed all-reduce also carries `sum_1` (sum.dim_IntList), which is "
                                         "not a mean of squares"),
            (bf16_variance, torch.bfloat16, "the variance `mean` (mean.dim) is torch.bfloat16; braze reduces fp32 "
                                            "variances")):
        gm = aten_graph(fn, torch.randn(2, 8, dtype=dtype), torch.randn(8, dtype=dtype))
        record = run_passes(gm, ON)
        [rm] = [r for r in record.remarks if r.pass_name == "tp-norm"]
        assert (rm.kind, rm.name, rm.reason) == ("missed", "tp-norm-not-fusable", reason)
        assert not fused_ops(gm)


def test_dependent_norms_of_two_layers_are_not_packed_together(world):
    def fn(x, w1, w2):
        v1 = funcol.all_reduce(x.pow(2).mean(-1, keepdim=True), "sum", world) / 2
        y = w1 * (x * torch.rsqrt(v1 + 1e-6))
        v2 = funcol.all_reduce(y.pow(2).mean(-1, keepdim=True), "sum", world) / 2
        return w2 * (y * torch.rsqrt(v2 + 1e-6))

    x, w1, w2 = torch.randn(3, 16), torch.randn(16), torch.randn(16)
    gm = aten_graph(fn, x, w1, w2)
    record = run_passes(gm, ON)
    assert [(r.name, dict(r.args)["all_reduces_replaced"]) for r in record.remarks] == [("tp-norm", 1)] * 2
    assert fused_ops(gm) == ["braze.tp_rmsnorm.default"] * 2
    torch.testing.assert_close(gm(x, w1, w2), fn(x, w1, w2), rtol=1e-5, atol=1e-6)

"""The small-topk pass on FX graphs: top-k over short last-dim rows becomes braze's sort kernel at any sizes and
equals eager; the variants that must stay ATen's say why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.config import FusionConfig
from braze.patterns.topk import MAX_ROW
from braze.testing import aten_graph, fused_ops, run_passes


def remarks(record, kind):
    return [r for r in record.remarks if r.kind == kind and r.pass_name == "small-topk"]


def fuse(fn, args, config=None):
    gm = aten_graph(fn, *args)
    return gm, run_passes(gm, config)


def router(logits, bias, *, groups, top_groups, k):
    """DeepSeek V3's grouped top-k router: top-2 per group, the best groups, top-k experts within them."""
    t = logits.shape[0]
    s = logits.sigmoid()
    choice = s + bias
    group_scores = choice.view(t, groups, -1).topk(2, dim=-1).values.sum(-1)  # [T, G]
    group_idx = group_scores.topk(top_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
    choice = choice.masked_fill(~mask.repeat_interleave(logits.shape[1] // groups, dim=1), float("-inf"))
    idx = choice.topk(k, dim=-1, sorted=False).indices
    w = s.gather(1, idx)
    return idx, w / w.sum(-1, keepdim=True)


@settings(max_examples=10)
@given(lead=st.sampled_from([(1,), (3,), (2, 5)]), n=st.sampled_from([1, 3, 8, 9, 41, 64, 257]), kf=st.floats(0, 1),
       largest=st.booleans(), sort=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       dim_last=st.sampled_from([-1, "last"]), uses=st.sampled_from(["values", "indices", "both"]),
       seed=st.integers(0, 999))
def test_topk_is_taken_at_any_sizes_and_equals_eager(lead, n, kf, largest, sort, dtype, dim_last, uses, seed):
    k = max(1, round(kf * n))
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    dim = -1 if dim_last == -1 else len(lead)

    def fn(x):
        v, i = torch.topk(x * 2, k, dim=dim, largest=largest, sorted=sort)
        return {"values": (v,), "indices": (i,), "both": (v + 1, i)}[uses]

    gm, record = fuse(fn, [x])
    (r,) = remarks(record, "applied")
    assert (r.name, r.ops) == ("small-topk", ("topk",))
    assert dict(r.args) == {"n": n, "k": k, "largest": largest, "dtype": str(dtype).split(".")[1]}
    assert r.message == f"top-{k} of rows of {n} sorted in one kernel"
    assert fused_ops(gm) == ["braze.topk_cpu.default"]
    assert not any("aten.topk" in str(nd.target) for nd in gm.graph.nodes)
    got, want = gm(x), fn(x)
    # which of equal values comes first is free (bfloat16 rows have many ties), and so is the unsorted order:
    # the values must be eager's (in its order when sorted), the indices must point at them
    gv = torch.topk(x * 2, k, dim=dim, largest=largest).values
    for g, w in zip(got, want):
        if g.dtype == torch.int64:
            picked = (x * 2).gather(-1, g)
            assert torch.equal(picked, gv) if sort else torch.equal(picked.sort(-1).values, gv.sort(-1).values)
        else:
            assert torch.equal(g, w) if sort else torch.equal(g.sort(-1).values, w.sort(-1).values)


def test_the_router_selects_what_eager_does():
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(3, 64, generator=g), torch.randn(64, generator=g) * 0.1
    fn = lambda lg, b: router(lg, b, groups=8, top_groups=4, k=6)  # noqa: E731
    gm, record = fuse(fn, [logits, bias])
    assert [dict(r.args)["n"] for r in remarks(record, "applied")] == [8, 8, 64]
    (gi, gw), (wi, ww) = gm(logits, bias), fn(logits, bias)
    order_g, order_w = gi.sort(-1), wi.sort(-1)
    assert torch.equal(order_g.values, order_w.values)  # the same experts (sorted=False: any order)
    # the same weights; their normalizing sum adds them in the selected order, so to an ulp
    torch.testing.assert_close(gw.gather(1, order_g.indices), ww.gather(1, order_w.indices), rtol=1e-6, atol=0)


def test_what_must_stay_aten_says_why():
    cases = [
        (lambda x: torch.topk(x, 2, dim=0), torch.randn(8, 5), "it selects along dim 0 of a 2-d tensor, not the last"),
        (lambda x: torch.topk(x, 3), torch.randn(2, MAX_ROW + 1),
         f"rows of {MAX_ROW + 1} values: above {MAX_ROW} ATen's top-k is faster than one program's sort"),
        (lambda x: torch.topk(x, 3), torch.randint(0, 9, (2, 16)),
         "the values are torch.int64; braze takes float32, bfloat16 and float16 rows"),
        (lambda x: torch.topk(x, 3), torch.randn(65, 2048),
         "65 rows of 2048 values: above 64 rows of more than 1024 ATen's radix select is as fast"),
    ]
    for fn, x, reason in cases:
        gm, record = fuse(fn, [x])
        (r,) = remarks(record, "missed")
        assert (r.name, r.reason) == ("topk-not-taken", reason)
        assert not fused_ops(gm)
        for got, want in zip(gm(x), fn(x)):
            assert torch.equal(got, want)


def test_token_range_and_switch_are_honoured():
    x = torch.randn(4, 32)
    fn = lambda x: torch.topk(x, 4)  # noqa: E731
    gm, record = fuse(fn, [x], FusionConfig(token_ranges={"topk": (1, 2)}))
    (r,) = remarks(record, "missed")
    assert (r.name, r.reason) == ("token-range", "4 tokens is outside the configured range [1, 2]")
    assert not fused_ops(gm)
    gm, record = fuse(fn, [x], FusionConfig(topk=False))
    assert not remarks(record, "applied") and not fused_ops(gm)


def test_a_dynamic_row_length_is_left_with_a_reason():
    import torch._dynamo

    import braze

    torch._dynamo.reset()
    be = braze.backend()
    fn = torch.compile(lambda x: torch.topk(x, 2).indices, backend=be, dynamic=True, fullgraph=True)
    x = torch.randn(3, 17)
    assert torch.equal(fn(x), torch.topk(x, 2).indices)
    (r,) = [r for r in braze.report(be).missed if r.pass_name == "small-topk"]
    assert r.name == "topk-not-taken"
    assert r.reason.startswith("the row length s") and r.reason.endswith("is dynamic")
    assert r.suggestion == "mark the selected dim static"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_inductor_launches_the_kernel_in_its_graph():
    """The kernel as Inductor launches it (a user Triton kernel in its wrapper), not only as the op runs it."""
    import torch._dynamo

    import braze

    def fn(lg, b, scores):
        idx, w = router(lg, b, groups=8, top_groups=4, k=6)
        near = torch.topk(scores.masked_fill(scores < -1, float("-inf")), 100, largest=False)
        return idx, w, near.values, near.indices

    torch._dynamo.reset()
    be = braze.backend()
    g = torch.Generator(device="cuda").manual_seed(0)
    args = (torch.randn(5, 256, device="cuda", generator=g), torch.randn(256, device="cuda", generator=g) * 0.1,
            torch.randn(5, 576, device="cuda", generator=g))
    got, want = torch.compile(fn, backend=be, fullgraph=True)(*args), fn(*args)
    assert [dict(r.args)["n"] for r in braze.report(be).applied if r.pass_name == "small-topk"] == [32, 8, 256, 576]
    assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values)
    torch.testing.assert_close(got[1].sort(-1).values, want[1].sort(-1).values, rtol=1e-6, atol=0)
    assert torch.equal(got[2], want[2])  # sorted values, distinct random scores: the same result
    assert torch.equal(got[3], want[3])


def test_a_dynamic_token_count_with_static_rows_is_taken():
    import torch._dynamo

    import braze

    torch._dynamo.reset()
    be = braze.backend()
    # x * 2 rounds the same compiled and eager (a compiled sigmoid may differ from ATen's by an ulp)
    fn = torch.compile(lambda x: torch.topk(x * 2, 4), backend=be, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for t in (3, 5, 9):
        x = torch.randn(t, 40, generator=g)
        torch._dynamo.mark_dynamic(x, 0)
        v, i = fn(x)
        want = torch.topk(x * 2, 4)
        assert torch.equal(v, want.values) and torch.equal(i, want.indices)
    (r,) = [r for r in braze.report(be).applied if r.pass_name == "small-topk"]
    assert dict(r.args) == {"n": 40, "k": 4, "largest": True, "dtype": "float32"}

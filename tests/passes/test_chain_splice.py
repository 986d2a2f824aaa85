"""Norm-only chains and launches spliced in dependency order (braze/passes/chain_groups.py).

DeepSeek V3.2's q_c RMSNorm reads a slice of a projection (so Inductor gives it a kernel of its own) and is read
only by two GEMMs (q_b and the indexer's wq_b) whose products later chains rotate. The GEMMs move up, and
the chains behind them share one launch with the k chain that writes the cache: a writing launch that also
returns the indexer q's fp8 values and scales. The norm could lead a first launch with the k chain instead,
but that is the same number of kernels, and a tie leaves it to Inductor. Where nothing rotates the GEMMs'
products, the norm joins the k chain's launch and saves its kernel. A norm that cannot save a kernel
(Llama's input norm, read by the q/k/v GEMMs whose chains it would have to share a launch with) stays
with Inductor, and the grouping is what it was without it. (On CUDA at decode, braze's decode GEMM kernel
computes such a norm itself: tests/passes/test_norm_fold.py.)
"""

from __future__ import annotations

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from braze import FusionConfig
from braze.models.common import apply_rope
from braze.models.fp8 import quant_fp8_group
from braze.testing import aten_graph, fused_ops, run_passes


def rms(x, w, eps=1e-6):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def two_launch_prologue(x, wa, wn, wq, wi, cos_t, sin_t, pos, k_cache, slots, *, heads=2, extra_reader=False,
                        rotate=True):
    """x [T, 96] -> a [T, 64] part normed and read by two GEMMs (each rotated later), and a [T, 32] k part
    rotated and cached: the shape of DeepSeek's q_c / k_pe."""
    t = x.shape[0]
    h = x @ wa  # [T, 96]
    q_c, k = h.split([64, 32], dim=-1)
    q_c = rms(q_c, wn)  # read by the two GEMMs below only (unless extra_reader)
    k = apply_rope(k.reshape(t, 1, 32), cos_t[pos], sin_t[pos], style="gptj")
    k_cache.view(-1, 1, 32)[slots] = k
    if not rotate:  # the GEMMs' products read by plain ops only
        return (q_c @ wq) * 2, (q_c @ wi).float().sum(), k_cache.view(-1, 32)[slots].float().sum()
    q = apply_rope((q_c @ wq).view(t, heads, 32), cos_t[pos], sin_t[pos], style="gptj")  # [T, H, 32]
    iq = apply_rope((q_c @ wi).view(t, heads, 32), cos_t[pos], sin_t[pos], style="neox")
    iq8, scale = quant_fp8_group(iq, 32, ue8m0=True)  # quant outputs of a launch that also writes a cache
    out = (q, iq8.float() * scale.repeat_interleave(32, -1), k_cache.view(-1, 32)[slots].float().sum())
    return out + (q_c.float().sum(),) if extra_reader else out


def case(t, seed, heads=2, extra_reader=False, dt=torch.bfloat16, rotate=True):
    gen = torch.Generator().manual_seed(seed)
    args = (torch.randn(t, 96, generator=gen).to(dt), (torch.randn(96, 96, generator=gen) / 10).to(dt),
            (1 + 0.3 * torch.randn(64, generator=gen)).to(dt), (torch.randn(64, heads * 32, generator=gen) / 8).to(dt),
            (torch.randn(64, heads * 32, generator=gen) / 8).to(dt), torch.randn(16, 16, generator=gen),
            torch.randn(16, 16, generator=gen), torch.randint(0, 16, (t,), generator=gen),
            torch.full((6, 2, 32), float("nan"), dtype=dt), torch.randperm(12, generator=gen)[:t])

    def fn(*a):
        return two_launch_prologue(*a, heads=heads, extra_reader=extra_reader, rotate=rotate)

    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    gm.graph.lint()
    got_cache, want_cache = args[8].clone(), args[8].clone()
    got = gm(*args[:8], got_cache, args[9])
    want = fn(*args[:8], want_cache, args[9])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0.07, atol=1e-3)  # fp8 steps
    assert torch.equal(got_cache.isnan(), want_cache.isnan())
    torch.testing.assert_close(got_cache[~want_cache.isnan()], want_cache[~want_cache.isnan()], rtol=2 ** -7, atol=1e-5)
    return record, gm


def launches(record) -> dict[tuple[str, ...], int]:
    return {r.ops: dict(r.args)["launch"] for r in record.remarks if r.kind == "applied" and r.pass_name == "head-chain"}


@settings(max_examples=6, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # ~2 s an example
@given(t=st.sampled_from([1, 3]), heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999))
def test_gemms_move_up_and_the_chains_behind_them_share_the_writing_launch(t, heads, seed):
    record, gm = case(t, seed, heads)
    got = launches(record)
    assert sorted(got) == [("rope",), ("rope", "fp8_quant"), ("rope", "store")], [str(r) for r in record.remarks]
    assert record.stats["head-chain"]["launches"] == 1 and len(fused_ops(gm)) == 1
    # a tie: the norm could lead a launch with the k chain (two launches) or stay with Inductor (one launch + its
    # kernel); it stays
    assert [n for n in gm.graph.nodes if n.target is torch.ops.aten.rsqrt.default]
    # the launch reads both GEMMs' products: it is defined after them
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (launch,) = [n for n in gm.graph.nodes if "auto_functionalized" in str(n.target)]
    mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert len(mms) == 3 and sum(order[m] < order[launch] for m in mms) == 3


def test_norm_read_by_gemms_joins_the_first_launch_where_that_saves_its_kernel():
    record, gm = case(3, 0, rotate=False)
    assert launches(record) == {("rmsnorm",): 0, ("rope", "store"): 0}
    assert record.stats["head-chain"]["launches"] == 1
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.aten.mean.dim, torch.ops.aten.rsqrt.default)]
    # both GEMMs read the launch's output, and are defined after it
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (launch,) = [n for n in gm.graph.nodes if "auto_functionalized" in str(n.target)]
    mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert len(mms) == 3 and sum(order[m] > order[launch] for m in mms) == 2


def test_norm_read_by_anything_but_gemms_stays_with_inductor():
    record, gm = case(3, 0, extra_reader=True)
    assert ("rmsnorm",) not in launches(record)
    assert [n for n in gm.graph.nodes if n.target is torch.ops.aten.rsqrt.default]


def test_norm_whose_only_siblings_read_it_through_gemms_stays_with_inductor():
    # Llama's shape: the input norm feeds q/k projections whose chains are its only candidates
    def fn(x, w, wq, wk, cos, sin, k_cache, slots):
        t = x.shape[0]
        h = rms(x, w)
        q = apply_rope((h @ wq).view(t, 2, 32), cos, sin)
        k = apply_rope((h @ wk).view(t, 1, 32), cos, sin)
        k_cache.view(-1, 1, 32)[slots] = k
        return q * 1, k_cache.sum()

    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(3, 64, generator=gen), 1 + torch.randn(64, generator=gen) / 4, torch.randn(64, 64, generator=gen),
            torch.randn(64, 32, generator=gen), torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen),
            torch.zeros(8, 32), torch.tensor([4, 0, 7]))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert sorted(launches(record)) == [("rope",), ("rope", "store")]
    assert record.stats["head-chain"]["launches"] == 1
    c1, c2 = args[6].clone(), args[6].clone()
    for a, b in zip(gm(*args[:6], c1, args[7]), fn(*args[:6], c2, args[7])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

"""Routed-experts fusion on FX graphs: braze's and Hugging Face's grouped-GEMM spellings fuse at any sizes while
the pairs do not outnumber the experts, equal eager, and the variants that must not fuse say why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.config import FusionConfig
from braze.testing import aten_graph, fused_ops, run_passes

OPS = ("sort", "gather", "grouped_mm", "silu_mul", "grouped_mm", "unsort", "weighted_sum")


def braze_spelling(x, w13, w2, idx, weights, *, act=F.silu, cast=True, escape=False):
    """braze.models.moe.Experts._forward_sparse, with its weights as [E, 2I, H] and [E, H, I]."""
    t, k = idx.shape
    pair = idx.flatten()
    order = pair.argsort(stable=True)
    counts = (pair[:, None] == torch.arange(w13.shape[0])).sum(0)
    offs = counts.cumsum(0).to(torch.int32)
    gu = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    ys = torch._grouped_mm(act(gate) * up, w2.transpose(1, 2), offs=offs)
    y = (ys[order.argsort()].view(t, k, -1).float() * weights.unsqueeze(-1)).sum(1)
    y = y.to(x.dtype) if cast else y
    return (y, gu) if escape else y


def hf_spelling(x, w13, w2, idx, weights):
    """transformers.integrations.moe.grouped_mm_experts_forward (sorted ids, histc, weights before un-sorting)."""
    t, k = idx.shape
    ids_sorted, perm = torch.sort(idx.reshape(-1))
    xs = x[perm // k]
    w_sorted = weights.reshape(-1)[perm]
    counts = torch.histc(ids_sorted.float(), bins=w13.shape[0], min=0, max=w13.shape[0] - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate, up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs) * w_sorted.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0))
    return out[inv].view(t, k, -1).sum(dim=1).to(x.dtype)


def make_inputs(t, k, e, hid, inter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hid, generator=g).to(torch.bfloat16)
    w13 = (torch.randn(e, 2 * inter, hid, generator=g) * hid ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, hid, inter, generator=g) * inter ** -0.5).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    return [x, w13, w2, idx, weights]


def fuse(fn, args, config=None):
    gm = aten_graph(fn, *args)
    record = run_passes(gm, config)
    return gm, record


def remarks(record, kind):
    return [r for r in record.remarks if r.kind == kind and r.pass_name == "moe-experts"]


@settings(max_examples=6)
@given(t=st.sampled_from([1, 2, 3]), k=st.sampled_from([1, 2, 4]), extra=st.integers(0, 5),
       hid=st.sampled_from([8, 24, 64]), inter=st.sampled_from([8, 16, 40]), spelling=st.sampled_from(["braze", "hf"]),
       cast=st.booleans(), seed=st.integers(0, 99))
def test_experts_fuse_at_any_sizes_and_equal_eager(t, k, extra, hid, inter, spelling, cast, seed):
    e = t * k + extra
    fn = hf_spelling if spelling == "hf" else (lambda *a: braze_spelling(*a, cast=cast))
    args = make_inputs(t, k, e, hid, inter, seed)
    gm, record = fuse(fn, args)
    (r,) = remarks(record, "applied")
    assert (r.name, r.ops) == ("moe-experts", OPS)
    assert dict(r.args) == {"tokens": t, "top_k": k, "experts": e, "hidden": hid, "inter": inter}
    assert fused_ops(gm) == ["braze.moe_experts_cpu.default"]
    assert not any("_grouped_mm" in str(n.target) or "sort" in str(n.target) for n in gm.graph.nodes)
    want, got = fn(*args), gm(*args)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got == want).float().mean() > 0.95  # rounded where eager rounds: nearly all bit-equal


def test_more_pairs_than_experts_stay_grouped_gemms():
    args = make_inputs(3, 4, 8, 16, 8)
    gm, record = fuse(hf_spelling, args)
    (r,) = remarks(record, "missed")
    assert r.name == "pairs-exceed-experts"
    assert r.reason.startswith("3 tokens x top-4 = 12 (token, expert) pairs for 8 experts")
    assert not fused_ops(gm)
    torch.testing.assert_close(gm(*args), hf_spelling(*args), rtol=0, atol=0)


def test_token_range_is_honoured():
    args = make_inputs(2, 2, 8, 16, 8)
    gm, record = fuse(braze_spelling, args, FusionConfig(token_ranges={"moe": (1, 1)}))
    (r,) = remarks(record, "missed")
    assert (r.name, r.reason) == ("token-range", "2 tokens is outside the configured range [1, 1]")
    assert not fused_ops(gm)


def test_an_intermediate_with_another_reader_is_not_fused():
    args = make_inputs(1, 2, 8, 16, 8)
    fn = lambda *a: braze_spelling(*a, escape=True)  # noqa: E731
    gm, record = fuse(fn, args)
    (r,) = remarks(record, "missed")
    assert r.name == "experts-not-recognized"
    assert "is also read by" in r.reason and "_grouped_mm" in r.reason
    assert not fused_ops(gm)
    for got, want in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_another_activation_is_not_fused():
    args = make_inputs(1, 2, 8, 16, 8)
    fn = lambda *a: braze_spelling(*a, act=F.gelu)  # noqa: E731
    gm, record = fuse(fn, args)
    (r,) = remarks(record, "missed")
    assert r.name == "experts-not-recognized"
    assert "is not silu(gate) · up over the two halves of the first grouped GEMM" in r.reason
    assert not fused_ops(gm)


def test_offsets_of_other_ids_are_not_fused():
    def wrong_offsets(x, w13, w2, idx, weights):
        t, k = idx.shape
        pair = idx.flatten()
        order = pair.argsort(stable=True)
        offs = (pair[:, None] == torch.arange(w13.shape[0])).sum(0).flip(0).cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
        return (ys[order.argsort()].view(t, k, -1).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)

    args = make_inputs(1, 2, 8, 16, 8)
    gm, record = fuse(wrong_offsets, args)
    (r,) = remarks(record, "missed")
    assert "not a count of the expert ids over 8 experts" in r.reason
    assert not fused_ops(gm)


def test_a_dynamic_token_count_is_left_with_a_reason():
    import torch._dynamo

    import braze

    torch._dynamo.reset()
    be = braze.backend()
    fn = torch.compile(hf_spelling, backend=be, dynamic=True, fullgraph=True)
    args = make_inputs(2, 2, 8, 16, 8)
    torch.testing.assert_close(fn(*args), hf_spelling(*args), rtol=2e-2, atol=2e-2)  # Inductor's own rounding
    (r,) = [r for r in braze.report(be).missed if r.pass_name == "moe-experts"]
    assert r.name == "experts-not-recognized"
    assert r.reason.startswith("the experts' sizes are dynamic (pairs s")
    assert r.suggestion == "compile with static shapes (dynamic=False) for decode steps"


def with_shared(x, w13, w2, idx, weights, ws13, ws2, *gate_w, inter_s=None, reader=None, escape=False):
    """braze.models.moe.MoE's experts + shared expert: y + down(silu(gate(x))·up(x)) [· sigmoid(x·w_g)]. `reader`:
    the shared expert reads this instead of x; `escape`: its up·silu product is also returned."""
    y = braze_spelling(x, w13, w2, idx, weights)
    xs = x if reader is None else reader
    gate, up = F.linear(xs, ws13).chunk(2, dim=-1)
    h = F.silu(gate) * up
    shared = F.linear(h, ws2)
    if gate_w:
        shared = shared * torch.sigmoid(F.linear(x, gate_w[0]))
    out = y + shared
    return (out, h) if escape else out


def shared_inputs(t, k, e, hid, inter, gated, seed=0, inter_s=None):
    args = make_inputs(t, k, e, hid, inter, seed)
    g = torch.Generator().manual_seed(seed + 7)
    i_s = inter_s or inter
    ws13 = (torch.randn(2 * i_s, hid, generator=g) * hid ** -0.5).to(torch.bfloat16)
    ws2 = (torch.randn(hid, i_s, generator=g) * i_s ** -0.5).to(torch.bfloat16)
    return args + [ws13, ws2] + ([(torch.randn(1, hid, generator=g) * hid ** -0.5).to(torch.bfloat16)] if gated else [])


def close_bf16(got, want):
    """bf16 outputs a few ulps apart: the fused kernels sum each token's pairs in another order than the grouped
    GEMMs and the weighted sum do."""
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@settings(max_examples=6, deadline=None)
@given(t=st.sampled_from([1, 2, 3]), k=st.sampled_from([1, 2]), extra=st.integers(0, 3),
       hid=st.sampled_from([8, 24, 64]), inter=st.sampled_from([8, 40]), gated=st.booleans(), seed=st.integers(0, 99))
def test_shared_expert_joins_the_fused_experts_and_equals_eager(t, k, extra, hid, inter, gated, seed):
    """Qwen 3.5's shared expert (sigmoid-gated) and DeepSeek V3.2's (plain), same widths as the routed experts:
    one more pair per token in the two kernels, its GEMMs, SwiGLU, gate and add gone from the graph."""
    args = shared_inputs(t, k, t * k + extra, hid, inter, gated, seed)
    gm, record = fuse(with_shared, args)
    (r,) = remarks(record, "applied")
    assert dict(r.args)["shared"] == ("sigmoid" if gated else "plain")
    assert r.ops[-4:] == ("shared_gate_up", "shared_silu_mul", "shared_down", "shared_add")
    assert fused_ops(gm) == ["braze.moe_experts_shared_cpu.default"]
    mms = [n for n in gm.graph.nodes if n.op == "call_function" and "aten.mm" in str(n.target)]
    assert len(mms) == (1 if gated else 0), "only the gate's logit GEMM stays"
    close_bf16(gm(*args), with_shared(*args))


def test_shared_expert_of_another_width_input_or_with_an_escape_stays_apart():
    args = shared_inputs(2, 2, 5, 24, 8, True, inter_s=16)
    gm, record = fuse(with_shared, args)
    (m,) = [r for r in remarks(record, "missed") if r.name == "shared-expert-apart"]
    assert "run experts of one shape" in m.reason
    assert fused_ops(gm) == ["braze.moe_experts_cpu.default"]  # the routed experts still fuse
    close_bf16(gm(*args), with_shared(*args))

    args = shared_inputs(2, 2, 5, 24, 8, False)
    other = torch.randn(2, 24).to(torch.bfloat16)
    gm, record = fuse(lambda *a: with_shared(*a[:-1], reader=a[-1]), args + [other])
    (m,) = [r for r in remarks(record, "missed") if r.name == "shared-expert-apart"]
    assert "the shared expert reads" in m.reason

    gm, record = fuse(lambda *a: with_shared(*a, escape=True), args)
    (m,) = [r for r in remarks(record, "missed") if r.name == "shared-expert-apart"]
    assert "is also read by" in m.reason
    for got, want in zip(gm(*args), with_shared(*args, escape=True)):
        close_bf16(got, want)


def test_a_shared_expert_above_the_size_limit_or_switched_off_stays_apart():
    """FusionConfig.moe_shared_max_mb: a large shared expert stays cuBLAS GEMMs (DeepSeek V3.2's 88 MB lost 4% of
    the step folded, on an H200); moe_shared=False keeps every shared expert apart without a remark."""
    import braze

    args = shared_inputs(2, 2, 5, 24, 8, True)  # 3 x 24 x 8 bf16 weights: 0.001152 MB
    gm, record = fuse(with_shared, args, braze.FusionConfig(moe_shared_max_mb=0.001))
    (m,) = [r for r in remarks(record, "missed") if r.name == "shared-expert-apart"]
    assert "its weights are 0.00115 MB, above FusionConfig.moe_shared_max_mb = 0.001" in m.reason
    assert fused_ops(gm) == ["braze.moe_experts_cpu.default"]  # the routed experts still fuse
    close_bf16(gm(*args), with_shared(*args))
    gm, record = fuse(with_shared, args, braze.FusionConfig(moe_shared_max_mb=0.002))
    assert fused_ops(gm) == ["braze.moe_experts_shared_cpu.default"]
    gm, record = fuse(with_shared, args, braze.FusionConfig(moe_shared=False))
    assert fused_ops(gm) == ["braze.moe_experts_cpu.default"] and not remarks(record, "missed")


def test_shared_expert_kernel_equals_reference_into_a_poisoned_output():
    from braze.patterns.moe import Experts, experts_reference
    from braze.runtime.moe import _run

    x, w13, w2, idx, weights, ws13, ws2, wg = shared_inputs(3, 2, 7, 24, 40, True, seed=4)
    w13t, w2t, ws13t, ws2t = w13.transpose(1, 2), w2.transpose(1, 2), ws13.t(), ws2.t()
    g = F.linear(x, wg)
    for mode in ("plain", "sigmoid"):
        spec = Experts(tokens=3, top_k=2, experts=7, hidden=24, inter=40, shared=mode)
        out = torch.full((3, 24), float("nan"), dtype=torch.bfloat16)
        got = _run(x, w13t, w2t, idx, weights, spec.to_json(), out=out, ws13=ws13t, ws2=ws2t, gate=g)
        want = experts_reference(spec, x, w13t, w2t, idx, weights, ws13t, ws2t, g)
        assert got is out and not torch.isnan(got).any()
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_expert_kernels_on_cuda_equal_reference():
    """Qwen 3.5's bench widths (H 4096, I 1024, 16 experts, top-10) and DeepSeek V3.2's (H 7168, I 2048, top-8)."""
    from braze.patterns.moe import Experts, experts_reference
    from braze.runtime.moe import _run

    for t, k, e, hid, inter, mode in ((1, 10, 16, 4096, 1024, "sigmoid"), (1, 8, 32, 7168, 2048, "plain"),
                                      (3, 2, 8, 512, 256, "sigmoid")):
        x, w13, w2, idx, weights, ws13, ws2, wg = (a.cuda() for a in shared_inputs(t, k, e, hid, inter, True, seed=t))
        w13t, w2t, ws13t, ws2t = w13.transpose(1, 2), w2.transpose(1, 2), ws13.t(), ws2.t()
        g = F.linear(x, wg)
        spec = Experts(tokens=t, top_k=k, experts=e, hidden=hid, inter=inter, shared=mode)
        out = torch.full((t, hid), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = _run(x, w13t, w2t, idx, weights, spec.to_json(), out=out, ws13=ws13t, ws2=ws2t, gate=g)
        want = experts_reference(spec, x, w13t, w2t, idx, weights, ws13t, ws2t, g)
        assert not torch.isnan(got).any(), (t, k, e, mode)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

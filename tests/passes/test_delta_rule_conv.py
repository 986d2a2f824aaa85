"""The post-conv path inside the gated delta-rule kernel (FusionConfig.delta_rule_conv): a linear-attention layer from
the conv input to the gated RMSNorm [+ FP8 quant] of its output becomes one op at any heads, dims and conv width,
equals eager with poisoned conv and recurrent state rows over several steps (the arrival counters come back to zero),
and every near miss keeps the post-conv kernel apart with a remark that says why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_post_conv import POST_CONV, make_inputs

import braze
from braze.models.fp8 import quant_fp8_group
from braze.models.gated_deltanet import (
    RMSNormGated,
    causal_conv1d_update,
    gated_delta_rule_step,
    gdn_gating,
    l2norm,
)
from braze.testing import aten_graph, run_passes

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DELTA_RULE = ("repeat_interleave", "decay", "delta_rule", "state_store", "readout")
GATED = ("rmsnorm", "silu_gate")


def layer(hk: int, hv: int, dk: int, dv: int, dtype, *, identity: bool = False, quant: int | None = None,
          extra=None, seed: int = 0, device: str = "cpu"):
    """Braze's Qwen 3.5 linear-attention layer from the conv input to the out projection's input. `identity`: the
    state rows are arange(T) (no slot indices read); `extra(q, k, v, o)`: another output that reads those values."""
    norm = RMSNormGated(dv, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dv, generator=torch.Generator().manual_seed(seed + 5)))

    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm, z):
        t = x.shape[0]
        rows = torch.arange(t) if identity else idx
        y = causal_conv1d_update(x, conv_state, w, rows)
        q, k, v = y.split([hk * dk, hk * dk, hv * dv], dim=-1)
        q, k = l2norm(q.view(t, hk, dk)), l2norm(k.view(t, hk, dk))
        g, beta = gdn_gating(a, b, a_log, dt_bias)
        o = gated_delta_rule_step(q, k, v.view(t, hv, dv), g, beta, ssm, rows)
        out = norm(o.to(dtype), z.view(t, hv, dv)).reshape(t, hv * dv)
        if quant:
            out = quant_fp8_group(out, quant)
        return (out, extra(q, k, v, o)) if extra else out

    return step


def inputs(t, hk, hv, dk, dv, width, dtype, seed=0, identity=False):
    args = make_inputs(t, hk, hv, dk, dv, width, dtype, seed=seed)
    if identity:  # rows 0..T-1 are the tokens'; poison the rest
        g = torch.Generator().manual_seed(seed + 2)
        args[1][:t] = torch.randn(t, *args[1].shape[1:], generator=g).to(dtype)
        args[1][t:] = float("nan")
        args[8][:t] = torch.randn(t, hv, dk, dv, generator=g) * 0.1
        args[8][t:] = float("nan")
    z = torch.randn(t, hv * dv + 3, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)[:, 3:]
    return args + [z]  # z: a strided slice, as inside the input projection


def applied_ops(record) -> list[tuple[str, ...]]:
    return [r.ops for r in record.remarks if r.kind == "applied"]


def fused_targets(gm) -> list[str]:
    return [str(n.args[0]) if n.args else str(n.target) for n in gm.graph.nodes
            if "auto_functionalized" in str(n.target)]


def run_steps(fn, args, config=None, steps: int = 2, tol: float = 1e-5):
    """Compile `fn`'s graph with braze's passes, then run it and eager `steps` times with the states carried:
    outputs, conv and recurrent states (poisoned rows included) equal eager after every step."""
    with torch.no_grad():
        gm = aten_graph(fn, *args)
        record = run_passes(gm, config)
        want_args, got_args = [a.clone() for a in args], [a.clone() for a in args]
        for step in range(steps):
            want, got = fn(*want_args), gm(*got_args)
            for w, g in zip(want if isinstance(want, tuple) else [want], got if isinstance(got, tuple) else [got]):
                torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, equal_nan=True,
                                           msg=lambda m, step=step: f"step {step}: {m}")
            for i, what in ((1, "conv state"), (8, "recurrent state")):
                torch.testing.assert_close(got_args[i], want_args[i], rtol=tol, atol=tol, equal_nan=True,
                                           msg=lambda m, what=what, step=step: f"{what} after step {step}: {m}")
            x = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(step + 50)).to(args[0].dtype)
            want_args[0], got_args[0] = x, x.clone()  # the next token's conv input
    return gm, record


@settings(max_examples=8)
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2, 4]),
       dk=st.sampled_from([4, 9, 16]), dv=st.sampled_from([3, 8, 17]), width=st.sampled_from([2, 4, 5]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), identity=st.booleans(),
       seed=st.integers(0, 100))
def test_post_conv_update_and_gated_norm_fuse_into_one_op_at_any_shape_and_equal_eager(t, hk, ratio, dk, dv, width,
                                                                                      dtype, identity, seed):
    hv = hk * ratio
    fn = layer(hk, hv, dk, dv, dtype, identity=identity, seed=seed)
    gm, record = run_steps(fn, inputs(t, hk, hv, dk, dv, width, dtype, seed, identity), tol=TOL[dtype])
    expand = DELTA_RULE if ratio > 1 else DELTA_RULE[1:]
    assert applied_ops(record) == [POST_CONV + expand + GATED], record.remarks
    assert fused_targets(gm) == ["braze.conv_delta_rule_gated_cpu.default"], fused_targets(gm)
    # the arrival counters: a zero-filled graph value on the CPU, none at one value head per key head
    counters = [n for n in gm.graph.nodes if n.target is torch.ops.aten.full.default and n.args[1] == 0]
    assert len(counters) == (ratio > 1), counters


def test_fp8_quant_of_the_next_linear_joins_the_one_op():
    hk, hv, dk, dv = 2, 4, 16, 128
    fn = layer(hk, hv, dk, dv, torch.bfloat16, quant=128)
    gm, record = run_steps(fn, inputs(2, hk, hv, dk, dv, 4, torch.bfloat16), tol=TOL[torch.bfloat16])
    assert applied_ops(record) == [POST_CONV + DELTA_RULE + GATED + ("fp8_quant",)], record.remarks
    assert fused_targets(gm) == ["braze.conv_delta_rule_gated_cpu.default"]


def remarks(record, name: str) -> list:
    return [r for r in record.remarks if r.name == name]


@pytest.mark.parametrize("reads", ["v", "q", "g"])
def test_a_post_conv_output_read_elsewhere_keeps_the_post_conv_kernel_apart(reads):
    hk, hv, dk, dv = 1, 2, 8, 4

    def extra(q, k, v, o):
        return {"v": v, "q": q, "g": o.sum(-1)}[reads] * 2  # "g": no post-conv output read elsewhere

    fn = layer(hk, hv, dk, dv, torch.float32, extra=extra)
    gm, record = run_steps(fn, inputs(3, hk, hv, dk, dv, 4, torch.float32))
    if reads == "g":  # o is read elsewhere: the norm stays apart, and so does the post-conv path (no remark of its own)
        assert [r.name for r in record.remarks if r.kind != "analysis"] == ["post-conv", "gated-norm-apart",
                                                                            "delta-rule", "gated-norm"]
        return
    (apart,) = remarks(record, "post-conv-apart")
    assert "is also read elsewhere" in apart.reason, apart.reason
    assert applied_ops(record) == [POST_CONV, DELTA_RULE + GATED], record.remarks
    assert fused_targets(gm) == ["braze.post_conv_cpu.default", "braze.delta_rule_gated_cpu.default"]


def test_switch_and_token_range_keep_two_kernels_and_say_why():
    hk, hv, dk, dv = 1, 2, 8, 4
    fn = layer(hk, hv, dk, dv, torch.float32)
    args = inputs(3, hk, hv, dk, dv, 4, torch.float32)
    _, record = run_steps(fn, args, braze.FusionConfig(delta_rule_conv=False), steps=1)
    assert applied_ops(record) == [POST_CONV, DELTA_RULE + GATED] and not remarks(record, "post-conv-apart")
    ranges = {"delta_rule_conv": braze.TokenRange(1, 2)}
    _, record = run_steps(fn, args, braze.FusionConfig(token_ranges=ranges), steps=1)
    assert applied_ops(record) == [POST_CONV, DELTA_RULE + GATED], record.remarks
    (miss,) = remarks(record, "token-range")
    assert miss.pass_name == "delta-rule" and "3 tokens is outside" in miss.reason, miss
    # the default range ends at 8 tokens (measured: no gain beyond)
    args = inputs(9, hk, hv, dk, dv, 4, torch.float32)
    _, record = run_steps(fn, args, steps=1)
    assert applied_ops(record) == [POST_CONV, DELTA_RULE + GATED], record.remarks
    assert "outside the configured range [1, 8]" in remarks(record, "token-range")[0].reason


def test_without_a_gated_norm_the_post_conv_stays_its_own_kernel_silently():
    """The fold rides on the gated kernel (one program per value head): a bare update keeps two kernels."""
    hk, hv, dk, dv = 1, 2, 8, 4

    inner = layer(hk, hv, dk, dv, torch.float32, extra=lambda q, k, v, o: o)

    def fn(*args):
        return inner(*args)[1]

    _, record = run_steps(fn, inputs(3, hk, hv, dk, dv, 4, torch.float32))
    assert applied_ops(record) == [POST_CONV, DELTA_RULE], record.remarks
    assert not remarks(record, "post-conv-apart")


def test_q_and_k_normed_over_other_heads_than_the_update_reads_are_a_near_miss():
    """The L2 norm over pairs of key heads (a [T, Hk/2, 2dk] view) is not the update's per-head q: apart, with why."""
    hk, hv, dk, dv = 2, 4, 8, 4

    norm = RMSNormGated(dv, eps=1e-6)

    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm, z):
        t = x.shape[0]
        y = causal_conv1d_update(x, conv_state, w, idx)
        q, k, v = y.split([hk * dk, hk * dk, hv * dv], dim=-1)
        q = l2norm(q.view(t, 1, hk * dk)).view(t, hk, dk)
        k = l2norm(k.view(t, hk, dk))
        g, beta = gdn_gating(a, b, a_log, dt_bias)
        o = gated_delta_rule_step(q, k, v.view(t, hv, dv), g, beta, ssm, idx)
        return norm(o, z.view(t, hv, dv))

    _, record = run_steps(step, inputs(3, hk, hv, dk, dv, 4, torch.float32))
    (apart,) = remarks(record, "post-conv-apart")
    assert "the q segment (1 x 16) is not 2 heads of 8" in apart.reason, apart.reason


# Through Inductor (CPU): tests/passes/test_post_conv_models.py compiles Qwen 3.5 tiny, whose six linear-attention
# layers take this fold, over three steps with the states carried.


def test_swapped_q_and_k_segments_fuse_by_what_the_update_reads():
    """The segments' roles come from the graph: k first in the conv output, then q."""
    hk, hv, dk, dv = 2, 4, 8, 4
    norm = RMSNormGated(dv, eps=1e-6)

    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm, z):
        t = x.shape[0]
        y = causal_conv1d_update(x, conv_state, w, idx)
        k, q, v = y.split([hk * dk, hk * dk, hv * dv], dim=-1)
        q, k = l2norm(q.view(t, hk, dk)), l2norm(k.view(t, hk, dk))
        g, beta = gdn_gating(a, b, a_log, dt_bias)
        o = gated_delta_rule_step(q, k, v.view(t, hv, dv), g, beta, ssm, idx)
        return norm(o, z.view(t, hv, dv))

    gm, record = run_steps(step, inputs(3, hk, hv, dk, dv, 4, torch.float32))
    assert applied_ops(record) == [POST_CONV + DELTA_RULE + GATED], record.remarks
    (op,) = [n for n in gm.graph.nodes if "auto_functionalized" in str(n.target)]
    assert op.kwargs["roles"] == "1,0,2", op.kwargs["roles"]


def _direct_op(hk: int, hv: int, d: int, slots: list[int], n_slots: int, counters: torch.Tensor | None):
    """braze::conv_delta_rule_gated called directly (fp32, conv width 4), with the given conv/state rows: outputs,
    conv state, state."""
    from braze.patterns.conv import ConvUpdate
    from braze.patterns.delta_rule import DeltaRule
    from braze.patterns.gated_norm import Gate
    from braze.patterns.gdn import Gating, L2Norm, PostConv, Segment
    from braze.patterns.stages import RMSNorm, RowChain, WeightMul

    f32 = "float32"
    c = 2 * hk * d + hv * d
    conv = ConvUpdate(c, 4, 3, f32, f32, "silu", f32, indexed=True)
    post = PostConv(conv, (Segment(0, hk, d, L2Norm(1e-6, f32)), Segment(hk * d, hk, d, L2Norm(1e-6, f32)),
                           Segment(2 * hk * d, hv, d, None)), Gating(hv, 20.0, f32, f32))
    chain = RowChain(f32, None, RMSNorm(1e-6, d, f32, f32, f32, f32, (WeightMul(f32, f32),), store=True), None,
                     Gate(f32, f32, f32))
    spec = DeltaRule(hk, hv, d, d, d ** -0.5)
    g = torch.Generator().manual_seed(3)
    t = len(slots)
    idx = torch.tensor(slots)
    conv_inputs = [torch.randn(t, c, generator=g), torch.randn(c, 4, generator=g) * 0.5, idx,
                   torch.randn(t, hv, generator=g), torch.randn(t, hv, generator=g), torch.randn(hv, generator=g),
                   torch.randn(hv, generator=g)]
    conv_state = torch.randn(n_slots, c, 3, generator=g)
    state = torch.randn(n_slots, hv, d, d, generator=g) * 0.1
    norm_inputs = [torch.randn(d, generator=g), torch.randn(t, hv, d, generator=g)]
    outs = torch.ops.braze.conv_delta_rule_gated(conv_inputs, conv_state, idx, state, norm_inputs, counters,
                                                 post.to_json(), "0,1,2", spec.to_json(), chain.to_json())
    return outs, conv_state, state


def test_the_counters_come_back_to_where_they_started_and_count_modulo_the_ratio():
    """A persistent counter buffer (what a GPU graph holds) over several calls: zero stays zero, and a counter off by
    a multiple of Hv/Hk (as two tokens naming one conv row could leave it, interleaved) still picks the last reader
    and comes back to its value. Rows out of range touch no counter."""
    import braze.runtime.delta_rule  # noqa: F401  (registers the op)

    hk, hv, d, n_slots = 2, 6, 8, 5
    zero = torch.zeros(n_slots, hk, dtype=torch.int32)
    want = _direct_op(hk, hv, d, [3, 0, 4], n_slots, zero)
    assert not zero.any(), zero
    for _ in range(2):
        assert torch.equal(_direct_op(hk, hv, d, [3, 0, 4], n_slots, zero)[1], want[1])
    assert not zero.any(), zero
    offset = torch.full((n_slots, hk), 2 * (hv // hk), dtype=torch.int32)
    got = _direct_op(hk, hv, d, [3, 0, 4], n_slots, offset)
    for a, b in zip([*got[0], *got[1:]], [*want[0], *want[1:]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (offset == 2 * (hv // hk)).all(), offset
    _direct_op(hk, hv, d, [7, 1], n_slots, zero)  # row 7 of 5: masked, as the state writes are
    assert not zero.any(), zero



@pytest.mark.slow
def test_a_dynamic_conv_state_row_count_keeps_the_post_conv_apart_and_says_why():
    """The counters are a buffer of fixed size: with a symbolic number of state rows (compiled with Inductor, CPU) the
    post-conv and the update still fuse, as two kernels, with a remark that says why, and equal eager."""
    torch._dynamo.reset()
    hk, hv, dk, dv = 1, 2, 8, 4
    fn = layer(hk, hv, dk, dv, torch.float32)
    args = inputs(3, hk, hv, dk, dv, 4, torch.float32)
    want = [a.clone() for a in args]
    for i in (1, 8):
        torch._dynamo.mark_dynamic(args[i], 0)
    be = braze.backend()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, backend=be, fullgraph=True)(*args), fn(*want), rtol=1e-5,
                                   atol=1e-5)
    for i in (1, 8):
        torch.testing.assert_close(args[i], want[i], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch._dynamo.reset()
    report = braze.report(be)
    assert [r.ops for r in report.applied] == [POST_CONV, DELTA_RULE + GATED], report.applied
    (apart,) = [r for r in report.missed if r.name == "post-conv-apart"]
    assert "row count" in apart.reason and "is dynamic" in apart.reason, apart.reason

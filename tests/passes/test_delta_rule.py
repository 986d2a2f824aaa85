"""Delta-rule fusion on FX graphs: the update fuses at any heads and dims (alone or after the post-conv
op), equals eager with poisoned state rows, and near misses say why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_post_conv import gdn_step, make_inputs

import braze
from braze.models.gated_deltanet import gated_delta_rule_step
from braze.testing import aten_graph, fused_ops, run_passes

OPS = ("repeat_interleave", "decay", "delta_rule", "state_store", "readout")


def rule_inputs(t, hk, hv, dk, dv, seed=0, slots=None):
    g = torch.Generator().manual_seed(seed)
    slots = slots or t + 2
    idx = torch.randperm(slots, generator=g)[:t]
    ssm = torch.randn(slots, hv, dk, dv, generator=g) * 0.3
    ssm[[s for s in range(slots) if s not in idx.tolist()]] = float("nan")  # must stay NaN
    q, k = (torch.nn.functional.normalize(torch.randn(t, hk, dk, generator=g), dim=-1) for _ in range(2))
    ab = torch.randn(t, 2 * hv, generator=g)
    return [q, k, torch.randn(t, hv, dv, generator=g), -torch.nn.functional.softplus(ab[:, :hv]),
            torch.sigmoid(ab[:, hv:]), ssm, idx]  # gated_delta_rule_step's order


def compare(fn, args, config=None, tol=1e-5, state=5):
    gm = aten_graph(fn, *args)
    record = run_passes(gm, config)
    want_args, got_args = [a.clone() for a in args], [a.clone() for a in args]
    want, got = fn(*want_args), gm(*got_args)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(got_args[state], want_args[state], rtol=tol, atol=tol, equal_nan=True)
    return gm, record


def remarks(record, kind):
    return [(r.name, r.reason) for r in record.remarks if r.kind == kind and r.pass_name == "delta-rule"]


@settings(max_examples=8)
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2, 3]),
       dk=st.sampled_from([3, 9, 16]), dv=st.sampled_from([3, 8, 17]), extra=st.integers(0, 3), seed=st.integers(0, 99))
def test_update_alone_fuses_at_any_heads_and_dims_and_equals_eager(t, hk, ratio, dk, dv, extra, seed):
    hv = hk * ratio
    gm, record = compare(gated_delta_rule_step, rule_inputs(t, hk, hv, dk, dv, seed, t + extra))
    (r,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "delta-rule"]
    assert r.ops == (OPS if ratio > 1 else OPS[1:])
    assert dict(r.args) == {"heads_k": hk, "heads_v": hv, "dk": dk, "dv": dv, "scale": pytest.approx(dk ** -0.5)}
    assert "braze.delta_rule_cpu.default" in fused_ops(gm)
    assert not any(r.name == "store-layout" for r in record.remarks)  # the head-chain pass no longer meets the write


@settings(max_examples=4)
@given(hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 99))
def test_update_after_the_post_conv_op_reads_its_outputs(hk, ratio, dtype, seed):
    hv = hk * ratio
    gm, record = compare(gdn_step(hk, hv, 8, 4), make_inputs(2, hk, hv, 8, 4, 4, dtype, seed),
                         tol=1e-5 if dtype == torch.float32 else 3e-2, state=8)
    assert [r.pass_name for r in record.remarks if r.kind == "applied"] == ["post-conv", "delta-rule"]
    assert fused_ops(gm) == ["braze.post_conv_cpu.default", "braze.delta_rule_cpu.default"]


def test_scale_and_operand_order_are_wildcards():
    def step(q, k, v, g, beta, ssm, idx):  # no q scale; products and sums written the other way round
        r = v.shape[1] // q.shape[1]
        qe, ke = q.repeat_interleave(r, 1), k.repeat_interleave(r, 1)
        s = g.exp()[:, :, None, None] * ssm[idx]
        u = (ke.unsqueeze(-1) * s).sum(2)
        delta = (v - u) * beta.unsqueeze(-1)
        s = delta.unsqueeze(-2) * ke.unsqueeze(-1) + s
        ssm.index_copy_(0, idx, s)
        return (qe.unsqueeze(-1) * s).sum(-2)

    gm, record = compare(step, rule_inputs(2, 1, 3, 4, 5))
    (r,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "delta-rule"]
    assert dict(r.args)["scale"] == 1.0


def test_state_in_bf16_is_a_near_miss():
    args = rule_inputs(2, 1, 2, 4, 4)

    def bf16_step(q, k, v, g, beta, ssm, idx):
        s = ssm[idx].float() * g.exp()[:, :, None, None]
        ke, qe = k.repeat_interleave(2, 1), q.repeat_interleave(2, 1) * 0.5
        u = (s * ke.unsqueeze(-1)).sum(-2)
        s = s + ke.unsqueeze(-1) * (beta.unsqueeze(-1) * (v - u)).unsqueeze(-2)
        ssm.index_copy_(0, idx, s.to(ssm.dtype))
        return (s * qe.unsqueeze(-1)).sum(-2)

    args[5] = args[5].bfloat16()
    gm, record = compare(bf16_step, args, tol=1e-2)
    assert remarks(record, "missed") == [("state-dtype", "the recurrent state is torch.bfloat16; braze's kernel "
                                          "updates fp32 state rows")]
    assert "delta_rule" not in str(fused_ops(gm))


def test_state_as_dv_by_dk_rows_is_a_near_miss():
    def step(q, k, v, g, beta, ssm, idx):  # vLLM's [slots, Hv, dv, dk]
        s = ssm[idx] * g.exp()[:, :, None, None]
        u = (s * k.unsqueeze(-2)).sum(-1)
        s = s + (beta.unsqueeze(-1) * (v - u)).unsqueeze(-1) * k.unsqueeze(-2)
        ssm.index_copy_(0, idx, s)
        return (s * q.unsqueeze(-2)).sum(-1)

    args = rule_inputs(2, 2, 2, 4, 4)
    gm, record = compare(step, args)
    ((name, reason),) = remarks(record, "missed")
    assert name == "state-layout" and "holds [.., dv, dk] rows" in reason


def test_a_value_read_elsewhere_is_a_near_miss():
    def step(q, k, v, g, beta, ssm, idx):
        s = ssm[idx] * g.exp()[:, :, None, None]
        u = (s * k.unsqueeze(-1)).sum(-2)
        s = s + k.unsqueeze(-1) * (beta.unsqueeze(-1) * (v - u)).unsqueeze(-2)
        ssm.index_copy_(0, idx, s)
        return (s * q.unsqueeze(-1)).sum(-2) + u  # u escapes

    gm, record = compare(step, rule_inputs(2, 2, 2, 4, 4))
    ((name, reason),) = remarks(record, "missed")
    assert name == "delta-rule-value-escapes" and "is also read elsewhere" in reason
    assert "delta_rule" not in str(fused_ops(gm))


def test_token_range_and_switch():
    args = rule_inputs(3, 1, 2, 4, 4)
    gm, record = compare(gated_delta_rule_step, args, braze.FusionConfig(token_ranges={"delta_rule": (1, 2)}))
    assert [n for n, _ in remarks(record, "missed")] == ["token-range"]
    gm, record = compare(gated_delta_rule_step, args, braze.FusionConfig(delta_rule=False))
    assert not remarks(record, "applied") and "delta_rule" not in str(fused_ops(gm))


@settings(max_examples=4)
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_hugging_face_recurrent_step_fuses_without_slot_indices(t, hk, ratio, seed):
    """HF's torch_recurrent_gated_delta_rule: row t of the state is token t's, the new state is returned (its
    cache takes it by assignment): the op writes fresh rows and reads the state only."""
    hf = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    hv = hk * ratio

    def step(q, k, v, g, beta, ssm):
        out, state = hf.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=ssm,
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        return out, state

    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(t, 1, hk, 8, generator=gen), torch.randn(t, 1, hk, 8, generator=gen)
    args = [q, k, torch.randn(t, 1, hv, 5, generator=gen), -torch.rand(t, 1, hv, generator=gen),
            torch.rand(t, 1, hv, generator=gen), torch.randn(t, hv, 8, 5, generator=gen) * 0.3]
    gm = aten_graph(step, *args)
    record = run_passes(gm)
    (r,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "delta-rule"]
    assert r.message.endswith("(new state rows)") and "braze.delta_rule_rows_cpu.default" in fused_ops(gm)
    ssm = args[5].clone()
    want, got = step(*args), gm(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(args[5], ssm), "the state is only read"


ARANGES = {  # state_indices built in the graph as arange(T), spelled three ways
    "arange": lambda t: torch.arange(t),
    "arange-start": lambda t: torch.arange(0, t),
    "arange-step": lambda t: torch.arange(0, t, 1, dtype=torch.long),
}


def arange_inputs(t, hk, hv, dk, dv, width, dtype, seed, slots):
    """make_inputs without the index: rows 0..t-1 are the tokens', the rows after them are NaN."""
    args = make_inputs(t, hk, hv, dk, dv, width, dtype, seed, slots)
    g = torch.Generator().manual_seed(seed + 1)
    conv_state, ssm = args[1], args[8]
    conv_state.copy_(torch.randn(conv_state.shape, generator=g).to(dtype))
    ssm.copy_(torch.randn(ssm.shape, generator=g) * 0.1)
    conv_state[t:], ssm[t:] = float("nan"), float("nan")  # must come out untouched
    return args[:3] + args[4:]


@settings(max_examples=6)
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2]),
       spelling=st.sampled_from(sorted(ARANGES)), extra=st.integers(0, 2), seed=st.integers(0, 99))
def test_state_indices_built_as_arange_are_no_index_at_all(t, hk, ratio, spelling, extra, seed):
    """Qwen 3.5's decode step makes its state indices with arange(T) (one state per token): both fused ops
    then use the token's row number instead of a materialized index (Inductor realizes an arange once per
    reader: two kernels per layer), and the rows after T stay untouched."""
    hv, inner = hk * ratio, gdn_step(hk, hk * ratio, 8, 4)

    def step(x, conv_state, w, a, b, a_log, dt_bias, ssm):
        return inner(x, conv_state, w, ARANGES[spelling](x.shape[0]), a, b, a_log, dt_bias, ssm)

    args = arange_inputs(t, hk, hv, 8, 4, 4, torch.float32, seed, t + extra)
    gm, record = compare(step, args, state=7)
    assert fused_ops(gm) == ["braze.post_conv_cpu.default", "braze.delta_rule_first_rows_cpu.default"]
    (r,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "delta-rule"]
    assert dict(r.args)["rows"] == "arange(T)"
    left = [n for n in gm.graph.nodes if n.op == "call_function" and ("arange" in str(n.target)
                                                                       or "iota" in str(n.target))]
    assert not left, f"the arange should be dead once no fused op reads it: {left}"
    out_args = [a.clone() for a in args]
    gm(*out_args)
    assert torch.isnan(out_args[1][t:]).all() and torch.isnan(out_args[7][t:]).all()
    assert not torch.isnan(out_args[1][:t]).any() and not torch.isnan(out_args[7][:t]).any()


@pytest.mark.parametrize("make", [lambda t: torch.arange(1, t + 1), lambda t: torch.arange(t).flip(0),
                                  lambda t: torch.arange(0, 2 * t, 2)], ids=["shifted", "reversed", "strided"])
def test_index_that_is_not_arange_t_stays_an_index(make):
    inner = gdn_step(1, 2, 8, 4)

    def step(x, conv_state, w, a, b, a_log, dt_bias, ssm):
        return inner(x, conv_state, w, make(x.shape[0]), a, b, a_log, dt_bias, ssm)

    args = make_inputs(3, 1, 2, 8, 4, 4, torch.float32, 0, 7)
    args[1][:], args[8][:] = torch.randn(args[1].shape), torch.randn(args[8].shape) * 0.1  # every row is read
    args = args[:3] + args[4:]
    gm, _ = compare(step, args, state=7)
    assert fused_ops(gm) == ["braze.post_conv_cpu.default", "braze.delta_rule_cpu.default"]

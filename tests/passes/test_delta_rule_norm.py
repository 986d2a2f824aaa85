"""The gated RMSNorm of the delta-rule output inside the delta-rule kernel (FusionConfig.delta_rule_norm): the
update and the norm fuse into one op at any heads and dims, equal eager with poisoned state rows, take the FP8
quant of the next linear with them, and every near miss leaves the two kernels with a remark that says why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from test_delta_rule import rule_inputs

import braze
from braze.models.fp8 import quant_fp8_group
from braze.models.gated_deltanet import RMSNormGated, gated_delta_rule_step
from braze.testing import aten_graph, fused_ops, run_passes

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
FOLDED = "fused the gated delta-rule update and the gated RMSNorm of its output"


def gated(width: int, dtype: torch.dtype, seed: int = 0) -> RMSNormGated:
    norm = RMSNormGated(width, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    return norm


def layer_tail(norm, hv: int, dv: int, dtype, identity: bool = False, quant: int | None = None, extra=None):
    """The linear-attention layer from the update to the out projection's input, as braze's Qwen 3.5 writes it."""

    def f(q, k, v, g, beta, ssm, idx, z):
        t = q.shape[0]
        rows = torch.arange(t) if identity else idx
        o = gated_delta_rule_step(q, k, v, g, beta, ssm, rows)
        y = norm(o.to(dtype), z.view(t, hv, dv)).reshape(t, hv * dv)
        if quant:
            y = quant_fp8_group(y, quant)
        return (y, extra(o)) if extra else y

    return f


def inputs(t, hk, hv, dk, dv, dtype, seed, extra_rows=2, identity=False):
    args = rule_inputs(t, hk, hv, dk, dv, seed, t + extra_rows)
    if identity:  # rows 0..T-1 are the tokens'; poison the rest
        args[5][:t] = torch.randn(t, hv, dk, dv, generator=torch.Generator().manual_seed(seed)) * 0.3
        args[5][t:] = float("nan")
    z = torch.randn(t, hv * dv + 3, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)[:, 3:]
    return args + [z]  # z: a strided slice, as inside the input projection


def run(fn, args, config=None):
    with torch.no_grad():
        gm = aten_graph(fn, *args)
        record = run_passes(gm, config)
        want_args, got_args = [a.clone() for a in args], [a.clone() for a in args]
        want, got = fn(*want_args), gm(*got_args)
    torch.testing.assert_close(got_args[5], want_args[5], rtol=1e-5, atol=1e-5, equal_nan=True)  # state rows
    return gm, record, got, want


def applied(record):
    return [(r.pass_name, r.message) for r in record.remarks if r.kind == "applied"]


@settings(max_examples=10, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 3]),
       dk=st.sampled_from([3, 16, 32]), dv=st.sampled_from([5, 16, 64]), identity=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
def test_update_and_gated_norm_fuse_into_one_op_and_equal_eager(t, hk, ratio, dk, dv, identity, dtype, seed):
    hv = hk * ratio
    fn = layer_tail(gated(dv, dtype, seed), hv, dv, dtype, identity)
    gm, record, got, want = run(fn, inputs(t, hk, hv, dk, dv, dtype, seed, identity=identity))
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert fused_ops(gm) == ["braze.delta_rule_gated_cpu.default"]
    ((pass_name, message),) = applied(record)
    assert pass_name == "delta-rule" and message.startswith(FOLDED)
    (r,) = [r for r in record.remarks if r.kind == "applied"]
    assert r.ops[-2:] == ("rmsnorm", "silu_gate") and dict(r.args).get("rows") == ("arange(T)" if identity else None)
    assert not [r for r in record.remarks if r.kind in ("missed", "failed")]


def test_the_fp8_quant_of_the_next_linear_joins_when_its_groups_are_the_heads():
    fn = layer_tail(gated(64, torch.bfloat16), 4, 64, torch.bfloat16, quant=64)
    gm, record, (q, s), (q_ref, s_ref) = run(fn, inputs(2, 2, 4, 32, 64, torch.bfloat16, 3))
    assert fused_ops(gm) == ["braze.delta_rule_gated_cpu.default"]
    (r,) = [r for r in record.remarks if r.kind == "applied"]
    assert r.ops[-3:] == ("rmsnorm", "silu_gate", "fp8_quant")
    torch.testing.assert_close(s, s_ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.07, atol=0)  # within one fp8 step
    assert (q.float() != q_ref.float()).float().mean() < 0.02


def test_o_read_elsewhere_keeps_two_kernels_and_says_why():
    fn = layer_tail(gated(8, torch.bfloat16), 2, 8, torch.bfloat16, extra=lambda o: o.sum())
    gm, record, got, want = run(fn, inputs(3, 1, 2, 4, 8, torch.bfloat16, 0))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert fused_ops(gm) == ["braze.delta_rule_cpu.default", "braze.fused_rowwise_cpu.default"]
    (miss,) = [r for r in record.remarks if r.kind == "missed"]
    assert miss.pass_name == "delta-rule" and miss.name == "gated-norm-apart" and "has another user" in miss.reason
    assert [p for p, _ in applied(record)] == ["delta-rule", "gated-norm"]


def test_a_norm_over_other_rows_than_the_value_heads_is_not_folded():
    norm = gated(16, torch.float32)

    def f(q, k, v, g, beta, ssm, idx, z):  # the norm spans two value heads of 8
        o = gated_delta_rule_step(q, k, v, g, beta, ssm, idx)
        return norm(o.reshape(q.shape[0], -1, 16), z.view(q.shape[0], -1, 16))

    gm, record, got, want = run(f, inputs(2, 1, 2, 4, 8, torch.float32, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (miss,) = [r for r in record.remarks if r.kind == "missed"]
    assert miss.name == "gated-norm-apart" and "not the value heads (8 values)" in miss.reason
    assert fused_ops(gm) == ["braze.delta_rule_cpu.default", "braze.fused_rowwise_cpu.default"]


def test_a_head_too_large_for_one_program_keeps_two_kernels():
    fn = layer_tail(gated(256, torch.float32), 1, 256, torch.float32)
    gm, record, got, want = run(fn, inputs(1, 1, 1, 128, 256, torch.float32, 0, extra_rows=0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (miss,) = [r for r in record.remarks if r.kind == "missed"]
    assert miss.name == "gated-norm-apart" and "more than one program holds (16384" in miss.reason
    assert fused_ops(gm) == ["braze.delta_rule_cpu.default", "braze.fused_rowwise_cpu.default"]


@pytest.mark.parametrize("config, why", [
    (braze.FusionConfig(delta_rule_norm=False), None),
    (braze.FusionConfig(token_ranges={"delta_rule_norm": (1, 2)}), "3 tokens is outside the configured range [1, 2]"),
])
def test_switch_and_token_range(config, why):
    fn = layer_tail(gated(8, torch.float32), 2, 8, torch.float32)
    gm, record, got, want = run(fn, inputs(3, 1, 2, 4, 8, torch.float32, 0), config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused_ops(gm) == ["braze.delta_rule_cpu.default", "braze.fused_rowwise_cpu.default"]
    assert [(r.name, r.reason) for r in record.remarks if r.kind == "missed"] == ([("token-range", why)] if why else [])


def test_a_dynamic_token_count_folds_once_and_equals_eager():
    """A symbolic T (a server's compile): one graph serves T=3 and T=5, the norm inside the update, no guard on T."""
    torch._dynamo.reset()
    fn = layer_tail(gated(16, torch.bfloat16), 4, 16, torch.bfloat16)
    be = braze.backend()
    compiled = torch.compile(fn, backend=be, fullgraph=True)
    for t in (3, 5):
        args = inputs(t, 2, 4, 8, 16, torch.bfloat16, t, extra_rows=8 - t)  # 8 state slots either way
        got_args, want_args = [a.clone() for a in args], [a.clone() for a in args]
        for i in (0, 1, 2, 3, 4, 6, 7):  # every per-token operand; the state's slots stay static
            torch._dynamo.mark_dynamic(got_args[i], 0)
        with torch.no_grad():
            got, want = compiled(*got_args), fn(*want_args)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got_args[5], want_args[5], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch._dynamo.reset()
    report = braze.report(be)
    assert len(report.graphs) == 1
    assert [r.message.startswith(FOLDED) for r in report.applied] == [True]

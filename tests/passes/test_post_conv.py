"""Post-conv fusion on FX graphs: what fuses (structure wildcards), what must not, and equality with eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import braze
from braze.models.gated_deltanet import (
    causal_conv1d_update,
    gated_delta_rule_step,
    gdn_gating,
    l2norm,
)
from braze.testing import aten_graph, fused_ops, run_passes

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
POST_CONV = ("conv_update", "silu", "split", "l2norm", "gdn_gating")


def gdn_step(hk: int, hv: int, dk: int, dv: int, eps_q: float = 1e-6, eps_k: float = 1e-6):
    """The model's decode path from the conv input to the delta-rule output (braze.models.qwen3_5)."""

    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        t = x.shape[0]
        y = causal_conv1d_update(x, conv_state, w, idx)
        q, k, v = y.split([hk * dk, hk * dk, hv * dv], dim=-1)
        q, k = l2norm(q.view(t, hk, dk), eps_q), l2norm(k.view(t, hk, dk), eps_k)
        g, beta = gdn_gating(a, b, a_log, dt_bias)
        return gated_delta_rule_step(q, k, v.view(t, hv, dv), g, beta, ssm, idx)

    return step


def make_inputs(t, hk, hv, dk, dv, width, dtype, seed=0, slots=None):
    g = torch.Generator().manual_seed(seed)
    c = 2 * hk * dk + hv * dv
    slots = slots or t + 2
    idx = torch.randperm(slots, generator=g)[:t]
    conv_state = torch.randn(slots, c, width - 1, generator=g).to(dtype)
    ssm = torch.randn(slots, hv, dk, dv, generator=g) * 0.1
    unused = [s for s in range(slots) if s not in idx.tolist()]
    conv_state[unused] = float("nan")  # rows no token owns: must come out untouched (still NaN)
    ssm[unused] = float("nan")
    proj = torch.randn(t, c + 7, generator=g).to(dtype)  # x as a strided slice of a wider projection
    ba = (3 * torch.randn(t, 2 * hv, generator=g)).to(dtype)
    return [proj[:, :c], conv_state, (torch.randn(c, width, generator=g) * 0.5).to(dtype), idx, ba[:, hv:], ba[:, :hv],
            torch.randn(hv, generator=g), torch.randn(hv, generator=g), ssm]


def compile_and_compare(fn, args, config=None, tol=1e-5):
    gm = aten_graph(fn, *args)
    record = run_passes(gm, config)
    want_args = [a.clone() for a in args]
    got_args = [a.clone() for a in args]
    want, got = fn(*want_args), gm(*got_args)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    for i in (1, 8):  # conv and recurrent state, untouched rows included (NaN stays NaN)
        torch.testing.assert_close(got_args[i], want_args[i], rtol=tol, atol=tol, equal_nan=True)
    return gm, record


@settings(max_examples=8)
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2, 3]),
       dk=st.sampled_from([4, 9, 16]), dv=st.sampled_from([3, 8, 17]), width=st.sampled_from([2, 3, 4, 5]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 100))
def test_post_conv_fuses_at_any_heads_dims_and_width_and_equals_eager(t, hk, ratio, dk, dv, width, dtype, seed):
    hv = hk * ratio
    args = make_inputs(t, hk, hv, dk, dv, width, dtype, seed)
    gm, record = compile_and_compare(gdn_step(hk, hv, dk, dv), args, tol=TOL[dtype])
    applied = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "post-conv"]
    assert len(applied) == 1 and applied[0].ops == POST_CONV
    args_ = dict(applied[0].args)
    assert args_["segments"] == f"{hk}x{dk}(l2),{hk}x{dk}(l2),{hv}x{dv}" and args_["conv_width"] == width
    assert args_["gating_heads"] == hv
    assert "braze.post_conv_cpu.default" in fused_ops(gm)


def test_q_and_k_norms_keep_their_own_eps():
    args = make_inputs(2, 2, 4, 8, 8, 4, torch.float32)
    gm, record = compile_and_compare(gdn_step(2, 4, 8, 8, eps_q=1e-6, eps_k=0.5), args)
    (r,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "post-conv"]
    assert dict(r.args)["eps"] == [1e-6, 0.5]


def remarks(record, kind):
    return [(r.name, r.reason) for r in record.remarks if r.kind == kind and r.pass_name == "post-conv"]


def test_window_read_elsewhere_is_not_fused():
    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        window = torch.cat([conv_state[idx], x.unsqueeze(-1)], dim=-1)
        conv_state.index_copy_(0, idx, window[:, :, 1:])
        y = torch.nn.functional.silu((window.float() * w.float()).sum(-1))
        return y + window.float().mean(-1)  # the window escapes

    args = make_inputs(2, 1, 2, 4, 4, 4, torch.float32)
    gm, record = compile_and_compare(step, args)
    assert not fused_ops(gm) or "post_conv" not in str(fused_ops(gm))
    assert [n for n, _ in remarks(record, "missed")] == ["conv-intermediate-escapes"]


def test_window_of_other_slots_than_the_write_is_a_near_miss():
    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        window = torch.cat([conv_state[idx.flip(0)], x.unsqueeze(-1)], dim=-1)  # reads other slots than it writes
        conv_state.index_copy_(0, idx, window[:, :, 1:])
        return torch.nn.functional.silu((window.float() * w.float()).sum(-1))

    gm, record = compile_and_compare(step, make_inputs(2, 1, 2, 4, 4, 4, torch.float32))
    assert "post_conv" not in str(fused_ops(gm))
    (miss,) = remarks(record, "missed")
    assert miss[0] == "conv-not-recognized" and "not the state rows of the written slots" in miss[1]


def test_l2norm_input_with_another_reader_stays_with_inductor_and_the_rest_fuses():
    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        y = causal_conv1d_update(x, conv_state, w, idx)
        q, k, v = y.split([4, 4, 8], dim=-1)
        qh = q.view(-1, 1, 4)
        g, beta = gdn_gating(a, b, a_log, dt_bias)
        o = gated_delta_rule_step(l2norm(qh), l2norm(k.view(-1, 1, 4)), v.view(-1, 2, 4), g, beta, ssm, idx)
        return o + qh.float().sum()  # the raw q is read too

    gm, record = compile_and_compare(step, make_inputs(2, 1, 2, 4, 4, 3, torch.float32))
    assert [n for n, _ in remarks(record, "missed")] == ["l2norm-input-escapes"]
    (applied,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "post-conv"]
    assert dict(applied.args)["segments"] == "1x4,1x4(l2),2x4"


def test_l2norm_in_bf16_is_a_near_miss():
    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        y = causal_conv1d_update(x, conv_state, w, idx)
        q, k, v = y.split([4, 4, 8], dim=-1)
        qb = q.view(-1, 1, 4)
        qn = qb * torch.rsqrt((qb * qb).sum(-1, keepdim=True) + 1e-6)  # computed in bf16
        g, beta = gdn_gating(a, b, a_log, dt_bias)
        return gated_delta_rule_step(qn, l2norm(k.view(-1, 1, 4)), v.view(-1, 2, 4), g, beta, ssm, idx)

    gm, record = compile_and_compare(step, make_inputs(2, 1, 2, 4, 4, 4, torch.bfloat16), tol=3e-2)
    missed = remarks(record, "missed")
    assert [n for n, _ in missed] == ["l2norm-not-fused"] and "computed in torch.bfloat16" in missed[0][1]


def test_gating_without_beta_fuses_the_rest():
    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        y = causal_conv1d_update(x, conv_state, w, idx)
        q, k, v = y.split([4, 4, 8], dim=-1)
        g, _ = gdn_gating(a, b, a_log, dt_bias)
        beta = torch.tanh(b.float())  # not a sigmoid
        return gated_delta_rule_step(l2norm(q.view(-1, 1, 4)), l2norm(k.view(-1, 1, 4)), v.view(-1, 2, 4), g, beta,
                                     ssm, idx)

    gm, record = compile_and_compare(step, make_inputs(2, 1, 2, 4, 4, 4, torch.float32))
    missed = remarks(record, "missed")
    assert [n for n, _ in missed] == ["gating-not-fused"] and "beta = sigmoid(b)" in missed[0][1]
    (applied,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "post-conv"]
    assert applied.ops == ("conv_update", "silu", "split", "l2norm")


def test_token_range_and_switch():
    args = make_inputs(3, 1, 2, 4, 4, 4, torch.float32)
    cfg = braze.FusionConfig(token_ranges={"post_conv": (1, 2)})
    gm, record = compile_and_compare(gdn_step(1, 2, 4, 4), args, cfg)
    assert [n for n, _ in remarks(record, "missed")] == ["token-range"]
    gm, record = compile_and_compare(gdn_step(1, 2, 4, 4), args, braze.FusionConfig(post_conv=False))
    assert not remarks(record, "applied") and "post_conv" not in str(fused_ops(gm))
    # with the pass off, the head-chain pass still takes the conv state write alone, in place
    assert any(r.name == "head-chain" and r.ops == ("store",) for r in record.remarks)


def hf_gdn_step(hk: int, hv: int, dk: int, dv: int):
    """Hugging Face's Qwen 3.5 GDN decode path (its torch fallbacks), from the conv input on."""
    hf = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")

    def step(x, conv_state, w, a, b, a_log, dt_bias, ssm):
        batch = x.shape[0]
        y = hf.causal_conv1d_update(x.unsqueeze(1).transpose(1, 2), conv_state, w, None, "silu").transpose(1, 2)
        q, k, v = torch.split(y, [hk * dk, hk * dk, hv * dv], dim=-1)
        q, k, v = q.reshape(batch, 1, hk, dk), k.reshape(batch, 1, hk, dk), v.reshape(batch, 1, hv, dv)
        beta = b.unsqueeze(1).sigmoid()
        g = -a_log.float().exp() * F.softplus(a.unsqueeze(1).float() + dt_bias)
        if hv != hk:
            q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
        out, state = hf.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=ssm,
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        ssm.copy_(state)
        return out

    return step


@settings(max_examples=6)
@given(t=st.sampled_from([1, 2]), hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 3]),
       dk=st.sampled_from([8, 9]), dv=st.sampled_from([4, 17]), width=st.sampled_from([2, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_post_conv_fires_on_hugging_face_spelling(t, hk, ratio, dk, dv, width, dtype, seed):
    hv = hk * ratio
    x, _, w, _, a, b, a_log, dt_bias, _ = make_inputs(t, hk, hv, dk, dv, width, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conv_state = torch.randn(t, x.shape[1], width, generator=g).to(dtype)  # HF keeps K values per channel
    ssm = torch.randn(t, hv, dk, dv, generator=g) * 0.1
    args = [x, conv_state, w, a, b, a_log, dt_bias, ssm]
    fn = hf_gdn_step(hk, hv, dk, dv)
    gm = aten_graph(fn, *args)
    record = run_passes(gm)
    want_args, got_args = [a.clone() for a in args], [a.clone() for a in args]
    want, got = fn(*want_args), gm(*got_args)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    for i in (1, 7):
        torch.testing.assert_close(got_args[i], want_args[i], rtol=TOL[dtype], atol=TOL[dtype])
    (r,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "post-conv"]
    assert r.ops == POST_CONV and dict(r.args)["segments"] == f"{hk}x{dk}(l2),{hk}x{dk}(l2),{hv}x{dv}"


def test_hugging_face_conv_with_a_bias_is_a_near_miss():
    hf = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")

    def step(x, conv_state, w, bias):
        return hf.causal_conv1d_update(x.unsqueeze(-1), conv_state, w, bias, "silu")

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 6, generator=g), torch.randn(2, 6, 4, generator=g), torch.randn(6, 4, generator=g),
            torch.randn(6, generator=g)]
    gm = aten_graph(step, *args)
    record = run_passes(gm)
    missed = remarks(record, "missed")
    assert [n for n, _ in missed] == ["conv-not-recognized"] and "bias-free depthwise conv1d" in missed[0][1]
    assert "post_conv" not in str(fused_ops(gm))


@pytest.mark.slow
@pytest.mark.parametrize("hf", [False, True])
def test_inductor_shifts_the_conv_state_in_place(hf):
    """The fused op receives the state graph input itself: Inductor dropped functionalization's clone, and
    neither a state-sized buffer nor a copy back exists (the CPU twin of the GPU test's no-whole-state check)."""
    import math
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    hk, hv, dk, dv, width, t = 1, 2, 4, 4, 4, 3
    args = make_inputs(t, hk, hv, dk, dv, width, torch.float32)
    fn = gdn_step(hk, hv, dk, dv)
    if hf:  # the state [B, C, K] is written whole: a state-sized buffer would be a clone, not the write
        fn = hf_gdn_step(hk, hv, dk, dv)
        x, _, w, _, a, b, a_log, dt_bias, ssm = args
        args = [x, torch.randn(t, x.shape[1], width), w, a, b, a_log, dt_bias, ssm[:t].nan_to_num()]
    state = args[1]
    want_args = [a.clone() for a in args]
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        got, (src,) = run_and_get_code(torch.compile(fn, backend=braze.backend(), fullgraph=True), *args)
    torch._dynamo.reset()
    torch.testing.assert_close(got, fn(*want_args), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[1], want_args[1], rtol=1e-5, atol=1e-5, equal_nan=True)
    call = src[src.index("def call("):]
    names = re.search(r"(\w+)(?:, \w+)* = args", call).group(0).split(" = ")[0].split(", ")
    state_arg = names[1]
    m = re.search(r"braze\.post_conv_cpu\.default\(\[[^\]]*\], ([^,]+),", call)
    assert m is not None, "the post-conv op is not called"
    assert m.group(1) == state_arg, f"the op shifts {m.group(1)}, not the state input {state_arg}: a clone survived"
    sizes = [math.prod(int(d) for d in dims.split(",") if d.strip())
             for dims in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", call)]
    assert state.numel() not in sizes, f"a buffer of the state's {state.numel()} values is allocated"
    assert f"{state_arg}.copy_" not in call and f"copy_({state_arg}" not in call, "the state is copied back"



def _gdn_step_with_conv_gate(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
    """gdn_step(1, 1, 4, 4) with a sigmoid of T·Hv values computed from the conv's v output before the
    gating (so before the real beta in graph order), gating the update's output."""
    t = x.shape[0]
    y = causal_conv1d_update(x, conv_state, w, idx)
    q, k, v = y.split([4, 4, 4], dim=-1)
    gate = torch.sigmoid(v.view(t, 1, 4).sum(-1))  # [T, 1]
    q, k = l2norm(q.view(t, 1, 4), 1e-6), l2norm(k.view(t, 1, 4), 1e-6)
    g, beta = gdn_gating(a, b, a_log, dt_bias)
    return gated_delta_rule_step(q, k, v.view(t, 1, 4), g, beta, ssm, idx) * gate[..., None]


@pytest.mark.parametrize("where", ["upstream", "downstream", "from-conv"])
def test_a_sigmoid_the_site_depends_on_or_feeds_is_not_taken_for_beta(where):
    # One value head (TP = Hv, e.g. Qwen 3.5 tiny at TP=4): another sigmoid of T·Hv values within reach
    # (the previous layer's shared-expert gate σ(x·w) that the conv input depends on, one computed from
    # the conv's outputs ahead of the real beta, or one from the recurrent update's output) must not be
    # taken for beta: the fused op would depend on its own output (a cycle).
    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm):
        if where == "from-conv":
            return _gdn_step_with_conv_gate(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm).flatten(1)
        if where == "upstream":
            x = x * torch.sigmoid(x[:, :1] @ torch.ones(1, 1))  # [T, 1] gate, before the real beta
        o = gdn_step(1, 1, 4, 4)(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm).flatten(1)  # [T, 4]
        if where == "downstream":
            o = o * torch.sigmoid(o @ torch.ones(4, 1))
        return o

    gm, record = compile_and_compare(step, make_inputs(2, 1, 1, 4, 4, 4, torch.float32))
    (applied,) = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "post-conv"]
    assert applied.ops == POST_CONV
    sigmoids = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sigmoid.default]
    assert len(sigmoids) == 1  # the gate's stays; beta's went into the fused op

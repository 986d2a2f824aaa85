"""The delta-rule kernel against its pure-torch reference, under the interpreter (and on CUDA): poisoned state
rows outside the slots stay untouched, every written row and output equal the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import braze.runtime.delta_rule as rt
from braze.models.gated_deltanet import RMSNormGated, gated_delta_rule_step
from braze.patterns.delta_rule import DeltaRule, delta_rule_reference
from braze.patterns.gated_norm import Gate
from braze.patterns.stages import Cast, RMSNorm, RowChain, WeightMul


def inputs_for(t, hk, hv, dk, dv, slots, seed, device, v_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(slots, generator=g)[:t]
    state = torch.randn(slots, hv, dk, dv, generator=g) * 0.3
    state[[s for s in range(slots) if s not in idx.tolist()]] = float("nan")  # rows no token owns
    qk = torch.nn.functional.normalize(torch.randn(t, 2 * hk + 1, dk, generator=g), dim=-1)
    q, k = qk[:, :hk], qk[:, hk + 1:]  # strided views of one projection
    v = torch.randn(t, hv, dv, generator=g).to(v_dtype)
    ab = torch.randn(t, 2 * hv, generator=g)
    gate = -torch.nn.functional.softplus(3 * ab[:, :hv])  # log-decays <= 0, some near 0, some large
    beta = torch.sigmoid(ab[:, hv:])
    return [x.to(device) for x in (q, k, v, gate, beta, idx, state)]


@settings(max_examples=12)
@given(t=st.sampled_from([1, 2, 5]), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2, 4]),
       dk=st.sampled_from([1, 3, 9, 16, 41]), dv=st.sampled_from([1, 3, 17, 64]), extra=st.integers(0, 3),
       v_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_interpreted_kernel_equals_reference_and_leaves_other_rows(t, hk, ratio, dk, dv, extra, v_dtype, seed):
    hv = hk * ratio
    spec = DeltaRule(hk, hv, dk, dv, dk ** -0.5)
    q, k, v, g, beta, idx, state = inputs_for(t, hk, hv, dk, dv, t + extra, seed, "cpu", v_dtype)
    want_state, got_state = state.clone(), state.clone()
    want = delta_rule_reference(spec, q, k, v, g, beta, idx, want_state)
    old = rt.cpu_backend
    rt.cpu_backend = lambda: "interpret"
    try:
        got = rt._run(q, k, v, g, beta, idx, got_state, spec.to_json())
    finally:
        rt.cpu_backend = old
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert not torch.equal(got_state.nan_to_num(), state.nan_to_num()) or t == 0, "no state row was written"


def test_reference_is_the_models_step():
    q, k, v, g, beta, idx, state = inputs_for(3, 2, 4, 8, 5, 6, 0, "cpu")
    a, b = state.clone(), state.clone()
    want = gated_delta_rule_step(q, k, v, g, beta, a, idx)
    got = delta_rule_reference(DeltaRule(2, 4, 8, 5, 8 ** -0.5), q, k, v, g, beta, idx, b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("shape", [(2, 8, 128, 128), (1, 3, 9, 17), (16, 64, 128, 128)])
def test_op_equals_reference(shape, device):
    hk, hv, dk, dv = shape
    spec = DeltaRule(hk, hv, dk, dv, dk ** -0.5)
    q, k, v, g, beta, idx, state = inputs_for(4, hk, hv, dk, dv, 7, 1, device, torch.bfloat16)
    got_state, want_state = state.clone(), state.cpu().clone()
    got = torch.ops.braze.delta_rule(q, k, v, g, beta, idx, got_state, spec.to_json())
    want = delta_rule_reference(spec, *(x.cpu() for x in (q, k, v, g, beta, idx)), want_state)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state.cpu(), want_state, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_bad_state_raises_a_clear_error():
    spec = DeltaRule(1, 2, 4, 4, 0.5)
    q, k, v, g, beta, idx, state = inputs_for(2, 1, 2, 4, 4, 3, 0, "cpu")
    with pytest.raises(ValueError, match=r"expected a contiguous fp32 \[slots, 2, 4, 4\]"):
        torch.ops.braze.delta_rule(q, k, v, g, beta, idx, state.double(), spec.to_json())
    with pytest.raises(ValueError, match=r"expected a contiguous fp32"):
        torch.ops.braze.delta_rule(q, k, v, g, beta, idx, state.transpose(2, 3).contiguous().transpose(2, 3),
                                   spec.to_json())


@settings(max_examples=6)
@given(t=st.sampled_from([1, 3]), hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 3]),
       dk=st.sampled_from([3, 16]), dv=st.sampled_from([5, 64]), seed=st.integers(0, 1000))
def test_rows_form_writes_fresh_rows_and_only_reads_the_state(t, hk, ratio, dk, dv, seed):
    hv = hk * ratio
    spec = DeltaRule(hk, hv, dk, dv, 0.25, indexed=False)
    q, k, v, g, beta, _, state = inputs_for(t, hk, hv, dk, dv, t, seed, "cpu")
    state = state.nan_to_num()
    want_new = torch.full((t, hv, dk, dv), float("nan"))
    want = delta_rule_reference(spec, q, k, v, g, beta, None, state.clone(), want_new)
    old = rt.cpu_backend
    rt.cpu_backend = lambda: "interpret"
    try:
        seen = state.clone()
        got, new = torch.ops.braze.delta_rule_rows(q, k, v, g, beta, seen, spec.to_json())
    finally:
        rt.cpu_backend = old
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, want_new, rtol=1e-5, atol=1e-5)
    assert torch.equal(seen, state), "the state is only read"


def gated_chain(dv: int) -> RowChain:
    """Qwen 3.5's gated RMSNorm of a bf16 value head (RMSNormGated): x̂ cast to bf16, times w, times silu(z)."""
    norm = RMSNorm(1e-6, dv, "float32", "float32", "float32", "float32",
                   (Cast("bfloat16"), WeightMul("bfloat16", "bfloat16")), store=True)
    return RowChain("bfloat16", None, norm, None, Gate("float32", "float32", "bfloat16"))


@pytest.mark.parametrize("shape", [(2, 8, 128, 128), (1, 3, 9, 17), (16, 64, 128, 128)])
@pytest.mark.parametrize("identity", [False, True])
def test_gated_op_equals_update_then_the_models_norm(shape, identity, device):
    hk, hv, dk, dv = shape
    t = 4
    spec = DeltaRule(hk, hv, dk, dv, dk ** -0.5, identity=identity)
    q, k, v, g, beta, idx, state = inputs_for(t, hk, hv, dk, dv, 7, 1, device, torch.bfloat16)
    if identity:
        idx = torch.arange(t, device=device)
        state[:t] = state[t:t + 1].nan_to_num() + torch.randn(t, hv, dk, dv, device=device) * 0.3
        state[t:] = float("nan")
    norm = RMSNormGated(dv).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dv, generator=torch.Generator().manual_seed(2)).to(device))
    z = torch.randn(t, hv * dv + 5, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)[:, 5:]
    got_state, want_state = state.clone(), state.cpu().clone()
    (got,) = torch.ops.braze.delta_rule_gated(q, k, v, g, beta, None if identity else idx, got_state,
                                             [norm.weight, z.view(t, hv, dv)], spec.to_json(), gated_chain(dv).to_json())
    o = delta_rule_reference(spec, q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), idx.cpu(), want_state)
    with torch.no_grad():
        want = norm.cpu()(o.to(torch.bfloat16), z.cpu().view(t, hv, dv))
    assert got.shape == (t, hv, dv) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got.cpu() != want).float().mean() < 0.02  # bf16 ulps where o lands near a rounding edge
    torch.testing.assert_close(got_state.cpu(), want_state, rtol=1e-4, atol=1e-4, equal_nan=True)

"""Gated DeltaNet decode pieces against independent, loop-by-loop references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.models.gated_deltanet import (
    RMSNormGated,
    causal_conv1d_prefill,
    causal_conv1d_update,
    expand_to_value_heads,
    gated_delta_rule_chunked,
    gated_delta_rule_prefill,
    gated_delta_rule_step,
    gdn_gating,
    l2norm,
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements differ; first at {idx}; "
            f"max abs diff {(actual - expected).abs().max().item():.3g}"
        )


# ---------------------------------------------------------------------------- conv


def conv_update_reference(x, state, weight):
    """Per channel, by hand: y = silu(Σ w_i u_i) over u = [state, x]; new state = u[1:]."""
    T, C = x.shape
    K = weight.shape[1]
    y = torch.empty(T, C)
    new_state = torch.empty_like(state)
    for t in range(T):
        for c in range(C):
            u = [state[t, c, i].item() for i in range(K - 1)] + [x[t, c].item()]
            acc = sum(weight[c, i].item() * u[i] for i in range(K))
            y[t, c] = acc / (1.0 + math.exp(-acc))
            new_state[t, c] = torch.tensor(u[1:])
    return y, new_state


@pytest.mark.parametrize("K", [2, 4])
def test_conv_update_shifts_state_and_touches_only_its_slots(K):
    g = torch.Generator().manual_seed(0)
    T, C, slots = 3, 5, 7
    x = torch.randn(T, C, generator=g)
    weight = torch.randn(C, K, generator=g)
    conv_state = torch.randn(slots, C, K - 1, generator=g)
    conv_state[[0, 2, 3, 6]] = float("nan")  # poison the slots nobody uses
    idx = torch.tensor([5, 1, 4])
    before = conv_state.clone()

    y = causal_conv1d_update(x, conv_state, weight, idx)

    y_ref, state_ref = conv_update_reference(x, before[idx], weight)
    assert_close(y, y_ref)
    assert_close(conv_state[idx], state_ref, atol=0, rtol=0)
    untouched = torch.tensor([0, 2, 3, 6])
    assert torch.isnan(conv_state[untouched]).all()


def test_conv_prefill_equals_repeated_updates():
    g = torch.Generator().manual_seed(1)
    S, C, K = 6, 4, 4
    x = torch.randn(S, C, generator=g)
    weight = torch.randn(C, K, generator=g)
    y_pre, final = causal_conv1d_prefill(x, weight)
    state = torch.zeros(1, C, K - 1)
    ys = [causal_conv1d_update(x[t : t + 1], state, weight, torch.zeros(1, dtype=torch.long)) for t in range(S)]
    assert_close(y_pre, torch.cat(ys))
    assert_close(final, state[0], atol=0, rtol=0)


def test_conv_prefill_shorter_than_kernel_keeps_zero_history():
    x = torch.randn(2, 3)
    _, final = causal_conv1d_prefill(x, torch.randn(3, 4))
    assert torch.equal(final[:, 0], torch.zeros(3))
    assert torch.equal(final[:, 1:], x.t())


# ---------------------------------------------------------------------------- delta rule


def delta_rule_reference(q, k, v, g, beta, state):
    """MODELS.md §3(b)7 literally, one (token, value head) at a time, with matrices.

    q, k: [T, Hk, dk] (normed); v: [T, Hv, dv]; state: [T, Hv, dk, dv] (the rows in use).
    Value head j reads key head j // (Hv/Hk). Uses the closed form
    S' = e^g (I − β k kᵀ) S + β k vᵀ, which equals decay-then-delta-update.
    """
    T, Hk, dk = q.shape
    Hv = v.shape[1]
    out = torch.empty(T, Hv, v.shape[2], dtype=torch.float64)
    new = torch.empty_like(state, dtype=torch.float64)
    for t in range(T):
        for j in range(Hv):
            h = j // (Hv // Hk)
            qj, kj, vj = q[t, h].double() / math.sqrt(dk), k[t, h].double(), v[t, j].double()
            S = state[t, j].double()
            eye = torch.eye(dk, dtype=torch.float64)
            S = math.exp(g[t, j].item()) * (eye - beta[t, j].item() * torch.outer(kj, kj)) @ S
            S = S + beta[t, j].item() * torch.outer(kj, vj)
            new[t, j] = S
            out[t, j] = S.t() @ qj
    return out, new


def random_gdn_inputs(g, T, Hk, Hv, dk, dv, slots):
    q = l2norm(torch.randn(T, Hk, dk, generator=g))
    k = l2norm(torch.randn(T, Hk, dk, generator=g))
    v = torch.randn(T, Hv, dv, generator=g)
    gate, beta = gdn_gating(
        torch.randn(T, Hv, generator=g), torch.randn(T, Hv, generator=g),
        torch.rand(Hv, generator=g).mul(3).log(), torch.randn(Hv, generator=g),
    )
    state = torch.randn(slots, Hv, dk, dv, generator=g)
    return q, k, v, gate, beta, state


def test_delta_rule_step_equals_recurrent_definition_and_touches_only_its_slots():
    g = torch.Generator().manual_seed(2)
    q, k, v, gate, beta, state = random_gdn_inputs(g, T=3, Hk=2, Hv=4, dk=8, dv=6, slots=6)
    idx = torch.tensor([4, 0, 2])
    state[[1, 3, 5]] = float("nan")
    before = state.clone()

    o = gated_delta_rule_step(q, k, v, gate, beta, state, idx)

    o_ref, s_ref = delta_rule_reference(q, k, v, gate, beta, before[idx])
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(o.double(), o_ref, atol=1e-5)
    assert_close(state[idx].double(), s_ref, atol=1e-5)
    assert torch.isnan(state[[1, 3, 5]]).all()


@settings(max_examples=25, deadline=None)
@given(
    Hk=st.sampled_from([1, 2, 3]),
    ratio=st.sampled_from([1, 2, 3, 4]),
    dk=st.sampled_from([1, 3, 8]),
    dv=st.sampled_from([1, 5, 8]),
    T=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_value_heads_a_multiple_of_key_heads(Hk, ratio, dk, dv, T, seed):
    g = torch.Generator().manual_seed(seed)
    Hv = Hk * ratio
    q, k, v, gate, beta, state = random_gdn_inputs(g, T, Hk, Hv, dk, dv, slots=T)
    idx = torch.arange(T)
    before = state.clone()
    o = gated_delta_rule_step(q, k, v, gate, beta, state, idx)
    o_ref, s_ref = delta_rule_reference(q, k, v, gate, beta, before)
    assert_close(o.double(), o_ref, atol=1e-5)
    assert_close(state.double(), s_ref, atol=1e-5)


def test_expand_to_value_heads_is_repeat_interleave_and_rejects_non_multiples():
    x = torch.arange(2 * 3).view(1, 2, 3)
    y = expand_to_value_heads(x, 4)
    assert torch.equal(y[0, :, 0], torch.tensor([0, 0, 3, 3]))
    with pytest.raises(ValueError, match="multiple"):
        expand_to_value_heads(x, 3)


def test_delta_rule_prefill_carries_state_like_steps():
    g = torch.Generator().manual_seed(3)
    q, k, v, gate, beta, state = random_gdn_inputs(g, T=5, Hk=1, Hv=2, dk=4, dv=4, slots=1)
    o, final = gated_delta_rule_prefill(q, k, v, gate, beta, state[0])
    s = state[0]
    for t in range(5):
        o_ref, s_ref = delta_rule_reference(q[t : t + 1], k[t : t + 1], v[t : t + 1], gate[t : t + 1],
                                            beta[t : t + 1], s[None])
        assert_close(o[t].double(), o_ref[0], atol=1e-5)
        s = s_ref[0].float()
    assert_close(final, s, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    S=st.sampled_from([1, 3, 9, 41, 70]),
    chunk=st.sampled_from([1, 4, 16, 64]),
    Hk=st.sampled_from([1, 2]),
    ratio=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_chunked_prefill_equals_recurrent(S, chunk, Hk, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, gate, beta, state = random_gdn_inputs(g, S, Hk, Hk * ratio, dk=8, dv=5, slots=1)
    gate = gate * 4  # strong decay too: e^γ underflows within a chunk
    o_ref, s_ref = gated_delta_rule_prefill(q, k, v, gate, beta, state[0])
    o, s = gated_delta_rule_chunked(q, k, v, gate, beta, state[0], chunk=chunk)
    assert_close(o, o_ref, atol=1e-5)
    assert_close(s, s_ref, atol=1e-5)


# ---------------------------------------------------------------------------- gating and norms


def test_gating_formula():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    A_log, dt_bias = torch.randn(4), torch.randn(4)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    assert_close(g, -torch.exp(A_log) * torch.log1p(torch.exp(a + dt_bias)))
    assert_close(beta, 1 / (1 + torch.exp(-b)))
    assert (g <= 0).all()


def test_l2norm_has_unit_norm_in_fp32():
    x = torch.randn(5, 3, 16, dtype=torch.bfloat16)
    y = l2norm(x)
    assert y.dtype == torch.float32
    assert_close(y.norm(dim=-1), torch.ones(5, 3), atol=1e-4)


def test_rmsnorm_gated():
    norm = RMSNormGated(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x, z = torch.randn(4, 8), torch.randn(4, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight * z * torch.sigmoid(z)
    assert_close(norm(x, z), expected.detach())

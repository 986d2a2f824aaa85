"""The sparse MoE path (grouped GEMMs over the chosen experts) equals the dense path, and the rule that picks it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from braze.models.common import (
    FP8_CHANNEL, Experts, MoE, RouterSpec, experts_read, load_full_state_dict, random_full_state_dict, route,
    sparse_experts,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_experts(e: int, hidden: int, inter: int, seed: int, dtype=torch.bfloat16) -> Experts:
    ex = Experts(e, hidden, inter, dtype=dtype)
    load_full_state_dict(ex, random_full_state_dict(ex, gen(seed), 1, "cpu", dtype, std=0.2))
    return ex


def draw_routing(t: int, k: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives), repeated across tokens; weights [T, k] fp32."""
    logits = torch.randn(t, e, generator=gen(seed))
    idx = logits.topk(k, dim=-1).indices
    return torch.rand(t, k, generator=gen(seed + 1)) + 0.1, idx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def loop_reference(ex: Experts, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per (token, slot) in float64 from the same (bf16) weights."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g, u = (x[t].double() @ ex.w13[e].double().t()).chunk(2)
            out[t] += w[t, j].double() * ((torch.nn.functional.silu(g) * u) @ ex.w2[e].double().t())
    return out


@given(e=st.sampled_from([4, 9, 16, 41]), k=st.integers(1, 8), t=st.integers(1, 9),
       hidden=st.sampled_from([8, 24, 256]), inter=st.sampled_from([8, 40, 128]), seed=st.integers(0, 1000))
def test_sparse_equals_dense(e, k, t, hidden, inter, seed):
    k = min(k, e - 1)
    t = max(1, min(t, (e - 1) // k))  # T·k < E: the sparse regime
    ex = make_experts(e, hidden, inter, seed)
    assert ex.is_sparse(t, k)
    x = torch.randn(t, hidden, generator=gen(seed + 2)).to(torch.bfloat16)
    w, idx = draw_routing(t, k, e, seed + 3)
    sparse = ex(x, w, idx)
    dense = ex._forward_dense(x, torch.zeros(t, e).scatter_(1, idx, w))
    assert sparse.shape == dense.shape == (t, hidden) and sparse.dtype == torch.bfloat16
    assert torch.isfinite(sparse).all()
    # Both round the same intermediates to bf16; only the accumulation order differs.
    assert rel_err(sparse, dense) < 1e-2, f"sparse vs dense: rel err {rel_err(sparse, dense):.2e}"
    ref = loop_reference(ex, x, w, idx)
    assert rel_err(sparse, ref) < 2e-2 and rel_err(dense, ref) < 2e-2


def test_sparse_repeated_experts_across_tokens_and_empty_groups():
    # Tokens 0 and 2 share expert 5; experts 0-2, 4, 6, 8.. get no rows (empty groups).
    ex = make_experts(16, 64, 32, 11)
    idx = torch.tensor([[5, 3], [7, 5], [5, 3]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    x = torch.randn(3, 64, generator=gen(12)).to(torch.bfloat16)
    assert ex.is_sparse(3, 2)
    ref = loop_reference(ex, x, w, idx)
    assert rel_err(ex(x, w, idx), ref) < 1e-2


def test_moe_sparse_equals_moe_dense_end_to_end():
    spec = RouterSpec(top_k=2, scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, routed_scaling=2.5)
    moe = MoE(64, 16, 32, spec, shared_inter=32, shared_gate=True, dtype=torch.bfloat16)
    load_full_state_dict(moe, random_full_state_dict(moe, gen(13), 1, "cpu", torch.bfloat16, std=0.2))
    x = torch.randn(3, 64, generator=gen(14)).to(torch.bfloat16)
    assert moe.experts.is_sparse(3, 2)
    w, idx = route(moe.gate(x.float()), spec, moe.e_score_correction_bias)
    routed = moe.experts._forward_dense(x, torch.zeros(3, 16).scatter_(1, idx, w))
    shared = moe.shared_expert(x) * torch.sigmoid(moe.shared_expert_gate(x))
    assert rel_err(moe(x), routed + shared) < 1e-2


def test_rule_and_path_choice():
    assert sparse_experts(1, 8, 16) and not sparse_experts(2, 8, 16) and not sparse_experts(8, 8, 16)
    assert [experts_read(t, 8, 16) for t in (1, 2, 8, 64)] == [8, 16, 16, 16]
    assert experts_read(3, 2, 16) == 6
    assert make_experts(16, 64, 32, 0).is_sparse(1, 8)
    assert not make_experts(16, 64, 32, 0).is_sparse(2, 8)  # T·k = E: dense
    assert not make_experts(16, 64, 32, 0, dtype=torch.float32).is_sparse(1, 8)  # grouped GEMM is bf16 only
    assert not make_experts(16, 60, 32, 0).is_sparse(1, 8)  # 60·2 bytes is no multiple of 16
    assert not Experts(16, 128, 128, fp8=FP8_CHANNEL).is_sparse(1, 8)  # FP8 experts stay dense


@pytest.mark.slow
@torch.no_grad()
def test_sparse_path_compiles_fullgraph():
    torch._dynamo.reset()
    ex = make_experts(16, 64, 32, 21)
    x = torch.randn(1, 64, generator=gen(22)).to(torch.bfloat16)
    w, idx = draw_routing(1, 8, 16, 23)
    compiled = torch.compile(ex, fullgraph=True, dynamic=False)
    assert rel_err(compiled(x, w, idx), ex(x, w, idx)) < 1e-2

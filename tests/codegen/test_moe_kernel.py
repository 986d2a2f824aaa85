"""The fused routed-experts kernels against their pure-torch reference under the interpreter (and on CUDA), and
the reference against the models' own grouped-GEMM experts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import braze.runtime.moe as rt
from braze.models.moe import Experts as ModelExperts
from braze.patterns.moe import Experts, experts_reference
from braze.runtime.rowwise import _interpreter_ready


def inputs_for(t, k, e, hid, inter, seed, device="cpu", transposed=True, weight_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hid, generator=g).to(torch.bfloat16)
    w13 = (torch.randn(e, 2 * inter, hid, generator=g) * hid ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, hid, inter, generator=g) * inter ** -0.5).to(torch.bfloat16)
    # as the grouped GEMMs read them: [E, H, 2I] and [E, I, H] views of [E, 2I, H] and [E, H, I] storage
    w13, w2 = (w13.transpose(1, 2), w2.transpose(1, 2)) if transposed else \
        (w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous())
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # distinct experts per token
    weights = torch.rand(t, k, generator=g).to(weight_dtype)
    return [v.to(device) for v in (x, w13, w2, idx, weights)]


def poisoned(spec: Experts, device="cpu") -> torch.Tensor:
    dtype = torch.bfloat16 if spec.out == "bfloat16" else torch.float32
    return torch.full((spec.tokens, spec.hidden), float("nan"), dtype=dtype, device=device)


def interpreted(*args):
    old = rt.cpu_backend
    rt.cpu_backend = lambda: "interpret"
    try:
        return rt._run(*args, out=poisoned(Experts.from_json(args[-1])))
    finally:
        rt.cpu_backend = old


@pytest.mark.skipif(not _interpreter_ready(), reason="needs Triton's interpreter (TRITON_INTERPRET=1 before triton loads)")
@settings(max_examples=8, deadline=None)
@given(t=st.sampled_from([1, 2, 3]), k=st.sampled_from([1, 2, 3, 8]), extra=st.integers(0, 9),
       hid=st.sampled_from([1, 9, 41, 64, 257]), inter=st.sampled_from([1, 3, 16, 41]), transposed=st.booleans(),
       round_act=st.booleans(), out=st.sampled_from(["bfloat16", "float32"]),
       weight_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_interpreted_kernels_equal_reference(t, k, extra, hid, inter, transposed, round_act, out, weight_dtype, seed):
    e = k + extra
    spec = Experts(tokens=t, top_k=k, experts=e, hidden=hid, inter=inter, round_act=round_act, out=out)
    x, w13, w2, idx, weights = inputs_for(t, k, e, hid, inter, seed, transposed=transposed, weight_dtype=weight_dtype)
    want = experts_reference(spec, x, w13, w2, idx, weights)
    got = interpreted(x, w13, w2, idx, weights, spec.to_json())
    assert got.dtype == want.dtype and got.shape == (t, hid)
    # bf16 rounding of each GEMM's fp32 sum can differ by one ulp with the summation order; one ulp of the
    # intermediate h moves y by about 2^-8 of its size
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    same = (got == want).float().mean().item()  # the rounding points are the reference's: nearly all bit-equal
    assert same > 0.95, f"only {same:.0%} of the outputs equal the reference; first differing: " \
        f"{(got != want).nonzero()[:5].tolist()}"


def test_reference_is_the_models_grouped_experts():
    torch.manual_seed(0)
    m = ModelExperts(16, 64, 32, dtype=torch.bfloat16)
    assert m.is_sparse(1, 4), "this test needs the model's grouped-GEMM path"
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    idx = torch.tensor([[3, 15, 0, 7]])
    weights = torch.rand(1, 4)
    want = m(x, weights, idx)
    spec = Experts(tokens=1, top_k=4, experts=16, hidden=64, inter=32)
    got = experts_reference(spec, x, m.w13.transpose(1, 2), m.w2.transpose(1, 2), idx, weights)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)


def test_bad_shapes_raise_a_clear_error():
    x, w13, w2, idx, weights = inputs_for(1, 2, 4, 8, 4, 0)
    spec = Experts(tokens=1, top_k=2, experts=4, hidden=8, inter=4)
    with pytest.raises(ValueError, match=r"w2 of shape \(4, 8, 4\), expected \[4, 4, 8\]"):
        rt._run(x, w13, w2.transpose(1, 2), idx, weights, spec.to_json())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("t,k,e,hid,inter", [(1, 8, 16, 7168, 2048), (1, 10, 512, 4096, 1024), (3, 8, 256, 3072, 1536),
                                             (2, 3, 9, 41, 17)])
def test_cuda_kernels_equal_reference(t, k, e, hid, inter):
    x, w13, w2, idx, weights = inputs_for(t, k, e, hid, inter, 0, device="cuda")
    spec = Experts(tokens=t, top_k=k, experts=e, hidden=hid, inter=inter)
    want = experts_reference(spec, x, w13, w2, idx, weights)
    got = rt._run(x, w13, w2, idx, weights, spec.to_json(), out=poisoned(spec, "cuda"))
    torch.testing.assert_close(torch.ops.braze.moe_experts(x, w13, w2, idx, weights, spec.to_json()), got,
                               rtol=0, atol=0)  # the op is the launcher, deterministic
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

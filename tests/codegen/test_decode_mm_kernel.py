"""braze's decode GEMM kernel against its reference (fp32 accumulation, one rounding) under the interpreter and on
CUDA, every tile shape it may take, and the plan that says where it beats cuBLAS."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import braze.runtime.decode_mm as rt
from braze.codegen.decode_mm import (
    MAX_ROWS,
    NORM_FORMS,
    DecodeMMConfig,
    decode_mm_plan,
    decode_mm_reference,
    decode_mm_tiles,
    rmsnorm_reference,
)

AWKWARD = [1, 3, 9, 41, 257]


def run(x, w, bias, config=None, **norm):
    """The op's launch with `config` (and `norm`: norm_weight, norm, eps) into a NaN-poisoned output (every element
    must be written)."""
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    old = rt.cpu_backend
    rt.cpu_backend = lambda: "interpret"
    try:
        return rt._run(x, w, bias, config=config, out=out, **norm)
    finally:
        rt.cpu_backend = old


def assert_close(got, x, w, bias, **norm):
    want = decode_mm_reference(x, w, bias, **norm).float()
    got = got.float()
    if norm:  # the bound below is over the GEMM's operand: the normalized rows
        x = rmsnorm_reference(x, norm["norm_weight"], norm["norm"], norm["eps"])
    assert torch.isfinite(got).all(), "unwritten (NaN) outputs"
    # the kernel and the reference both sum in fp32, in different orders: a few fp32 ulps of the sum's
    # magnitude, then one rounding to the output dtype each
    scale = (x.float().abs() @ w.float().abs().t() + (0 if bias is None else bias.float().abs())).clamp_min(1e-3)
    err = ((got - want).abs() / scale).max().item()
    eps = torch.finfo(x.dtype).eps
    bad = ((got - want).abs() / scale > 2 * eps).nonzero()
    assert err <= 2 * eps, f"{len(bad)} of {got.numel()} elements differ, first at {bad[:5].tolist()}: {err:.2e}"


@settings(max_examples=10)
@given(t=st.integers(1, MAX_ROWS), n=st.sampled_from(AWKWARD + [64]), k=st.sampled_from(AWKWARD + [300]),
       bias=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       tiles=st.sampled_from([None, DecodeMMConfig(1, 16, 1), DecodeMMConfig(4, 64, 2, unroll=False),
                              DecodeMMConfig(8, 32, 4)]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference(t, n, k, bias, dtype, tiles, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    assert_close(run(x, w, b, tiles), x, w, b)


def test_strided_activation_and_op(device):
    """A row of a wider tensor as x (stride(0) != K), through the registered op."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 200, generator=g).to(torch.bfloat16).to(device)
    x = wide[:, :100]
    w = torch.randn(37, 100, generator=g).to(torch.bfloat16).to(device)
    assert_close(run(x, w, None), x, w, None)
    old = rt.cpu_backend
    rt.cpu_backend = lambda: "interpret"
    try:
        assert_close(torch.ops.braze.decode_mm(x, w, None), x, w, None)
    finally:
        rt.cpu_backend = old


def test_bad_input_says_what():
    x = torch.zeros(5, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="5 rows; the kernel takes 1..4"):
        rt._run(x, torch.zeros(4, 8, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match="expected x \\[T, K\\] and w \\[N, K\\]"):
        rt._run(x[:1], torch.zeros(4, 9, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match="expected one dtype"):
        rt._run(x[:1], torch.zeros(4, 8, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="bias of shape \\(3,\\), expected \\(4,\\)"):
        rt._run(x[:1], torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16))


def test_plan_where_the_sweep_measured():
    """The plan's choices at the bench shapes it was fitted to (benchmarks/results/decode_mm.md)."""
    bf16 = torch.bfloat16
    merged_a = decode_mm_plan(1, 2304, 7168, bf16)  # DeepSeek's merged q_a/kv_a/indexer weight: 1.18x
    assert merged_a == DecodeMMConfig(2, 2048, 4)
    assert decode_mm_plan(1, 128, 4096, bf16) == DecodeMMConfig(1, 2048, 4)  # Qwen's in_proj_ba: 2.4x
    assert decode_mm_plan(1, 512, 128, bf16) == DecodeMMConfig(8, 128, 4)  # short rows: 1024 values a program
    for shape in [(1, 11264, 1536), (1, 16384, 4096), (1, 8192, 3072), (2, 2304, 7168), (4, 3072, 1536)]:
        assert "cuBLAS is" in decode_mm_plan(*shape, bf16), shape
    assert "over 70 MB" in decode_mm_plan(1, 129280, 7168, bf16)  # a vocabulary projection
    assert isinstance(decode_mm_plan(2, 3072, 1536, bf16), DecodeMMConfig)
    assert isinstance(decode_mm_plan(4, 1024, 4096, torch.float16), DecodeMMConfig)
    assert "float32 weights" in decode_mm_plan(1, 64, 64, torch.float32)
    assert "5 token rows" in decode_mm_plan(5, 64, 64, bf16)
    # with an RMSNorm folded in (which would otherwise take a kernel of its own), where that measured faster than
    # Inductor's norm + cuBLAS (decode_mm_norm.md): DeepSeek's q_b and wq_b alone at one token, q_b at two; not the
    # merged q_b || wq_b (34.6 MB), nor anything at four tokens
    assert isinstance(decode_mm_plan(1, 8192, 1536, bf16, fold_norm=True), DecodeMMConfig)
    assert isinstance(decode_mm_plan(2, 3072, 1536, bf16, fold_norm=True), DecodeMMConfig)
    for shape in [(1, 11264, 1536), (2, 8192, 1536), (4, 3072, 1536)]:
        assert "even with the RMSNorm folded in" in decode_mm_plan(*shape, bf16, fold_norm=True), shape
    assert decode_mm_tiles(1, 7168, 2048) == DecodeMMConfig(2, 2048, 4)
    assert decode_mm_tiles(1, 7169, 9) == DecodeMMConfig(64, 16, 4)


@settings(max_examples=5)
@given(t=st.integers(1, MAX_ROWS), k=st.sampled_from(AWKWARD + [300]), norm=st.sampled_from(NORM_FORMS[1:]),
       tiles=st.sampled_from([None, DecodeMMConfig(4, 64, 2, unroll=False), DecodeMMConfig(2, 128, 4)]),
       seed=st.integers(0, 2**16))
def test_kernel_with_a_folded_norm_equals_reference(t, k, norm, tiles, seed):
    """The RMSNorm of x computed by every program (its statistics over the whole row, then each K chunk normalized
    and rounded as the graph rounds it) against the reference norm followed by the reference GEMM."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(t, k, generator=g)).to(torch.bfloat16)
    w = (torch.randn(41, k, generator=g) * k**-0.5).to(torch.bfloat16)
    nw = (1 + 0.3 * torch.randn(k, generator=g)).to(torch.bfloat16)
    kw = {"norm_weight": nw, "norm": norm, "eps": 1e-6}
    assert_close(run(x, w, None, tiles, **kw), x, w, None, **kw)


def test_a_folded_norm_checks_its_weight_and_form():
    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a weight of shape"):
        rt._run(x, w, None, norm="cast,w")
    with pytest.raises(ValueError, match="is not one of"):
        rt._run(x, w, None, norm="w,cast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(11264, 1536), (2304, 7168)])
@pytest.mark.parametrize("norm", ["cast,w", "1+w"])
def test_cuda_kernel_with_a_folded_norm_equals_reference_and_replays_bit_exact(t, n, k, norm):
    g = torch.Generator(device="cuda").manual_seed(n + k + t)
    x = (3 * torch.randn(t, k, device="cuda", generator=g)).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    kw = {"norm_weight": (1 + 0.3 * torch.randn(k, device="cuda", generator=g)).to(torch.bfloat16), "norm": norm,
          "eps": 1e-6}
    first = run(x, w, None, **kw)
    assert_close(first, x, w, None, **kw)
    out = torch.full_like(first, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rt._run(x, w, None, out=out, **kw)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first), "a replay differs from the first call"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(2304, 7168), (11264, 1536), (192, 7168), (128, 4096), (4096, 8192), (41, 257)])
def test_cuda_kernel_equals_reference_and_replays_bit_exact(t, n, k):
    g = torch.Generator(device="cuda").manual_seed(n + k + t)
    x = torch.randn(t, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    first = run(x, w, b)
    assert_close(first, x, w, b)
    out = torch.full_like(first, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rt._run(x, w, b, out=out)
    for _ in range(5):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first), "a replay differs from the first call: the sum order must be fixed"

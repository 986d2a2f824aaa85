"""The decode-GEMM pass on small ATen graphs: which GEMMs take braze's decode kernel, which stay cuBLAS and why,
and that a rewritten graph equals the original (run on CPU under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_post_conv_cuda_lowering import on_fake_cuda

import braze.runtime.decode_mm as rt
from braze import FusionConfig, TokenRange
from braze.passes import decode_gemm
from braze.passes.canonicalize import Canonicalize
from braze.passes.decode_gemm import DecodeGemm
from braze.passes.gemm_merge import SiblingGemmMerge
from braze.testing import aten_graph, run_passes

PASSES = (Canonicalize, SiblingGemmMerge, DecodeGemm)
BF16 = torch.bfloat16


def decode_ops(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is torch.ops.braze.decode_mm.default]


def remarks(record) -> list[tuple[str, str]]:
    return [(r.kind, r.name) for r in record.remarks if r.pass_name == "decode-gemm"]


def on_cuda(fn, *args, config: FusionConfig | None = None):
    """fn's ATen graph on fake CUDA tensors (no GPU needed), through the passes."""
    gm = on_fake_cuda(aten_graph(fn, *args), list(args))
    return gm, run_passes(gm, config or FusionConfig(), PASSES)


def projections(x, w_small, w_wide, b_wide, w_t):
    """A launch-bound weight, one cuBLAS is faster at (with a bias), and one stored [K, N]."""
    return F.linear(x, w_small), F.linear(x.relu(), w_wide, b_wide), x @ w_t


def inputs(t: int):
    return (torch.zeros(t, 1536, dtype=BF16), torch.zeros(128, 1536, dtype=BF16), torch.zeros(11264, 1536, dtype=BF16),
            torch.zeros(11264, dtype=BF16), torch.zeros(1536, 64, dtype=BF16))


def test_what_takes_the_kernel_and_what_stays_cublas_says_why():
    gm, record = on_cuda(projections, *inputs(1))
    (op,) = decode_ops(gm)
    assert op.args[1].target == "arg1_1" and op.args[2] is None
    assert remarks(record) == [("applied", "decode-gemm"), ("missed", "cublas-faster"), ("missed", "weight-layout")]
    by_name = {r.name: r for r in record.remarks if r.pass_name == "decode-gemm"}
    assert by_name["decode-gemm"].message == ("GEMM of 1 token(s) against `arg1_1` (placeholder) [128, 1536] on "
                                              "braze's decode kernel (1 rows x 2048 a program, 4 warps)")
    assert by_name["cublas-faster"].reason == ("cuBLAS is faster for a [11264, 1536] weight at 1 token(s) "
                                               "(benchmarks/results/decode_mm.md)")
    assert sum(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes) == 1  # x @ w_t
    assert sum(n.target is torch.ops.aten.addmm.default for n in gm.graph.nodes) == 1


def test_token_range_switch_and_cpu_graphs():
    _, record = on_cuda(projections, *inputs(5))
    assert ("missed", "token-range") in remarks(record)
    (r, *_) = [r for r in record.remarks if r.pass_name == "decode-gemm"]
    assert r.reason == "5 tokens is outside the configured range [1, 4]"
    gm, record = on_cuda(projections, *inputs(1), config=FusionConfig(decode_gemm=False))
    assert not decode_ops(gm) and not remarks(record)
    gm, record = on_cuda(projections, *inputs(1), config=FusionConfig(token_ranges={"decode_gemm": TokenRange(2, 4)}))
    assert not decode_ops(gm) and ("missed", "token-range") in remarks(record)
    gm = aten_graph(projections, *inputs(1))  # a CPU graph: the kernel choice is a GPU one
    record = run_passes(gm, FusionConfig(), PASSES)
    assert not decode_ops(gm) and not remarks(record)


def test_computed_weight_and_other_dtypes_stay():
    def f(x, w, x32, w32):
        return F.linear(x, w * 2), F.linear(x32, w32)

    args = (torch.zeros(1, 64, dtype=BF16), torch.zeros(32, 64, dtype=BF16), torch.zeros(1, 64), torch.zeros(32, 64))
    gm, record = on_cuda(f, *args)
    assert not decode_ops(gm)
    assert remarks(record) == [("missed", "weight-computed")]  # fp32 GEMMs are not candidates


def test_merged_siblings_take_the_kernel_choice_with_the_switch():
    def f(x, wa, wb):
        return F.linear(x, wa), F.linear(x, wb)

    args = (torch.zeros(1, 64, dtype=BF16), torch.zeros(32, 64, dtype=BF16), torch.zeros(16, 64, dtype=BF16))
    params = [a if i == 0 else torch.nn.Parameter(a, requires_grad=False) for i, a in enumerate(args)]
    for on in (True, False):  # the flag is the graph's; the op acts on it on CUDA only
        gm = aten_graph(f, *params)
        run_passes(gm, FusionConfig(decode_gemm=on), PASSES, inputs=tuple(params))
        (merged,) = [n for n in gm.graph.nodes if n.target is torch.ops.braze.sibling_mm.default]
        assert merged.args[3] is on


@settings(max_examples=6)
@given(t=st.integers(1, 4), n=st.sampled_from([3, 9, 41]), k=st.sampled_from([9, 41, 300]),
       bias=st.booleans(), dtype=st.sampled_from([BF16, torch.float16]), seed=st.integers(0, 2**16))
def test_rewritten_graph_equals_the_original(t, n, k, bias, dtype, seed, monkeypatch_module):
    """On CPU (the pass told to act there), the rewritten graph under the interpreter against the original. (One
    output row or one K column would be traced as a multiply and a sum, not a GEMM.)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)

    def f(x, w, b):
        return F.linear(x.relu(), w, b if bias else None) * 2

    gm = aten_graph(f, x, w, b)
    record = run_passes(gm, FusionConfig(), PASSES)
    assert remarks(record) == [("applied", "decode-gemm")]
    got = gm(x, w, b)
    want = f(x, w, b)
    scale = 2 * ((x.float().relu().abs() @ w.float().abs().t()) + (b.float().abs() if bias else 0)).clamp_min(1e-3)
    assert (((got.float() - want.float()).abs() / scale) <= 2 * torch.finfo(dtype).eps).all()


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Let the pass act on CPU graphs and the op run its kernel under the interpreter, for this module's tests."""
    mp = pytest.MonkeyPatch()
    mp.setattr(decode_gemm, "DEVICES", ("cuda", "cpu"))
    mp.setattr(rt, "cpu_backend", lambda: "interpret")
    yield
    mp.undo()


def test_a_symbolic_token_count_stays_cublas_with_a_remark(monkeypatch_module):
    """The kernel is specialized on the token count: a dynamic one (here bounded to the range) is left to cuBLAS,
    through a real compile, with a remark, and the compiled function still equals eager."""
    import braze

    torch._dynamo.reset()
    w = torch.randn(32, 64).to(BF16)
    be = braze.backend(FusionConfig())
    fn = torch.compile(lambda x: F.linear(x, w), backend=be)
    x = torch.randn(3, 64).to(BF16)
    torch._dynamo.mark_dynamic(x, 0, min=1, max=4)
    assert torch.allclose(fn(x).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    names = [(r.kind, r.name) for r in braze.report(be).missed if r.pass_name == "decode-gemm"]
    assert names == [("missed", "dynamic-shape")], braze.report(be).missed


@settings(max_examples=10)
@given(variant=st.sampled_from(["transposed", "computed", "tokens", "fp32", "mixed", "wide", "huge"]),
       t=st.integers(1, 4), seed=st.integers(0, 99))
def test_gemms_that_must_stay_cublas_do_with_their_reason(variant, t, seed):
    """Variants that must not take the kernel: each keeps its GEMM and says why (no rewrite, no crash)."""
    n, k, rows, dt = 96, 64, t, BF16
    if variant == "tokens":
        rows = 5 + seed % 60
    if variant == "fp32":
        dt = torch.float32
    if variant == "wide":  # a shape cuBLAS wins at (N >= 8192, K < 6144 at one token; larger weights above)
        n, k = 8192, 1024
    if variant == "huge":  # a vocabulary projection: over 70 MB
        n, k = 40000, 1024
    x = torch.zeros(rows, k, dtype=BF16 if variant == "mixed" else dt)
    w = torch.zeros(k, n, dtype=dt) if variant == "transposed" else torch.zeros(n, k, dtype=dt)

    def f(x, w):
        if variant == "transposed":
            return x @ w
        if variant == "computed":
            return F.linear(x, w + 1)
        if variant == "mixed":
            return F.linear(x.float(), w.float()).to(BF16)  # fp32 GEMM: not a candidate
        return F.linear(x, w)

    gm, record = on_cuda(f, x, w)
    assert not decode_ops(gm)
    got = remarks(record)
    want = {"transposed": [("missed", "weight-layout")], "computed": [("missed", "weight-computed")],
            "tokens": [("missed", "token-range")], "fp32": [], "mixed": [],
            "wide": [("missed", "cublas-faster")], "huge": [("missed", "cublas-faster")]}[variant]
    assert got == want, (variant, got)

"""Sibling-GEMM merging on small ATen graphs: what merges, what must not, and that merged equals unmerged,
also after the weights change."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from braze import FusionConfig, TokenRange
from braze.passes.canonicalize import Canonicalize
from braze.passes.gemm_merge import SiblingGemmMerge
from braze.runtime.sibling_mm import rows_view, share_rows
from braze.testing import aten_graph, run_passes

PASSES = (Canonicalize, SiblingGemmMerge)
SIZES = st.sampled_from([1, 3, 9, 41, 257])
# the default range is one token (where merging pays on an H100); these tests merge at up to 257
MERGE = FusionConfig(token_ranges={"gemm_merge": TokenRange(1, 256)})
WIDE = FusionConfig(gemm_merge=True, token_ranges={"gemm_merge": TokenRange(1, 1024)})


def frozen(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype), requires_grad=False)


def merge(fn, *inputs, config: FusionConfig | None = None):
    """fn traced with inputs as placeholders, run through gemm-merge knowing the real inputs."""
    gm = aten_graph(fn, *inputs)
    record = run_passes(gm, config or MERGE, PASSES, inputs=inputs)
    return gm, record


def sibling_ops(gm) -> int:
    return sum(n.target is torch.ops.braze.sibling_mm.default for n in gm.graph.nodes)


def three_heads(x, wa, wb, wc):
    return F.linear(x, wa) * 2, F.linear(x, wb).relu(), F.linear(x, wc)


def test_three_siblings_merge_into_one_gemm_and_match_unmerged():
    x, wa, wb, wc = torch.randn(3, 16), frozen(8, 16, seed=1), frozen(5, 16, seed=2), frozen(1, 16, seed=3)
    gm, record = merge(three_heads, x, wa, wb, wc)
    assert sibling_ops(gm) == 1
    assert not any(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes)
    (r,) = [r for r in record.remarks if r.kind == "applied"]
    assert r.name == "gemm-merge" and dict(r.args)["rows"] == [8, 5, 1]
    assert "extra memory: none" in r.message
    assert record.shared_weights == [{"inputs": [1, 2, 3], "location": ""}]
    assert share_rows([wa, wb, wc]) == ("shared", (8 + 5 + 1) * 16 * 4)
    assert rows_view([wa, wb, wc]) is not None  # one storage: the op reads it without a copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shared path must not fall back to concatenating
        for got, want in zip(gm(x, wa, wb, wc), three_heads(x, wa, wb, wc)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_weight_updates_are_seen_in_place_and_after_a_parameter_is_replaced():
    x, wa, wb = torch.randn(2, 8), frozen(4, 8, seed=1), frozen(6, 8, seed=2)

    def fn(x, wa, wb):
        return F.linear(x, wa), F.linear(x, wb)

    gm, _ = merge(fn, x, wa, wb)
    assert sibling_ops(gm) == 1 and share_rows([wa, wb])[0] == "shared"
    with torch.no_grad():
        wb.mul_(-3.0)  # in place: the shared buffer holds the new values, nothing is stale
    for got, want in zip(gm(x, wa, wb), fn(x, wa, wb)):
        torch.testing.assert_close(got, want)
    assert wa.untyped_storage().data_ptr() == wb.untyped_storage().data_ptr()
    new_wb = frozen(6, 8, seed=7)  # a parameter replaced by a new tensor: no longer adjacent
    with pytest.warns(UserWarning, match="concatenating"):
        got = gm(x, wa, new_wb)
    for g, w in zip(got, fn(x, wa, new_wb)):
        torch.testing.assert_close(g, w)


def test_biased_siblings_merge_with_their_biases_apart_from_plain_ones():
    x, wa, wb, wc, ba, bb = (torch.randn(5, 12), frozen(7, 12, seed=1), frozen(3, 12, seed=2), frozen(4, 12, seed=3),
                             frozen(7, seed=4), frozen(3, seed=5))

    def fn(x, wa, wb, wc, ba, bb):
        return F.linear(x, wa, ba), F.linear(x, wb, bb), F.linear(x, wc)

    gm, record = merge(fn, x, wa, wb, wc, ba, bb)
    assert sibling_ops(gm) == 1  # the two addmm; the lone mm stays
    assert record.shared_weights[0]["inputs"] == [1, 2] and share_rows([wa, wb])[0] == "shared"
    for got, want in zip(gm(x, wa, wb, wc, ba, bb), fn(x, wa, wb, wc, ba, bb)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@settings(max_examples=8)  # each example traces a graph (~1 s); the shapes are the awkward ones
@given(t=SIZES, k=SIZES, rows=st.lists(SIZES, min_size=2, max_size=3), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_merged_equals_unmerged_over_shapes(t, k, rows, bias, dtype):
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t * k)).to(dtype)
    ws = [frozen(n, k, dtype=dtype, seed=i) for i, n in enumerate(rows)]
    bs = [frozen(n, dtype=dtype, seed=10 + i) for i, n in enumerate(rows)] if bias else []

    def fn(x, *wb):
        w, b = wb[:len(rows)], wb[len(rows):]
        return [F.linear(x, w[i], b[i] if b else None) for i in range(len(rows))]

    gm = aten_graph(fn, x, *ws, *bs)
    # Inductor's decompositions turn a [1, K] x [K, 1] product (and K = 1) into pointwise math: no GEMM
    gemms = sum(n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) for n in gm.graph.nodes)
    record = run_passes(gm, WIDE, PASSES, inputs=(x, *ws, *bs))
    assert sibling_ops(gm) == (gemms >= 2), [str(r) for r in record.remarks]
    share_rows(ws)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for got, want in zip(gm(x, *ws, *bs), fn(x, *ws, *bs)):
            torch.testing.assert_close(got, want, **tol)


# -- what must not merge -------------------------------------------------------------------------


def test_gemms_on_different_activations_do_not_merge():
    x, y, wa, wb = torch.randn(3, 16), torch.randn(3, 16), frozen(8, 16), frozen(4, 16)
    gm, record = merge(lambda x, y, wa, wb: (F.linear(x, wa), F.linear(y, wb)), x, y, wa, wb)
    assert sibling_ops(gm) == 0 and not record.remarks


def test_a_gemm_reading_the_others_output_does_not_merge():
    x, wa, wb = torch.randn(3, 16), frozen(16, 16, seed=1), frozen(4, 16, seed=2)
    gm, record = merge(lambda x, wa, wb: F.linear(F.linear(x, wa), wb), x, wa, wb)
    assert sibling_ops(gm) == 0 and not record.remarks


def test_transposed_and_computed_weights_are_missed_with_reasons():
    x, wa, wt, wc = torch.randn(3, 16), frozen(8, 16, seed=1), frozen(16, 4, seed=2), frozen(8, 16, seed=3)

    def fn(x, wa, wt, wc):
        return F.linear(x, wa), x @ wt, F.linear(x, wc * 2.0)  # [K, N] weight; a weight computed in the graph

    gm, record = merge(fn, x, wa, wt, wc)
    assert sibling_ops(gm) == 0
    assert sorted(r.name for r in record.remarks) == ["weight-computed", "weight-layout"]
    assert all(r.kind == "missed" and r.reason for r in record.remarks)


def test_fp8_scaled_mm_siblings_are_missed_not_merged():
    def fn(x, wa, wb, sa, sb):
        s = torch.ones(x.shape[0], 1)
        return (torch._scaled_mm(x, wa.t(), scale_a=s, scale_b=sa.t(), out_dtype=torch.bfloat16),
                torch._scaled_mm(x, wb.t(), scale_a=s, scale_b=sb.t(), out_dtype=torch.bfloat16))

    fp8 = torch.float8_e4m3fn
    x = torch.randn(16, 32).to(fp8)
    wa, wb = (torch.nn.Parameter(torch.randn(n, 32).to(fp8), requires_grad=False) for n in (16, 48))
    sa, sb = frozen(16, 1), frozen(48, 1)
    gm, record = merge(fn, x, wa, wb, sa, sb)
    assert sibling_ops(gm) == 0
    assert [r.name for r in record.remarks] == ["scaled-mm", "scaled-mm"]


def test_weights_that_are_not_frozen_parameters_are_missed():
    x = torch.randn(3, 16)
    plain = [torch.randn(8, 16), torch.randn(4, 16)]  # user tensors, not parameters
    trained = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(4, 16))]

    def fn(x, wa, wb):
        return F.linear(x, wa), F.linear(x, wb)

    for weights in (plain, trained):
        gm, record = merge(fn, x, *weights)
        assert sibling_ops(gm) == 0
        assert [r.name for r in record.remarks] == ["not-parameters"]
    gm = aten_graph(fn, x, *plain)  # outside the backend: braze cannot tell what the inputs hold
    record = run_passes(gm, FusionConfig(gemm_merge=True), PASSES)
    assert [r.name for r in record.remarks] == ["not-parameters"] and "outside braze's backend" in record.remarks[0].reason


def test_token_range_and_compute_bound_sizes_are_missed():
    wa, wb = frozen(512, 512, seed=1), frozen(512, 512, seed=2)

    def fn(x, wa, wb):
        return F.linear(x, wa), F.linear(x, wb)

    _, record = merge(fn, torch.randn(300, 512), wa, wb)  # above [1, 256]
    assert [r.name for r in record.remarks] == ["token-range"]
    gm, record = merge(fn, torch.randn(2, 512), wa, wb, config=FusionConfig())  # the default range: one token
    assert [(r.name, r.reason) for r in record.remarks] == [("token-range",
                                                             "2 tokens is outside the configured range [1, 1]")]
    gm, record = merge(fn, torch.randn(1, 512), wa, wb, config=FusionConfig())
    assert sibling_ops(gm) == 1 and [r.name for r in record.remarks] == ["gemm-merge"]
    big = [frozen(2048, 2048, dtype=torch.bfloat16, seed=i) for i in (1, 2)]  # at 1024 tokens: ~2x over balance
    _, record = merge(fn, torch.randn(1024, 2048, dtype=torch.bfloat16), *big, config=WIDE)
    assert [r.name for r in record.remarks] == ["compute-bound"]
    gm, record = merge(fn, torch.randn(3, 512), wa, wb, config=FusionConfig(gemm_merge=False))
    assert sibling_ops(gm) == 0 and not record.remarks


def test_share_rows_refuses_what_it_cannot_re_point():
    base = frozen(8, 4)
    view = torch.nn.Parameter(base.data[:4], requires_grad=False)  # shares its storage with `base`
    assert share_rows([frozen(2, 4), view])[0].startswith("refused: a weight shares its storage")
    assert share_rows([frozen(2, 4), torch.nn.Parameter(torch.randn(2, 4))])[0].startswith("refused: a weight is not")
    assert share_rows([base, base])[0] == "refused: the same weight appears twice"
    assert share_rows([frozen(2, 4), frozen(2, 5)])[0].startswith("refused: the weights differ")
    a, b = frozen(2, 4), frozen(3, 4)
    assert share_rows([a, b])[0] == "shared" and share_rows([a, b]) == ("already", 0)
    assert rows_view([b, a]) is None  # adjacency is ordered

"""The norm -> quant fusion pass on ATen graphs: what must fuse does and runs equal to eager; what must not, doesn't."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellings import NORMS, QUANTS, group_of  # noqa: E402

from braze import FusionConfig, TokenRange  # noqa: E402
from braze.testing import aten_graph, fused_ops, run_passes  # noqa: E402


def site(norm: str, quant: str, residual: bool, keep_norm_out: bool, eps: float):
    nfn, qfn = NORMS[norm], QUANTS[quant]

    def fn(x, r, w):
        h = x + r if residual else x
        y = nfn(h, w, eps)
        q, s = qfn(y)
        outs = [q, s]
        if residual:
            outs.append(h)
        if keep_norm_out:
            outs.append(y)
        return tuple(outs)

    return fn


def assert_close_quant(got, ref, group):
    """q compared after dequantizing with its scale; everything else within one step of its dtype."""
    q, s, *rest = got
    q_ref, s_ref, *rest_ref = ref
    width = q.shape[-1]
    g = group or width
    dq = q.float().reshape(-1, width // g, g) * s.float().reshape(-1, width // g, 1)
    dq_ref = q_ref.float().reshape(-1, width // g, g) * s_ref.float().reshape(-1, width // g, 1)
    torch.testing.assert_close(dq, dq_ref, rtol=0.13, atol=1e-3)
    for a, b in zip(rest, rest_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-5)


@given(norm=st.sampled_from(sorted(NORMS)), quant=st.sampled_from(sorted(QUANTS)), residual=st.booleans(),
       keep=st.booleans(), groups=st.sampled_from([1, 3]), rows=st.sampled_from([1, 4]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 999))
def test_every_combination_fuses_and_matches_eager(norm, quant, residual, keep, groups, rows, dtype, eps, seed):
    width = (group_of(quant) or 40) * groups
    fn = site(norm, quant, residual, keep, eps)
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, width, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.5 * torch.randn(width, generator=gen)).to(dtype)
    gm = aten_graph(fn, x, r, w)
    record = run_passes(gm)
    applied = [rm for rm in record.remarks if rm.kind == "applied"]
    assert len(applied) == 1, [str(rm) for rm in record.remarks]
    args = dict(applied[0].args)
    assert args["width"] == width and args["group_size"] == (group_of(quant) or width)
    assert args.get("zero_centered", False) == (norm == "zero-centered")
    assert applied[0].ops == (("residual_add",) if residual else ()) + ("rmsnorm", "fp8_quant")
    assert fused_ops(gm), gm.graph
    # nothing of the norm is left to run unfused
    assert not any("rsqrt" in str(n.target) or "amax" in str(n.target) for n in gm.graph.nodes)
    assert_close_quant(gm(x, r, w), fn(x, r, w), group_of(quant))


def test_norm_output_with_another_user_is_produced_by_the_kernel():
    fn = site("hf", "per-token", residual=True, keep_norm_out=True, eps=1e-6)
    x, r, w = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    gm = aten_graph(fn, x.bfloat16(), r.bfloat16(), w.bfloat16())
    record = run_passes(gm)
    assert [rm.kind for rm in record.remarks] == ["applied"]
    out = gm(x.bfloat16(), r.bfloat16(), w.bfloat16())
    ref = fn(x.bfloat16(), r.bfloat16(), w.bfloat16())
    assert torch.equal(out[2], ref[2])  # the residual sum, bit for bit
    torch.testing.assert_close(out[3], ref[3], rtol=2 ** -7, atol=1e-6)


def test_quant_of_a_non_norm_is_missed_with_the_producer_named():
    def fn(x):
        return QUANTS["per-token"](torch.nn.functional.silu(x))

    gm = aten_graph(fn, torch.randn(2, 64))
    record = run_passes(gm)
    [rm] = record.remarks
    assert (rm.kind, rm.name) == ("missed", "quant-input-not-norm")
    assert "not from an RMSNorm" in rm.reason and "activation+quant" in rm.suggestion
    assert not fused_ops(gm)


def test_norm_with_escaping_intermediate_is_missed_and_left_unfused():
    def fn(x, w):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = w * (h * rstd).to(x.dtype)
        return (*QUANTS["per-token"](y), rstd)

    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    gm = aten_graph(fn, x, w)
    record = run_passes(gm)
    [rm] = record.remarks
    assert (rm.kind, rm.name) == ("missed", "norm-not-fusable")
    assert rm.reason == "intermediate `rsqrt` (rsqrt.default) is also used by `output` (output)"
    assert not fused_ops(gm)
    out, ref = gm(x, w), fn(x, w)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(out, ref))


def test_unsupported_fp8_dtype_after_a_norm_is_missed():
    def fn(x, w):
        y = NORMS["hf"](x, w, 1e-6)
        s = y.abs().amax(-1, keepdim=True).float() / 57344.0
        return (y.float() / s).to(torch.float8_e5m2), s

    gm = aten_graph(fn, torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16))
    record = run_passes(gm)
    [rm] = record.remarks
    assert (rm.kind, rm.name) == ("missed", "quant-not-recognized") and "float8_e5m2" in rm.reason


def test_weight_of_the_wrong_shape_does_not_fuse_the_multiply():
    def fn(x, w):
        return QUANTS["per-token"](NORMS["hf"](x, w, 1e-6))

    x, w = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    gm = aten_graph(fn, x, w)
    record = run_passes(gm)
    assert [rm.kind for rm in record.remarks] == ["missed"]
    assert not fused_ops(gm)


def test_token_range_outside_is_missed_with_the_range():
    fn = site("hf", "per-token", residual=False, keep_norm_out=False, eps=1e-6)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    gm = aten_graph(fn, x, x, x[0])
    record = run_passes(gm, FusionConfig(token_ranges={"norm_quant": TokenRange(1, 8)}))
    [rm] = record.remarks
    assert (rm.kind, rm.name) == ("missed", "token-range")
    assert rm.reason == "16 tokens is outside the configured range [1, 8]"


def test_disabled_family_leaves_the_graph_alone():
    fn = site("hf", "per-token", residual=False, keep_norm_out=False, eps=1e-6)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    gm = aten_graph(fn, x, x, x[0])
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert record.remarks == [] and not fused_ops(gm)


def test_graph_without_candidates_comes_out_unchanged():
    def fn(x, w):
        return torch.nn.functional.silu(x @ w).sum(-1)

    gm = aten_graph(fn, torch.randn(3, 8), torch.randn(8, 8))
    before = gm.code
    record = run_passes(gm)
    assert record.remarks == [] and gm.code == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_layers_two_sites(dtype):
    def fn(x, r, w1, w2):
        h = x + r
        q1, s1 = QUANTS["group128-ue8m0"](NORMS["hf"](h, w1, 1e-6))
        h2 = h + (q1.float() * s1.repeat_interleave(128, -1)).to(dtype)
        q2, s2 = QUANTS["group128-ue8m0"](NORMS["hf"](h2, w2, 1e-6))
        return q2, s2, h2

    x, r = torch.randn(2, 256, dtype=dtype), torch.randn(2, 256, dtype=dtype)
    w1, w2 = torch.randn(256, dtype=dtype), torch.randn(256, dtype=dtype)
    gm = aten_graph(fn, x, r, w1, w2)
    record = run_passes(gm)
    assert [rm.kind for rm in record.remarks] == ["applied", "applied"]
    assert_close_quant(gm(x, r, w1, w2), fn(x, r, w1, w2), 128)


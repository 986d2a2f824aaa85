"""The numerics gate refuses a replacement that disagrees with the graph, and records by how much."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellings import NORMS, QUANTS  # noqa: E402

from braze import FusionConfig  # noqa: E402
from braze.passes.canonicalize import Canonicalize  # noqa: E402
from braze.passes.norm_quant import NormQuantFusion  # noqa: E402
from braze.testing import aten_graph, fused_ops, run_passes  # noqa: E402


class WrongNormQuant(NormQuantFusion):
    """Plants a wrong kernel: the norm's weight multiply is dropped from the chain."""

    def build_chain(self, norm, quant, residual, norm_store):
        chain = super().build_chain(norm, quant, residual, norm_store)
        epilogue = tuple(op for op in chain.norm.epilogue if type(op).__name__ != "WeightMul")
        wrong = dataclasses.replace(chain.norm, epilogue=epilogue)
        return dataclasses.replace(chain, norm=wrong)


def graph():
    def fn(x, w):
        return QUANTS["per-token"](NORMS["hf"](x, w, 1e-6))

    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = (2 + torch.rand(64)).to(torch.bfloat16)
    return aten_graph(fn, x, w), fn, (x, w)


def test_gate_rejects_the_wrong_replacement_and_leaves_the_site_unfused():
    gm, fn, args = graph()
    record = run_passes(gm, FusionConfig(verify="compile"), passes=(Canonicalize, WrongNormQuant))
    [rm] = record.remarks
    assert (rm.kind, rm.name) == ("failed", "numerics-gate")
    assert dict(rm.args)["error_ratio"] > 1.0
    assert "relative error" in rm.reason and "tolerance" in rm.reason
    assert not fused_ops(gm)
    out, ref = gm(*args), fn(*args)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(out, ref))


def test_without_the_gate_the_wrong_replacement_would_have_landed():
    gm, fn, args = graph()
    record = run_passes(gm, FusionConfig(verify="off"), passes=(Canonicalize, WrongNormQuant))
    assert [r.kind for r in record.remarks] == ["applied"]
    q, s = gm(*args)
    q_ref, s_ref = fn(*args)
    assert not torch.allclose(s, s_ref, rtol=0.1)  # the planted bug is real: the gate is what stops it


def test_gate_passes_the_right_replacement():
    gm, fn, args = graph()
    record = run_passes(gm, FusionConfig(verify="compile"))
    assert [r.kind for r in record.remarks] == ["applied"]
    assert record.stats["norm-quant"]["sites-verified"] == 1


class BrokenNormQuant(NormQuantFusion):
    def build_chain(self, *args):
        raise RuntimeError("planted bug")


def test_an_error_inside_braze_leaves_the_site_unfused_with_a_failed_remark():
    gm, fn, args = graph()
    record = run_passes(gm, passes=(Canonicalize, BrokenNormQuant))
    [rm] = record.remarks
    assert (rm.kind, rm.name, rm.reason) == ("failed", "internal-error", "RuntimeError: planted bug")
    out, ref = gm(*args), fn(*args)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(out, ref))

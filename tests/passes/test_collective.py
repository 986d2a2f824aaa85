"""The all-reduce -> residual add -> RMSNorm (-> FP8 quant) pass on ATen graphs: what must fuse does and equals
eager; what must not keeps its all-reduce and says why.

One gloo rank (an all-reduce over one rank returns its input) is enough to check recognition, the rewrite
and the fused op's math; tests/passes/test_collective_tp.py runs the same on two ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed._functional_collectives as funcol
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellings import NORMS, QUANTS, group_of  # noqa: E402

from braze import FusionConfig, TokenRange  # noqa: E402
from braze.patterns.collective import is_wait  # noqa: E402
from braze.testing import aten_graph, fused_ops, run_passes, single_rank_group  # noqa: E402

# the collective family is off by default (slower than stock on 2 H100s so far); these tests turn it on
ON = FusionConfig(collective=True)

# F.rms_norm needs the weight in the activation dtype; the others take any weight dtype
MIXED_WEIGHT_NORMS = sorted(set(NORMS) - {"functional"})


@pytest.fixture(scope="module")
def world():
    with single_rank_group() as group:
        yield group


def site(group, norm: str, quant: str | None, residual: str, eps: float):
    """x is a rank's partial sum; residual "none", "after" (y + r) or "before" (r + y)."""
    nfn = NORMS[norm]

    def fn(x, r, w):
        y = funcol.all_reduce(x * 1.5, "sum", group)  # x * 1.5: a producer, as a GEMM would be
        h = y if residual == "none" else y + r if residual == "after" else r + y
        out = nfn(h, w, eps)
        outs = [out] if quant is None else list(QUANTS[quant](out))
        return (*outs, h) if residual != "none" else tuple(outs)

    return fn


def assert_outputs_close(got, ref, quant: str | None, width: int):
    if quant is not None:
        g = group_of(quant) or width
        (q, s, *got), (q_ref, s_ref, *ref) = got, ref
        dq = q.float().reshape(-1, width // g, g) * s.float().reshape(-1, width // g, 1)
        dq_ref = q_ref.float().reshape(-1, width // g, g) * s_ref.float().reshape(-1, width // g, 1)
        torch.testing.assert_close(dq, dq_ref, rtol=0.13, atol=1e-3)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-5)


@given(norm=st.sampled_from(sorted(NORMS)), quant=st.sampled_from([None, "per-token", "group64-mul"]),
       residual=st.sampled_from(["none", "after", "before"]), width=st.sampled_from([1, 3, 41, 64, 257]),
       rows=st.sampled_from([1, 4]), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       fp32_weight=st.booleans(), eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 999))
def test_every_variant_fuses_with_its_all_reduce_and_matches_eager(world, norm, quant, residual, width, rows, dtype,
                                                                   fp32_weight, eps, seed):
    if quant == "group64-mul" and width % 64:
        quant = "per-token"
    w_dtype = torch.float32 if fp32_weight and norm in MIXED_WEIGHT_NORMS else dtype
    fn = site(world, norm, quant, residual, eps)
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, width, generator=gen).to(dtype) for _ in range(2))
    w = (0.5 * torch.randn(width, generator=gen)).to(w_dtype)
    gm = aten_graph(fn, x, r, w)
    record = run_passes(gm, ON)
    [applied] = [rm for rm in record.remarks if rm.kind == "applied"]
    assert (applied.pass_name, applied.name) == ("allreduce-norm", "allreduce-norm"), str(applied)
    ops = ("all_reduce", *(["residual_add"] if residual != "none" else []), "rmsnorm",
           *(["fp8_quant"] if quant else []))
    assert applied.ops == ops
    args = dict(applied.args)
    assert args["group"] == world.group_name and args["width"] == width
    assert args.get("zero_centered", False) == (norm == "zero-centered")
    assert fused_ops(gm) == ["braze.allreduce_rowwise.default"]
    # the collective runs once, inside the fused op; nothing of the norm is left
    assert not any(is_wait(n) or "rsqrt" in str(n.target) or "amax" in str(n.target) for n in gm.graph.nodes)
    assert_outputs_close(gm(x, r, w), fn(x, r, w), quant, width)


def test_an_all_reduce_whose_result_has_another_reader_is_missed_and_kept(world):
    def fn(x, r, w):
        y = funcol.all_reduce(x, "sum", world)
        h = y + r
        return NORMS["hf"](h, w, 1e-6), h, y * 2  # y itself escapes

    x, r, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    gm = aten_graph(fn, x, r, w)
    record = run_passes(gm, ON)
    [rm] = [rm for rm in record.remarks if rm.pass_name == "allreduce-norm"]
    assert (rm.kind, rm.name) == ("missed", "reduced-value-escapes")
    assert rm.reason.startswith("the all-reduced value `wait_tensor` (wait_tensor.default) is also read by "
                                "`mul_2` (mul.Tensor)")
    assert sum(is_wait(n) for n in gm.graph.nodes) == 1 and "braze.allreduce_rowwise.default" not in fused_ops(gm)
    assert all(torch.equal(a, b) for a, b in zip(gm(x, r, w), fn(x, r, w)))


def test_a_norm_over_a_different_tensor_is_missed_with_what_reads_the_sum(world):
    def fn(x, r, w):
        h = funcol.all_reduce(x, "sum", world) + r
        return NORMS["hf"](r, w, 1e-6), h  # the norm is of r, not of the residual sum

    x, r, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    gm = aten_graph(fn, x, r, w)
    record = run_passes(gm, ON)
    [rm] = [rm for rm in record.remarks if rm.pass_name == "allreduce-norm"]
    assert (rm.kind, rm.name) == ("missed", "no-norm-after-allreduce")
    assert rm.reason == "the residual sum `add` (add.Tensor) is read by `output` (output), not by an RMSNorm"
    assert sum(is_wait(n) for n in gm.graph.nodes) == 1
    assert all(torch.equal(a, b) for a, b in zip(gm(x, r, w), fn(x, r, w)))


def test_a_norm_with_an_escaping_intermediate_is_missed_with_the_norms_reason(world):
    def fn(x, w):
        h = funcol.all_reduce(x, "sum", world).float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * (h * rstd).to(x.dtype), rstd

    x, w = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    gm = aten_graph(fn, x, w)
    record = run_passes(gm, ON)
    [rm] = [rm for rm in record.remarks if rm.pass_name == "allreduce-norm"]
    assert (rm.kind, rm.name) == ("missed", "norm-not-fusable")
    assert rm.reason == "intermediate `rsqrt` (rsqrt.default) is also used by `output` (output)"


def test_a_max_all_reduce_is_missed_as_not_recognized(world):
    def fn(x, r, w):
        return NORMS["hf"](funcol.all_reduce(x, "max", world) + r, w, 1e-6)

    x, r, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    gm = aten_graph(fn, x, r, w)
    record = run_passes(gm, ON)
    assert [(rm.kind, rm.name) for rm in record.remarks] == [("missed", "allreduce-not-recognized")]
    assert "'max'" in record.remarks[0].reason


def test_token_range_and_family_switch(world):
    fn = site(world, "hf", None, "after", 1e-6)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    gm = aten_graph(fn, x, x, x[0])
    record = run_passes(gm, FusionConfig(collective=True, token_ranges={"collective": TokenRange(1, 8)}))
    [rm] = [rm for rm in record.remarks if rm.pass_name == "allreduce-norm"]
    assert (rm.kind, rm.name) == ("missed", "token-range")
    assert rm.reason == "16 tokens is outside the configured range [1, 8]"
    assert sum(is_wait(n) for n in gm.graph.nodes) == 1
    gm = aten_graph(fn, x, x, x[0])
    record = run_passes(gm, FusionConfig(collective=False, norm_quant=False))
    assert record.remarks == [] and not fused_ops(gm)


def test_the_numerics_gate_checks_the_local_part_of_a_site(world):
    fn = site(world, "zero-centered", "group64-mul", "after", 1e-6)
    x, r = torch.randn(2, 128, dtype=torch.bfloat16), torch.randn(2, 128, dtype=torch.bfloat16)
    w = torch.randn(128)
    gm = aten_graph(fn, x, r, w)
    record = run_passes(gm, FusionConfig(collective=True, verify="compile"))
    assert [rm.kind for rm in record.remarks] == ["applied"]
    assert record.stats["allreduce-norm"]["sites-verified"] == 1
    assert_outputs_close(gm(x, r, w), fn(x, r, w), "group64-mul", 128)

"""The FP8 dynamic-quant recognizer: spellings, group sizes, scale programs, and what it refuses."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellings import QUANTS, group_of  # noqa: E402

from braze.patterns.fx import Miss  # noqa: E402
from braze.patterns.quant import QuantMatch, fp8_quant_reference, is_fp8_cast, match_fp8_quant  # noqa: E402
from braze.testing import aten_graph  # noqa: E402


def quants_in(gm) -> list:
    return [match_fp8_quant(n) for n in gm.graph.nodes if is_fp8_cast(n)]


@given(spelling=st.sampled_from(sorted(QUANTS)), groups=st.sampled_from([1, 2, 7]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), rows=st.sampled_from([1, 3]),
       seed=st.integers(0, 1000))
def test_every_spelling_is_recognized_and_its_reference_is_exact(spelling, groups, dtype, rows, seed):
    fn = QUANTS[spelling]
    group = group_of(spelling) or 96
    width = group * groups
    y = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)).to(dtype)
    gm = aten_graph(fn, y)
    [m] = quants_in(gm)
    assert isinstance(m, QuantMatch), m
    assert m.stage.group_size == (group_of(spelling) or width)
    assert len(m.scale_nodes) == 1
    q_ref, [s_ref] = fp8_quant_reference(y, m.stage)
    q, s = fn(y)
    assert torch.equal(q_ref.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(s_ref, s.reshape(s_ref.shape).float(), rtol=0, atol=0)


def test_power_of_two_scales_are_recorded_op_by_op():
    gm = aten_graph(QUANTS["group128-ue8m0"], torch.randn(2, 256))
    [m] = quants_in(gm)
    assert [op.op for op in m.stage.operand] == ["cast", "clamp_min", "div", "log2", "ceil", "exp2"]
    assert m.stage.clamp == (-448.0, 448.0)


def test_e5m2_is_a_near_miss_with_a_reason():
    def fn(y):
        s = y.abs().amax(-1, keepdim=True) / 57344.0
        return (y / s).to(torch.float8_e5m2), s

    [m] = quants_in(aten_graph(fn, torch.randn(2, 64)))
    assert isinstance(m, Miss) and m.candidate and "float8_e5m2" in m.reason


def test_static_scale_is_not_a_dynamic_quant():
    def fn(y, s):
        return (y / s).clamp(-448, 448).to(torch.float8_e4m3fn)

    [m] = quants_in(aten_graph(fn, torch.randn(2, 64), torch.rand(())))
    assert isinstance(m, Miss) and "amax" in m.reason


def test_amax_of_a_different_tensor_is_a_miss():
    def fn(y, z):
        s = z.abs().amax(-1, keepdim=True) / 448.0
        return (y / s).clamp(-448, 448).to(torch.float8_e4m3fn), s

    [m] = quants_in(aten_graph(fn, torch.randn(2, 64), torch.randn(2, 64)))
    assert isinstance(m, Miss) and "different tensor" in m.reason


def test_escaping_amax_intermediate_is_a_miss():
    def fn(y):
        a = y.abs()
        s = a.amax(-1, keepdim=True) / 448.0
        return (y / s).clamp(-448, 448).to(torch.float8_e4m3fn), s, a + 1

    [m] = quants_in(aten_graph(fn, torch.randn(2, 64)))
    assert isinstance(m, Miss) and "also used" in m.reason

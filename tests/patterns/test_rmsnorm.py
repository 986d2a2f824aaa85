"""The RMSNorm recognizer on post-grad-like ATen graphs: every spelling, wildcard eps and width, near misses."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spellings import NORMS  # noqa: E402

from braze.patterns.fx import Miss, aten, is_op  # noqa: E402
from braze.patterns.rmsnorm import NormMatch, match_residual_add, match_rmsnorm, rmsnorm_reference  # noqa: E402
from braze.testing import aten_graph  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WIDTHS = [1, 3, 41, 257, 7168]


def norms_in(gm) -> list:
    return [match_rmsnorm(n) for n in gm.graph.nodes if is_op(n, aten.mean)]


@given(spelling=st.sampled_from(sorted(NORMS)), width=st.sampled_from(WIDTHS), dtype=st.sampled_from(DTYPES),
       eps=st.sampled_from([1e-6, 1e-5, 3e-3, 0.1]), rows=st.sampled_from([1, 3]))
def test_every_spelling_is_recognized_with_its_eps_and_width(spelling, width, dtype, eps, rows):
    fn = NORMS[spelling]
    x = torch.randn(rows, width, dtype=dtype)
    w = torch.randn(width, dtype=dtype)
    gm = aten_graph(lambda x, w: fn(x, w, eps), x, w)
    [m] = norms_in(gm)
    assert isinstance(m, NormMatch), m
    # F.rms_norm's decomposition rounds eps to fp32
    assert abs(m.stage.eps - eps) <= eps * 1e-7 and m.stage.width == width
    assert m.weight is not None and m.weight.op == "placeholder"
    assert any(getattr(op, "zero_centered", False) for op in m.stage.epilogue) == (spelling == "zero-centered")
    # the stage's reference reproduces eager exactly, rounding included (one ulp for rsqrt vs sqrt spellings)
    ref = rmsnorm_reference(x.float(), w, m.stage).to(dtype)
    out = fn(x, w, eps)
    torch.testing.assert_close(ref, out.to(dtype), rtol=2 ** -7 if dtype != torch.float32 else 1e-6, atol=1e-6)


@given(width=st.sampled_from(WIDTHS), dtype=st.sampled_from(DTYPES))
def test_residual_add_feeding_the_norm(width, dtype):
    def fn(x, r, w):
        h = x + r
        return NORMS["hf"](h, w, 1e-6), h

    x, r, w = torch.randn(2, width, dtype=dtype), torch.randn(2, width, dtype=dtype), torch.randn(width, dtype=dtype)
    gm = aten_graph(fn, x, r, w)
    [m] = norms_in(gm)
    res = match_residual_add(m.x)
    assert res is not None and {res.a.name, res.b.name} == {"arg0_1", "arg1_1"}


def test_nn_rmsnorm_module_eps_is_read_from_the_graph():
    mod = torch.nn.RMSNorm(64, eps=1e-5)
    gm = aten_graph(mod, torch.randn(2, 64))
    [m] = norms_in(gm)
    assert isinstance(m, NormMatch)
    assert abs(m.stage.eps - 1e-5) < 1e-10


def test_no_weight_norm():
    gm = aten_graph(lambda x: torch.nn.functional.rms_norm(x, (32,), None, 1e-6), torch.randn(2, 32))
    [m] = norms_in(gm)
    assert isinstance(m, NormMatch) and m.weight is None


def test_variance_of_one_tensor_normalizing_another_is_a_miss():
    def fn(x, y):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return y.float() * torch.rsqrt(v + 1e-6)

    gm = aten_graph(fn, torch.randn(2, 32), torch.randn(2, 32))
    [m] = norms_in(gm)
    assert isinstance(m, Miss) and "same tensor" in m.reason


def test_two_eps_reading_the_same_variance_is_a_miss():
    def fn(x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(v + 1e-6), x * torch.rsqrt(v + 1e-5)

    gm = aten_graph(fn, torch.randn(2, 32))
    [m] = norms_in(gm)
    assert isinstance(m, Miss) and "read by 2 ops" in m.reason


def test_reduction_over_another_dim_is_a_miss():
    def fn(x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)

    gm = aten_graph(fn, torch.randn(4, 32))
    [m] = norms_in(gm)
    assert isinstance(m, Miss) and "not the last dim" in m.reason


def test_escaping_intermediate_is_a_miss_that_names_the_user():
    def fn(x, w):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * (h * rstd).to(x.dtype), rstd

    gm = aten_graph(fn, torch.randn(2, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16))
    [m] = norms_in(gm)
    assert isinstance(m, Miss) and "intermediate `rsqrt`" in m.reason and "output" in m.reason


def test_weight_of_the_wrong_shape_is_not_taken_as_the_norm_weight():
    def fn(x, w):
        return NORMS["hf"](x, w, 1e-6)

    gm = aten_graph(fn, torch.randn(4, 32), torch.randn(4, 32))  # a [T, D] tensor, not a [D] weight
    [m] = norms_in(gm)
    assert isinstance(m, NormMatch) and m.weight is None


def test_a_plain_mean_is_not_a_candidate():
    gm = aten_graph(lambda x: x.mean(-1, keepdim=True), torch.randn(2, 8))
    [m] = norms_in(gm)
    assert isinstance(m, Miss) and not m.candidate

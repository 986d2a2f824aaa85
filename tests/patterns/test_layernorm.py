"""The LayerNorm recognizer: F.layer_norm / nn.LayerNorm with weight and bias, wildcard eps and width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from braze.patterns.fx import Miss, aten, is_op
from braze.patterns.layernorm import LayerNormMatch, layernorm_reference, match_layernorm
from braze.testing import aten_graph


def lns(gm) -> list:
    return [match_layernorm(n) for n in gm.graph.nodes if is_op(n, aten.var_mean)]


@given(width=st.sampled_from([1, 3, 41, 128, 257]), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       eps=st.sampled_from([1e-6, 1e-5]), upcast=st.booleans(), affine=st.sampled_from(["both", "weight", "none"]),
       seed=st.integers(0, 99))
def test_layer_norm_spellings(width, dtype, eps, upcast, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, width, generator=gen).to(dtype)
    w = torch.randn(width, generator=gen).to(dtype)
    b = torch.randn(width, generator=gen).to(dtype)

    def fn(x, w, b):
        ww = (w.float() if upcast else w) if affine != "none" else None
        bb = (b.float() if upcast else b) if affine == "both" else None
        xx = x.float() if upcast else x
        return F.layer_norm(xx, (width,), ww, bb, eps).to(x.dtype)

    gm = aten_graph(fn, x, w, b)
    [m] = lns(gm)
    assert isinstance(m, LayerNormMatch), m
    assert m.stage.width == width and abs(m.stage.eps - eps) <= eps * 1e-6
    assert (m.weight is not None) == (affine != "none") and (m.bias is not None) == (affine == "both")
    ref = layernorm_reference(x, w if m.weight is not None else None, b if m.bias is not None else None, m.stage)
    torch.testing.assert_close(ref.to(dtype), fn(x, w, b), rtol=2 ** -7 if dtype != torch.float32 else 1e-5,
                               atol=1e-5)


def test_escaping_mean_is_a_miss():
    def fn(x):
        var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + 1e-6), mean

    [m] = lns(aten_graph(fn, torch.randn(2, 16)))
    assert isinstance(m, Miss)


def test_unbiased_variance_is_not_a_layer_norm():
    def fn(x):
        var, mean = torch.var_mean(x, -1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-6)

    [m] = lns(aten_graph(fn, torch.randn(2, 16)))
    assert isinstance(m, Miss) and not m.candidate

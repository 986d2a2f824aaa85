"""Gated RMSNorm fusion on FX graphs: (x̂·w)·silu(z) [-> FP8 quant] fuses at any width, near misses say why."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.models.fp8 import quant_fp8_group
from braze.models.gated_deltanet import RMSNormGated
from braze.testing import aten_graph, fused_ops, run_passes

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def gated(width: int, dtype: torch.dtype, seed: int = 0) -> RMSNormGated:
    norm = RMSNormGated(width, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    return norm


def remarks(record, kind: str, pass_name: str = "gated-norm"):
    return [r for r in record.remarks if r.kind == kind and r.pass_name == pass_name]


@settings(max_examples=8)
@given(t=st.sampled_from([1, 3]), heads=st.sampled_from([1, 3, 4]), width=st.sampled_from([8, 41, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 50))
def test_gated_norm_fuses_at_any_width_and_equals_eager(t, heads, width, dtype, seed):
    norm = gated(width, dtype, seed)

    def f(o, z):  # o: the recurrent update's fp32 output; z: a strided slice of the input projection
        return norm(o.to(dtype), z.view(t, heads, width)).reshape(t, heads * width)

    g = torch.Generator().manual_seed(seed)
    args = [torch.randn(t, heads, width, generator=g), torch.randn(t, heads * width + 5, generator=g).to(dtype)[:, 5:]]
    with torch.no_grad():
        gm = aten_graph(f, *args)
        record = run_passes(gm)
        torch.testing.assert_close(gm(*args), f(*args), rtol=TOL[dtype], atol=TOL[dtype])
    (r,) = remarks(record, "applied")
    assert r.ops == ("rmsnorm", "silu_gate") and dict(r.args)["width"] == width
    assert fused_ops(gm) == ["braze.fused_rowwise_cpu.default"]


def test_gated_norm_and_the_fp8_quant_of_the_next_linear_fuse_when_groups_are_rows():
    norm = gated(128, torch.bfloat16)

    def f(o, z):
        return quant_fp8_group(norm(o.to(torch.bfloat16), z.view(2, 3, 128)).reshape(2, 384), 128)

    g = torch.Generator().manual_seed(1)
    args = [torch.randn(2, 3, 128, generator=g), torch.randn(2, 384, generator=g).to(torch.bfloat16)]
    with torch.no_grad():
        gm = aten_graph(f, *args)
        record = run_passes(gm)
        (q, s), (q_ref, s_ref) = gm(*args), f(*args)
    assert [r.ops for r in remarks(record, "applied")] == [("rmsnorm", "silu_gate", "fp8_quant")]
    assert not [r for r in record.remarks if r.kind == "missed"]
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.07, atol=0)  # within one fp8 step
    assert (q.float() != q_ref.float()).float().mean() < 0.01


def test_quant_groups_across_rows_stay_with_inductor_and_the_gated_norm_still_fuses():
    norm = gated(64, torch.bfloat16)

    def f(o, z):
        return quant_fp8_group(norm(o.to(torch.bfloat16), z.view(2, 4, 64)).reshape(2, 256), 128)

    args = [torch.randn(2, 4, 64), torch.randn(2, 256).to(torch.bfloat16)]
    with torch.no_grad():
        gm = aten_graph(f, *args)
        record = run_passes(gm)
        (q, s), (q_ref, s_ref) = gm(*args), f(*args)
    torch.testing.assert_close(s, s_ref)
    assert (q.float() != q_ref.float()).float().mean() < 0.01
    (miss,) = remarks(record, "missed")
    assert miss.name == "quant-layout" and "groups of 128 values across rows of 64" in miss.reason
    assert [r.ops for r in remarks(record, "applied")] == [("rmsnorm", "silu_gate")]


def test_gate_read_elsewhere_is_a_near_miss_and_a_bf16_silu_fuses():
    norm = gated(32, torch.bfloat16)

    def x_hat(o):
        xf = o.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(o.dtype)

    def escapes(o, z):
        s = F.silu(z.float())
        return ((norm.weight * x_hat(o)) * s).to(o.dtype) + s.sum()  # silu(z) is read outside the gate too

    def bf16_silu(o, z):
        return (norm.weight * x_hat(o)) * F.silu(z)  # silu of bf16: computed in fp32, rounded to bf16

    args = [torch.randn(3, 32).to(torch.bfloat16), torch.randn(3, 32).to(torch.bfloat16)]
    with torch.no_grad():
        gm = aten_graph(escapes, *args)
        record = run_passes(gm)
        torch.testing.assert_close(gm(*args), escapes(*args))
        (miss,) = remarks(record, "missed")
        assert miss.name == "gate-not-fused" and "also read by" in miss.reason
        assert not fused_ops(gm)
        gm = aten_graph(bf16_silu, *args)
        record = run_passes(gm)
        torch.testing.assert_close(gm(*args), bf16_silu(*args), rtol=0, atol=0)
    (r,) = remarks(record, "applied")
    assert r.ops == ("rmsnorm", "silu_gate")

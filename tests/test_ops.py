"""braze.ops: the hand-callable fused ops check their inputs and match their references."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import braze.ops as ops


@given(width=st.sampled_from([3, 41, 256, 384]), rows=st.sampled_from([1, 5]), residual=st.booleans(),
       zero_centered=st.booleans(), fmt=st.sampled_from(["fp32", "ue8m0"]), grouped=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
def test_rmsnorm_quant_matches_reference(width, rows, residual, zero_centered, fmt, grouped, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen).to(device, dtype)
    r = torch.randn(rows, width, generator=gen).to(device, dtype) if residual else None
    w = torch.randn(width, generator=gen).to(device, dtype)
    group = 128 if grouped and width % 128 == 0 else None
    kw = dict(residual=r, zero_centered=zero_centered, group_size=group, scale_format=fmt, return_normed=True)
    out = ops.rmsnorm_quant(x, w, 1e-6, **kw)
    ref = ops.rmsnorm_quant_reference(x.cpu(), w.cpu(), 1e-6, **{**kw, "residual": r.cpu() if residual else None})
    g = group or width
    dq = out.q.float().cpu().reshape(rows, -1, g) * out.scale.cpu().reshape(rows, -1, 1)
    dq_ref = ref.q.float().reshape(rows, -1, g) * ref.scale.reshape(rows, -1, 1)
    torch.testing.assert_close(dq, dq_ref, rtol=0.13, atol=1e-3)
    torch.testing.assert_close(out.normed.cpu().float(), ref.normed.float(), rtol=2 ** -7, atol=1e-5)
    if residual:
        assert torch.equal(out.residual.cpu(), ref.residual)


def test_rmsnorm_with_residual(device):
    x, r, w = (torch.randn(4, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = ops.rmsnorm(x, w[0], 1e-5, residual=r)
    ref = ops.rmsnorm_reference(x.cpu(), w[0].cpu(), 1e-5, residual=r.cpu())
    torch.testing.assert_close(out.normed.cpu(), ref.normed, rtol=2 ** -7, atol=1e-5)
    assert torch.equal(out.residual.cpu(), (x + r).cpu())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.rmsnorm_quant(torch.randn(2, 8, dtype=torch.float64), None), "x: expected a float32/bfloat16/float16 tensor [..., D], got torch.float64"),
        (lambda: ops.rmsnorm_quant(torch.randn(2, 8), torch.randn(4)), "weight: expected shape [8] to match x's last dim, got (4,)"),
        (lambda: ops.rmsnorm_quant(torch.randn(8, 2).t(), None), "x: expected unit stride in the last dim, got strides (1, 2); pass x.contiguous()"),
        (lambda: ops.rmsnorm_quant(torch.randn(2, 8), None, residual=torch.randn(2, 8, dtype=torch.bfloat16)), "residual: expected (2, 8) torch.float32 on cpu like x, got (2, 8) torch.bfloat16 on cpu"),
        (lambda: ops.rmsnorm_quant(torch.randn(2, 8), None, group_size=3), "group_size: expected a positive divisor of the width 8, got 3"),
        (lambda: ops.rmsnorm_quant(torch.randn(2, 8), None, scale_format="e8"), "scale_format: expected one of ('fp32', 'ue8m0'), got 'e8'"),
        (lambda: ops.rmsnorm_quant(torch.randn(2, 8), None, eps=-1.0), "eps: expected a float >= 0, got -1.0"),
    ],
)
def test_bad_inputs_say_what_was_expected(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_allreduce_rmsnorm_matches_reference_on_one_rank():
    from braze.testing import single_rank_group

    with single_rank_group() as group:
        x, r = torch.randn(3, 41).bfloat16(), torch.randn(3, 41).bfloat16()
        w = torch.randn(41)  # an fp32 weight for bf16 rows
        out = ops.allreduce_rmsnorm(x, w, 1e-5, group=group, residual=r, zero_centered=True)
        ref = ops.allreduce_rmsnorm_reference(x, w, 1e-5, group=group, residual=r, zero_centered=True)
        assert torch.equal(out.residual, ref.residual) and torch.equal(out.residual, x + r)
        torch.testing.assert_close(out.normed.float(), ref.normed.float(), rtol=2 ** -8, atol=0)


def test_topk_matches_reference_and_rejects_what_it_cannot_sort(device):
    x = torch.randn(3, 5, 300, device=device)
    for largest in (True, False):
        got, want = ops.topk(x, 17, largest), ops.topk_reference(x, 17, largest)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="expected 0 < k <= n <= 4096"):
        ops.topk(x, 301)
    with pytest.raises(ValueError, match="expected rows"):
        ops.topk(x.double(), 3)

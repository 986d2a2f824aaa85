"""A quant scale times per-(token, head) weights, stored by the chain in place of the scale
(braze/patterns/scale_product.py, the head-chain pass): DeepSeek V3.2's indexer `w' = w·s_h·c`.

The variants that must fold (constants before or after the product, either operand order) and those
that must not (the scale read elsewhere, weights that broadcast instead of one per head, weights
computed from the chain's own values), each compared with eager on fresh inputs.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze import FusionConfig
from braze.models.common import apply_rope
from braze.models.fp8 import quant_fp8_group
from braze.testing import aten_graph, run_passes

FOLD = ("weights-first", "scale-first", "constant-after")
KEEP = ("scale-shared", "per-token", "per-dim", "dependent")


def make_fn(variant: str, heads: int, dim: int, pow2: bool):
    """q [T, H, dim] -> NeoX RoPE on 64 dims -> fp8 per head; the head weights from a strided slice of
    a projection, times the scale as `variant` says. Returns (q8, weights', ...)."""
    c = dim ** -0.5 * heads ** -0.5

    def fn(q, cos_t, sin_t, pos, proj):
        q = apply_rope(q, cos_t[pos], sin_t[pos], style="neox")  # [T, H, dim]
        q8, s = quant_fp8_group(q, dim, ue8m0=pow2)  # [T, H, dim], [T, H, 1]
        w = proj[:, 1:1 + heads].float() * c  # [T, H]
        s = s.squeeze(-1)  # [T, H]
        if variant == "weights-first":
            return q8, w * s
        if variant == "scale-first":
            return q8, s * w
        if variant == "constant-after":
            return q8, (proj[:, 1:1 + heads].float() * s) * c
        if variant == "scale-shared":
            return q8, w * s, s + 1
        if variant == "per-token":  # one weight per token, broadcast over the heads
            return q8, proj[:, :1].float() * s
        if variant == "per-dim":  # [T, H, dim]: not one value per head
            return q8, proj[:, :heads * dim].view(-1, heads, dim).float() * s[..., None]
        if variant == "dependent":  # weights from the rotated values themselves
            return q8, q.float().abs().amax(-1) * s
        raise ValueError(variant)

    return fn


def run_case(variant, heads, dim, pow2, t, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(t, heads, dim, generator=gen)).to(torch.bfloat16)
    cos_t, sin_t = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    pos = torch.randint(0, 16, (t,), generator=gen)
    proj = torch.randn(t, heads * dim + 1, generator=gen).to(torch.bfloat16)
    fn = make_fn(variant, heads, dim, pow2)
    args = (q, cos_t, sin_t, pos, proj)
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    return record, gm(*args), fn(*args)


def assert_product_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 rounding, or by a factor of 2 where one ulp of the rotated value moved amax
    across a power of two (the scale's own tolerance in tests/codegen/test_heads.py)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    ratio = got / want.where(want != 0, torch.ones_like(want))
    ok = ((ratio - 1).abs() <= 2 ** -7) | (ratio == 2) | (ratio == 0.5) | ((got == 0) & (want == 0))
    assert bool(ok.all()), ratio


@settings(max_examples=6)  # each example generates (and interprets) a new kernel
@given(variant=st.sampled_from(FOLD), heads=st.sampled_from([1, 3, 4]), dim=st.sampled_from([64, 128]),
       pow2=st.booleans(), t=st.sampled_from([1, 3]), seed=st.integers(0, 999))
def test_scale_times_head_weights_is_stored_by_the_chain(variant, heads, dim, pow2, t, seed):
    record, got, want = run_case(variant, heads, dim, pow2, t, seed)
    applied = [r for r in record.remarks if r.kind == "applied" and r.pass_name == "head-chain"]
    assert [r.ops for r in applied] == [("rope", "fp8_quant", "scale_mul")], [str(r) for r in record.remarks]
    assert not [r for r in record.remarks if r.kind == "missed"]
    assert_product_close(got[1], want[1])
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0.13, atol=1.0)  # fp8 steps


@given(variant=st.sampled_from(KEEP), heads=st.sampled_from([2, 3]), pow2=st.booleans(), seed=st.integers(0, 999))
def test_products_the_chain_must_not_take_stay_with_inductor(variant, heads, pow2, seed):
    record, got, want = run_case(variant, heads, 64, pow2, 3, seed)
    applied = [r.ops for r in record.remarks if r.kind == "applied" and r.pass_name == "head-chain"]
    assert applied == [("rope", "fp8_quant")], [str(r) for r in record.remarks]
    missed = {r.name: r for r in record.remarks if r.kind == "missed"}
    expected = {"scale-shared": "scale-product-shared", "per-token": "scale-product-shape",
                "per-dim": "scale-product-shape", "dependent": "scale-product-dependent"}[variant]
    assert expected in missed, [str(r) for r in record.remarks]
    assert missed[expected].reason and missed[expected].suggestion
    for g, w in zip(got[1:], want[1:]):  # the scale, as the chain stores it, times the weights in Inductor
        assert_product_close(g, w)


def test_remark_text():
    record, _, _ = run_case("per-token", 4, 64, True, 2, 0)
    (miss,) = [r for r in record.remarks if r.name == "scale-product-shape"]
    assert miss.reason == ("the scale of each head multiplies a tensor of shape (2, 1) into (2, 4); braze folds a "
                           "[tokens, heads] = [2, 4] tensor, one value per token and head")
    assert miss.suggestion == "give the head weights as [tokens, heads]"

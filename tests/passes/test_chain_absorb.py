"""A per-head product against a weight (MLA's absorbed W_UK: `einsum("thd,hdc->thc", q_nope, w_uk)`, a bmm) inside a
head-chain launch (HeadAbsorb): taken only where it shares a launch with another chain, over the same rows."""

from __future__ import annotations

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from braze import FusionConfig
from braze.models.common import apply_rope
from braze.testing import aten_graph, run_passes

BF16 = torch.bfloat16
ANY_T = FusionConfig(token_ranges={"chain_absorb": (1, None)})  # the kernel at any token count (default [1, 2])


def mla_q(x, wq, wkv, cos, sin, *, heads, nope, pe, c, computed=False, rotate=True, pe_fp32=False):
    """q = x Wqᵀ as [T, H, nope + pe]; q_nope times W_UK (a view of a [H·(nope + v), C] weight), q_pe rotated."""
    t = x.shape[0]
    q = (x @ wq.t()).view(t, heads, nope + pe)
    q_nope, q_pe = q.split([nope, pe], dim=-1)
    w = wkv * 2 if computed else wkv
    w_uk = w.view(heads, 2 * nope, c)[:, :nope]  # [H, nope, C]: W_UK of kv_b's weight (W_UV the other half)
    ql = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    if pe_fp32:  # q_pe rotated in fp32 (its reader upcasts): the launch's other output differs in dtype
        q_pe = q_pe.float()
    return (ql, apply_rope(q_pe, cos, sin, style="gptj")) if rotate else (ql, q_pe * 2)


def case(t, heads, nope, c, seed, config=None, **kw):
    pe = 16
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(t, 64, generator=g).to(BF16), (torch.randn(heads * (nope + pe), 64, generator=g) / 8).to(BF16),
            (torch.randn(heads * 2 * nope, c, generator=g) / 4).to(BF16), torch.randn(t, pe // 2, generator=g),
            torch.randn(t, pe // 2, generator=g))

    def fn(*a):
        return mla_q(*a, heads=heads, nope=nope, pe=pe, c=c, **kw)

    gm = aten_graph(fn, *args)
    record = run_passes(gm, config or FusionConfig())
    gm.graph.lint()
    for got, want in zip(gm(*args), fn(*args)):  # fp32 sums rounded once to bf16, like the bmm: an ulp or two
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2e-2)
    return record, gm


def chains(record):
    return {r.ops: dict(r.args) for r in record.remarks if r.kind == "applied" and r.pass_name == "head-chain"}


def bmms(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.bmm.default]


@settings(max_examples=6, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # ~2 s an example
@given(t=st.sampled_from([1, 3]), heads=st.sampled_from([1, 3, 4]), nope=st.sampled_from([16, 24, 32]),
       c=st.sampled_from([20, 40, 64]), pe_fp32=st.booleans(), seed=st.integers(0, 999))
def test_absorbed_weight_joins_the_rope_launch(t, heads, nope, c, pe_fp32, seed):
    record, gm = case(t, heads, nope, c, seed, ANY_T, pe_fp32=pe_fp32)
    got = chains(record)
    assert set(got) == {("absorb",), ("rope",)} and got[("absorb",)]["launch"] == got[("rope",)]["launch"]
    assert got[("absorb",)]["in_dim"] == nope and got[("absorb",)]["head_dim"] == c
    assert not bmms(gm) and record.stats["head-chain"]["launches"] == 1


def test_a_product_with_no_launch_to_join_or_a_computed_weight_stays_a_bmm():
    for kw in ({"rotate": False}, {"computed": True}):
        record, gm = case(3, 2, 16, 40, 0, ANY_T, **kw)
        assert ("absorb",) not in chains(record) and len(bmms(gm)) == 1, kw
        # nothing the site prepared is left behind
        assert not [n for n in gm.graph.nodes if n.op == "call_function" and not n.users], kw


def test_past_its_token_range_or_switched_off_the_product_stays_a_bmm():
    record, gm = case(3, 2, 16, 40, 0)  # the default range is [1, 2]
    assert ("absorb",) not in chains(record) and ("rope",) in chains(record) and len(bmms(gm)) == 1
    (miss,) = [r for r in record.remarks if r.kind == "missed" and r.name == "absorb-tokens"]
    assert "3 tokens is outside the configured range [1, 2]" in miss.reason and "chain_absorb" in miss.reason
    record, gm = case(3, 2, 16, 40, 0, FusionConfig(token_ranges={"chain_absorb": (1, None)}))
    assert ("absorb",) in chains(record) and not bmms(gm)
    record, gm = case(1, 2, 16, 40, 0, FusionConfig(chain_absorb=False))
    assert ("absorb",) not in chains(record) and len(bmms(gm)) == 1
    assert not [r for r in record.remarks if "absorb" in r.name]

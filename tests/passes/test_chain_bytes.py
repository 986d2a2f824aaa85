"""Packed byte caches written by the chains themselves (braze/passes/chain_bytes.py, patterns/packed.py).

Rows as DeepSeek V3.2 builds them: the bytes of a norm -> fp8 quant's values and scales beside the bf16
bytes of a RoPE, one row per slot or paged runs written with (slot // B, slot % B). Caches are poisoned
with random bytes: every byte outside the written fields must keep its poison.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from braze import FusionConfig
from braze.models.common import apply_rope
from braze.models.fp8 import quant_fp8_group, to_bytes
from braze.testing import aten_graph, fused_ops, run_passes


def rms(x, w, eps=1e-6):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def make_prologue(width: int, group: int, norm: bool, pow2: bool, style: str, paged: int, extra: str = "none"):
    """kv [T, width] -> [RMSNorm ->] fp8 in groups -> bytes, and pe [T, 64] -> RoPE -> bf16 bytes, into `cache`.

    paged 0: cache [N, row] rows at slots. paged B: cache [pages, B * (width + 4 * width / group + 128)], the
    page's fp8 values of all B slots, then their scales, then their rope bytes (column slices).
    extra: "raw" puts the raw bytes of kv itself into the row (no chain computes them);
    "escape" also returns the fp8 bytes (an image with another reader)."""

    def fn(kv, w, pe, cos_t, sin_t, pos, cache, slots):
        t = kv.shape[0]
        h = rms(kv, w) if norm else kv
        q8, scale = quant_fp8_group(h, group, ue8m0=pow2)  # [T, width] fp8, [T, width / group] fp32
        rope = apply_rope(pe, cos_t[pos], sin_t[pos], style=style)  # [T, 64]
        pieces = [to_bytes(q8), to_bytes(scale), to_bytes(rope.to(torch.bfloat16))]
        if extra == "raw":
            pieces[2] = to_bytes(kv[:, :64].to(torch.bfloat16))
        if not paged:
            cache.view(-1, cache.shape[-1])[slots] = torch.cat(pieces, dim=-1)
        else:
            blk, off = slots // paged, slots % paged
            start = 0
            for p in pieces:
                n = p.shape[-1]
                cache[:, start * paged:(start + n) * paged].view(cache.shape[0], paged, n)[blk, off] = p
                start += n
        out = (cache.sum(dtype=torch.int64),)
        return out + (pieces[0],) if extra == "escape" else out

    return fn


def run_case(width, group, norm, pow2, style, paged, t, seed, extra="none"):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    kv = (3 * torch.randn(t, width, generator=gen)).to(dt)
    w = (1 + 0.3 * torch.randn(width, generator=gen)).to(dt)
    pe = torch.randn(t, 64, generator=gen).to(dt)
    cos_t, sin_t = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    pos = torch.randint(0, 16, (t,), generator=gen)
    row = width + 4 * (width // group) + 128
    n_slots = 12
    shape = (n_slots // paged, paged * row) if paged else (n_slots // 2, 2, row)
    cache = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    slots = torch.randperm(n_slots, generator=gen)[:t]
    fn = make_prologue(width, group, norm, pow2, style, paged, extra)
    args = (kv, w, pe, cos_t, sin_t, pos, cache, slots)
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    got, want = cache.clone(), cache.clone()
    out_got = gm(kv, w, pe, cos_t, sin_t, pos, got, slots)
    out_want = fn(kv, w, pe, cos_t, sin_t, pos, want, slots)
    return record, gm, got, want, out_got, out_want


@given(width=st.sampled_from([128, 512]), group=st.sampled_from([64, 128]), norm=st.booleans(), pow2=st.booleans(),
       style=st.sampled_from(["neox", "gptj"]), paged=st.sampled_from([0, 2, 4]), t=st.sampled_from([1, 3]),
       seed=st.integers(0, 999))
def test_packed_rows_are_written_by_the_chains_in_one_launch(width, group, norm, pow2, style, paged, t, seed):
    record, gm, got, want, _, _ = run_case(width, group, norm, pow2, style, paged, t, seed)
    applied = [r for r in record.remarks if r.kind == "applied"]
    assert sorted(r.ops for r in applied) == sorted([(("rmsnorm",) if norm else ()) + ("fp8_quant", "store"),
                                                     ("rope", "store")]), [str(r) for r in record.remarks]
    assert len({dict(r.args)["launch"] for r in applied}) == 1  # one launch writes the whole row
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.aten.index_put.default,
                                                          torch.ops.aten.slice_scatter.default)]
    # the same bytes as eager: the kernel's fp8 rounding may differ from eager's by one step on a value
    # whose scaled magnitude is at a tie (rare), nothing else may differ
    differ = got != want
    assert differ.float().mean() < 2e-3, int(differ.sum())


def test_a_piece_no_chain_computes_leaves_the_row_to_inductor():
    record, gm, got, want, _, _ = run_case(512, 128, True, False, "gptj", 0, 3, 0, extra="raw")
    missed = [r for r in record.remarks if r.name == "packed-row-partial"]
    assert missed and "no fused chain computes" in missed[0].reason
    assert torch.equal(got, want)


def test_bytes_read_elsewhere_are_not_claimed():
    record, gm, got, want, out_got, out_want = run_case(128, 64, True, True, "neox", 2, 3, 1, extra="escape")
    assert all("fp8_quant" not in r.ops or "store" not in r.ops for r in record.remarks if r.kind == "applied")
    assert torch.equal(got, want) and torch.equal(out_got[1], out_want[1])


def test_pages_indexed_with_another_block_size_stay_with_inductor():
    def fn(x, cache, slots):  # pages of 4 slots, indexed as if they held 8: not a paged write braze knows
        q8, scale = quant_fp8_group(x, 64)
        cache.view(3, 4, 64)[slots // 8, slots % 4] = to_bytes(q8)
        return cache.sum(dtype=torch.int64)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=gen)
    cache = torch.randint(0, 256, (3, 256), generator=gen, dtype=torch.int64).to(torch.uint8)
    slots = torch.tensor([5, 2])
    gm = aten_graph(fn, x, cache, slots)
    run_passes(gm, FusionConfig(norm_quant=False))
    assert not fused_ops(gm)
    got, want = cache.clone(), cache.clone()
    gm(x, got, slots)
    fn(x, want, slots)
    assert torch.equal(got, want)

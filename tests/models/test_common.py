"""Tests of braze/models/common.py and fp8.py against small independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from braze.models.common import (
    FP8_BLOCK, FP8_BLOCK_UE8M0, FP8_CHANNEL, MoE, PageTable, ReplicatedLinear, RMSNorm, RouterSpec,
    apply_rope, context_mask, gather_pages, load_full_state_dict, paged_attention, quant_fp8_group,
    quant_fp8_per_token, quant_weight_fp8, random_full_state_dict, rope_inv_freq, route, shard, shard_fp8, write_slots,
    local_size, mark,
    yarn_inv_freq, dequant_weight_fp8,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_quant_per_token_roundtrip():
    x = torch.randn(7, 300, generator=gen()) * torch.logspace(-3, 2, 7)[:, None]
    q, s = quant_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 1)
    assert torch.allclose(q.float().abs().amax(-1), torch.full((7,), 448.0))  # the scale maps amax to 448
    rel = ((q.float() * s - x).abs().amax(-1) / x.abs().amax(-1))
    assert rel.max() < 2 ** -3  # e4m3 has 3 mantissa bits


def test_quant_group_ue8m0_scales_are_powers_of_two():
    x = torch.randn(5, 4 * 128, generator=gen(1)) * 3
    q, s = quant_fp8_group(x, 128, ue8m0=True)
    assert s.shape == (5, 4)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    amax = x.view(5, 4, 128).abs().amax(-1)
    assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()  # smallest power of two that fits
    back = (q.float().view(5, 4, 128) * s[..., None]).view(5, -1)
    assert (back - x).abs().max() <= (s.max() * 32)  # within one e4m3 step at the top of the range


@pytest.mark.parametrize("scheme", [FP8_CHANNEL, FP8_BLOCK, FP8_BLOCK_UE8M0], ids=["channel", "block", "ue8m0"])
def test_fp8_linear_close_to_full_precision(scheme):
    w = torch.randn(320, 256, generator=gen(2)) * 0.02  # 320 rows: a ragged last weight block
    x = torch.randn(9, 256, generator=gen(3))
    lin = ReplicatedLinear(256, 320, fp8=scheme, dtype=torch.float32)
    lin.load_full("weight", w, rank=0, size=1)
    ref = x @ w.t()
    err = (lin(x) - ref).norm() / ref.norm()
    assert err < 0.08, f"relative error {err:.3f}"
    if lin.use_scaled_mm:  # the dequantized fallback is the same math as torch._scaled_mm
        y = lin(x)
        lin.use_scaled_mm = False
        assert torch.allclose(lin(x), y, atol=1e-5)


@pytest.mark.parametrize("scheme", [FP8_CHANNEL, FP8_BLOCK], ids=["channel", "block"])
@pytest.mark.parametrize("dim,parts", [(0, (256, 512)), (1, None)], ids=["column", "row"])
def test_fp8_shards_are_slices_of_the_whole_quantized_weight(scheme, dim, parts):
    w = torch.randn(768, 512, generator=gen(12))
    q, s = quant_weight_fp8(w, scheme)
    whole = dequant_weight_fp8(q, s, scheme)
    for rank in range(2):
        qr, sr = shard_fp8(q, s, scheme, dim, parts, rank, 2)
        assert torch.equal(dequant_weight_fp8(qr, sr, scheme), shard(whole, dim, parts, rank, 2))
    if scheme.block:
        with pytest.raises(ValueError, match="whole 128-blocks"):
            shard_fp8(q, s, scheme, 0, (128, 640), 0, 2)


def test_rmsnorm_plain_and_zero_centered():
    x = torch.randn(4, 64, generator=gen(4), dtype=torch.bfloat16)
    w = torch.randn(64, generator=gen(5)) * 0.1
    xhat = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    plain = RMSNorm(64, dtype=torch.bfloat16)
    plain.weight.copy_(1 + w)
    assert torch.equal(plain(x), (1 + w).to(torch.bfloat16) * xhat.to(torch.bfloat16))
    zc = RMSNorm(64, zero_centered=True, dtype=torch.float32)
    zc.weight.copy_(w)
    assert torch.allclose(zc(x), (xhat * (1 + w)).to(torch.bfloat16))


def test_rope_styles_agree_up_to_pair_layout():
    # GPT-J rotates pairs (2i, 2i+1); NeoX rotates (i, i + r/2). On a de-interleaved input they agree.
    r, d = 16, 40
    x = torch.randn(3, 2, d, generator=gen(6))
    pos = torch.tensor([0, 3, 100])
    freqs = torch.outer(pos.float(), rope_inv_freq(r, 1e4))
    cos, sin = freqs.cos(), freqs.sin()
    perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])  # interleaved -> halves
    for first in (True, False):
        sl = slice(0, r) if first else slice(d - r, d)
        gptj = apply_rope(x, cos, sin, style="gptj", first=first)
        xn = x.clone()
        xn[..., sl] = x[..., sl][..., perm]
        neox = apply_rope(xn, cos, sin, style="neox", first=first)
        assert torch.allclose(gptj[..., sl][..., perm], neox[..., sl], atol=1e-6)
        rest = slice(r, d) if first else slice(0, d - r)
        assert torch.equal(gptj[..., rest], x[..., rest])
    assert torch.equal(apply_rope(x, cos[:1].expand(3, -1) * 0 + 1, sin * 0, style="neox"), x)  # position 0


def test_yarn_matches_transformers():
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="yarn", rope_theta=1e4, factor=40.0, original_max_position_embeddings=4096,
                beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    cfg = DeepseekV32Config(rope_parameters=rope, qk_rope_head_dim=64)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    assert attention_factor == 1.0
    assert torch.allclose(yarn_inv_freq(64, 1e4, 40.0, 4096, 32, 1), inv_freq, rtol=1e-6)


def brute_force_route(logits, spec, bias):
    # One token at a time, with Python sorting.
    out_w = []
    for row in logits.float():
        s = row.sigmoid() if spec.scoring == "sigmoid" else row.softmax(-1)
        c = s + bias if bias is not None else s
        g = c.view(spec.n_group, -1)
        keep = sorted(range(spec.n_group), key=lambda i: -g[i].topk(min(2, g.shape[1])).values.sum().item())
        allowed = [e for e in range(len(c)) if e // g.shape[1] in keep[: spec.topk_group]]
        chosen = sorted(allowed, key=lambda e: -c[e].item())[: spec.top_k]
        w = s[chosen]
        w = w / w.sum() if spec.renormalize else w
        out_w.append(dict(zip(chosen, (w * spec.routed_scaling).tolist())))
    return out_w


@pytest.mark.parametrize("spec", [
    RouterSpec(top_k=2, scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, routed_scaling=2.5),
    RouterSpec(top_k=3, scoring="sigmoid", correction_bias=True),
    RouterSpec(top_k=2, scoring="softmax"),
], ids=["deepseek", "minimax", "qwen"])
def test_route_matches_brute_force(spec):
    logits = torch.randn(11, 16, generator=gen(7))
    bias = torch.randn(16, generator=gen(8)) * 0.1 if spec.correction_bias else None
    w, idx = route(logits, spec, bias)
    for t, expect in enumerate(brute_force_route(logits, spec, bias)):
        got = dict(zip(idx[t].tolist(), w[t].tolist()))
        assert got.keys() == expect.keys()
        assert all(math.isclose(got[e], expect[e], rel_tol=1e-5) for e in got)


def test_moe_dense_equals_per_token_loop():
    spec = RouterSpec(top_k=2, scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, routed_scaling=2.5)
    moe = MoE(32, 8, 16, spec, shared_inter=16, shared_gate=True, dtype=torch.float32)
    load_full_state_dict(moe, random_full_state_dict(moe, gen(9), 1, "cpu", torch.float32, std=0.2))
    x = torch.randn(5, 32, generator=gen(10))
    w, idx = route(moe.gate(x), spec, moe.e_score_correction_bias)
    ref = torch.zeros_like(x)
    for t in range(5):
        for k in range(2):
            e = idx[t, k]
            g, u = (x[t] @ moe.experts.w13[e].t()).chunk(2)
            ref[t] += w[t, k] * (F.silu(g) * u) @ moe.experts.w2[e].t()
    ref += moe.shared_expert(x) * torch.sigmoid(moe.shared_expert_gate(x))
    assert torch.allclose(moe(x), ref, atol=1e-5)


def test_shard_merged_columns():
    full = torch.arange(12).view(12, 1)  # segments [0..3], [4..11]
    assert shard(full, 0, (4, 8), 1, 2).flatten().tolist() == [2, 3, 8, 9, 10, 11]
    assert shard(full, 0, None, 0, 3).flatten().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot shard"):
        shard(full, 0, (5, 7), 0, 2)


def test_shard_replicated_segments():
    # q segment of 4 rows split over 4 ranks; a kv segment of 2 heads (4 rows each) replicated 2x:
    # rank r holds kv head r // 2.
    full = torch.arange(12).view(12, 1)
    got = [shard(full, 0, (4, 8), r, 4, replicas=(1, 2)).flatten().tolist() for r in range(4)]
    assert got == [[0, 4, 5, 6, 7], [1, 4, 5, 6, 7], [2, 8, 9, 10, 11], [3, 8, 9, 10, 11]]
    assert local_size((4, 8), (1, 2), 4) == 5
    with pytest.raises(ValueError, match="cannot shard"):
        shard(full, 0, (4, 8), 0, 4, replicas=(1, 3))
    with pytest.raises(ValueError, match="does not split over TP=4"):
        local_size((4, 8), (1, 3), 4)
    with pytest.raises(ValueError, match="one entry per segment"):
        mark(torch.empty(12), dim=0, parts=(4, 8), replicas=(2,))


@pytest.mark.parametrize("scheme", [FP8_CHANNEL, FP8_BLOCK], ids=["channel", "block"])
def test_fp8_shards_of_replicated_segments_are_slices_of_the_whole_quantized_weight(scheme):
    w = torch.randn(1024, 256, generator=gen(13))
    q, s = quant_weight_fp8(w, scheme)
    whole = dequant_weight_fp8(q, s, scheme)
    for rank in range(4):
        qr, sr = shard_fp8(q, s, scheme, 0, (512, 256, 256), rank, 4, replicas=(1, 2, 2))
        assert qr.shape[0] == 128 + 2 * 128
        assert torch.equal(dequant_weight_fp8(qr, sr, scheme), shard(whole, 0, (512, 256, 256), rank, 4, (1, 2, 2)))


def test_write_slots_in_place_and_gather():
    pages = PageTable(max_batch=3, max_context=20, block_size=4)
    cache = torch.full((pages.num_blocks, 4, 2), -1.0)
    ptr = cache.data_ptr()
    batch = pages.prompt(2, torch.arange(6))
    rows = torch.arange(12, dtype=torch.float32).view(6, 2)
    write_slots(cache, batch.slot_mapping, rows)
    assert cache.data_ptr() == ptr
    assert (cache != -1).sum() == 12  # nothing else touched
    ctx = gather_pages(cache, batch.block_table)  # [6, 20, 2]
    assert torch.equal(ctx[0, :6], rows)
    assert context_mask(batch.seq_lens, 20).sum(-1).tolist() == [1, 2, 3, 4, 5, 6]
    step = pages.append([2, 0], torch.tensor([7, 8]))
    assert step.positions.tolist() == [6, 0] and step.seq_lens.tolist() == [7, 1]


def test_paged_attention_matches_dense_causal():
    pages = PageTable(max_batch=1, max_context=12, block_size=4)
    s, h, hkv, d = 9, 4, 2, 8
    q, k, v = (torch.randn(s, n, d, generator=gen(i)) for i, n in ((11, h), (12, hkv), (13, hkv)))
    kc = torch.zeros(pages.num_blocks, 4, hkv, d)
    vc = torch.zeros_like(kc)
    b = pages.prompt(0, torch.zeros(s, dtype=torch.long))
    write_slots(kc, b.slot_mapping, k)
    write_slots(vc, b.slot_mapping, v)
    got = paged_attention(q, kc, vc, b.block_table, b.seq_lens, 0.3)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                         v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True, scale=0.3)
    assert torch.allclose(got, ref.transpose(0, 1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_to_bytes_is_the_byte_view_and_from_bytes_inverts_it(dtype):
    from braze.models.common import from_bytes, to_bytes

    x = (torch.randn(4, 3, 6) * 50).to(dtype)
    x.view(torch.uint8)[0, 0, :4] = 0xFF  # NaN / negative bit patterns too
    assert torch.equal(to_bytes(x), x.view(torch.uint8))
    assert torch.equal(from_bytes(to_bytes(x), dtype).view(torch.uint8), x.view(torch.uint8))

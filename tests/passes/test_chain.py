"""Head-chain fusion on ATen graphs: random valid chains fuse and match eager, caches outside the slots untouched."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze import FusionConfig
from braze.models.common import apply_rope
from braze.testing import aten_graph, fused_ops, run_passes


def rms(x, w, eps, zero_centered):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = (1.0 + w.float()) if zero_centered else w.float()
    return (h * w).to(x.dtype)


def make_chain(heads, head_dim, norm, style, rotary, first, store, keep_out, quant="none"):
    from braze.models.fp8 import quant_fp8_group

    r = int(head_dim * rotary)

    def fn(x, w, cos_t, sin_t, pos, cache, slots):
        t = x.shape[0]
        h = x
        if norm == "row":
            h = rms(h, w, 1e-6, False)
        elif norm == "layernorm":  # over the row, weight and bias (the bias: the weight reversed)
            h = torch.nn.functional.layer_norm(h.float(), h.shape[-1:], w.float(), w.flip(0).float(), 1e-5).to(x.dtype)
        h = h.view(t, heads, head_dim)
        if norm in ("head", "head-zero-centered"):
            h = rms(h, w[:head_dim], 1e-6, norm == "head-zero-centered")
        y = apply_rope(h, cos_t[pos][:, : r // 2], sin_t[pos][:, : r // 2], style=style, first=first)
        outs = []
        if store:
            cache.view(-1, heads, head_dim)[slots] = y
        if quant != "none":
            group = head_dim // 2 if quant.startswith("half-") else head_dim  # groups within a head
            q8, scale = quant_fp8_group(y, group, ue8m0=quant.endswith("pow2"))
            outs += [q8.float() * scale.repeat_interleave(group, -1)]  # dequantized: [T, H, hd]
        if keep_out or not (store or quant != "none"):
            outs.append(y * 1)
        return tuple(outs) + (cache.sum(),) if store else tuple(outs)

    return fn


@given(heads=st.sampled_from([1, 3, 4]), head_dim=st.sampled_from([32, 64]),
       norm=st.sampled_from(["none", "row", "head", "head-zero-centered", "layernorm"]),
       style=st.sampled_from(["neox", "gptj"]), rotary=st.sampled_from([1.0, 0.5]), first=st.booleans(),
       end=st.sampled_from(["out", "store", "fp32-quant", "pow2-quant", "half-fp32-quant", "half-pow2-quant"]),
       keep=st.booleans(),
       t=st.sampled_from([1, 3]), seed=st.integers(0, 999))
def test_random_chains_fuse_and_match_eager(heads, head_dim, norm, style, rotary, first, end, keep, t, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    store = end == "store"
    quant = end.removesuffix("-quant") if end.endswith("-quant") else "none"
    x = torch.randn(t, heads * head_dim, generator=gen).to(dt)
    w = (1 + 0.3 * torch.randn(heads * head_dim, generator=gen)).to(dt)
    cos_t, sin_t = torch.randn(16, head_dim // 2, generator=gen), torch.randn(16, head_dim // 2, generator=gen)
    pos = torch.randint(0, 16, (t,), generator=gen)
    cache = torch.full((4, 2, heads, head_dim), float("nan"), dtype=dt)
    slots = torch.randperm(8, generator=gen)[:t]
    fn = make_chain(heads, head_dim, norm, style, rotary, first, store, keep, quant)
    args = (x, w, cos_t, sin_t, pos, cache, slots)
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    applied = [r for r in record.remarks if r.kind == "applied"]
    assert len(applied) == 1, [str(r) for r in record.remarks]
    expected = ([] if norm == "none" else ["layernorm"] if norm == "layernorm" else ["rmsnorm"]) + ["rope"] + (
        ["fp8_quant"] if quant != "none" else []) + (["store"] if store else [])
    assert list(applied[0].ops) == expected
    assert fused_ops(gm)
    c_fused, c_eager = cache.clone(), cache.clone()
    got = gm(x, w, cos_t, sin_t, pos, c_fused, slots)
    want = fn(x, w, cos_t, sin_t, pos, c_eager, slots)
    for a, b in zip(got, want):
        if a.dim() > 0:  # dequantized fp8 within one fp8 step (a 1-ulp bf16 input difference may move it)
            rtol = 0.13 if quant != "none" and a.dtype == torch.float32 else 2 ** -7
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=1e-2)
    assert torch.equal(c_fused.isnan(), c_eager.isnan())  # the same slots written, nothing else
    written = ~c_eager.isnan()
    torch.testing.assert_close(c_fused[written].float(), c_eager[written].float(), rtol=2 ** -7, atol=1e-5)


def test_norm_whose_output_escapes_stays_out_of_the_chain():
    def fn(x, w, cos, sin):
        h = rms(x.view(2, 2, 32), w, 1e-6, False)
        return apply_rope(h, cos, sin, style="neox"), h.sum()

    args = (torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16), torch.randn(2, 16),
            torch.randn(2, 16))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    [rm] = [r for r in record.remarks if r.kind == "applied"]
    assert rm.ops == ("rope",)
    got, want = gm(*args), fn(*args)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2 ** -7, atol=1e-5)


def test_accumulating_cache_write_is_missed_with_a_reason():
    def fn(x, cos, sin, cache, slots):
        y = apply_rope(x.view(2, 1, 32), cos, sin, style="neox")
        cache.view(-1, 1, 32).index_put_((slots,), y, accumulate=True)
        return y * 1

    args = (torch.randn(2, 32), torch.randn(2, 16), torch.randn(2, 16), torch.zeros(4, 1, 32), torch.tensor([0, 2]))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    missed = [r for r in record.remarks if r.kind == "missed"]
    assert [r.name for r in missed] == ["store-not-recognized"] and "accumulates" in missed[0].reason
    applied = [r for r in record.remarks if r.kind == "applied"]
    assert [r.ops for r in applied] == [("rope",)]  # the rotation still fuses; the write stays as it was
    c1, c2 = torch.zeros(4, 1, 32), torch.zeros(4, 1, 32)
    gm(*args[:3], c1, args[4])
    fn(*args[:3], c2, args[4])
    torch.testing.assert_close(c1, c2)


def test_chain_family_switch():
    fn = make_chain(2, 32, "head", "neox", 1.0, True, True, False)
    args = (torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16), torch.randn(16, 16),
            torch.randn(16, 16), torch.tensor([1, 2]), torch.zeros(2, 2, 2, 32, dtype=torch.bfloat16),
            torch.tensor([0, 1]))
    gm = aten_graph(fn, *args)
    assert run_passes(gm, FusionConfig(chain=False, norm_quant=False)).remarks == []
    assert not fused_ops(gm)


def qk_attention_prologue(x, wq, wk, cos_t, sin_t, pos, cache, slots):
    # [T, (Hq + Hkv) * D] -> per-head RMSNorm + RoPE of q and k; k goes to the cache (Qwen3 style)
    t = x.shape[0]
    q, k = x.split([4 * 32, 2 * 32], dim=-1)
    q = apply_rope(rms(q.view(t, 4, 32), wq, 1e-6, False), cos_t[pos], sin_t[pos])
    k = apply_rope(rms(k.reshape(t, 2, 32), wk, 1e-6, False), cos_t[pos], sin_t[pos])
    cache.view(-1, 2, 32)[slots] = k
    return q * 2, cache.view(-1, 2, 32)[slots].float().sum()


def test_q_and_k_chains_share_one_launch():
    gen = torch.Generator().manual_seed(3)
    dt = torch.bfloat16
    args = (torch.randn(3, 192, generator=gen).to(dt), torch.randn(32, generator=gen).to(dt),
            torch.randn(32, generator=gen).to(dt), torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen),
            torch.tensor([1, 4, 9]), torch.full((4, 2, 2, 32), float("nan"), dtype=dt), torch.tensor([0, 5, 6]))
    gm = aten_graph(qk_attention_prologue, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    applied = [r for r in record.remarks if r.kind == "applied"]
    assert sorted(r.ops for r in applied) == [("rmsnorm", "rope"), ("rmsnorm", "rope", "store")]
    assert all(dict(r.args)["group"] == 2 for r in applied)
    assert len(fused_ops(gm)) == 1 and record.stats["head-chain"]["launches"] == 1
    c1, c2 = args[6].clone(), args[6].clone()
    got = gm(*args[:6], c1, args[7])
    want = qk_attention_prologue(*args[:6], c2, args[7])
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2 ** -7, atol=1e-5)
    assert torch.equal(c1.isnan(), c2.isnan())
    torch.testing.assert_close(c1[~c2.isnan()].float(), c2[~c2.isnan()].float(), rtol=2 ** -7, atol=1e-5)


def test_a_chain_reading_another_chains_output_gets_its_own_launch():
    def fn(x, cos, sin):
        y = apply_rope(x.view(2, 1, 32), cos, sin)
        z = apply_rope(y * 1, cos, sin)
        return z * 1

    args = (torch.randn(2, 32), torch.randn(2, 16), torch.randn(2, 16))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert record.stats["head-chain"]["launches"] == 2
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-5, atol=1e-5)


def test_a_chain_reading_another_chains_output_through_a_matmul_gets_its_own_launch():
    # a matmul may move up so chains share a launch (DeepSeek's q_b projection), but never one that reads
    # the result of a chain in that launch
    def fn(x, w, cos, sin):
        y = apply_rope(x.view(2, 1, 32), cos, sin)  # [2, 1, 32]
        z = apply_rope((y.view(2, 32) @ w).view(2, 1, 32), cos, sin)
        return y * 1, z * 1

    args = (torch.randn(2, 32), torch.randn(32, 32), torch.randn(2, 16), torch.randn(2, 16))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert record.stats["head-chain"]["launches"] == 2
    gm.graph.lint()
    for a, b in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def kv_prologue(x, wk, cos_t, sin_t, pos, k_cache, v_cache, slots):
    # [T, 2 * Hkv * D]: k normed, rotated and cached; v cached as it is (a plain store)
    t = x.shape[0]
    k, v = x.split([2 * 32, 2 * 32], dim=-1)
    k = apply_rope(rms(k.reshape(t, 2, 32), wk, 1e-6, False), cos_t[pos], sin_t[pos])
    k_cache.view(-1, 2, 32)[slots] = k
    v_cache.view(-1, 2, 32)[slots] = v.view(t, 2, 32).to(v_cache.dtype)
    return k_cache.view(-1, 2, 32)[slots].float().sum() + v_cache.view(-1, 2, 32)[slots].float().sum()


@given(t=st.sampled_from([1, 3, 5]), seed=st.integers(0, 999), v_dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_plain_cache_write_joins_the_k_chain_in_place(t, seed, v_dtype):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    x = torch.randn(t, 128, generator=gen).to(dt)
    args = (x, torch.randn(32, generator=gen).to(dt), torch.randn(16, 16, generator=gen),
            torch.randn(16, 16, generator=gen), torch.randint(0, 16, (t,), generator=gen))
    k_cache = torch.full((4, 2, 2, 32), float("nan"), dtype=dt)
    v_cache = torch.full((4, 2, 2, 32), float("nan"), dtype=v_dtype)  # a wider cache: the rows are cast
    slots = torch.randperm(8, generator=gen)[:t]
    gm = aten_graph(kv_prologue, *args, k_cache, v_cache, slots)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    applied = [r for r in record.remarks if r.kind == "applied"]
    assert sorted(r.ops for r in applied) == [("rmsnorm", "rope", "store"), ("store",)]
    assert len(fused_ops(gm)) == 1 and record.stats["head-chain"]["launches"] == 1
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.index_put.default]
    caches = [(k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())]
    gm(*args, *caches[0], slots)
    kv_prologue(*args, *caches[1], slots)
    for got, want in zip(caches[0], caches[1]):
        assert torch.equal(got.isnan(), want.isnan())  # the same slots written, nothing else
        written = ~want.isnan()
        torch.testing.assert_close(got[written].float(), want[written].float(), rtol=2 ** -7, atol=1e-5)
    v_written = ~caches[1][1].isnan()
    assert torch.equal(caches[0][1][v_written], caches[1][1][v_written])  # v: an exact copy


def test_plain_store_of_packed_bytes_is_taken_over_exactly(device):
    # DeepSeek's MLA cache: rows of bytes built by the model (fp8 values, scale and rope bytes)
    def fn(rows, cache, slots):
        cache.view(-1, 656)[slots] = rows
        return cache.sum(dtype=torch.int64)

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (3, 656), generator=gen, dtype=torch.int64).to(device, torch.uint8)
    cache = torch.randint(0, 256, (4, 2, 656), generator=gen, dtype=torch.int64).to(device, torch.uint8)
    slots = torch.tensor([7, 0, 2], device=device)
    gm = aten_graph(fn, rows, cache, slots)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [(r.kind, r.ops) for r in record.remarks] == [("applied", ("store",))]
    got, want = cache.clone(), cache.clone()
    gm(rows, got, slots)
    fn(rows, want, slots)
    assert torch.equal(got, want)  # every byte, written and untouched


def test_plain_store_of_other_dtypes_is_left_to_inductor_with_a_reason():
    def fn(rows, cache, slots):
        cache.view(-1, 8)[slots] = rows
        return cache.sum()

    args = (torch.randint(0, 255, (2, 8)), torch.zeros(4, 8, dtype=torch.int64), torch.tensor([3, 1]))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [(r.kind, r.name) for r in record.remarks] == [("missed", "store-dtype")]
    assert "torch.int64" in record.remarks[0].reason and not fused_ops(gm)


def indexer_prologue(x, q_in, cos_t, sin_t, pos, w):
    # DeepSeek V3.2's indexer: k [T, 128] and q [T, H, 128] rotated (NeoX) and quantized to fp8 with one
    # power-of-two scale per head; the q scales weight the heads
    from braze.models.fp8 import quant_fp8_group

    t = x.shape[0]
    k = apply_rope(x, cos_t[pos], sin_t[pos], style="neox")
    q = apply_rope(q_in.view(t, 2, 64), cos_t[pos], sin_t[pos], style="neox")
    k8, k_scale = quant_fp8_group(k, 64, ue8m0=True)
    q8, q_scale = quant_fp8_group(q, 64, ue8m0=True)
    return k8.float(), k_scale, q8.float(), w * q_scale.squeeze(-1)


@settings(max_examples=8)  # 2 token counts and a seed; 20 examples took ~14 s on CPU
@given(t=st.sampled_from([1, 3]), seed=st.integers(0, 999))
def test_rope_then_fp8_quant_per_head_is_one_chain(t, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    args = (torch.randn(t, 64, generator=gen).to(dt), torch.randn(t, 128, generator=gen).to(dt),
            torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen),
            torch.randint(0, 16, (t,), generator=gen), torch.randn(t, 2, generator=gen))
    gm = aten_graph(indexer_prologue, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    applied = [r for r in record.remarks if r.kind == "applied"]
    # the q chain also stores its scale times the head weights (tests/passes/test_chain_product.py)
    assert sorted(r.ops for r in applied) == [("rope", "fp8_quant"), ("rope", "fp8_quant", "scale_mul")], \
        [str(r) for r in record.remarks]
    assert record.stats["head-chain"]["launches"] == 1
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.amax.default]
    got, want = gm(*args), indexer_prologue(*args)
    for g, w in zip(got, want):  # scales are exact powers of two of the same bf16 values
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_quant_with_groups_across_heads_stays_out_of_the_chain():
    from braze.models.fp8 import quant_fp8_group

    def fn(x, cos, sin):
        y = apply_rope(x.view(2, 2, 32), cos, sin)
        return quant_fp8_group(y.reshape(2, 64), 64)  # one scale over both heads

    args = (torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(2, 16), torch.randn(2, 16))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [r.ops for r in record.remarks if r.kind == "applied"] == [("rope",)]
    missed = [r for r in record.remarks if r.kind == "missed"]
    assert [r.name for r in missed] == ["quant-layout"] and "each head of 32 or groups that divide it" in missed[0].reason
    got, want = gm(*args), fn(*args)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@given(weight=st.booleans(), bias=st.booleans(), per_head=st.booleans(), t=st.sampled_from([1, 3]),
       seed=st.integers(0, 999))
def test_layernorm_rope_chain_matches_eager(weight, bias, per_head, t, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    width = 32 if per_head else 64
    w = (1 + 0.3 * torch.randn(width, generator=gen)).to(dt)
    b = (0.5 * torch.randn(width, generator=gen)).to(dt)

    def fn(x, w, b, cos, sin):
        h = x.view(t, 2, 32) if per_head else x
        h = torch.nn.functional.layer_norm(h.float(), (width,), w.float() if weight else None,
                                           b.float() if bias else None, 1e-6).to(dt)
        return apply_rope(h.view(t, 2, 32), cos, sin, style="neox") * 1

    args = (3 * torch.randn(t, 64, generator=gen).to(dt) + 1, w, b, torch.randn(t, 16, generator=gen),
            torch.randn(t, 16, generator=gen))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    applied = [r for r in record.remarks if r.kind == "applied"]
    assert [r.ops for r in applied] == [("layernorm", "rope")], [str(r) for r in record.remarks]
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.var_mean.correction]
    torch.testing.assert_close(gm(*args).float(), fn(*args).float(), rtol=2 ** -7, atol=1e-2)


def test_quant_to_an_unsupported_fp8_dtype_leaves_the_quant_to_inductor():
    def fn(x, cos, sin):
        y = apply_rope(x.view(2, 2, 32), cos, sin).float()
        scale = y.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 57344.0
        return (y / scale).clamp(-57344.0, 57344.0).to(torch.float8_e5m2).float(), scale

    args = (torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(2, 16), torch.randn(2, 16))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [r.ops for r in record.remarks if r.kind == "applied"] == [("rope",)]  # the rotation alone
    got, want = gm(*args), fn(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@given(b=st.sampled_from([1, 3]), shared=st.booleans(), seed=st.integers(0, 999))
def test_hf_layout_rope_with_tables_shared_by_all_tokens(b, shared, seed):
    # Hugging Face: q, k [B, H, 1, D]; cos/sin [B, 1, D], or [1, 1, D] when every sequence is at the same
    # position (position_ids [1, 1]) and the one row broadcasts over the batch
    def fn(q, k, cos, sin):
        def rotate_half(x):
            return torch.cat((-x[..., 16:], x[..., :16]), dim=-1)

        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (q * cos + rotate_half(q) * sin) * 1, (k * cos + rotate_half(k) * sin) * 1

    gen = torch.Generator().manual_seed(seed)
    rows = 1 if shared else b
    args = (torch.randn(b, 4, 1, 32, generator=gen), torch.randn(b, 2, 1, 32, generator=gen),
            torch.randn(rows, 1, 32, generator=gen), torch.randn(rows, 1, 32, generator=gen))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [r.ops for r in record.remarks if r.kind == "applied"] == [("rope",), ("rope",)]
    for got, want in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_position_for_every_token_broadcasts():
    # cos_t[pos] with a single position, broadcast over T tokens (every sequence at the same step)
    def fn(x, cos_t, sin_t, pos):
        return apply_rope(x.view(3, 2, 32), cos_t[pos], sin_t[pos], style="neox") * 1

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 64, generator=gen), torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen),
            torch.tensor([5]))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [r.ops for r in record.remarks if r.kind == "applied"] == [("rope",)]
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-5, atol=1e-5)


def test_one_row_written_to_several_slots_is_left_to_inductor():
    def fn(row, cache, slots):
        cache.view(-1, 2, 32)[slots] = row  # [1, 2, 32] broadcast to every slot
        return cache.sum()

    args = (torch.randn(1, 2, 32), torch.zeros(4, 2, 2, 32), torch.tensor([1, 4, 6]))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [(r.kind, r.name) for r in record.remarks] == [("missed", "store-layout")]
    got, want = args[1].clone(), args[1].clone()
    gm(args[0], got, args[2])
    fn(args[0], want, args[2])
    assert torch.equal(got, want)


def test_fp8_values_of_a_quant_chain_stored_by_a_second_launch():
    from braze.models.fp8 import quant_fp8_group

    def fn(x, cos, sin, cache, slots):
        q8, scale = quant_fp8_group(apply_rope(x.view(3, 2, 32), cos, sin), 32, ue8m0=True)
        cache.view(-1, 2, 32)[slots] = q8
        return scale * 1

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 64, generator=gen).to(torch.bfloat16), torch.randn(3, 16, generator=gen),
            torch.randn(3, 16, generator=gen), torch.zeros(4, 2, 2, 32, dtype=torch.float8_e4m3fn),
            torch.tensor([6, 1, 3]))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert sorted(r.ops for r in record.remarks if r.kind == "applied") == [("rope", "fp8_quant"), ("store",)]
    assert record.stats["head-chain"]["launches"] == 2
    got, want = args[3].clone(), args[3].clone()
    s_got = gm(*args[:3], got, args[4])
    s_want = fn(*args[:3], want, args[4])
    torch.testing.assert_close(s_got, s_want, rtol=0, atol=0)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_strided_slot_and_position_indices():
    # indices that arrive as strided views (a column of a [T, 2] tensor) are read with their strides
    def fn(x, cos_t, sin_t, idx, cache):
        pos, slots = idx[:, 0], idx[:, 1]
        cache.view(-1, 2, 32)[slots] = apply_rope(x.view(3, 2, 32), cos_t[pos], sin_t[pos], style="neox")
        return cache.sum()

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 64, generator=gen), torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen),
            torch.tensor([[5, 7], [9, 0], [2, 3]]), torch.full((4, 2, 2, 32), float("nan")))
    gm = aten_graph(fn, *args)
    record = run_passes(gm, FusionConfig(norm_quant=False))
    assert [r.ops for r in record.remarks if r.kind == "applied"] == [("rope", "store")]
    got, want = args[4].clone(), args[4].clone()
    gm(*args[:4], got)
    fn(*args[:4], want)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got[~want.isnan()], want[~want.isnan()], rtol=1e-5, atol=1e-5)


def test_chains_around_a_matmul_of_a_chain_result_stay_valid_and_equal_eager():
    # chain A's result feeds a matmul whose product chain C rotates; chain B (independent, early use)
    # must not pull that matmul above A's launch
    def fn(x, u, w, cos, sin):
        a = apply_rope(x.view(2, 1, 32), cos, sin)  # chain A
        b = apply_rope(u.view(2, 1, 32), cos, sin)  # chain B, used first
        first = b * 2
        c = apply_rope((a.view(2, 32) @ w).view(2, 1, 32), cos, sin)  # chain C
        return first, a * 1, c * 1

    args = (torch.randn(2, 32), torch.randn(2, 32), torch.randn(32, 32), torch.randn(2, 16), torch.randn(2, 16))
    gm = aten_graph(fn, *args)
    run_passes(gm, FusionConfig(norm_quant=False))
    gm.graph.lint()
    gm.recompile()
    for a, b in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

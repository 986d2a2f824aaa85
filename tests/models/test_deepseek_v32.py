"""DeepSeek V3.2: faithfulness to transformers and to MODELS.md's indexer and cache math, TP=2 == TP=1,
one graph under torch.compile, in-place cache writes (compiled == eager through braze: tests/passes/
test_chain_models.py).

What transformers' DeepseekV32 does differently, on purpose, and how the tests handle it:
- its indexer has no FP8 and no Hadamard rotation, and its caches hold bf16 (model dtype): the HF
  comparison runs with `fp8_cache=False`; the FP8 indexer and the packed fp8_ds_mla cache are tested
  against an independent pure-torch reference of MODELS.md §1 below;
- it lays out the GPT-J-rotated rope dims de-interleaved (it emits [even ‖ odd]) where we (like vLLM
  and DeepSeek's reference) keep them interleaved: the q·k products, and so the logits, are equal;
- it expands kv_b_proj per head (no absorption); the absorbed decode path is the same math.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from braze.models import build
from braze.models.deepseek_v32 import (
    DeepseekV32Config, DeepseekV32ForCausalLM, Indexer, load_hf_state_dict, make_decode_inputs,
)
from braze.models.common import PageTable, RotaryCache, init_random, yarn_inv_freq

transformers = pytest.importorskip("transformers")


def hf_tiny(c: DeepseekV32Config, seed: int = 0):
    rope = dict(rope_type="yarn", rope_theta=c.rope_theta, factor=c.rope_factor, mscale=1.0,
                original_max_position_embeddings=c.rope_original_max_position, beta_fast=c.beta_fast,
                beta_slow=c.beta_slow, mscale_all_dim=c.mscale_all_dim)
    hc = transformers.DeepseekV32Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.dense_inter,
        moe_intermediate_size=c.moe_inter, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_heads, n_shared_experts=c.n_shared_experts, n_routed_experts=c.num_experts,
        routed_scaling_factor=c.routed_scaling, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
        qk_rope_head_dim=c.qk_rope_dim, v_head_dim=c.v_head_dim, qk_nope_head_dim=c.qk_nope_dim, n_group=c.n_group,
        topk_group=c.topk_group, num_experts_per_tok=c.top_k, rope_parameters=rope, index_topk=c.index_topk,
        index_head_dim=c.index_head_dim, index_n_heads=c.index_heads, first_k_dense_replace=c.first_k_dense,
        rms_norm_eps=c.rms_norm_eps, bos_token_id=None, eos_token_id=None)
    hc._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.DeepseekV32ForCausalLM(hc).eval().float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):  # HF: ones; make them matter
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return hf


@pytest.mark.parametrize("index_heads,lengths", [(4, (5, 12)), (16, (9, 40))], ids=["tiny-dense", "16heads-sparse"])
@torch.no_grad()
def test_matches_transformers_prefill_and_decode(index_heads, lengths):
    # tiny-dense: the tiny config with contexts up to index_topk (16), where every token is selected.
    # 16heads-sparse: contexts past index_topk need more than tiny's 4 indexer heads: with 4, a key
    # whose four head dots are all negative scores exactly 0 (ReLU), zeros tie at the top-k boundary,
    # and torch.topk's unspecified tie order would decide which tokens attend. The indexer at 4 heads
    # is tested tie-aware against the reference below.
    cfg = DeepseekV32Config.tiny().replace(fp8_cache=False, index_heads=index_heads)
    hf = hf_tiny(cfg)
    model = DeepseekV32ForCausalLM(cfg, dtype=torch.float32, max_batch=2, max_context=64)
    load_hf_state_dict(model, hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(cfg.vocab_size, (n,), generator=g) for n in lengths]
    steps = torch.randint(cfg.vocab_size, (4, 2), generator=g)
    ours = [[model.prefill(p, seq)] for seq, p in enumerate(prompts)]
    for step in steps:
        logits = model(*model.pages.append([0, 1], step))
        for seq in range(2):
            ours[seq].append(logits[seq:seq + 1])
    for seq, prompt in enumerate(prompts):
        out = hf(prompt[None], use_cache=True)
        ref, cache = [out.logits[0]], out.cache
        for tok in steps[:, seq]:
            out = hf(tok.view(1, 1), cache=cache, use_cache=True)
            ref.append(out.logits[0])
        for i, (a, b) in enumerate(zip(ours[seq], ref)):
            err = (a - b).abs().max().item()
            assert err < 2e-5, f"sequence {seq} {'prefill' if i == 0 else f'decode step {i}'}: max |diff| {err:.2e}"


# ----------------------------------------------------------------------------
# indexer and MLA cache against an independent reference of MODELS.md §1 (b) steps 6, 7, 11, 12
# ----------------------------------------------------------------------------


def ref_fp8_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """Dequantized fp8 of x [..., 128] with one power-of-two scale per row: s = 2^⌈log2(max(amax,1e-4)/448)⌉."""
    s = torch.exp2(torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448)))
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def ref_neox_first64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [S, ..., 128]; rotate-half inside dims 0..63, dims 64..127 untouched.
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (32,)
    c, s = cos.view(shape), sin.view(shape)
    a, b, rest = x[..., :32], x[..., 32:64], x[..., 64:]
    return torch.cat([a * c - b * s, b * c + a * s, rest], -1)


def ref_index_scores(ind: Indexer, x: torch.Tensor, q_c: torch.Tensor, cos, sin) -> torch.Tensor:
    """Dense causal index scores [S, S] of one sequence: L[t,n] = Σ_h w[t,h]·relu(q[t,h]·k[n]) / √(128·H)."""
    d, h = ind.dim, ind.heads
    wk, wproj = ind.wk_weights_proj.weight.float().split([d, h])
    k = torch.nn.functional.layer_norm(x.float() @ wk.t(), (d,), ind.k_norm.weight.float(),
                                       ind.k_norm.bias.float(), 1e-6)
    k = ref_fp8_ue8m0(ref_neox_first64(k, cos, sin))  # [S, 128]
    q = ref_fp8_ue8m0(ref_neox_first64((q_c.float() @ ind.wq_b.weight.float().t()).view(-1, h, d), cos, sin))
    w = x.float() @ wproj.t()  # [S, H]
    scores = torch.einsum("th,thn->tn", w, torch.einsum("thd,nd->thn", q, k).relu()) / (d * h) ** 0.5
    causal = torch.ones(len(x), len(x), dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("length", [11, 16, 45])
@torch.no_grad()
def test_fp8_indexer_selects_a_top_k_of_the_reference_scores(length):
    cfg = DeepseekV32Config.tiny()
    pages = PageTable(max_batch=2, max_context=64, block_size=cfg.block_size, seed=2)
    ind = Indexer(cfg, pages, fp8=None, device="cpu", dtype=torch.float32)
    init_random(ind, seed=3, std=0.1)
    g = torch.Generator().manual_seed(4)
    x, q_c = torch.randn(length, cfg.hidden_size, generator=g), torch.randn(length, cfg.q_lora_rank, generator=g)
    rotary = RotaryCache(yarn_inv_freq(64, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_position), 64)
    batch = pages.prompt(1, torch.zeros(length, dtype=torch.long))
    cos, sin = rotary(batch.positions)
    idx = ind.select(*ind(x, q_c, cos, sin, batch.slot_mapping), batch.block_table, batch.seq_lens)  # [S, K]
    assert idx.shape == (length, cfg.index_topk)
    ref = ref_index_scores(ind, x, q_c, cos, sin)
    for t in range(length):
        chosen = idx[t][idx[t] >= 0]
        n_valid = min(t + 1, cfg.index_topk)
        assert len(chosen) == n_valid and len(set(chosen.tolist())) == n_valid, f"token {t}: {idx[t].tolist()}"
        assert (idx[t][n_valid:] == -1).all()
        others = torch.ones(t + 1, dtype=torch.bool)
        others[chosen] = False
        if others.any():  # tie-aware: nothing left out may beat what was chosen
            assert ref[t, chosen].min() >= ref[t, :t + 1][others].max() - 1e-4, f"token {t}"


@torch.no_grad()
def test_mla_cache_rows_are_packed_fp8_ds_mla():
    cfg = DeepseekV32Config.tiny()
    model = DeepseekV32ForCausalLM(cfg, dtype=torch.bfloat16, max_batch=1, max_context=32)
    attn = model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    kv_c = torch.randn(3, 512, generator=g).to(torch.bfloat16) * torch.tensor([0.01, 1.0, 30.0])[:, None]
    k_pe = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    rows = attn.pack(kv_c, k_pe)
    assert rows.shape == (3, 656) and rows.dtype == torch.uint8
    scales = rows[:, 512:528].contiguous().view(torch.float32)  # one fp32 scale per 128 values
    assert torch.allclose(scales, kv_c.float().view(3, 4, 128).abs().amax(-1) / 448)
    assert torch.equal(rows[:, 528:].contiguous().view(torch.bfloat16), k_pe)  # rope part unquantized
    latent, rope = attn.unpack(rows)
    assert ((latent - kv_c.float()).abs() <= scales.repeat_interleave(128, 1) * 16 + 1e-6).all()
    assert torch.equal(rope, k_pe.float())


@torch.no_grad()
def test_chunked_prefill_equals_one_chunk():
    models = [build("deepseek-v3.2", dtype=torch.float32, max_batch=1, max_context=48, seed=11) for _ in range(2)]
    prompt = torch.randint(1024, (37,), generator=torch.Generator().manual_seed(12))
    a, b = models[0].prefill(prompt, 0), models[1].prefill(prompt, 0, chunk=10)
    # (the caches are not compared bytewise: a GEMM of another height rounds differently in fp32,
    # which can move an FP8 value across a rounding boundary)
    assert torch.allclose(a, b, atol=1e-4), f"max |diff| {(a - b).abs().max():.2e}"


def test_softmax_scale():
    assert DeepseekV32Config.bench().softmax_scale == pytest.approx(0.1352, abs=1e-4)


# ----------------------------------------------------------------------------
# caches in place, TP, compile, FP8
# ----------------------------------------------------------------------------


@torch.no_grad()
def test_cache_writes_in_place_and_only_at_slots():
    kw = dict(dtype=torch.bfloat16, max_batch=3, max_context=48, seed=4)
    clean, dirty = build("deepseek-v3.2", **kw), build("deepseek-v3.2", **kw)
    lens = [5, 9, 33]
    batches = [make_decode_inputs(m, 3, lens, torch.Generator().manual_seed(6)) for m in (clean, dirty)]
    valid = torch.cat([dirty.pages.slots(s, torch.arange(n)) for s, n in enumerate(lens)])
    b = dirty.config.block_size
    caches = {}
    for name, buf in dirty.named_buffers():
        if name.endswith("mla_cache"):
            rows = buf.view(-1, buf.shape[-1])  # [slots, 656]
        elif name.endswith("index_cache"):  # per page: B key rows of 128 bytes, then B scales of 4 bytes
            rows = torch.cat([buf[:, : b * 128].view(-1, b, 128), buf[:, b * 128:].view(-1, b, 4)], -1).view(-1, 132)
        else:
            continue
        caches[name] = (buf, rows)
    assert len(caches) == 2 * dirty.config.num_layers
    for name, (buf, rows) in caches.items():  # poison every row no sequence owns (finite fp8/fp32/bf16 bytes)
        poisoned = torch.full_like(rows, 0x3C)
        poisoned[valid] = rows[valid]
        if name.endswith("mla_cache"):
            buf.view(-1, 656).copy_(poisoned)
        else:
            p = poisoned.view(-1, b, 132)
            buf[:, : b * 128].copy_(p[..., :128].reshape(-1, b * 128))
            buf[:, b * 128:].copy_(p[..., 128:].reshape(-1, b * 4))
    before = {n: (buf.data_ptr(), buf.clone()) for n, (buf, _) in caches.items()}
    assert torch.equal(dirty(*batches[1]), clean(*batches[0]))
    slots = set(batches[1].slot_mapping.tolist())
    for name, (buf, _) in caches.items():
        ptr, old = before[name]
        assert buf.data_ptr() == ptr, f"{name} was replaced, not written in place"
        if name.endswith("mla_cache"):
            changed = (buf.view(-1, 656) != old.view(-1, 656)).any(-1).nonzero().flatten()
        else:
            diff = buf != old
            changed = torch.cat([diff[:, : b * 128].view(-1, b, 128).any(-1), diff[:, b * 128:].view(-1, b, 4).any(-1)])
            changed = changed.view(2, -1).any(0).nonzero().flatten()
        assert set(changed.tolist()) <= slots and changed.numel() > 0, f"{name}: rows {changed.tolist()} vs {slots}"


def count_collectives(model, batch) -> int:
    """Trace one step with Dynamo (fullgraph) and count the all-reduces in the captured graph."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=record, fullgraph=True)(*batch)
    return sum(1 for gm in graphs for n in gm.graph.nodes if "all_reduce" in str(n.target))


def _tp_worker(rank: int, world_size: int) -> None:
    cfg = DeepseekV32Config.tiny()
    kw = dict(dtype=torch.float32, max_batch=3, max_context=48, seed=3)
    full = DeepseekV32ForCausalLM(cfg, **kw)
    tp = DeepseekV32ForCausalLM(cfg, group=dist.group.WORLD, **kw)
    assert tp.layers[0].self_attn.heads == cfg.num_heads // world_size
    with torch.no_grad():
        a = full(*make_decode_inputs(full, 3, [7, 16, 30], torch.Generator().manual_seed(5)))
        b = tp(*make_decode_inputs(tp, 3, [7, 16, 30], torch.Generator().manual_seed(5)))
        # all-reduces per layer, as in the deployments: o_proj, MoE (the indexer is replicated)
        assert count_collectives(tp, tp.pages.append([0, 1, 2], torch.tensor([1, 2, 3]))) == 2 * cfg.num_layers
    # The all-reduce sums in another order; an fp32 ulp that moves an FP8 cache value across a rounding
    # boundary shows up as ~1e-5 in the logits, so the bar is a little above fp32 noise.
    assert torch.allclose(a, b, atol=2e-4), f"rank {rank}: max |diff| {(a - b).abs().max():.2e}"


def test_tp2_equals_tp1(tp_runner):
    tp_runner(2, _tp_worker)


@torch.no_grad()
def test_fp8_linears_and_caches_stay_close_to_unquantized():
    cfg = DeepseekV32Config.tiny()
    kw = dict(dtype=torch.float32, max_batch=2, max_context=32, seed=9)
    ref = DeepseekV32ForCausalLM(cfg.replace(fp8_cache=False), **kw)
    q = DeepseekV32ForCausalLM(cfg, fp8=True, **kw)
    assert q.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    a = ref(*make_decode_inputs(ref, 2, [6, 12], torch.Generator().manual_seed(10)))  # dense regime: no top-k
    b = q(*make_decode_inputs(q, 2, [6, 12], torch.Generator().manual_seed(10)))
    assert (a - b).norm() / a.norm() < 0.1


@torch.no_grad()
def test_bench_config_runs_on_meta():
    # The bench model (real widths, 16 heads = 128 at TP=8, 64 indexer heads, top-2048) on the meta device.
    model = build("deepseek-v3.2", "bench", device="meta", max_batch=8, max_context=4096, fp8=True)
    attn = model.layers[1].self_attn
    assert attn.heads == 16 and attn.mla_cache.shape[-1] == 656
    t = 8
    ids = torch.zeros(t, dtype=torch.long, device="meta")
    logits = model(ids, ids, ids, model.pages.table[:t], ids.int())
    assert logits.shape == (t, 129280)

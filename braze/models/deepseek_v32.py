"""DeepSeek V3.2 (-Exp) in plain PyTorch, decode order as vLLM's NVIDIA DSA path (MODELS.md §1).

Per layer: RMSNorm -> fused q_a‖kv_a projection -> q_a / kv_a RMSNorm -> GPT-J RoPE of k_pe ->
MLA cache write (packed fp8_ds_mla, 656 bytes a token) -> lightning indexer (LayerNorm, NeoX RoPE
on its FIRST 64 dims, FP8 with power-of-two scales, paged index-key cache, weighted ReLU scores,
top-k with -1 padding) -> q_b projection, W_UK absorption, GPT-J RoPE of q_pe -> sparse MLA over
the selected tokens -> W_UV -> o_proj + all-reduce -> RMSNorm -> MoE (sigmoid, correction bias,
group-limited top-k, routed scaling, one shared expert; the first layers dense) -> all-reduce.

Caches, per layer (B = block_size):
  mla_cache    [num_blocks, B, 656] uint8: 512 fp8 latent values, 4 fp32 scales (one per 128),
               64 bf16 rope values. With config.fp8_cache=False: [num_blocks, B, 576] model dtype.
  index_cache  [num_blocks, B·132] uint8: a page holds B fp8 key rows of 128, then B fp32 scales.
               With fp8_cache=False: [num_blocks, B, 128] model dtype and the indexer unquantized
               (as in Hugging Face's implementation).
The indexer applies no Hadamard rotation (as vLLM; DeepSeek's reference rotates q and k by an
orthogonal matrix first, which leaves the scores unchanged and only moves the FP8 error).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from braze.models.common import (
    FP8, FP8_BLOCK_UE8M0, FP8_MAX, ColumnParallelLinear, DecodeBatch, Fp8Scheme, GatedMLP, MoE, PageTable,
    ProcessGroup, ReplicatedLinear, RMSNorm, RotaryCache, RouterSpec, RowParallelLinear, apply_rope, context_mask,
    from_bytes, init_random, load_full_state_dict, make_decode_inputs, mark, quant_fp8_group, to_bytes, tp_size,
    write_slots, yarn_inv_freq,
)

__all__ = ["DeepseekV32Config", "DeepseekV32ForCausalLM", "load_hf_state_dict", "make_decode_inputs", "DecodeBatch"]

MLA_ROW_BYTES = 656  # 512 fp8 + 4·4 scale bytes + 64·2 rope bytes


@dataclass(frozen=True)
class DeepseekV32Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    first_k_dense: int
    dense_inter: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    index_heads: int
    index_head_dim: int
    index_topk: int
    num_experts: int
    n_group: int
    topk_group: int
    top_k: int
    moe_inter: int
    n_shared_experts: int = 1
    routed_scaling: float = 2.5
    rope_theta: float = 1e4
    rope_factor: float = 40.0
    rope_original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    block_size: int = 64
    fp8_cache: bool = True  # False: MLA and index caches in the model dtype, indexer unquantized (as HF)

    @classmethod
    def tiny(cls) -> DeepseekV32Config:
        return cls(vocab_size=1024, hidden_size=256, num_layers=2, first_k_dense=1, dense_inter=512, num_heads=4,
                   q_lora_rank=256, kv_lora_rank=512, qk_nope_dim=64, qk_rope_dim=64, v_head_dim=64, index_heads=4,
                   index_head_dim=128, index_topk=16, num_experts=8, n_group=4, topk_group=2, top_k=2,
                   moe_inter=128, block_size=16)

    @classmethod
    def bench(cls, tp: int = 1) -> DeepseekV32Config:
        """One rank of the published TP=8 deployment: real hidden/vocab/MLA/indexer sizes, 128 heads -> 16
        per rank (and the dense MLP's 18432 -> 2304 per rank), 16 whole experts (as under expert
        parallelism), 4 layers. For a TP group of `tp` ranks the attention heads are 16·tp, so every rank
        still holds 16 (tp=8: the real 128); the indexer (replicated) and the MLP/expert widths (split
        over the group) do not grow."""
        return cls(vocab_size=129280, hidden_size=7168, num_layers=4, first_k_dense=1, dense_inter=2304,
                   num_heads=16 * tp, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
                   v_head_dim=128, index_heads=64, index_head_dim=128, index_topk=2048, num_experts=16, n_group=8,
                   topk_group=4, top_k=8, moe_inter=2048)

    def replace(self, **kw) -> DeepseekV32Config:
        return dataclasses.replace(self, **kw)

    @property
    def softmax_scale(self) -> float:
        # YaRN: mscale = mscale_all_dim = 1 leaves cos/sin unscaled; the attention logits get mscale².
        mscale = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1 else 1.0
        return (self.qk_nope_dim + self.qk_rope_dim) ** -0.5 * mscale * mscale


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32."""

    def __init__(self, dim: int, eps: float, device, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = mark(nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False), init="one")
        self.bias = mark(nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False), init="small")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Indexer(nn.Module):
    """The lightning indexer: picks, for each token, the index_topk cached tokens sparse MLA attends to.
    Replicated under TP (every rank computes the same top-k)."""

    def __init__(self, cfg: DeepseekV32Config, pages: PageTable, *, fp8: Fp8Scheme | None, device, dtype):
        super().__init__()
        self.heads, self.dim, self.topk = cfg.index_heads, cfg.index_head_dim, cfg.index_topk
        self.quantized = cfg.fp8_cache  # FP8 keys and queries, paged key cache of fp8 rows + fp32 scales
        self.block_size = pages.block_size
        self.wq_b = ReplicatedLinear(cfg.q_lora_rank, self.heads * self.dim, fp8=fp8, device=device, dtype=dtype)
        self.wk_weights_proj = ReplicatedLinear(cfg.hidden_size, self.dim + self.heads, device=device, dtype=dtype)
        self.k_norm = LayerNorm(self.dim, 1e-6, device, dtype)
        if self.quantized:
            cache = torch.zeros(pages.num_blocks, pages.block_size * (self.dim + 4), device=device, dtype=torch.uint8)
        else:
            cache = torch.zeros(pages.num_blocks, pages.block_size, self.dim, device=device, dtype=dtype)
        self.register_buffer("index_cache", cache, persistent=False)

    def _pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Byte views of the fp8 cache: keys [num_blocks, B, D] and scales [num_blocks, B, 4].
        nb, b = self.index_cache.shape[0], self.block_size
        keys = self.index_cache[:, : b * self.dim].view(nb, b, self.dim)
        scales = self.index_cache[:, b * self.dim:].view(nb, b, 4)
        return keys, scales

    def forward(self, x: torch.Tensor, q_c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer's prologue (a module call, so the report names `indexer`): keys into the index
        cache; `select` then scores them. Returns the queries (fp8 when quantized) [T, Hi, 128] and
        the head weights [T, Hi] (scaled by the queries' quant scales)."""
        t = x.shape[0]
        k, w = self.wk_weights_proj(x).split([self.dim, self.heads], dim=-1)  # [T, 128], [T, Hi]
        k = apply_rope(self.k_norm(k), cos, sin, style="neox")  # rope dims FIRST in the indexer
        q = apply_rope(self.wq_b(q_c).view(t, self.heads, self.dim), cos, sin, style="neox")  # [T, Hi, 128]
        w = w.float() * (self.dim ** -0.5 * self.heads ** -0.5)  # [T, Hi]
        if not self.quantized:
            write_slots(self.index_cache, slot_mapping, k)
            return q, w
        k8, k_scale = quant_fp8_group(k, self.dim, ue8m0=True)  # [T, 128] fp8, [T, 1]
        keys, scales = self._pages()
        blk, off = slot_mapping // self.block_size, slot_mapping % self.block_size
        keys[blk, off] = to_bytes(k8)
        scales[blk, off] = to_bytes(k_scale)  # [T, 1] fp32 -> [T, 4] bytes
        q8, q_scale = quant_fp8_group(q, self.dim, ue8m0=True)  # [T, Hi, 128] fp8, [T, Hi, 1]
        return q8, w * q_scale.squeeze(-1)

    def select(self, q: torch.Tensor, w: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor) -> torch.Tensor:
        """Scores of every cached key, top-k per token [T, K] (-1 pads short sequences)."""
        if self.quantized:
            keys, scales = self._pages()
            ctx_k = from_bytes(keys[block_table], FP8).flatten(1, 2).float()  # [T, N, 128]
            ctx_s = from_bytes(scales[block_table], torch.float32).flatten(1)  # [T, N]
            dots = torch.einsum("thd,tnd->thn", q.float(), ctx_k).relu()  # [T, Hi, N]
            scores = torch.einsum("thn,th->tn", dots, w) * ctx_s
        else:
            ctx_k = self.index_cache[block_table].flatten(1, 2).float()  # [T, N, 128]
            dots = torch.einsum("thd,tnd->thn", q.float(), ctx_k).relu()
            scores = torch.einsum("thn,th->tn", dots, w)  # [T, N]
        n = scores.shape[1]
        scores = scores.masked_fill(~context_mask(seq_lens, n), float("-inf"))
        top, idx = scores.topk(min(self.topk, n), dim=-1)  # [T, K]
        return torch.where(top == float("-inf"), -1, idx)  # -1 pads sequences shorter than index_topk


class MLAAttention(nn.Module):
    def __init__(self, cfg: DeepseekV32Config, pages: PageTable, *, group: ProcessGroup | None,
                 fp8: Fp8Scheme | None, device, dtype):
        super().__init__()
        self.cfg, self.tp = cfg, tp_size(group)
        self.heads = cfg.num_heads // self.tp
        self.block_size, self.scale = pages.block_size, cfg.softmax_scale
        kw = dict(fp8=fp8, device=device, dtype=dtype)
        qk_dim = cfg.qk_nope_dim + cfg.qk_rope_dim
        qkv_a = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_dim
        self.fused_qkv_a_proj = ReplicatedLinear(cfg.hidden_size, qkv_a, **kw)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, cfg.num_heads * qk_dim, group=group, **kw)
        # Only its weight is used, split per head into W_UK and W_UV (kept in the model dtype, as vLLM).
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_dim + cfg.v_head_dim),
                                              group=group, device=device, dtype=dtype)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, group=group, **kw)
        self.indexer = Indexer(cfg, pages, fp8=fp8, device=device, dtype=dtype)
        if cfg.fp8_cache:
            if cfg.kv_lora_rank != 512 or cfg.qk_rope_dim != 64:
                raise ValueError("the fp8_ds_mla cache layout needs kv_lora_rank 512 and qk_rope_dim 64; "
                                 "set fp8_cache=False for other sizes")
            cache = torch.zeros(pages.num_blocks, pages.block_size, MLA_ROW_BYTES, device=device, dtype=torch.uint8)
        else:
            cache = torch.zeros(pages.num_blocks, pages.block_size, cfg.kv_lora_rank + cfg.qk_rope_dim,
                                device=device, dtype=dtype)
        self.register_buffer("mla_cache", cache, persistent=False)

    def pack(self, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """kv_c [T, 512], k_pe [T, 64] -> cache rows [T, 656] uint8 (or [T, 576] unquantized)."""
        if not self.cfg.fp8_cache:
            return torch.cat([kv_c, k_pe], dim=-1)
        t = kv_c.shape[0]
        blocks = kv_c.float().view(t, 4, 128)
        scale = (blocks.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # [T, 4, 1]
        q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(t, 512)
        return torch.cat([to_bytes(q), to_bytes(scale.view(t, 4)), to_bytes(k_pe.to(torch.bfloat16))], dim=-1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [..., 656] -> latent [..., 512] and rope [..., 64], fp32."""
        c = self.cfg.kv_lora_rank
        if not self.cfg.fp8_cache:
            return rows[..., :c].float(), rows[..., c:].float()
        scale = from_bytes(rows[..., 512:528], torch.float32)  # [..., 4]
        latent = (from_bytes(rows[..., :512], FP8).float().unflatten(-1, (4, 128)) * scale[..., None]).flatten(-2)
        return latent, from_bytes(rows[..., 528:], torch.bfloat16).float()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        ql_nope, q_pe, iq, iw = self.prologue(x, cos, sin, slot_mapping)
        topk = self.indexer.select(iq, iw, block_table, seq_lens)  # [T, K]
        return self.attend(ql_nope, q_pe, topk, block_table)

    def prologue(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slot_mapping: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything between the hidden state and the attention kernels: projections, norms, RoPE,
        both cache writes. Returns ql_nope [T, H', 512], q_pe [T, H', 64] and the indexer's queries
        and head weights."""
        cfg, t = self.cfg, x.shape[0]
        q_c, kv_c, k_pe = self.fused_qkv_a_proj(x).split([cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_dim], dim=-1)
        q_c = self.q_a_layernorm(q_c)  # [T, q_lora]
        kv_c = self.kv_a_layernorm(kv_c)  # [T, 512]
        k_pe = apply_rope(k_pe, cos, sin, style="gptj")  # [T, 64]
        write_slots(self.mla_cache, slot_mapping, self.pack(kv_c, k_pe))
        iq, iw = self.indexer(x, q_c, cos, sin, slot_mapping)

        q = self.q_b_proj(q_c).view(t, self.heads, cfg.qk_nope_dim + cfg.qk_rope_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_dim, cfg.qk_rope_dim], dim=-1)  # [T, H', 128], [T, H', 64]
        w_uk = self._w_kv()[0]  # [H', 128, 512]
        ql_nope = torch.einsum("thd,hdc->thc", q_nope, w_uk)  # [T, H', 512]
        q_pe = apply_rope(q_pe, cos, sin, style="gptj")  # [T, H', 64]
        return ql_nope, q_pe, iq, iw

    def _w_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        w_kv = self.kv_b_proj.weight.view(self.heads, cfg.qk_nope_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w_kv.split([cfg.qk_nope_dim, cfg.v_head_dim], dim=1)  # [H', 128, 512], [H', 128, 512]

    def attend(self, ql_nope: torch.Tensor, q_pe: torch.Tensor, topk: torch.Tensor,
               block_table: torch.Tensor) -> torch.Tensor:
        """Sparse MLA over the selected tokens (-1 = none; those read position 0 and are masked), W_UV, o_proj."""
        t = ql_nope.shape[0]
        pos = topk.clamp(min=0)
        blocks = block_table.gather(1, pos // self.block_size).long()
        slots = blocks * self.block_size + pos % self.block_size  # [T, K]
        latent, rope = self.unpack(self.mla_cache.view(-1, self.mla_cache.shape[-1])[slots])  # [T, K, 512], [T, K, 64]
        scores = (torch.einsum("thc,tkc->thk", ql_nope.float(), latent)
                  + torch.einsum("thr,tkr->thk", q_pe.float(), rope)) * self.scale
        scores = scores.masked_fill((topk < 0)[:, None, :], float("-inf"))
        o = torch.einsum("thk,tkc->thc", scores.softmax(-1), latent).to(ql_nope.dtype)  # [T, H', 512]
        o = torch.einsum("thc,hvc->thv", o, self._w_kv()[1])  # [T, H', 128]
        return self.o_proj(o.reshape(t, -1))


class DeepseekV32DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV32Config, layer: int, pages: PageTable, *, group, fp8, device, dtype):
        super().__init__()
        kw = dict(group=group, fp8=fp8, device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = MLAAttention(cfg, pages, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        if layer < cfg.first_k_dense:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.dense_inter, **kw)
        else:
            router = RouterSpec(top_k=cfg.top_k, scoring="sigmoid", correction_bias=True, n_group=cfg.n_group,
                                topk_group=cfg.topk_group, renormalize=True, routed_scaling=cfg.routed_scaling)
            self.mlp = MoE(cfg.hidden_size, cfg.num_experts, cfg.moe_inter, router,
                           shared_inter=cfg.moe_inter * cfg.n_shared_experts, **kw)

    def forward(self, h: torch.Tensor, cos, sin, slot_mapping, block_table, seq_lens) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, slot_mapping, block_table, seq_lens)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV32ForCausalLM(nn.Module):
    def __init__(self, config: DeepseekV32Config, *, group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 fp8: bool | Fp8Scheme = False, max_batch: int = 16, max_context: int = 512, seed: int = 0):
        super().__init__()
        self.config, self.group = config, group
        fp8_scheme = FP8_BLOCK_UE8M0 if fp8 is True else (fp8 or None)  # released: 128x128 blocks, ue8m0 scales
        self.pages = PageTable(max_batch, max_context, config.block_size, device=device, seed=seed)
        self.embed_tokens = mark(nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, device=device,
                                                          dtype=dtype), requires_grad=False))
        self.layers = nn.ModuleList(
            DeepseekV32DecoderLayer(config, i, self.pages, group=group, fp8=fp8_scheme, device=device, dtype=dtype)
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = ReplicatedLinear(config.hidden_size, config.vocab_size, device=device, dtype=dtype)
        inv_freq = yarn_inv_freq(config.qk_rope_dim, config.rope_theta, config.rope_factor,
                                 config.rope_original_max_position, config.beta_fast, config.beta_slow)
        self.rotary = RotaryCache(inv_freq, self.pages.max_context, device)
        init_random(self, seed, group)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        # one slot per token: lets a compiler with dynamic T know the cache rows and slots match
        torch._check(slot_mapping.shape[0] == input_ids.shape[0])
        h = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary(positions)  # [T, 32]: one table for MLA (GPT-J) and the indexer (NeoX)
        for layer in self.layers:
            h = layer(h, cos, sin, slot_mapping, block_table, seq_lens)
        return self.lm_head(self.norm(h))  # [T, vocab]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, seq_idx: int, chunk: int = 256) -> torch.Tensor:
        """Start sequence `seq_idx` with input_ids [S]: fill its caches, return logits [S, vocab]."""
        batch = self.pages.prompt(seq_idx, input_ids)
        return torch.cat([self(*(x[i:i + chunk] for x in batch)) for i in range(0, input_ids.shape[0], chunk)])


def load_hf_state_dict(model: DeepseekV32ForCausalLM, hf_model: nn.Module) -> None:
    """Load a transformers `DeepseekV32ForCausalLM`'s weights (full, unsharded) into `model` (any TP)."""
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    full = {"embed_tokens": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}
    for i, layer in enumerate(model.layers):
        p, a = f"layers.{i}.", f"layers.{i}.self_attn."
        full[a + "fused_qkv_a_proj.weight"] = torch.cat([sd[a + "q_a_proj.weight"],
                                                         sd[a + "kv_a_proj_with_mqa.weight"]])
        full[a + "indexer.wk_weights_proj.weight"] = torch.cat(
            [sd[a + "indexer.wk.weight"], sd[a + "indexer.weights_proj.weight"].to(sd[a + "indexer.wk.weight"].dtype)])
        for name in ("q_a_layernorm.weight", "kv_a_layernorm.weight", "q_b_proj.weight", "kv_b_proj.weight",
                     "o_proj.weight", "indexer.wq_b.weight", "indexer.k_norm.weight", "indexer.k_norm.bias"):
            full[a + name] = sd[a + name]
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            full[p + name] = sd[p + name]
        m = p + "mlp."
        if isinstance(layer.mlp, GatedMLP):
            full[m + "gate_up_proj.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])
            full[m + "down_proj.weight"] = sd[m + "down_proj.weight"]
            continue
        full[m + "gate.weight"] = sd[m + "gate.weight"]
        full[m + "e_score_correction_bias"] = sd[m + "gate.e_score_correction_bias"]
        full[m + "experts.w13"] = sd[m + "experts.gate_up_proj"]  # [E, 2I, H], gate rows first
        full[m + "experts.w2"] = sd[m + "experts.down_proj"]  # [E, H, I]
        s = m + "shared_experts."
        full[m + "shared_expert.gate_up_proj.weight"] = torch.cat([sd[s + "gate_proj.weight"],
                                                                   sd[s + "up_proj.weight"]])
        full[m + "shared_expert.down_proj.weight"] = sd[s + "down_proj.weight"]
    load_full_state_dict(model, full, model.group)

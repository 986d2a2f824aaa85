"""MiniMax-M2 / M2.5 in plain PyTorch, decode order as vLLM's `minimax_m2.py` (MODELS.md §2).

Per layer: RMSNorm -> qkv_proj -> QK RMSNorm over the WHOLE projected q and k width (under TP the
per-token variances of the local slices are summed across ranks with a [T, 2] fp32 all-reduce
and divided by P before the local weight slice is applied) -> partial NeoX RoPE (rotary_dim of
head_dim) -> paged K/V cache write -> GQA -> o_proj + all-reduce -> RMSNorm -> sigmoid router
with correction bias -> SwiGLU experts -> all-reduce. When TP exceeds the kv heads (a multiple of
them), each kv head and its k_norm weight slice are replicated over TP/kv ranks, as in vLLM.

Norm convention is Hugging Face's `MiniMaxM2RMSNorm`: x̂ is cast to the model dtype before the
weight multiplies it (vLLM multiplies in fp32; the two agree in fp32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from braze.models.common import (
    FP8_BLOCK, ColumnParallelLinear, DecodeBatch, Fp8Scheme, MoE, PageTable, ProcessGroup, ReplicatedLinear,
    RMSNorm, RotaryCache, RouterSpec, RowParallelLinear, all_reduce, apply_rope, init_random, load_full_state_dict,
    make_decode_inputs, mark, paged_attention, rope_inv_freq, tp_size, write_slots,
)

__all__ = ["MiniMaxM2Config", "MiniMaxM2ForCausalLM", "load_hf_state_dict", "make_decode_inputs", "DecodeBatch"]


@dataclass(frozen=True)
class MiniMaxM2Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    num_experts: int
    top_k: int
    moe_inter: int
    rope_theta: float = 5e6
    rms_norm_eps: float = 1e-6
    block_size: int = 16

    @classmethod
    def tiny(cls) -> MiniMaxM2Config:
        return cls(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                   rotary_dim=32, num_experts=8, top_k=2, moe_inter=128)

    @classmethod
    def bench(cls, tp: int = 1) -> MiniMaxM2Config:
        """One rank of the published TP=4 deployment (48/8 heads -> 12/2 per rank) with the real hidden
        size, vocab and head_dim, 4 layers and 16 experts. For a TP group of `tp` ranks the full head
        counts are 12·tp / 2·tp, so every rank still holds 12 q and 2 kv heads (tp=4: the real 48/8);
        expert widths stay full and split over the group."""
        return cls(vocab_size=200064, hidden_size=3072, num_layers=4, num_heads=12 * tp, num_kv_heads=2 * tp,
                   head_dim=128, rotary_dim=64, num_experts=16, top_k=8, moe_inter=1536, block_size=64)

    def replace(self, **kw) -> MiniMaxM2Config:
        return dataclasses.replace(self, **kw)


class MiniMaxM2Attention(nn.Module):
    def __init__(self, cfg: MiniMaxM2Config, pages: PageTable, *, group: ProcessGroup | None,
                 fp8: Fp8Scheme | None, device, dtype: torch.dtype):
        super().__init__()
        self.group, self.tp = group, tp_size(group)
        P, H, Hkv = self.tp, cfg.num_heads, cfg.num_kv_heads
        if H % P or (Hkv % P and P % Hkv):
            raise ValueError(f"attention heads ({H} q, {Hkv} kv) do not split over TP={P}: it must divide the q "
                             "heads and divide the kv heads or be a multiple of them")
        # kv heads are replicated when P > Hkv (as vLLM does): rank r holds kv head r // (P/Hkv), with
        # that head's k_norm weight slice.
        self.kv_replicas = max(1, P // Hkv)
        self.heads, self.kv_heads = H // P, max(1, Hkv // P)
        self.head_dim, self.eps, self.scale = cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim ** -0.5
        q_size, kv_size = H * cfg.head_dim, Hkv * cfg.head_dim  # full (TP=1) widths
        rep = (1, self.kv_replicas, self.kv_replicas)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, q_size + 2 * kv_size,
                                             output_sizes=(q_size, kv_size, kv_size), replicas=rep, group=group,
                                             fp8=fp8, device=device, dtype=dtype)
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, group=group, fp8=fp8, device=device, dtype=dtype)
        # Norm weights over the full width, sharded with their heads (only .weight is used).
        self.q_norm = RMSNorm(q_size // P, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.k_norm = RMSNorm(self.kv_heads * cfg.head_dim, cfg.rms_norm_eps, device=device, dtype=dtype)
        mark(self.q_norm.weight, dim=0, init="one")
        mark(self.k_norm.weight, dim=0, parts=(kv_size,), replicas=(self.kv_replicas,), init="one")
        shape = (pages.num_blocks, pages.block_size, self.kv_heads, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of q [T, q'] and k [T, k'] over the full (all-rank) width."""
        dtype = q.dtype
        q, k = q.float(), k.float()
        var = torch.cat([q.pow(2).mean(-1, keepdim=True), k.pow(2).mean(-1, keepdim=True)], dim=-1)  # [T, 2]
        if self.tp > 1:
            # Equal slice widths: the full-width mean is the mean of the P rank means. With kv heads
            # replicated, each of the Hkv distinct k slices sits on P/Hkv ranks, so the sum over ranks
            # counts each one P/Hkv times and sum / P is still the mean over the Hkv distinct slices.
            var = all_reduce(var, self.group, self.tp) / self.tp
        q = self.q_norm.weight * (q * torch.rsqrt(var[:, 0:1] + self.eps)).to(dtype)
        k = self.k_norm.weight * (k * torch.rsqrt(var[:, 1:2] + self.eps)).to(dtype)
        return q, k

    def prologue(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slot_mapping: torch.Tensor) -> torch.Tensor:
        """Everything before the attention kernel: qkv projection, TP-reduced QK-norm, RoPE, the K and V
        cache writes. Returns q [T, H', D]."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H' + 2·Hkv')·D]
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q, k = self.qk_norm(q, k)
        q = apply_rope(q.view(t, self.heads, self.head_dim), cos, sin, style="neox")  # [T, H', D], rotary dims first
        k = apply_rope(k.view(t, self.kv_heads, self.head_dim), cos, sin, style="neox")  # [T, Hkv', D]
        write_slots(self.k_cache, slot_mapping, k)
        write_slots(self.v_cache, slot_mapping, v.view(t, self.kv_heads, self.head_dim))
        return q

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        q = self.prologue(x, cos, sin, slot_mapping)
        o = paged_attention(q, self.k_cache, self.v_cache, block_table, seq_lens, self.scale)  # [T, H', D]
        return self.o_proj(o.reshape(x.shape[0], -1))


class MiniMaxM2DecoderLayer(nn.Module):
    def __init__(self, cfg: MiniMaxM2Config, pages: PageTable, *, group, fp8, device, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = MiniMaxM2Attention(cfg, pages, group=group, fp8=fp8, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        router = RouterSpec(top_k=cfg.top_k, scoring="sigmoid", correction_bias=True, renormalize=True)
        self.mlp = MoE(cfg.hidden_size, cfg.num_experts, cfg.moe_inter, router, group=group, fp8=fp8,
                       device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, cos, sin, slot_mapping, block_table, seq_lens) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, slot_mapping, block_table, seq_lens)
        return h + self.mlp(self.post_attention_layernorm(h))


class MiniMaxM2ForCausalLM(nn.Module):
    def __init__(self, config: MiniMaxM2Config, *, group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 fp8: bool | Fp8Scheme = False, max_batch: int = 16, max_context: int = 512, seed: int = 0):
        super().__init__()
        self.config, self.group = config, group
        fp8_scheme = FP8_BLOCK if fp8 is True else (fp8 or None)  # released weights: 128x128 blocks, fp32 scales
        self.pages = PageTable(max_batch, max_context, config.block_size, device=device, seed=seed)
        self.embed_tokens = mark(nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, device=device,
                                                          dtype=dtype), requires_grad=False))
        kw = dict(group=group, fp8=fp8_scheme, device=device, dtype=dtype)
        self.layers = nn.ModuleList(MiniMaxM2DecoderLayer(config, self.pages, **kw) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = ReplicatedLinear(config.hidden_size, config.vocab_size, device=device, dtype=dtype)
        self.rotary = RotaryCache(rope_inv_freq(config.rotary_dim, config.rope_theta), self.pages.max_context, device)
        init_random(self, seed, group)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        # one slot per token: lets a compiler with dynamic T know the cache rows and slots match
        torch._check(slot_mapping.shape[0] == input_ids.shape[0])
        h = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary(positions)  # [T, rotary_dim/2]
        for layer in self.layers:
            h = layer(h, cos, sin, slot_mapping, block_table, seq_lens)
        return self.lm_head(self.norm(h))  # [T, vocab]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, seq_idx: int, chunk: int = 256) -> torch.Tensor:
        """Start sequence `seq_idx` with input_ids [S]: fill its caches, return logits [S, vocab]."""
        batch = self.pages.prompt(seq_idx, input_ids)
        return torch.cat([self(*(x[i:i + chunk] for x in batch)) for i in range(0, input_ids.shape[0], chunk)])


def load_hf_state_dict(model: MiniMaxM2ForCausalLM, hf_model: nn.Module) -> None:
    """Load a transformers `MiniMaxM2ForCausalLM`'s weights (full, unsharded) into `model` (any TP)."""
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    full = {"embed_tokens": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}
    for i in range(model.config.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        full[a + "qkv_proj.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
        for name in ("o_proj.weight", "q_norm.weight", "k_norm.weight"):
            full[a + name] = sd[a + name]
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight",
                     "mlp.e_score_correction_bias"):
            full[p + name] = sd[p + name]
        full[p + "mlp.experts.w13"] = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2I, H], gate rows first
        full[p + "mlp.experts.w2"] = sd[p + "mlp.experts.down_proj"]  # [E, H, I]
    load_full_state_dict(model, full, model.group)

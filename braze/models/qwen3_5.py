"""Qwen 3.5 (397B-A17B) as faithful plain PyTorch: the hybrid Gated DeltaNet / gated attention MoE stack.

Layers repeat [GDN, GDN, GDN, full attention] (MODELS.md §3). Every layer is
  h = h + mixer(norm₁(h));  h = h + MoE(norm₂(h))
with zero-centered RMSNorms x̂·(1+w). The decode step (`forward`) is one token for each
of T sequences; the Gated DeltaNet state math lives in `gated_deltanet.py`.

Weight layout follows vLLM, not Hugging Face: the GDN input projections are merged into
`in_proj_qkvz` [q‖k‖v‖z] and `in_proj_ba` [b‖a] (the two GEMMs braze may put on two
streams), attention's q/gate, k and v into one `qkv_proj`. `load_hf_state_dict` maps
Hugging Face's separate projections into these.

Tensor parallelism: attention heads, GDN key/value heads (conv channels per q/k/v
segment, A_log, dt_bias) and expert widths are split over the group; attention kv heads
and GDN key heads are replicated when the group is larger than their count (rank r holds
head r // (P/count), see `common.mark`). Two all-reduces per layer, after
`o_proj`/`out_proj` and after the MoE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from braze.models.common import (  # noqa: F401  (make_decode_inputs: part of this module's API)
    FP8_BLOCK, ColumnParallelLinear, Fp8Scheme, MoE, PageTable, ProcessGroup, ReplicatedLinear, RMSNorm,
    RotaryCache, RouterSpec, RowParallelLinear, apply_rope, load_full_state_dict, make_decode_inputs, mark,
    paged_attention, random_full_state_dict, rope_inv_freq, tp_rank, tp_size, write_slots,
)
from braze.models.gated_deltanet import (
    RMSNormGated, causal_conv1d_prefill, causal_conv1d_update, gated_delta_rule_chunked, gated_delta_rule_step,
    gdn_gating, l2norm,
)

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen35Config:
    """Defaults are Qwen3.5-397B-A17B (`real()`); `tiny()` and `bench()` shrink it."""

    vocab_size: int = 248320
    hidden_size: int = 4096
    num_layers: int = 60
    full_attention_interval: int = 4  # every 4th layer is full attention, the others GDN
    # gated full attention
    num_attention_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25  # NeoX RoPE on the first 64 of 256 dims
    rope_theta: float = 1e7
    mrope_section: tuple[int, ...] = (11, 11, 10)  # M-RoPE; for text all three position ids agree -> 1-D RoPE
    # Gated DeltaNet
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 64
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel: int = 4
    # MoE
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 1024
    shared_expert_intermediate_size: int = 1024
    rms_norm_eps: float = 1e-6
    block_size: int = 16  # paged KV cache page

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple("full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                     for i in range(self.num_layers))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def real(cls) -> Qwen35Config:
        return cls()

    @classmethod
    def tiny(cls) -> Qwen35Config:
        """MODELS.md §3(e): 2 × [GDN×3, full], ratio Hv/Hk = 2, TP=2-shardable."""
        return cls(vocab_size=1024, hidden_size=256, num_layers=8, num_attention_heads=4, num_kv_heads=2,
                   head_dim=64, mrope_section=(3, 3, 2), linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=64, linear_value_head_dim=64, num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=128, shared_expert_intermediate_size=128, block_size=4)

    @classmethod
    def bench(cls, tp: int = 1) -> Qwen35Config:
        """Real hidden size and one rank's heads of the published TEP=8 deployment: attention 32/8 = 4 q
        heads and 1 kv head (2 kv heads replicated over 8 ranks), GDN 16/8 = 2 key and 64/8 = 8 value
        heads; one [GDN×3, full] group. Experts cut from 512 to 16 (top-10 kept): common's MoE reads only
        the chosen experts when T·k < E, else runs all E densely. For a TP group of `tp` ranks the full
        head counts are these times tp (4·tp q, tp kv, 2·tp key, 8·tp value heads), so every rank still
        holds the heads above; the expert widths stay full and split over the group."""
        return cls(num_layers=4, num_attention_heads=4 * tp, num_kv_heads=tp, linear_num_key_heads=2 * tp,
                   linear_num_value_heads=8 * tp, num_experts=16, block_size=64)


class StepInputs(NamedTuple):
    """What the token mixers of one step need besides the hidden states."""

    cos: torch.Tensor  # [T, rotary_dim/2] fp32
    sin: torch.Tensor  # [T, rotary_dim/2] fp32
    slot_mapping: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [T, max_blocks] int32
    seq_lens: torch.Tensor  # [T] int32
    state_indices: torch.Tensor  # [T] int64, GDN state slot of each token's sequence


# ----------------------------------------------------------------------------
# token mixers
# ----------------------------------------------------------------------------


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (MODELS.md §3(b), GDN steps 2-8).

    Caches: conv_state [max_batch, C', K-1] (model dtype), ssm_state [max_batch, Hv', dk, dv] (fp32).
    """

    def __init__(self, cfg: Qwen35Config, *, group: ProcessGroup | None, max_batch: int, fp8: Fp8Scheme | None,
                 device, dtype: torch.dtype):
        super().__init__()
        P, Hk, Hv = tp_size(group), cfg.linear_num_key_heads, cfg.linear_num_value_heads
        if Hv % Hk or Hv % P or (Hk % P and P % Hk):
            raise ValueError(f"GDN heads ({Hk} key, {Hv} value) do not split over TP={P}: value heads must be a "
                             "multiple of key heads and of TP, and TP must divide the key heads or be a multiple")
        # Key heads are replicated when P > Hk: rank r holds key head r // (P/Hk), the one its Hv/P value
        # heads (a contiguous run inside that key head's group of Hv/Hk) read.
        self.key_replicas = max(1, P // Hk)
        self.hk, self.hv = max(1, Hk // P), Hv // P
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key, value = Hk * self.dk, Hv * self.dv  # full widths
        self.conv_dim = 2 * self.hk * self.dk + self.hv * self.dv  # C': local conv channels [q‖k‖v]
        kw = dict(group=group, device=device, dtype=dtype)
        rk = self.key_replicas
        self.in_proj_qkvz = ColumnParallelLinear(cfg.hidden_size, 2 * key + 2 * value,
                                                 output_sizes=(key, key, value, value), replicas=(rk, rk, 1, 1),
                                                 fp8=fp8, **kw)
        self.in_proj_ba = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.linear_num_value_heads,
                                               output_sizes=(cfg.linear_num_value_heads,) * 2, **kw)
        K = cfg.linear_conv_kernel
        self.conv_weight = mark(nn.Parameter(torch.empty(self.conv_dim, K, device=device, dtype=dtype),
                                             requires_grad=False), dim=0, parts=(key, key, value),
                                        replicas=(rk, rk, 1), init="small")
        self.A_log = mark(nn.Parameter(torch.empty(self.hv, device=device), requires_grad=False), dim=0,
                          init="small")
        self.dt_bias = mark(nn.Parameter(torch.empty(self.hv, device=device), requires_grad=False), dim=0,
                            init="small")
        self.norm = RMSNormGated(self.dv, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.norm.weight.requires_grad_(False)
        mark(self.norm.weight, init="one")
        self.out_proj = RowParallelLinear(value, cfg.hidden_size, fp8=fp8, **kw)
        self.register_buffer("conv_state", torch.zeros(max_batch, self.conv_dim, K - 1, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("ssm_state", torch.zeros(max_batch, self.hv, self.dk, self.dv, device=device,
                                                      dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, step: StepInputs, prefill_slot: int | None = None) -> torch.Tensor:
        # x: [T, hidden]; one token per sequence, or (prefill_slot given) T tokens of one sequence
        T = x.shape[0]
        hk, hv, dk, dv = self.hk, self.hv, self.dk, self.dv
        mixed_qkv, z = self.in_proj_qkvz(x).split([self.conv_dim, hv * dv], dim=-1)  # [T, C'], [T, Hv'·dv]
        b, a = self.in_proj_ba(x).split([hv, hv], dim=-1)  # [T, Hv'] each
        if prefill_slot is None:
            mixed_qkv = causal_conv1d_update(mixed_qkv, self.conv_state, self.conv_weight, step.state_indices)
        else:
            mixed_qkv, final = causal_conv1d_prefill(mixed_qkv, self.conv_weight, self.conv_state[prefill_slot])
            self.conv_state[prefill_slot] = final
        q, k, v = mixed_qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
        q = l2norm(q.view(T, hk, dk))  # [T, Hk', dk] fp32
        k = l2norm(k.view(T, hk, dk))  # [T, Hk', dk] fp32
        v = v.view(T, hv, dv)  # [T, Hv', dv]
        g, beta = gdn_gating(a, b, self.A_log, self.dt_bias)  # [T, Hv'] fp32 each
        if prefill_slot is None:
            o = gated_delta_rule_step(q, k, v, g, beta, self.ssm_state, step.state_indices)  # [T, Hv', dv] fp32
        else:
            o, final = gated_delta_rule_chunked(q, k, v, g, beta, self.ssm_state[prefill_slot])
            self.ssm_state[prefill_slot] = final
        o = self.norm(o.to(x.dtype), z.view(T, hv, dv))  # [T, Hv', dv]
        return self.out_proj(o.reshape(T, hv * dv))  # [T, hidden], all-reduced

    def reset(self, slot: int) -> None:
        self.conv_state[slot].zero_()
        self.ssm_state[slot].zero_()


class GatedAttention(nn.Module):
    """GQA with per-head zero-centered QK-norm, partial NeoX RoPE and a sigmoid output gate (MODELS.md §3(b)).

    Caches: k_cache, v_cache [num_blocks, block_size, Hkv', head_dim] (model dtype).
    """

    def __init__(self, cfg: Qwen35Config, *, group: ProcessGroup | None, num_blocks: int, fp8: Fp8Scheme | None,
                 device, dtype: torch.dtype):
        super().__init__()
        P = tp_size(group)
        H, Hkv, D = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
        if H % P or (Hkv % P and P % Hkv):
            raise ValueError(f"attention heads ({H} q, {Hkv} kv) do not split over TP={P}")
        # kv heads are replicated when P > Hkv: rank r holds kv head r // (P/Hkv)
        self.kv_replicas = max(1, P // Hkv)
        self.h, self.hkv, self.d = H // P, max(1, Hkv // P), D
        kv, r = Hkv * D, self.kv_replicas
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, 2 * H * D + 2 * kv, output_sizes=(2 * H * D, kv, kv),
                                             replicas=(1, r, r), group=group, fp8=fp8, device=device, dtype=dtype)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps, zero_centered=True, device=device, dtype=dtype)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps, zero_centered=True, device=device, dtype=dtype)
        self.o_proj = RowParallelLinear(H * D, cfg.hidden_size, group=group, fp8=fp8, device=device, dtype=dtype)
        shape = (num_blocks, cfg.block_size, self.hkv, D)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, step: StepInputs, prefill_slot: int | None = None) -> torch.Tensor:
        # x: [T, hidden]; prefill and decode are the same code (each token sees seq_lens of its sequence)
        T, H, Hkv, D = x.shape[0], self.h, self.hkv, self.d
        q_gate, k, v = self.qkv_proj(x).split([2 * H * D, Hkv * D, Hkv * D], dim=-1)
        q, gate = q_gate.view(T, H, 2 * D).chunk(2, dim=-1)  # [T, H', D] each: per head [q_h ‖ gate_h]
        q = apply_rope(self.q_norm(q), step.cos, step.sin)  # [T, H', D]
        k = apply_rope(self.k_norm(k.view(T, Hkv, D)), step.cos, step.sin)  # [T, Hkv', D]
        write_slots(self.k_cache, step.slot_mapping, k)
        write_slots(self.v_cache, step.slot_mapping, v.view(T, Hkv, D))
        o = paged_attention(q, self.k_cache, self.v_cache, step.block_table, step.seq_lens, D**-0.5)  # [T, H', D]
        o = o.reshape(T, H * D) * torch.sigmoid(gate.reshape(T, H * D))
        return self.o_proj(o)  # [T, hidden], all-reduced


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen35Config, layer_type: str, *, group, max_batch: int, num_blocks: int,
                 fp8: Fp8Scheme | None, device, dtype: torch.dtype):
        super().__init__()
        self.layer_type = layer_type
        kw = dict(group=group, fp8=fp8, device=device, dtype=dtype)
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, max_batch=max_batch, **kw)
        else:
            self.self_attn = GatedAttention(cfg, num_blocks=num_blocks, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=True, device=device,
                                       dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=True,
                                                device=device, dtype=dtype)
        router = RouterSpec(top_k=cfg.num_experts_per_tok, scoring="softmax", renormalize=True, dtype=dtype)
        self.mlp = MoE(cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, router,
                       shared_inter=cfg.shared_expert_intermediate_size, shared_gate=True, **kw)

    def forward(self, h: torch.Tensor, step: StepInputs, prefill_slot: int | None = None) -> torch.Tensor:
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        h = h + mixer(self.input_layernorm(h), step, prefill_slot)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------


class Qwen35ForCausalLM(nn.Module):
    """Qwen 3.5 MoE, text only. See `braze.models` for the contract.

    `forward(input_ids, positions, slot_mapping, block_table, seq_lens, state_indices=None)`: one
    decode step. Token i's sequence keeps its GDN conv/recurrent state in slot `state_indices[i]`
    (default i, which is what `make_decode_inputs` sets up: sequence i in row i).
    """

    def __init__(self, config: Qwen35Config, *, group: ProcessGroup | None = None, device=None,
                 dtype: torch.dtype = torch.bfloat16, fp8: bool | Fp8Scheme = False, max_batch: int = 8,
                 max_context: int = 512, seed: int = 0, prefill_chunk: int = 256):
        super().__init__()
        self.config, self.group, self.prefill_chunk = config, group, prefill_chunk
        # fp8=True: the official Qwen3.5 FP8 scheme (128x128 weight blocks); router, shared-expert gate and
        # in_proj_ba stay in bf16.
        scheme = FP8_BLOCK if fp8 is True else (fp8 or None)
        self.pages = PageTable(max_batch, max_context, config.block_size, device=device)
        H, V = config.hidden_size, config.vocab_size
        self.embed_tokens = mark(nn.Parameter(torch.empty(V, H, device=device, dtype=dtype), requires_grad=False))
        self.layers = nn.ModuleList(
            DecoderLayer(config, t, group=group, max_batch=max_batch, num_blocks=self.pages.num_blocks, fp8=scheme,
                         device=device, dtype=dtype)
            for t in config.layer_types)
        self.norm = RMSNorm(H, config.rms_norm_eps, zero_centered=True, device=device, dtype=dtype)
        self.lm_head = ReplicatedLinear(H, V, device=device, dtype=dtype)
        self.rotary = RotaryCache(rope_inv_freq(config.rotary_dim, config.rope_theta), self.pages.max_context,
                                  device=device)
        if device is None or torch.device(device).type != "meta":
            self.init_random(seed)

    # ---- weights

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Draw every weight at its full (TP=1) shape from a generator seeded with `seed`: the same math
        at every TP size, replicated heads included."""
        device = self.embed_tokens.device
        gen = torch.Generator(device=device).manual_seed(seed)
        self.load_full_state_dict(random_full_state_dict(self, gen, tp_size(self.group), device,
                                                         self.embed_tokens.dtype))

    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Load a TP=1-shaped state dict (our names) into this rank's shards (replicated heads included)."""
        load_full_state_dict(self, full, self.group)

    # ---- running

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, seq_lens: torch.Tensor,
                state_indices: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: input_ids [T] -> logits [T, vocab]; caches and states updated in place."""
        if state_indices is None:
            state_indices = torch.arange(input_ids.shape[0], device=input_ids.device)
        # one slot and one state per token: lets a compiler with dynamic T know rows and indices match
        torch._check(slot_mapping.shape[0] == input_ids.shape[0])
        torch._check(state_indices.shape[0] == input_ids.shape[0])
        return self._run(input_ids, positions, slot_mapping, block_table, seq_lens, state_indices)

    def _run(self, input_ids, positions, slot_mapping, block_table, seq_lens, state_indices,
             prefill_slot: int | None = None) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary(positions)
        step = StepInputs(cos, sin, slot_mapping, block_table, seq_lens, state_indices)
        for layer in self.layers:
            h = layer(h, step, prefill_slot)
        return self.lm_head(self.norm(h))  # [T, vocab]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, seq_idx: int) -> torch.Tensor:
        """Start sequence `seq_idx` with input_ids [S]: fill its KV pages and GDN states (slot seq_idx),
        in chunks of `prefill_chunk` tokens. Returns logits [S, vocab]."""
        batch = self.pages.prompt(seq_idx, input_ids)
        for layer in self.layers:
            if layer.layer_type == "linear_attention":
                layer.linear_attn.reset(seq_idx)
        S, out = input_ids.shape[0], []
        for start in range(0, S, self.prefill_chunk):
            chunk = [t[start:start + self.prefill_chunk] for t in batch]
            out.append(self._run(*chunk, state_indices=None, prefill_slot=seq_idx))
        return torch.cat(out)



# ----------------------------------------------------------------------------
# Hugging Face weights
# ----------------------------------------------------------------------------


def hf_to_full_state_dict(hf_state: dict[str, torch.Tensor], cfg: Qwen35Config) -> dict[str, torch.Tensor]:
    """Hugging Face `Qwen3_5MoeForCausalLM` names and layouts -> ours at TP=1.

    HF keeps in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, q_proj (per head [q ‖ gate]) / k_proj /
    v_proj, and the shared expert's gate_proj / up_proj apart; we concatenate them. The conv weight
    loses its singleton channel dim; routed experts are already stacked [E, 2I, H] (gate rows first).
    """
    sd = {k.removeprefix("model."): v for k, v in hf_state.items()}
    full = {"embed_tokens": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "lm_head.weight": hf_state.get("lm_head.weight", sd["embed_tokens.weight"])}
    for i, layer_type in enumerate(cfg.layer_types):
        p = f"layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight",
                     "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight"):
            full[p + name] = sd[p + name]
        full[p + "mlp.experts.w13"] = sd[p + "mlp.experts.gate_up_proj"]
        full[p + "mlp.experts.w2"] = sd[p + "mlp.experts.down_proj"]
        full[p + "mlp.shared_expert.gate_up_proj.weight"] = torch.cat(
            [sd[p + "mlp.shared_expert.gate_proj.weight"], sd[p + "mlp.shared_expert.up_proj.weight"]])
        if layer_type == "linear_attention":
            a = p + "linear_attn."
            full[a + "in_proj_qkvz.weight"] = torch.cat([sd[a + "in_proj_qkv.weight"], sd[a + "in_proj_z.weight"]])
            full[a + "in_proj_ba.weight"] = torch.cat([sd[a + "in_proj_b.weight"], sd[a + "in_proj_a.weight"]])
            full[a + "conv_weight"] = sd[a + "conv1d.weight"].squeeze(1)  # [C, 1, K] -> [C, K]
            for name in ("A_log", "dt_bias", "norm.weight", "out_proj.weight"):
                full[a + name] = sd[a + name]
        else:
            a = p + "self_attn."
            full[a + "qkv_proj.weight"] = torch.cat(
                [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
            for name in ("q_norm.weight", "k_norm.weight", "o_proj.weight"):
                full[a + name] = sd[a + name]
    return full


@torch.no_grad()
def load_hf_state_dict(model: Qwen35ForCausalLM, hf_model: nn.Module) -> None:
    """Copy a Hugging Face `Qwen3_5MoeForCausalLM`'s weights into `model` (this rank's shards)."""
    model.load_full_state_dict(hf_to_full_state_dict(hf_model.state_dict(), model.config))

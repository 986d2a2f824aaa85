"""Shared building blocks of braze's plain-PyTorch models: TP linears, FP8, norms, RoPE, paged caches, MoE.

Everything here is written the way people write it in eager PyTorch, because braze's
passes must recognize it. The decode-step pieces have no data-dependent Python
control flow, so a model built from them traces with `torch.compile(fullgraph=True)`.

Weights are described at their full (TP=1) shape: a parameter is marked with how it
is sharded (`mark`), `load_full_state_dict` slices a full state dict into the local
shards (FP8 weights are quantized whole, as in a checkpoint, then sliced), and
`init_random` draws each tensor at full shape from a seeded generator and loads it the same
way, so TP=1 and TP=P models built from the same seed hold the same math.
FP8 quantization and the scaled GEMM live in `fp8.py` and are re-exported here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from braze.models.fp8 import (  # noqa: F401  (re-exported: part of common's API)
    FP8, FP8_BLOCK, FP8_BLOCK_UE8M0, FP8_CHANNEL, FP8_MAX, FP8_MIN_SCALE, Fp8Scheme, dequant_weight_fp8,
    fp8_linear, from_bytes, quant_fp8_group, quant_fp8_per_token, quant_weight_fp8, scaled_mm_supported, to_bytes,
    use_scaled_mm,
)

ProcessGroup = dist.ProcessGroup

# ----------------------------------------------------------------------------
# tensor parallelism
# ----------------------------------------------------------------------------


def tp_size(group: ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def tp_rank(group: ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce(x: torch.Tensor, group: ProcessGroup | None, size: int) -> torch.Tensor:
    """Sum `x` over the TP group in place (Dynamo traces this to all_reduce + wait_tensor)."""
    if size > 1:
        dist.all_reduce(x, group=group)
    return x


class Sharding(NamedTuple):
    """How a marked tensor is split over the TP ranks and drawn at random init (see `mark`)."""

    dim: int | None
    parts: tuple[int, ...] | None
    init: str
    replicas: tuple[int, ...] | None = None


def mark(t: torch.Tensor, *, dim: int | None = None, parts: tuple[int, ...] | None = None,
         init: str = "normal", replicas: tuple[int, ...] | None = None) -> torch.Tensor:
    """Record on `t` (a Parameter or buffer, once wrapped) how it is sharded (along `dim`, each segment
    of `parts` split evenly over the ranks) and how it is drawn at random init.

    replicas (one per segment of `parts`, which then must be given): k > 1 replicates the segment over
    k ranks, as heads are when the group is larger than their count: the segment splits into size/k
    pieces and rank r holds piece r // k. The full shape stays the unreplicated one, so a TP=P model
    draws and loads the same full tensors as the TP=1 model.

    init: "normal" (std 0.02), "one" (1 + 0.1·N, norm weights), "small" (0.1·N: zero-centered
    norm weights, biases), "zero".
    """
    if replicas is not None and (parts is None or len(replicas) != len(parts)):
        raise ValueError(f"replicas {replicas} needs one entry per segment of parts {parts}")
    t._braze = Sharding(dim, parts, init, replicas)  # type: ignore[attr-defined]
    return t


def local_size(parts: tuple[int, ...], replicas: tuple[int, ...] | None, size: int) -> int:
    """Width of one rank's slice of segments `parts` (full sizes) with `replicas` (see `mark`)."""
    replicas = replicas or (1,) * len(parts)
    for p, k in zip(parts, replicas):
        if size % k or p % (size // k):
            raise ValueError(f"a segment of {p} replicated over {k} ranks does not split over TP={size}; "
                             "pick a TP size that divides the heads, or a multiple of their count")
    return sum(p // (size // k) for p, k in zip(parts, replicas))


def shard(full: torch.Tensor, dim: int | None, parts: tuple[int, ...] | None, rank: int, size: int,
          replicas: tuple[int, ...] | None = None) -> torch.Tensor:
    """This rank's slice of `full`: each segment of `parts` along `dim` is split into `size` equal pieces
    (into size/k pieces, rank r taking piece r // k, for a segment replicated over k ranks)."""
    if dim is None or size == 1:
        return full
    segments = full.split(list(parts), dim) if parts else [full]
    pieces = []
    for seg, k in zip(segments, replicas or (1,) * len(segments)):
        ways = size // k if size % k == 0 else 0
        if not ways or seg.shape[dim] % ways:
            raise ValueError(f"cannot shard a segment of {seg.shape[dim]} along dim {dim} over {size} ranks "
                             f"(replicated {k}x; full shape {tuple(full.shape)}); pick a TP size that divides it")
        pieces.append(seg.chunk(ways, dim)[rank // k])
    return torch.cat(pieces, dim)


def _marked(model: nn.Module):
    for mod_name, mod in model.named_modules():
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if hasattr(t, "_braze"):
                yield mod, name, f"{mod_name}.{name}" if mod_name else name, t


def _full_shape(t: torch.Tensor, size: int) -> tuple[int, ...]:
    dim, parts, _, replicas = t._braze
    full = sum(parts) if replicas else None  # a replicated segment's local width times size overshoots
    return tuple((full or n * size) if i == dim else n for i, n in enumerate(t.shape))


def full_shapes(model: nn.Module, size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (full TP=1 shape, init kind) for every marked parameter and buffer."""
    return {key: (_full_shape(t, size), t._braze.init) for _, _, key, t in _marked(model)}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], group: ProcessGroup | None = None) -> None:
    """Copy a full (TP=1) state dict into `model`'s local shards; FP8 linears quantize their slice."""
    rank, size = tp_rank(group), tp_size(group)
    missing = [key for _, _, key, _ in _marked(model) if key not in full]
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} tensors, e.g. {missing[:4]}")
    for mod, name, key, t in _marked(model):
        _load(mod, name, key, t, full[key].to(t.device), rank, size)


def _load(mod: nn.Module, name: str, key: str, t: torch.Tensor, full: torch.Tensor, rank: int, size: int) -> None:
    if hasattr(mod, "load_full"):  # FP8 weights: quantized whole, as a checkpoint is, then sliced
        mod.load_full(name, full, rank, size)
        return
    dim, parts, _, replicas = t._braze
    local = shard(full, dim, parts, rank, size, replicas)
    if local.shape != t.shape:
        raise ValueError(f"{key}: expected local shape {tuple(t.shape)}, got {tuple(local.shape)}")
    t.copy_(local)


def shard_fp8(q: torch.Tensor, s: torch.Tensor, scheme: Fp8Scheme, dim: int | None, parts: tuple[int, ...] | None,
              rank: int, size: int, replicas: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice a quantized weight q [..., N, K] and its scales like `shard` slices the weight. Per-channel
    scales [..., N, 1] follow the rows (a K split leaves them whole); 128x128 block scales follow
    their blocks, so every shard must hold whole blocks."""
    if dim is None or size == 1:
        return q, s
    k_dim = q.dim() - 1
    if not scheme.block:
        return (shard(q, dim, parts, rank, size, replicas),
                s if dim == k_dim else shard(s, dim, parts, rank, size, replicas))
    for seg, k in zip(parts or (q.shape[dim],), replicas or (1,) * len(parts or (0,))):
        if seg % (128 * (size // k)):
            raise ValueError(f"block FP8 under TP={size} needs shards of whole 128-blocks; a segment of {seg} "
                             f"along dim {dim} does not split so. Use FP8_CHANNEL or another TP size")
    block_parts = tuple(p // 128 for p in parts) if parts else None
    return shard(q, dim, parts, rank, size, replicas), shard(s, dim, block_parts, rank, size, replicas)


def _draw(shape, init: str, generator: torch.Generator, device, std: float) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    scale = {"normal": std, "one": 0.1, "small": 0.1, "zero": 0.0}[init]
    return x * scale + (1.0 if init == "one" else 0.0)


@torch.no_grad()
def init_random(model: nn.Module, seed: int, group: ProcessGroup | None = None, std: float = 0.02) -> None:
    """Fill every marked tensor with a seeded draw at full shape, sliced for this rank, one tensor at a
    time (no full state dict in memory). The generator lives on the model's device."""
    rank, size = tp_rank(group), tp_size(group)
    marked = list(_marked(model))
    device = marked[0][3].device if marked else torch.device("cpu")
    if device.type == "meta":  # shapes only (e.g. to check a bench config without allocating it)
        return
    generator = torch.Generator(device=device).manual_seed(seed)
    for mod, name, key, t in marked:
        _load(mod, name, key, t, _draw(_full_shape(t, size), t._braze.init, generator, device, std), rank, size)


def random_full_state_dict(model: nn.Module, generator: torch.Generator, size: int, device: torch.device | str,
                           dtype: torch.dtype, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Draw every marked tensor at full shape, in a fixed order, from `generator` (seeded on `device`)."""
    return {key: _draw(shape, init, generator, device, std).to(dtype)
            for key, (shape, init) in full_shapes(model, size).items()}


# ----------------------------------------------------------------------------
# linear layers
# ----------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x·Wᵀ (no bias). parallel: None (replicated), "column" (W split by output rows; each of
    `output_sizes` is split separately, for merged projections; `replicas`, one per output size,
    replicates heads over ranks as `mark` describes) or "row" (W split by input columns; the partial
    sums are all-reduced unless reduce=False, which leaves the reduce to the caller)."""

    def __init__(self, in_features: int, out_features: int, *, parallel: str | None = None,
                 group: ProcessGroup | None = None, output_sizes: tuple[int, ...] | None = None,
                 replicas: tuple[int, ...] | None = None, reduce: bool = True, fp8: Fp8Scheme | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.group, self.tp = group, tp_size(group)
        if replicas is not None and (parallel != "column" or output_sizes is None):
            raise ValueError("replicas applies to a column-parallel linear with output_sizes")
        self.parallel, self.reduce, self.fp8 = parallel, reduce, fp8
        out_local, in_local = out_features, in_features
        if parallel == "column":
            out_local, dim = out_features // self.tp, 0
            if replicas is not None:
                out_local = local_size(output_sizes, replicas, self.tp)
        elif parallel == "row":
            in_local, dim = in_features // self.tp, 1
        elif parallel is None:
            dim = None
        else:
            raise ValueError(f"parallel must be None, 'column' or 'row', got {parallel!r}")
        if fp8 is not None and fp8.block and in_local % 128:
            raise ValueError(f"block FP8 needs a local input width divisible by 128, got {in_local}; use FP8_CHANNEL")
        w = torch.empty(out_local, in_local, device=device, dtype=FP8 if fp8 else dtype)
        self.weight = mark(nn.Parameter(w, requires_grad=False), dim=dim,
                           parts=output_sizes if parallel == "column" else None, replicas=replicas)
        if fp8 is not None:
            n_s = (out_local, 1) if not fp8.block else (-(-out_local // 128), in_local // 128)
            self.weight_scale = nn.Parameter(torch.ones(n_s, device=device), requires_grad=False)
            self.use_scaled_mm = use_scaled_mm(w.device, fp8, dtype, out_local, in_local)

    def load_full(self, name: str, full: torch.Tensor, rank: int, size: int) -> None:
        """Set the weight from its full [out, in] value: sliced for this rank (quantized first if FP8)."""
        dim, parts, _, replicas = self.weight._braze
        if self.fp8 is None:
            self.weight.copy_(shard(full, dim, parts, rank, size, replicas))
            return
        q, s = shard_fp8(*quant_weight_fp8(full, self.fp8), self.fp8, dim, parts, rank, size, replicas)
        self.weight.copy_(q)
        self.weight_scale.copy_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            y = F.linear(x, self.weight)
        else:
            y = fp8_linear(x, self.weight, self.weight_scale, self.fp8, self.use_scaled_mm)
        if self.parallel == "row" and self.reduce:
            all_reduce(y, self.group, self.tp)
        return y


class ReplicatedLinear(Linear):
    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, parallel=None, **kw)


class ColumnParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, parallel="column", **kw)


class RowParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, parallel="row", **kw)


# ----------------------------------------------------------------------------
# norms
# ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """HF-style RMSNorm: x̂ = x·rsqrt(mean(x²)+eps) in fp32, cast back, times w.
    zero_centered (Qwen/Gemma): (x̂·(1+w)) in fp32, then cast."""

    def __init__(self, dim: int, eps: float = 1e-6, *, zero_centered: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        w = torch.empty(dim, device=device, dtype=dtype)
        self.weight = mark(nn.Parameter(w, requires_grad=False), init="small" if zero_centered else "one")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------
# rotary embeddings
# ----------------------------------------------------------------------------


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """[dim/2] fp32: theta^(-2i/dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_position: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN frequencies (DeepSeek V3): high frequencies kept, low ones divided by `factor`, a linear
    ramp between the dims that rotate beta_fast and beta_slow times over the original context.
    The attention mscale is the caller's business (DeepSeek folds it into the softmax scale)."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = rope_inv_freq(dim, theta)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


class RotaryCache(nn.Module):
    """cos/sin tables [max_position, r/2] (fp32), looked up by position."""

    def __init__(self, inv_freq: torch.Tensor, max_position: int, device: torch.device | str | None = None):
        super().__init__()
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [P, r/2]
        self.register_buffer("cos", freqs.cos().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # [T, r/2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, style: str = "neox",
               first: bool = True) -> torch.Tensor:
    """Rotate r = 2·cos.shape[-1] dims of x [T, ..., D]: the first r (first=True) or the last r.
    neox: pairs (i, i + r/2) (rotate-half); gptj: pairs (2i, 2i+1), output interleaved. fp32 math."""
    r = 2 * cos.shape[-1]
    d = x.shape[-1]
    cos = cos.view(cos.shape[0], *([1] * (x.dim() - 2)), -1).float()  # [T, 1.., r/2]
    sin = sin.view(sin.shape[0], *([1] * (x.dim() - 2)), -1).float()
    x_rot, x_pass = (x[..., :r], x[..., r:]) if first else (x[..., d - r:], x[..., : d - r])
    x_rot = x_rot.float()
    if style == "neox":
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    elif style == "gptj":
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        raise ValueError(f"rope style must be 'neox' or 'gptj', got {style!r}")
    out = out.to(x.dtype)
    if r == d:
        return out
    return torch.cat([out, x_pass], dim=-1) if first else torch.cat([x_pass, out], dim=-1)


# ----------------------------------------------------------------------------
# paged caches and the decode-step contract
# ----------------------------------------------------------------------------


class DecodeBatch(NamedTuple):
    """The tensors of one step: `model(*batch)`. T tokens, each of its own sequence (or, in a
    chunked prefill, T tokens of one sequence)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block·block_size + offset) the token is written to
    block_table: torch.Tensor  # [T, max_blocks] int32, the token's sequence's blocks
    seq_lens: torch.Tensor  # [T] int32, tokens visible to the token, itself included (= position + 1)


class PageTable:
    """Host-side bookkeeping: each of max_batch sequences owns max_blocks blocks (shuffled, so block
    tables are not the identity) and a current length. Not part of the compiled graph."""

    def __init__(self, max_batch: int, max_context: int, block_size: int,
                 device: torch.device | str | None = None, seed: int = 0):
        self.block_size = block_size
        self.max_blocks = -(-max_context // block_size)
        self.max_context = self.max_blocks * block_size
        self.num_blocks = max_batch * self.max_blocks
        perm = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(seed))
        self.table = perm.view(max_batch, self.max_blocks).to(torch.int32).to(device)
        self.lens = [0] * max_batch

    def slots(self, seq: int, positions: torch.Tensor) -> torch.Tensor:
        blocks = self.table[seq, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def append(self, seqs: list[int], input_ids: torch.Tensor) -> DecodeBatch:
        """Reserve the next position of each sequence in `seqs` for input_ids [T] (one token each)."""
        if len(seqs) != input_ids.shape[0]:
            raise ValueError(f"{len(seqs)} sequences but {input_ids.shape[0]} tokens")
        device = self.table.device
        if any(self.lens[s] >= self.max_context for s in seqs):
            raise ValueError(f"a sequence would exceed max_context={self.max_context}")
        pos = torch.tensor([self.lens[s] for s in seqs], device=device)
        slots = torch.stack([self.slots(s, p) for s, p in zip(seqs, pos)])
        for s in seqs:
            self.lens[s] += 1
        return DecodeBatch(input_ids.to(device), pos, slots, self.table[seqs], (pos + 1).to(torch.int32))

    def prompt(self, seq: int, input_ids: torch.Tensor) -> DecodeBatch:
        """A fresh sequence `seq` of input_ids [S], as S tokens with causal visibility."""
        if input_ids.shape[0] > self.max_context:
            raise ValueError(f"prompt of {input_ids.shape[0]} tokens exceeds max_context={self.max_context}")
        device = self.table.device
        pos = torch.arange(input_ids.shape[0], device=device)
        self.lens[seq] = input_ids.shape[0]
        table = self.table[seq].expand(pos.shape[0], -1)
        return DecodeBatch(input_ids.to(device), pos, self.slots(seq, pos), table, (pos + 1).to(torch.int32))


def write_slots(cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """cache [num_blocks, block_size, *row] <- rows [T, *row] at slot_mapping [T], in place."""
    cache.view(-1, *cache.shape[2:])[slot_mapping] = rows


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, *row] -> [T, max_blocks·block_size, *row], each token's whole context."""
    return cache[block_table].flatten(1, 2)


def context_mask(seq_lens: torch.Tensor, n: int) -> torch.Tensor:
    """[T, n] bool: context position < seq_len."""
    return torch.arange(n, device=seq_lens.device) < seq_lens[:, None]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA over each token's cached context. q [T, H, D]; caches [num_blocks, B, Hkv, D] -> [T, H, Dv]."""
    t, h, d = q.shape
    k = gather_pages(k_cache, block_table)  # [T, N, Hkv, D]
    v = gather_pages(v_cache, block_table)  # [T, N, Hkv, Dv]
    hkv = k.shape[2]
    qg = q.view(t, hkv, h // hkv, d)  # query head j uses kv head j // (H/Hkv)
    scores = torch.einsum("tkgd,tnkd->tkgn", qg.float(), k.float()) * scale
    mask = context_mask(seq_lens, k.shape[1])  # [T, N]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = scores.softmax(-1)
    o = torch.einsum("tkgn,tnkd->tkgd", p, v.float())
    return o.reshape(t, h, -1).to(q.dtype)


def make_decode_inputs(model: nn.Module, T: int, context_len: int | list[int],
                       generator: torch.Generator | None = None) -> DecodeBatch:
    """Prefill T sequences of random tokens (context_len each, or one length per sequence) and return
    the next decode step's tensors. The model must have `.config.vocab_size`, `.pages` and `.prefill`."""
    lens = [context_len] * T if isinstance(context_len, int) else list(context_len)
    vocab = model.config.vocab_size
    for seq, n in enumerate(lens):
        model.prefill(torch.randint(vocab, (n,), generator=generator), seq)
    return model.pages.append(list(range(T)), torch.randint(vocab, (T,), generator=generator))


from braze.models.moe import (  # noqa: E402,F401  (re-exported: part of common's API)
    Experts, GatedMLP, MoE, RouterSpec, experts_read, grouped_mm_supported, route, sparse_experts,
)

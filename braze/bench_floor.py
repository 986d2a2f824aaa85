"""The floor of one decode step: the bytes it must move and the weight-GEMM flops it must do, counted
from the model's own parameters and buffers.

Bytes, per rank (under TP every tensor here is this rank's shard):

- weights: every parameter read once, except
  - `embed_tokens`: only the T rows looked up;
  - routed experts (`Experts` under a `MoE`): only the experts a step must read, by the same rule
    the model uses to pick its sparse path (`experts_read`: T·k of E when T·k < E, else all E;
    T·k bounds the distinct experts from above and is exact at T=1);
- paged caches (`k_cache`, `v_cache`, `index_cache`): each token reads its whole context
  (context + the new token) and writes its new row; `mla_cache` (DeepSeek's sparse MLA): each token
  reads min(index_topk, context + 1) rows and writes one;
- per-sequence state (`conv_state`, `ssm_state`): each token's row read and written;
- rotary tables (`cos`, `sin`): the T rows looked up; any other buffer: read whole;
- activations: the step's input tensors read and the logits written; intermediate activations are
  assumed to stay on chip, and all-reduce traffic (NVLink, not HBM) is not counted.

Flops: 2·T·(elements) for every 2-D or stacked weight a token multiplies (routed experts: k per
token), i.e. the weight GEMMs; attention and element-wise math are left out (at decode contexts of a
few hundred tokens they are under 1% of the GEMM flops and memory-bound anyway).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from braze.models.common import MoE, experts_read

PAGED_CACHES = ("k_cache", "v_cache", "index_cache")
SPARSE_CACHES = ("mla_cache",)
STATES = ("conv_state", "ssm_state")
ROTARY = ("cos", "sin")


@dataclass(frozen=True)
class Floor:
    """What one decode step of `tokens` tokens at `context` tokens of context must move and compute."""

    tokens: int
    context: int
    bytes_by_kind: dict[str, int]  # kind -> bytes (see the module docstring for each rule)
    gemm_flops: int
    experts_read: dict[str, int]  # MoE module path -> experts counted

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    def seconds(self, copy_bytes_per_s: float, matmul_flops_per_s: float | None) -> dict[str, float | None]:
        """The two floors (bytes over copy bandwidth, flops over the matmul rate) and the larger one."""
        bytes_s = self.total_bytes / copy_bytes_per_s
        flops_s = self.gemm_flops / matmul_flops_per_s if matmul_flops_per_s else None
        return {"bytes_s": bytes_s, "flops_s": flops_s, "floor_s": max(bytes_s, flops_s or 0.0)}

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "context": self.context, "total_bytes": self.total_bytes,
                "bytes_by_kind": dict(self.bytes_by_kind), "gemm_flops": self.gemm_flops,
                "experts_read": dict(self.experts_read)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_floor(model: nn.Module, tokens: int, context: int, inputs: tuple[torch.Tensor, ...] = ()) -> Floor:
    """The floor of `model(*inputs)` for `tokens` sequences each with `context` cached tokens."""
    T, seq = tokens, context + 1  # each token attends to its context and itself
    pages = model.pages
    index_topk = getattr(model.config, "index_topk", None)
    routed = {id(m.experts): (path, m.router.top_k) for path, m in model.named_modules() if isinstance(m, MoE)}
    by_kind: dict[str, int] = defaultdict(int)
    flops = 0
    read: dict[str, int] = {}
    for path, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(mod) in routed:
                moe_path, k = routed[id(mod)]
                n_exp = p.shape[0]
                n = experts_read(T, k, n_exp)
                read[moe_path] = n
                by_kind["routed experts"] += _nbytes(p) * n // n_exp
                if not name.endswith("_scale"):
                    flops += 2 * T * k * (p.numel() // n_exp)
            elif mod is model and name == "embed_tokens":
                by_kind["embedding rows"] += T * p.shape[1] * p.element_size()
            else:
                by_kind["weights"] += _nbytes(p)
                if p.dim() >= 2 and not name.endswith("_scale"):
                    flops += 2 * T * p.numel()
        for name, b in mod.named_buffers(recurse=False):
            kind, nbytes = _buffer_bytes(path, name, b, T, seq, pages, index_topk)
            by_kind[kind] += nbytes
    by_kind["activations"] += sum(_nbytes(x) for x in inputs)
    vocab = model.config.vocab_size
    by_kind["activations"] += T * vocab * model.lm_head.weight.element_size()  # logits written
    return Floor(T, context, dict(by_kind), flops, read)


def _buffer_bytes(path: str, name: str, b: torch.Tensor, T: int, seq: int, pages,
                  index_topk: int | None) -> tuple[str, int]:
    """(kind, bytes) that buffer `name` of module `path` costs a step of T tokens seeing `seq` tokens."""
    where = f"{path}.{name}" if path else name
    if name in PAGED_CACHES + SPARSE_CACHES:
        if b.shape[0] != pages.num_blocks:
            raise ValueError(f"{where}: expected a paged cache of {pages.num_blocks} blocks on dim 0, got shape "
                             f"{tuple(b.shape)}; teach braze.bench_floor this cache's layout")
        row = _nbytes(b) // (pages.num_blocks * pages.block_size)  # bytes per cached token
        if name in PAGED_CACHES:
            return "kv caches", T * (seq + 1) * row  # read the context, write the new row
        return "sparse-attention cache", T * (min(index_topk or seq, seq) + 1) * row
    if name in STATES:
        return "recurrent state", 2 * T * (_nbytes(b) // b.shape[0])  # the sequence's row, read and written
    if name in ROTARY:
        return "rotary rows", T * b.shape[-1] * b.element_size()
    return "other buffers", _nbytes(b)

"""Mixture of experts: routers (sigmoid + correction bias + group-limited top-k, softmax), SwiGLU
experts with an exact sparse path for small decode steps, shared experts, TP slicing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from braze.models.common import (
    FP8, ColumnParallelLinear, Fp8Scheme, ProcessGroup, ReplicatedLinear, RowParallelLinear, all_reduce, fp8_linear,
    mark, quant_weight_fp8, shard, shard_fp8, tp_size, use_scaled_mm,
)



@dataclass(frozen=True)
class RouterSpec:
    """softmax: p = softmax(logits), top-k of p. sigmoid: s = σ(logits), top-k of s (+ correction bias),
    optionally only within the topk_group best of n_group groups (group score: sum of its top-2);
    weights are s (or p) at the chosen experts, renormalized, times routed_scaling."""

    top_k: int
    scoring: str = "softmax"
    correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = True
    routed_scaling: float = 1.0
    dtype: torch.dtype = torch.float32  # dtype of the router GEMM


def route(logits: torch.Tensor, spec: RouterSpec,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, expert ids [T, k])."""
    t, e = logits.shape
    if spec.scoring == "softmax":
        scores = logits.softmax(-1, dtype=torch.float32)
        choice = scores
    elif spec.scoring == "sigmoid":
        scores = logits.float().sigmoid()
        choice = scores + bias if bias is not None else scores
    else:
        raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', got {spec.scoring!r}")
    if spec.n_group > 1:
        group_scores = choice.view(t, spec.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [T, G]
        group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(t, spec.n_group, e // spec.n_group).reshape(t, e)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    idx = choice.topk(spec.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)
    if spec.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * spec.routed_scaling, idx


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x))·up(x)); gate‖up column-parallel, down row-parallel."""

    def __init__(self, hidden: int, inter: int, *, group: ProcessGroup | None = None, reduce: bool = True,
                 fp8: Fp8Scheme | None = None, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        kw = dict(group=group, fp8=fp8, device=device, dtype=dtype)
        self.gate_up_proj = ColumnParallelLinear(hidden, 2 * inter, output_sizes=(inter, inter), **kw)
        self.down_proj = RowParallelLinear(inter, hidden, reduce=reduce, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def sparse_experts(tokens: int, top_k: int, num_experts: int) -> bool:
    """The MoE rule, decided from static shapes at trace time: a step with fewer (token, expert) pairs
    than experts (T·k < E) runs only the chosen experts; otherwise every expert runs on every token."""
    return tokens * top_k < num_experts


def experts_read(tokens: int, top_k: int, num_experts: int) -> int:
    """Experts whose weights a decode step must read under `sparse_experts`: T·k (an upper bound on the
    distinct ones; exact at T=1) when sparse, else all E."""
    return tokens * top_k if sparse_experts(tokens, top_k, num_experts) else num_experts


def grouped_mm_supported(device: torch.device | str | None, dtype: torch.dtype, *widths: int) -> bool:
    """Whether `torch._grouped_mm` runs here without reading its offsets on the host (so a CUDA graph
    can capture it): bf16 only (its fake/meta function accepts nothing else), on CPU or on CUDA
    sm90/sm100 (PyTorch's CUTLASS path; other GPUs take a fallback that syncs). Every width must be a
    multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    if any(w * 2 % 16 for w in widths):
        return False
    dev = torch.empty(0, device=device).device
    if dev.type in ("cpu", "meta"):
        return True
    if dev.type == "cuda":
        return torch.cuda.get_device_capability(dev)[0] in (9, 10)
    return False


class Experts(nn.Module):
    """E SwiGLU experts with the intermediate width split over TP. Under TP the result is a partial sum;
    the caller reduces it.

    Two exact paths, picked from static shapes (`sparse_experts`): with T·k < E (small decode steps),
    the chosen (token, expert) pairs are sorted by expert and run as two grouped GEMMs that read only
    the chosen experts' weights, in place; otherwise every expert runs on every token and the outputs
    are weighted by a dense routing matrix [T, E] (zero off the top-k), which at T·k >= E reads the same
    weights a grouped GEMM would. The sparse path needs `torch._grouped_mm` (bf16, see
    `grouped_mm_supported`); FP8 experts and other dtypes always run dense.
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, *, group: ProcessGroup | None = None,
                 fp8: Fp8Scheme | None = None, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.fp8, self.tp = fp8, tp_size(group)
        il = inter // self.tp
        if fp8 is not None and fp8.block and il % 128:
            raise ValueError(f"block FP8 experts need a local intermediate width divisible by 128, got {il}")
        wdt = FP8 if fp8 else dtype
        w13 = torch.empty(num_experts, 2 * il, hidden, device=device, dtype=wdt)  # gate rows, then up rows
        w2 = torch.empty(num_experts, hidden, il, device=device, dtype=wdt)
        self.w13 = mark(nn.Parameter(w13, requires_grad=False), dim=1, parts=(inter, inter))
        self.w2 = mark(nn.Parameter(w2, requires_grad=False), dim=2)
        if fp8 is not None:
            s13 = (2 * il, 1) if not fp8.block else (-(-2 * il // 128), hidden // 128)
            s2 = (hidden, 1) if not fp8.block else (-(-hidden // 128), -(-il // 128))
            self.w13_scale = nn.Parameter(torch.ones(num_experts, *s13, device=device), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.ones(num_experts, *s2, device=device), requires_grad=False)
            self.use_scaled_mm = (use_scaled_mm(w13.device, fp8, dtype, 2 * il, hidden)
                                  and use_scaled_mm(w13.device, fp8, dtype, hidden, il))
        self.grouped_mm = fp8 is None and grouped_mm_supported(w13.device, dtype, hidden, il)

    def load_full(self, name: str, full: torch.Tensor, rank: int, size: int) -> None:
        """Set w13 [E, 2I, H] or w2 [E, H, I] from the full value (each expert quantized whole if FP8)."""
        dim, parts = getattr(self, name)._braze[:2]  # experts are never replicated
        if self.fp8 is None:
            getattr(self, name).copy_(shard(full, dim, parts, rank, size))
            return
        q, s = zip(*(quant_weight_fp8(w, self.fp8) for w in full))
        q, s = shard_fp8(torch.stack(q), torch.stack(s), self.fp8, dim, parts, rank, size)
        getattr(self, name).copy_(q)
        getattr(self, f"{name}_scale").copy_(s)

    def is_sparse(self, tokens: int, top_k: int) -> bool:
        """Whether a step of `tokens` tokens with `top_k` experts each takes the sparse path."""
        return self.grouped_mm and sparse_experts(tokens, top_k, self.w13.shape[0])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights: [T, k] fp32; idx: [T, k] expert ids
        t, k = idx.shape
        if self.is_sparse(t, k):
            return self._forward_sparse(x, weights, idx)
        routing = torch.zeros(t, self.w13.shape[0], device=x.device, dtype=torch.float32)
        routing = routing.scatter_(1, idx, weights)  # [T, E]
        return self._forward_dense(x, routing)

    def _forward_sparse(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t, k = idx.shape
        e = self.w13.shape[0]
        pair_expert = idx.flatten()  # [T·k], pair p = (token p // k, slot p % k)
        order = pair_expert.argsort(stable=True)  # pairs grouped by expert
        counts = (pair_expert[:, None] == torch.arange(e, device=idx.device)).sum(0)  # [E]
        offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's group (empty groups allowed)
        xs = x[order // k]  # [T·k, H] token of each pair, in expert order
        gate_up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs)  # [T·k, 2I']
        gate, up = gate_up.chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)  # [T·k, H]
        y = ys[order.argsort()].view(t, k, -1)  # [T, k, H] back in (token, slot) order
        return (y.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)

    def _forward_dense(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; routing: [T, E] fp32
        if self.fp8 is None:
            gate_up = torch.einsum("th,eih->eti", x, self.w13)  # [E, T, 2I']
            gate, up = gate_up.chunk(2, dim=-1)
            y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, self.w2)  # [E, T, H]
            return torch.einsum("eth,te->th", y.float(), routing).to(x.dtype)
        out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        for e in range(self.w13.shape[0]):  # static loop: FP8 GEMMs are 2-D
            gate, up = fp8_linear(x, self.w13[e], self.w13_scale[e], self.fp8, self.use_scaled_mm).chunk(2, dim=-1)
            y = fp8_linear(F.silu(gate) * up, self.w2[e], self.w2_scale[e], self.fp8, self.use_scaled_mm)
            out = out + y.float() * routing[:, e:e + 1]
        return out.to(x.dtype)


class MoE(nn.Module):
    """Router (replicated) -> routed experts (+ shared expert, optionally σ-gated) -> one all-reduce."""

    def __init__(self, hidden: int, num_experts: int, inter: int, router: RouterSpec, *, shared_inter: int = 0,
                 shared_gate: bool = False, group: ProcessGroup | None = None, reduce: bool = True,
                 fp8: Fp8Scheme | None = None, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.router, self.group, self.tp, self.reduce = router, group, tp_size(group), reduce
        self.gate = ReplicatedLinear(hidden, num_experts, device=device, dtype=router.dtype)
        if router.correction_bias:
            bias = torch.empty(num_experts, device=device, dtype=torch.float32)
            self.register_buffer("e_score_correction_bias", mark(bias, init="small"))
        else:
            self.e_score_correction_bias = None
        kw = dict(group=group, fp8=fp8, device=device, dtype=dtype)
        self.experts = Experts(num_experts, hidden, inter, **kw)
        self.shared_expert = GatedMLP(hidden, shared_inter, reduce=False, **kw) if shared_inter else None
        self.shared_expert_gate = ReplicatedLinear(hidden, 1, device=device, dtype=dtype) if shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        logits = self.gate(x.to(self.router.dtype))  # [T, E]
        weights, idx = route(logits, self.router, self.e_score_correction_bias)
        y = self.experts(x, weights, idx)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            y = y + shared
        if self.reduce:
            all_reduce(y, self.group, self.tp)
        return y



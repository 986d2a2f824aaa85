"""The fused routed experts: `braze::moe_experts` (CUDA, a `triton_op`) and its CPU twin.

`moe_experts(x, w13, w2, idx, weights, spec)` runs the Experts site described by the JSON `spec`
(braze.patterns.moe): y[t] = Σ_j w[t, j] · down_e(silu(gate_e(x[t])) · up_e(x[t])), e = idx[t, j], with
w13 [E, H, 2I] and w2 [E, I, H] read in place (any strides). Two launches: the gate/up GEMVs with the
SwiGLU, then the down GEMVs with the weighted sum (braze.codegen.moe).
"""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.moe import braze_moe_down, braze_moe_gate_up, down_blocks, gate_up_blocks
from braze.patterns.moe import Experts, experts_reference

from .rowwise import cpu_backend, interpreted

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _check(spec: Experts, x, w13, w2, idx, weights) -> None:
    t, k, e, hid, i = spec.tokens, spec.top_k, spec.experts, spec.hidden, spec.inter
    want = {"x": (x, (t, hid)), "w13": (w13, (e, hid, 2 * i)), "w2": (w2, (e, i, hid)), "idx": (idx, (t, k)),
            "weights": (weights, (t, k))}
    for name, (v, shape) in want.items():
        if tuple(v.shape) != shape:
            raise ValueError(f"braze moe_experts: {name} of shape {tuple(v.shape)}, expected {list(shape)}")
    for name, v in (("x", x), ("w13", w13), ("w2", w2)):
        if v.dtype != torch.bfloat16:
            raise ValueError(f"braze moe_experts: {name} is {v.dtype}, expected torch.bfloat16")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"braze moe_experts: idx is {idx.dtype}, expected an integer tensor")


def _run(x, w13, w2, idx, weights, spec_json: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """y; written into `out` when given (tests pass a poisoned one)."""
    spec = Experts.from_json(spec_json)
    _check(spec, x, w13, w2, idx, weights)
    if x.device.type == "cpu" and cpu_backend() == "reference":
        return experts_reference(spec, x, w13, w2, idx, weights)
    t, k, hid, inter = spec.tokens, spec.top_k, spec.hidden, spec.inter
    y = torch.empty(t, hid, dtype=_DTYPES[spec.out], device=x.device) if out is None else out
    if t == 0:
        return y
    ids = idx.reshape(t * k).contiguous()
    h = torch.empty(t * k, inter, dtype=torch.bfloat16, device=x.device)
    on_cpu = x.device.type == "cpu"
    bn1, bk1, w1 = gate_up_blocks(hid)
    bn2, bk2, w2_warps = down_blocks(hid, inter)
    grid1 = (t * k, triton.cdiv(inter, bn1))
    grid2 = (t, triton.cdiv(hid, bn2))
    args1 = (x, x.stride(0), x.stride(1), ids, w13, w13.stride(0), w13.stride(1), w13.stride(2), h, spec.experts)
    const1 = dict(TOP_K=k, HIDDEN=hid, INTER=inter, ROUND_ACT=spec.round_act, BLOCK_N=bn1, BLOCK_K=bk1,
                  SOFT_ROUND=on_cpu)
    args2 = (h, ids, w2, w2.stride(0), w2.stride(1), w2.stride(2), weights, weights.stride(0), weights.stride(1),
             y, spec.experts)
    const2 = dict(TOP_K=k, HIDDEN=hid, INTER=inter, ROUND_OUT=spec.out == "bfloat16", BLOCK_N=bn2, BLOCK_K=bk2,
                  SOFT_ROUND=on_cpu)
    if on_cpu:
        interpreted(braze_moe_gate_up)[grid1](*args1, **const1)
        interpreted(braze_moe_down)[grid2](*args2, **const2)
    else:
        wrap_triton(braze_moe_gate_up)[grid1](*args1, **const1, num_warps=w1)
        wrap_triton(braze_moe_down)[grid2](*args2, **const2, num_warps=w2_warps)
    return y


@triton_op("braze::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                spec: str) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.braze.moe_experts_cpu(x, w13, w2, idx, weights, spec)
    return _run(x, w13, w2, idx, weights, spec)


@custom_op("braze::moe_experts_cpu", mutates_args=())
def moe_experts_cpu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                    spec: str) -> torch.Tensor:
    return _run(x, w13, w2, idx, weights, spec)


@moe_experts_cpu.register_fake
def _(x, w13, w2, idx, weights, spec):
    s = Experts.from_json(spec)
    return torch.empty(s.tokens, s.hidden, dtype=_DTYPES[s.out], device=x.device)

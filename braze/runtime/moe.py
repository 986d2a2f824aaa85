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


def _check_shared(spec: Experts, w13, w2, ws13, ws2, gate) -> None:
    if tuple(ws13.shape) != tuple(w13.shape[1:]) or tuple(ws2.shape) != tuple(w2.shape[1:]):
        raise ValueError(f"braze moe_experts: shared expert weights {tuple(ws13.shape)}, {tuple(ws2.shape)}, expected "
                         f"{tuple(w13.shape[1:])} and {tuple(w2.shape[1:])}")
    if ws13.dtype != torch.bfloat16 or ws2.dtype != torch.bfloat16:
        raise ValueError("braze moe_experts: shared expert weights must be bf16")
    if spec.shared == "sigmoid" and tuple(gate.shape) != (spec.tokens, 1):
        raise ValueError(f"braze moe_experts: shared gate logits {tuple(gate.shape)}, expected [{spec.tokens}, 1]")


def _run(x, w13, w2, idx, weights, spec_json: str, out: torch.Tensor | None = None, ws13=None, ws2=None,
         gate=None) -> torch.Tensor:
    """y; written into `out` when given (tests pass a poisoned one). With spec.shared, ws13 [H, 2I] and ws2 [I, H]
    (any strides) and, for "sigmoid", the gate logits [T, 1]."""
    spec = Experts.from_json(spec_json)
    _check(spec, x, w13, w2, idx, weights)
    shared = spec.shared != "none"
    if shared:
        _check_shared(spec, w13, w2, ws13, ws2, gate)
    if x.device.type == "cpu" and cpu_backend() == "reference":
        return experts_reference(spec, x, w13, w2, idx, weights, ws13, ws2, gate)
    t, k, hid, inter = spec.tokens, spec.top_k, spec.hidden, spec.inter
    y = torch.empty(t, hid, dtype=_DTYPES[spec.out], device=x.device) if out is None else out
    if t == 0:
        return y
    ids = idx.reshape(t * k).contiguous()
    h = torch.empty(t * k + (t if shared else 0), inter, dtype=torch.bfloat16, device=x.device)
    on_cpu = x.device.type == "cpu"
    bn1, bk1, w1 = gate_up_blocks(hid)
    bn2, bk2, w2_warps = down_blocks(hid, inter)
    grid1 = (t * k + (t if shared else 0), triton.cdiv(inter, bn1))
    grid2 = (t, triton.cdiv(hid, bn2))
    sigmoid = spec.shared == "sigmoid"
    s13 = ws13 if shared else w13[0]  # (the routed weights stand in for an absent shared expert: never read)
    s2 = ws2 if shared else w2[0]
    args1 = (x, x.stride(0), x.stride(1), ids, w13, w13.stride(0), w13.stride(1), w13.stride(2), h, spec.experts,
             s13, s13.stride(0), s13.stride(1), t * k)
    const1 = dict(TOP_K=k, HIDDEN=hid, INTER=inter, ROUND_ACT=spec.round_act, BLOCK_N=bn1, BLOCK_K=bk1,
                  SOFT_ROUND=on_cpu, SHARED=shared)
    args2 = (h, ids, w2, w2.stride(0), w2.stride(1), w2.stride(2), weights, weights.stride(0), weights.stride(1),
             y, spec.experts, s2, s2.stride(0), s2.stride(1), gate if sigmoid else weights,
             gate.stride(0) if sigmoid else 0, t * k)
    const2 = dict(TOP_K=k, HIDDEN=hid, INTER=inter, ROUND_OUT=spec.out == "bfloat16", BLOCK_N=bn2, BLOCK_K=bk2,
                  SOFT_ROUND=on_cpu, SHARED=shared, SIGMOID=sigmoid)
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


@triton_op("braze::moe_experts_shared", mutates_args=())
def moe_experts_shared(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                       ws13: torch.Tensor, ws2: torch.Tensor, gate: torch.Tensor, spec: str) -> torch.Tensor:
    """moe_experts plus every token's shared expert (spec.shared; `gate` is read only for "sigmoid")."""
    if x.device.type == "cpu":
        return torch.ops.braze.moe_experts_shared_cpu(x, w13, w2, idx, weights, ws13, ws2, gate, spec)
    return _run(x, w13, w2, idx, weights, spec, ws13=ws13, ws2=ws2, gate=gate)


@custom_op("braze::moe_experts_shared_cpu", mutates_args=())
def moe_experts_shared_cpu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor,
                           weights: torch.Tensor, ws13: torch.Tensor, ws2: torch.Tensor, gate: torch.Tensor,
                           spec: str) -> torch.Tensor:
    return _run(x, w13, w2, idx, weights, spec, ws13=ws13, ws2=ws2, gate=gate)


@moe_experts_shared_cpu.register_fake
def _(x, w13, w2, idx, weights, ws13, ws2, gate, spec):
    s = Experts.from_json(spec)
    return torch.empty(s.tokens, s.hidden, dtype=_DTYPES[s.out], device=x.device)

"""A fused MoE router: `braze::router` (CUDA, a `triton_op`) and its CPU twin.

`router(logits, bias, spec)` -> (weights [T, k] fp32, expert ids [T, k] int64), as
braze.patterns.router.router_reference defines it; one launch of braze.codegen.router.braze_router. `bias`
is read only when the spec has one (else any tensor stands in for it).
"""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.router import SCORING_CODES, braze_router, launch_config
from braze.patterns.router import Router, router_reference

from .rowwise import cpu_backend, interpreted


def _check(spec: Router, logits: torch.Tensor, bias: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] != spec.experts:
        raise ValueError(f"braze router: logits of shape {tuple(logits.shape)}, expected [T, {spec.experts}]")
    if spec.experts % spec.groups or not 0 < spec.top_groups <= spec.groups:
        raise ValueError(f"braze router: {spec.experts} experts in {spec.groups} groups, top {spec.top_groups}")
    if spec.bias and (bias.shape != (spec.experts,) or bias.dtype != torch.float32):
        raise ValueError(f"braze router: bias {tuple(bias.shape)} {bias.dtype}, expected fp32 [{spec.experts}]")


def _run(logits: torch.Tensor, bias: torch.Tensor, spec_json: str,
         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids); written into `out` when given (tests pass poisoned ones)."""
    spec = Router.from_json(spec_json)
    _check(spec, logits, bias)
    if logits.device.type == "cpu" and cpu_backend() == "reference":
        return router_reference(spec, logits, bias if spec.bias else None)
    t = logits.shape[0]
    if out is None:
        w = torch.empty(t, spec.k, dtype=torch.float32, device=logits.device)
        idx = torch.empty(t, spec.k, dtype=torch.int64, device=logits.device)
    else:
        w, idx = out
    if t == 0:
        return w, idx
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_e, block_k, warps = launch_config(spec.experts, spec.k)
    args = (logits, logits.stride(0), bias.contiguous() if spec.bias else logits, w, idx, spec.scaling, spec.eps)
    const = {"E": spec.experts, "K": spec.k, "BLOCK_E": block_e, "BLOCK_K": block_k,
             "SCORING": SCORING_CODES[spec.scoring], "HAS_BIAS": spec.bias, "RENORM": spec.renormalize,
             "GROUPS": spec.groups, "TOP_GROUPS": spec.top_groups, "BLOCK_G": triton.next_power_of_2(spec.groups)}
    if logits.device.type == "cpu":
        interpreted(braze_router)[(t,)](*args, **const)
    else:
        wrap_triton(braze_router)[(t,)](*args, **const, num_warps=warps)
    return w, idx


@triton_op("braze::router", mutates_args=())
def router(logits: torch.Tensor, bias: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.device.type == "cpu":
        return torch.ops.braze.router_cpu(logits, bias, spec)
    return _run(logits, bias, spec)


@custom_op("braze::router_cpu", mutates_args=())
def router_cpu(logits: torch.Tensor, bias: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(logits, bias, spec)


@router_cpu.register_fake
def _(logits, bias, spec):
    s = Router.from_json(spec)
    return (logits.new_empty(logits.shape[0], s.k, dtype=torch.float32),
            logits.new_empty(logits.shape[0], s.k, dtype=torch.int64))

"""Top-k of short rows: `braze::topk` (CUDA, a `triton_op`) and its CPU twin.

`topk(x, spec)` -> (values [..., k] in x's dtype, indices [..., k] int64) over the last dim of x [..., n],
as braze.patterns.topk.topk_reference defines it; one launch of the kernel `topk_plan` picks for the call
(braze.codegen.topk: a sort in one program per row, or each value ranked against its row).
"""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.topk import TopKPlan, braze_topk, braze_topk_rank, topk_plan
from braze.patterns.topk import DTYPES, TopK, topk_reference

from .rowwise import cpu_backend, interpreted


def _check(spec: TopK, x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] != spec.n:
        raise ValueError(f"braze topk: x of shape {tuple(x.shape)}, expected rows of {spec.n} in the last dim")
    if DTYPES.get(x.dtype) != spec.dtype:
        raise ValueError(f"braze topk: x is {x.dtype}, expected torch.{spec.dtype}")
    if not 0 < spec.k <= spec.n:
        raise ValueError(f"braze topk: k={spec.k} for rows of {spec.n}; expected 0 < k <= n")


def _run(x: torch.Tensor, spec_json: str, out: tuple[torch.Tensor, torch.Tensor] | None = None,
         plan: TopKPlan | None = None):
    """(values, indices); written into `out` when given (tests pass poisoned ones); `plan` overrides topk_plan's
    choice of kernel and blocks (tests, benchmarks)."""
    spec = TopK.from_json(spec_json)
    _check(spec, x)
    if x.device.type == "cpu" and cpu_backend() == "reference":
        return topk_reference(x, spec.k, spec.largest)
    lead = x.shape[:-1]
    rows = x.reshape(-1, spec.n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if out is None:
        vals = torch.empty(*lead, spec.k, dtype=x.dtype, device=x.device)
        idx = torch.empty(*lead, spec.k, dtype=torch.int64, device=x.device)
    else:
        vals, idx = out
    if rows.shape[0] == 0:
        return vals, idx
    args = (rows, rows.stride(0), vals, idx)
    if plan is None:
        plan = topk_plan(spec.n, rows.shape[0], interpreted=x.device.type == "cpu")
    if plan.kernel == "rank":
        fn = braze_topk_rank
        const = {"N": spec.n, "K": spec.k, "BLOCK_I": plan.block_i, "BLOCK_J": plan.block_j, "LARGEST": spec.largest}
        grid = (rows.shape[0], triton.cdiv(spec.n, plan.block_i))
    else:
        fn = braze_topk
        block = triton.next_power_of_2(spec.n)
        const = {"N": spec.n, "K": spec.k, "BLOCK": block, "LARGEST": spec.largest, "LOG": block.bit_length() - 1,
                 "INTERPRETED": x.device.type == "cpu"}
        grid = (rows.shape[0],)
    if x.device.type == "cpu":
        interpreted(fn)[grid](*args, **const)
    else:
        wrap_triton(fn)[grid](*args, **const, num_warps=plan.warps)
    return vals, idx


@triton_op("braze::topk", mutates_args=())
def topk(x: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cpu":
        return torch.ops.braze.topk_cpu(x, spec)
    return _run(x, spec)


@custom_op("braze::topk_cpu", mutates_args=())
def topk_cpu(x: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(x, spec)


@topk_cpu.register_fake
def _(x, spec):
    s = TopK.from_json(spec)
    shape = (*x.shape[:-1], s.k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)

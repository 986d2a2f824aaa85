"""braze's fused ops, callable directly by people who fuse by hand.

Each op checks its inputs and says what it expected when they are wrong, runs
one generated Triton kernel on CUDA (the Triton interpreter or the reference on
CPU), and has a pure-torch `*_reference` with the same signature.

    q, scale = braze.ops.rmsnorm_quant(x, w, 1e-6, group_size=128, scale_format="ue8m0")
    out = braze.ops.rmsnorm(x, w, 1e-6, residual=r)   # out.normed, out.residual
    out = braze.ops.allreduce_rmsnorm(x, w, 1e-6, group=tp_group, residual=r)   # sum over the TP group first
    values, indices = braze.ops.topk(scores, 8)   # rows of up to 4096 values, one program per row
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from braze.patterns.reference import row_chain_reference
from braze.patterns.stages import Cast, FP8Quant, ResidualAdd, RMSNorm, RowChain, UnaryOp, WeightMul, dtype_name

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SCALE_FORMATS = ("fp32", "ue8m0")


class NormQuantOut(NamedTuple):
    q: torch.Tensor  # [..., D] float8_e4m3fn
    scale: torch.Tensor  # [..., D // group_size] fp32: x ≈ q * scale per group
    residual: torch.Tensor | None  # x + residual, when a residual was given
    normed: torch.Tensor | None  # the norm output, when return_normed


class NormOut(NamedTuple):
    normed: torch.Tensor
    residual: torch.Tensor | None


def _check(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.dim() < 1:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a float32/bfloat16/float16 tensor [..., D], got {got}")
    if x.stride(-1) != 1:
        raise ValueError(f"x: expected unit stride in the last dim, got strides {x.stride()}; pass x.contiguous()")
    width = x.shape[-1]
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != width:
            raise ValueError(f"weight: expected shape [{width}] to match x's last dim, got {tuple(weight.shape)}")
        if weight.dtype not in _FLOATS:
            raise ValueError(f"weight: expected a float32/bfloat16/float16 tensor, got {weight.dtype}")
        if weight.device != x.device:
            raise ValueError(f"weight: expected device {x.device} (x's), got {weight.device}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual: expected {tuple(x.shape)} {x.dtype} on {x.device} like x, "
                f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}"
            )
        if residual.stride(-1) != 1:
            raise ValueError(f"residual: expected unit stride in the last dim, got {residual.stride()}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")


def _norm_stage(x, weight, eps, zero_centered, store) -> RMSNorm:
    dt = dtype_name(x.dtype)
    epilogue: tuple = (Cast(dt),)
    if weight is not None:
        epilogue = (WeightMul("float32", dtype_name(weight.dtype), zero_centered, "float32" if zero_centered else None),
                    Cast(dt))
    f32 = "float32"
    return RMSNorm(float(eps), x.shape[-1], f32, f32, f32, f32, epilogue, store)


def _quant_stage(width: int, group_size: int | None, scale_format: str, scale_floor: float) -> FP8Quant:
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format: expected one of {SCALE_FORMATS}, got {scale_format!r}")
    group = width if group_size is None else group_size
    if not isinstance(group, int) or group < 1 or width % group:
        raise ValueError(f"group_size: expected a positive divisor of the width {width}, got {group_size!r}")
    if not (isinstance(scale_floor, (int, float)) and scale_floor > 0):
        raise ValueError(f"scale_floor: expected a float > 0, got {scale_floor!r}")
    f32 = "float32"
    prog = (UnaryOp("cast", f32), UnaryOp("div", f32, 448.0), UnaryOp("clamp_min", f32, float(scale_floor)))
    if scale_format == "ue8m0":
        prog += (UnaryOp("log2", f32), UnaryOp("ceil", f32), UnaryOp("exp2", f32))
    return FP8Quant(group, "float8_e4m3fn", f32, "div", prog, (-448.0, 448.0), (prog,))


def _chain(x, weight, eps, residual, zero_centered, quant, store_normed) -> RowChain:
    res = ResidualAdd(dtype_name(x.dtype), True) if residual is not None else None
    return RowChain(dtype_name(x.dtype), res, _norm_stage(x, weight, eps, zero_centered, store_normed), quant)


def _inputs(x, weight, residual) -> list[torch.Tensor]:
    return [t for t in (x, residual, weight) if t is not None]


def rmsnorm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    group_size: int | None = None,
    scale_format: str = "fp32",
    scale_floor: float = 1e-10,
    return_normed: bool = False,
    _reference: bool = False,
) -> NormQuantOut:
    """[residual add ->] RMSNorm -> dynamic FP8 (e4m3) quant of each row, in one kernel.

    h = x + residual (rounded to x.dtype) when a residual is given;
    y = h * rsqrt(mean(h^2) + eps) * w (or * (1 + w) if zero_centered), in fp32, rounded to x.dtype;
    per group of `group_size` values (default: the whole row), s = max(amax|y| / 448, scale_floor),
    rounded up to a power of two if scale_format == "ue8m0"; q = clamp(y / s, ±448) as float8_e4m3fn.
    Bytes: reads x [+ residual] + weight, writes q, scales [+ h] [+ y].
    """
    _check(x, weight, residual, eps)
    chain = _chain(x, weight, eps, residual, zero_centered,
                   _quant_stage(x.shape[-1], group_size, scale_format, scale_floor), return_normed)
    inputs = _inputs(x, weight, residual)
    outs = row_chain_reference(chain, inputs) if _reference else torch.ops.braze.fused_rowwise(inputs, chain.to_json())
    outs = list(outs)
    res = outs.pop(0) if residual is not None else None
    normed = outs.pop(0) if return_normed else None
    q, scale = outs
    return NormQuantOut(q, scale, res, normed)


def rmsnorm_quant_reference(*args, **kwargs) -> NormQuantOut:
    """The pure-torch reference of rmsnorm_quant (same arguments)."""
    return rmsnorm_quant(*args, _reference=True, **kwargs)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    _reference: bool = False,
) -> NormOut:
    """[residual add ->] RMSNorm of each row in one kernel; returns the normed rows and x + residual."""
    _check(x, weight, residual, eps)
    chain = _chain(x, weight, eps, residual, zero_centered, None, True)
    inputs = _inputs(x, weight, residual)
    outs = row_chain_reference(chain, inputs) if _reference else torch.ops.braze.fused_rowwise(inputs, chain.to_json())
    outs = list(outs)
    res = outs.pop(0) if residual is not None else None
    return NormOut(outs[0], res)


def rmsnorm_reference(*args, **kwargs) -> NormOut:
    """The pure-torch reference of rmsnorm (same arguments)."""
    return rmsnorm(*args, _reference=True, **kwargs)


def allreduce_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    group: torch.distributed.ProcessGroup,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    symm_max_tokens: int = 256,
    _reference: bool = False,
) -> NormOut:
    """Sum x over `group`, [add residual ->] RMSNorm, as one op: the normed rows and the new residual.

    On CUDA with at most `symm_max_tokens` rows and a symmetric-memory workspace for the group (see
    braze.runtime.symm_mem.prepare), one kernel does the one-shot all-reduce and the rest; otherwise the
    group's all-reduce (NCCL, gloo) then one fused kernel. Every rank of the group must call it.
    """
    _check(x, weight, residual, eps)
    chain = _chain(x, weight, eps, residual, zero_centered, None, True)
    inputs = _inputs(x, weight, residual)
    if _reference:
        from braze.runtime.collective import allreduce_rowwise_reference

        outs = allreduce_rowwise_reference(inputs, chain.to_json(), group.group_name)
    else:
        outs = torch.ops.braze.allreduce_rowwise(inputs, chain.to_json(), group.group_name, symm_max_tokens)
    outs = list(outs)
    res = outs.pop(0) if residual is not None else None
    return NormOut(outs[0], res)


def allreduce_rmsnorm_reference(*args, **kwargs) -> NormOut:
    """The pure-torch reference of allreduce_rmsnorm (same arguments; it communicates too)."""
    return allreduce_rmsnorm(*args, _reference=True, **kwargs)


def topk(x: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (or smallest) of each row of x [..., n] (n <= 4096; float32, bfloat16 or float16), sorted, with
    their int64 indices: one Triton launch (a sort per row, or each value ranked against its row). Equal values
    come out in index order, -0.0 ties +0.0, NaN counts as the largest (torch.topk's order; it leaves the order
    of ties open)."""
    from braze.patterns.topk import DTYPES, KERNEL_MAX_ROW, TopK

    if x.dim() == 0 or x.dtype not in DTYPES:
        raise ValueError(f"braze.ops.topk: x of shape {tuple(x.shape)} and {x.dtype}; expected rows [..., n] of "
                         "float32, bfloat16 or float16")
    n = x.shape[-1]
    if not 0 < k <= n or n > KERNEL_MAX_ROW:
        raise ValueError(f"braze.ops.topk: k={k} of rows of {n}; expected 0 < k <= n <= {KERNEL_MAX_ROW}")
    spec = TopK(n=n, k=k, largest=bool(largest), dtype=DTYPES[x.dtype]).to_json()
    return tuple(torch.ops.braze.topk(x, spec))


def topk_reference(x: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch reference of topk: a stable sort cut at k."""
    from braze.patterns.topk import topk_reference as ref

    return ref(x, k, largest)


import braze.runtime.collective  # noqa: E402,F401  registers torch.ops.braze.allreduce_rowwise
import braze.runtime.rowwise  # noqa: E402,F401  registers torch.ops.braze.*
import braze.runtime.topk  # noqa: E402,F401  registers torch.ops.braze.topk

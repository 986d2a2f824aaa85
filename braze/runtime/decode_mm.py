"""`braze::decode_mm`: a decode GEMM y = x @ wᵀ (+ bias) for 1..4 token rows on braze's weight-stream kernel
(braze.codegen.decode_mm; CUDA, a `triton_op`) and its CPU twin (Triton's interpreter or the reference)."""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.decode_mm import (
    MAX_ROWS,
    NORM_FORMS,
    DecodeMMConfig,
    braze_decode_mm,
    decode_mm_reference,
    decode_mm_tiles,
    norm_flags,
)

from .rowwise import cpu_backend, interpreted


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None = None,
           norm: str = "") -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"braze decode_mm: expected x [T, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"braze decode_mm: x has {x.shape[0]} rows; the kernel takes 1..{MAX_ROWS} "
                         "(use torch.mm above that)")
    if x.dtype != w.dtype or (bias is not None and bias.dtype != w.dtype):
        raise ValueError(f"braze decode_mm: x {x.dtype}, w {w.dtype}"
                         f"{'' if bias is None else f', bias {bias.dtype}'}: expected one dtype")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"braze decode_mm: bias of shape {tuple(bias.shape)}, expected ({w.shape[0]},)")
    if norm not in NORM_FORMS:
        raise ValueError(f"braze decode_mm: norm {norm!r} is not one of {NORM_FORMS}")
    if norm_flags(norm)[2] and (norm_weight is None or tuple(norm_weight.shape) != (x.shape[1],)):
        got = None if norm_weight is None else tuple(norm_weight.shape)
        raise ValueError(f"braze decode_mm: norm {norm!r} needs a weight of shape ({x.shape[1]},), got {got}")


def _run(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config: DecodeMMConfig | None = None,
         out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, norm: str = "",
         eps: float = 0.0) -> torch.Tensor:
    """y [T, N]; `config` overrides decode_mm_tiles's tiles and `out` receives y (tests, benchmarks); `norm`
    (NORM_FORMS) folds an RMSNorm of x, with `norm_weight` and `eps`, into the kernel."""
    _check(x, w, bias, norm_weight, norm)
    if x.device.type == "cpu" and cpu_backend() == "reference":
        return decode_mm_reference(x, w, bias, norm_weight, norm, eps)
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    bias = None if bias is None else bias.contiguous()
    nw = None if norm_weight is None else norm_weight.contiguous()
    T, K = x.shape
    N = w.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device) if out is None else out
    c = decode_mm_tiles(T, N, K) if config is None else config
    on, cast_first, weight = norm_flags(norm)
    args = (x, w, w if bias is None else bias, y, w if nw is None else nw, N, x.stride(0), w.stride(0), y.stride(0),
            float(eps))
    const = {"T": T, "K": K, "HAS_BIAS": bias is not None, "BLOCK_T": triton.next_power_of_2(T),
             "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "UNROLL": c.unroll, "NORM": on, "CAST_FIRST": cast_first,
             "WEIGHT": weight}
    grid = (triton.cdiv(N, c.block_n),)
    if x.device.type == "cpu":
        interpreted(braze_decode_mm)[grid](*args, **const)
    else:
        wrap_triton(braze_decode_mm)[grid](*args, **const, num_warps=c.warps, num_stages=c.stages)
    return y


@triton_op("braze::decode_mm", mutates_args=())
def decode_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None = None,
              norm: str = "", eps: float = 0.0) -> torch.Tensor:
    """rmsnorm(x) [T, K] @ w[N, K]ᵀ (+ bias [N]) -> [T, N], 1 <= T <= 4, accumulated in fp32; no norm when `norm`
    is "" (NORM_FORMS: braze.codegen.decode_mm.rmsnorm_reference)."""
    if x.device.type == "cpu":
        return torch.ops.braze.decode_mm_cpu(x, w, bias, norm_weight, norm, eps)
    return _run(x, w, bias, norm_weight=norm_weight, norm=norm, eps=eps)


@custom_op("braze::decode_mm_cpu", mutates_args=())
def decode_mm_cpu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None = None,
                  norm: str = "", eps: float = 0.0) -> torch.Tensor:
    return _run(x, w, bias, norm_weight=norm_weight, norm=norm, eps=eps)


@decode_mm_cpu.register_fake
def _(x, w, bias, norm_weight=None, norm="", eps=0.0):
    return x.new_empty((x.shape[0], w.shape[0]))

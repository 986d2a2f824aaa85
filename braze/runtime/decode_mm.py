"""`braze::decode_mm`: a decode GEMM y = x @ wᵀ (+ bias) for 1..4 token rows on braze's weight-stream kernel
(braze.codegen.decode_mm; CUDA, a `triton_op`), `braze::decode_bmm` its batched form y[b] = x[b] @ w[b] (a
weight per head, read through its strides), and their CPU twins (Triton's interpreter or the reference)."""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.decode_mm import (
    MAX_ROWS,
    DecodeMMConfig,
    braze_decode_bmm,
    braze_decode_mm,
    decode_bmm_reference,
    decode_bmm_tiles,
    decode_mm_reference,
    decode_mm_tiles,
)

from .rowwise import cpu_backend, interpreted


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
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


def _run(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config: DecodeMMConfig | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, N]; `config` overrides decode_mm_tiles's tiles and `out` receives y (tests, benchmarks)."""
    _check(x, w, bias)
    if x.device.type == "cpu" and cpu_backend() == "reference":
        return decode_mm_reference(x, w, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    bias = None if bias is None else bias.contiguous()
    T, K = x.shape
    N = w.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device) if out is None else out
    c = decode_mm_tiles(T, N, K) if config is None else config
    args = (x, w, w if bias is None else bias, y, N, x.stride(0), w.stride(0), y.stride(0))
    const = {"T": T, "K": K, "HAS_BIAS": bias is not None, "BLOCK_T": triton.next_power_of_2(T),
             "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "UNROLL": c.unroll}
    grid = (triton.cdiv(N, c.block_n),)
    if x.device.type == "cpu":
        interpreted(braze_decode_mm)[grid](*args, **const)
    else:
        wrap_triton(braze_decode_mm)[grid](*args, **const, num_warps=c.warps, num_stages=c.stages)
    return y


@triton_op("braze::decode_mm", mutates_args=())
def decode_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ w[N, K]ᵀ (+ bias [N]) -> [T, N], 1 <= T <= 4, accumulated in fp32."""
    if x.device.type == "cpu":
        return torch.ops.braze.decode_mm_cpu(x, w, bias)
    return _run(x, w, bias)


@custom_op("braze::decode_mm_cpu", mutates_args=())
def decode_mm_cpu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _run(x, w, bias)


@decode_mm_cpu.register_fake
def _(x, w, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


def _run_bmm(x: torch.Tensor, w: torch.Tensor, tiles: tuple[int, int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, T, N]; `tiles` (BLOCK_N, BLOCK_K) override decode_bmm_tiles and `out` receives y (tests)."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(f"braze decode_bmm: expected x [B, T, K] and w [B, K, N], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if not 1 <= x.shape[1] <= MAX_ROWS:
        raise ValueError(f"braze decode_bmm: x has {x.shape[1]} rows a batch; the kernel takes 1..{MAX_ROWS}")
    if x.dtype != w.dtype:
        raise ValueError(f"braze decode_bmm: x {x.dtype}, w {w.dtype}: expected one dtype")
    if x.device.type == "cpu" and cpu_backend() == "reference":
        return decode_bmm_reference(x, w)
    B, T, K = x.shape
    N = w.shape[2]
    y = torch.empty(B, T, N, dtype=x.dtype, device=x.device) if out is None else out
    block_n, block_k = decode_bmm_tiles(N, K) if tiles is None else tiles
    args = (x, w, y, N, *x.stride(), *w.stride(), y.stride(0), y.stride(1))
    const = {"T": T, "K": K, "BLOCK_T": triton.next_power_of_2(T), "BLOCK_N": block_n, "BLOCK_K": block_k}
    grid = (triton.cdiv(N, block_n), B)
    if x.device.type == "cpu":
        interpreted(braze_decode_bmm)[grid](*args, **const)
    else:
        wrap_triton(braze_decode_bmm)[grid](*args, **const, num_warps=4)
    return y


@triton_op("braze::decode_bmm", mutates_args=())
def decode_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, T, K] @ w [B, K, N] -> [B, T, N], 1 <= T <= 4, accumulated in fp32; w in any strides."""
    if x.device.type == "cpu":
        return torch.ops.braze.decode_bmm_cpu(x, w)
    return _run_bmm(x, w)


@custom_op("braze::decode_bmm_cpu", mutates_args=())
def decode_bmm_cpu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _run_bmm(x, w)


@decode_bmm_cpu.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], x.shape[1], w.shape[2]))

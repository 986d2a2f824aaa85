"""Decode GEMMs as a weight stream: y[T, N] = x[T, K] · W[N, K]ᵀ (+ b) for a few token rows, no tensor cores.

Reference: `decode_mm_reference` (fp32 accumulation, rounded once to the output dtype).

At T = 1..4 such a GEMM reads 2·N·K weight bytes and a few KB of activations, so its floor is the weight
bytes over the copy bandwidth. cuBLAS runs the DeepSeek V3.2 prologue's merged [2304, 7168] weight at one
token as a split-K kernel plus a reduction kernel at 2.5x that floor on an H100 (benchmarks/results/
skinny_gemm.md). What a GEMV needs is many weight bytes in flight per SM: each program here owns BLOCK_N
whole weight rows and, with UNROLL, issues the loads of all its K chunks before the first multiply (the
loop is unrolled at compile time and no load depends on another), so a program's latency is one memory
round trip rather than K / BLOCK_K of them. No split over K: every output is one program's sum in a fixed
order, so the result is the same on every call and every CUDA-graph replay.

Bytes per call: 2·N·K (weights, read once, evict-first) + 2·T·K·⌈N/BLOCK_N⌉ (the activation, L2-resident
after the first program) + 2·T·N (outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 4  # token rows the kernel takes; above that a GEMM's tensor cores are worth having


NORM_FORMS = ("", "cast", "cast,w", "w", "1+w", "cast,1+w")  # what `norm` may say (see decode_mm_reference)


def norm_flags(norm: str) -> tuple[bool, bool, int]:
    """(normalize, cast before the weight, weight: 0 none, 1 w, 2 1+w) for a `norm` string of NORM_FORMS."""
    if norm not in NORM_FORMS:
        raise ValueError(f"braze decode_mm: norm {norm!r} is not one of {NORM_FORMS}")
    parts = norm.split(",") if norm else []
    weight = 2 if "1+w" in parts else 1 if "w" in parts else 0
    return bool(norm), "cast" in parts, weight


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None, norm: str, eps: float) -> torch.Tensor:
    """The RMSNorm a `norm` string names, rounded as the graph rounds it: x̂ = x·rsqrt(mean(x²) + eps) in fp32;
    "cast": x̂ rounded to x's dtype; "w" / "1+w": times the weight (or 1 + weight) in fp32; the result in x's
    dtype. "cast,w" is Hugging Face's Llama/DeepSeek RMSNorm, "1+w" Gemma's and Qwen 3.5's."""
    on, cast, mode = norm_flags(norm)
    if not on:
        return x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast:
        h = h.to(x.dtype).float()
    if mode:
        h = h * (weight.float() if mode == 1 else 1.0 + weight.float())
    return h.to(x.dtype)


def decode_mm_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        norm_weight: torch.Tensor | None = None, norm: str = "", eps: float = 0.0) -> torch.Tensor:
    """rmsnorm(x) [T, K] @ w[N, K]ᵀ (+ bias [N]) -> [T, N] in x's dtype, accumulated in fp32 (no norm when `norm`
    is "")."""
    x = rmsnorm_reference(x, norm_weight, norm, eps)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _operand(x_rows, nw_ptr, kk, km, rstd, NORM: tl.constexpr, CAST_FIRST: tl.constexpr, WEIGHT: tl.constexpr):
    """One K chunk of the activation [BLOCK_T, BLOCK_K] as the GEMM reads it: x, or rmsnorm(x) rounded as the
    graph rounds it (decode_mm_reference)."""
    x = tl.load(x_rows + kk[None, :], mask=km[None, :], other=0.0)
    if NORM:
        h = x.to(tl.float32) * rstd[:, None]
        if CAST_FIRST:
            h = h.to(x.dtype).to(tl.float32)
        if WEIGHT > 0:
            nw = tl.load(nw_ptr + kk, mask=km, other=0.0).to(tl.float32)
            if WEIGHT == 2:
                nw = 1.0 + nw
            h = h * nw[None, :]
        x = h.to(x.dtype)
    return x


@triton.jit
def _rstd(x_rows, rk, eps, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """1 / rms of each activation row when NORM (every program reads the L2-resident rows once more), else 0."""
    rstd = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NORM:
        ssq = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            kk = k0 + rk
            h = tl.load(x_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0).to(tl.float32)
            ssq += tl.sum(h * h, axis=1)
        rstd = tl.math.rsqrt(ssq / K + eps)
    return rstd


@triton.jit
def braze_decode_mm(x_ptr, w_ptr, b_ptr, y_ptr, nw_ptr, N, stride_xt, stride_wn, stride_yt, eps,
                    T: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
                    NORM: tl.constexpr = False, CAST_FIRST: tl.constexpr = False, WEIGHT: tl.constexpr = 0):
    # one program: output columns [n0, n0 + BLOCK_N) of every token row
    n0 = tl.program_id(0) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    rk = tl.arange(0, BLOCK_K)
    # rows past N read row N-1 (valid memory, no predicated loads) and are not stored
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    x_rows = x_ptr + tl.minimum(rt, T - 1)[:, None] * stride_xt  # [BLOCK_T, 1]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if UNROLL:
        # the first chunk's weights are requested before anything else, so that their DRAM round trip overlaps the
        # norm's statistics (a reduction across warps: loads issued after it would wait for it)
        w = tl.load(w_rows + rk[None, :], mask=(rk < K)[None, :], other=0.0, eviction_policy="evict_first")
        rstd = _rstd(x_rows, rk, eps, K, BLOCK_T, BLOCK_K, NORM)
        x = _operand(x_rows, nw_ptr, rk, rk < K, rstd, NORM, CAST_FIRST, WEIGHT)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        for k0 in tl.static_range(BLOCK_K, K, BLOCK_K):
            kk = k0 + rk
            km = kk < K
            w = tl.load(w_rows + kk[None, :], mask=km[None, :], other=0.0, eviction_policy="evict_first")
            x = _operand(x_rows, nw_ptr, kk, km, rstd, NORM, CAST_FIRST, WEIGHT)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        rstd = _rstd(x_rows, rk, eps, K, BLOCK_T, BLOCK_K, NORM)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            km = kk < K
            w = tl.load(w_rows + kk[None, :], mask=km[None, :], other=0.0, eviction_policy="evict_first")
            x = _operand(x_rows, nw_ptr, kk, km, rstd, NORM, CAST_FIRST, WEIGHT)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + tl.minimum(rn, N - 1)).to(tl.float32)[None, :]
    out = y_ptr + rt[:, None] * stride_yt + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rt[:, None] < T) & (rn[None, :] < N))


@dataclass(frozen=True)
class DecodeMMConfig:
    """Tiles of one launch: BLOCK_N weight rows per program, K chunks of BLOCK_K, warps, unrolled or looped."""

    block_n: int
    block_k: int
    warps: int
    unroll: bool = True
    stages: int = 1


def decode_mm_tiles(T: int, N: int, K: int) -> DecodeMMConfig:
    """The tile config for a [T, K] x [N, K]ᵀ call: the sweep's best or within a few percent of it at every bench
    shape (decode_mm.json, H200): 2048-wide K chunks, 4 warps, 1/2/4 rows a program as N grows."""
    block_k = min(2048, triton.next_power_of_2(K))
    block_n = 1 if N <= 1024 else 2 if N <= 7168 else 4
    return DecodeMMConfig(max(block_n, 1024 // block_k), block_k, 4)


def decode_mm_plan(T: int, N: int, K: int, dtype: torch.dtype, fold_norm: bool = False) -> DecodeMMConfig | str:
    """The tiles when braze's kernel beats cuBLAS at this shape, else why not (a short reason for a remark).

    Where it wins, by the sweep (benchmarks/results/decode_mm.md, H200, bf16; torch.mm / braze):
    - one token: every shape but the widest weights with short rows (N >= 8192 and K < 6144: 0.96-1.04x there);
      1.06-1.27x on the large weights, 1.5-2.4x on the small, launch-bound ones (N <= 1024);
    - two tokens: weights up to 10 MB (1.1-2.3x); larger ones lose (0.87-1.02x);
    - three or four tokens: weights of at most 1024 rows (1.2-2x); the rest lose up to 1.7x;
    - weights over 70 MB (a vocabulary projection) stay cuBLAS: the largest measured (134 MB) was a tie.
    `fold_norm`: the kernel would also compute the RMSNorm before the GEMM, which otherwise takes a kernel of its
    own. Every program then reads the activation rows for their statistics before its first multiply, which costs
    more than that kernel saves on large weights (benchmarks/results/decode_mm_norm.md, H200, DeepSeek's q_c norm
    and its readers; Inductor's norm + cuBLAS / folded): at one token 7.9 / 6.1 µs on the 9.4 MB q_b, 11.0 / 10.6
    on the 25 MB wq_b, 13.0 / 13.6 on the merged 34.6 MB (no tile config did better than 13.85); at two tokens
    7.7 / 7.5 on q_b, 10.9 / 12.9 on wq_b; at four it loses everywhere. So it folds at one token up to 25 MB, at two up to 10 MB.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype} weights (the kernel is tuned for bf16/fp16)"
    if not 1 <= T <= MAX_ROWS:
        return f"{T} token rows (the kernel takes 1..{MAX_ROWS})"
    if 2 * N * K > 70_000_000:
        return f"cuBLAS is at least as fast for a [{N}, {K}] weight (over 70 MB; the 134 MB one measured was a tie)"
    if fold_norm:
        wins = 2 * N * K <= {1: 25_500_000, 2: 10_000_000}.get(T, 0)
    elif T == 1:
        wins = N < 8192 or K >= 6144
    elif T == 2:
        wins = 2 * N * K <= 10_000_000
    else:
        wins = N <= 1024
    if not wins:
        return (f"cuBLAS is faster for a [{N}, {K}] weight at {T} token(s)"
                f"{', even with the RMSNorm folded in' if fold_norm else ''} (benchmarks/results/decode_mm.md)")
    return decode_mm_tiles(T, N, K)

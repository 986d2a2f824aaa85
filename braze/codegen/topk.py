"""Top-k of short rows as one Triton program per row: a bitonic sort of packed (value, index) keys in registers.

Reference: braze.patterns.topk.topk_reference (a stable sort cut at k). Each value becomes an int64 key whose
order is the order wanted, ties included, so one `tl.sort` of the keys sorts values and indices together:

- high 32 bits: the fp32 value's bits made order-preserving as a signed int (negative floats have their 31
  low bits flipped), after -0.0 -> +0.0 (they tie) and every NaN -> one positive NaN (above +inf);
- low 32 bits: the index, complemented, so that equal values keep index order in the descending sort.

For the k smallest the high half is complemented too (NaN then sorts last, as torch.topk puts it), so every
top-k is one descending sort.

Padding (the row rounded up to a power of two) takes a key beyond every real one and is never selected
(k <= n). Bytes: the row is read once and k values and indices written; the values are re-read by index
from the row (L1/L2-resident) so they come back bit-exact in the input dtype (-0.0 and NaN payloads kept).

Under Triton's interpreter `tl.sort` runs its xor-reductions element by element in Python (4 s for one row of
576); there the kernel sorts with the same bitonic network spelled with split/join (`_bitonic_sort`), so the
key packing, padding and index recovery that the CPU tests check are the GPU's.

A second kernel, `braze_topk_rank`, skips the sort: each value's place is its rank, the number of values ahead
of it in that same order (larger, or equal at a lower index), counted against the whole row, and a value whose
rank is below k is stored at that place. It does n^2 comparisons per row where the sort does n log^2 n, but
they are independent: the row splits over many programs, with no shuffles between threads, where the sort is
a chain of ~log^2 n dependent steps in one program (11.6 µs for one row of 576 on an H100, topk.md).
`topk_plan` picks one kernel per call from the row length and the row count.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@triton.jit
def _bitonic_sort(key, BLOCK: tl.constexpr, LOG: tl.constexpr, DESCENDING: tl.constexpr):
    """key [BLOCK] sorted: the bitonic network, each compare-and-swap over index bit j as a split of
    [BLOCK >> (j+1), 2^j, 2] (the interpreter's path; tl.sort on the GPU)."""
    for s in tl.static_range(1, LOG + 1):
        for jj in tl.static_range(0, s):
            j: tl.constexpr = s - 1 - jj
            outer: tl.constexpr = BLOCK >> (j + 1)
            inner: tl.constexpr = 1 << j
            pair = tl.permute(tl.reshape(key, [outer, 2, inner]), [0, 2, 1])  # [outer, inner, 2]
            left, right = tl.split(pair)
            # blocks of 2^s ascend or descend alternately; the last stage sorts the whole row one way
            down = ((tl.arange(0, outer) >> (s - j - 1)) & 1) == 1
            down = (down != DESCENDING)[:, None]
            swap = (left > right) != down
            pair = tl.join(tl.where(swap, right, left), tl.where(swap, left, right))
            key = tl.reshape(tl.permute(pair, [0, 2, 1]), [BLOCK])
    return key


@triton.jit
def _order_key(x, LARGEST: tl.constexpr):
    """int32 keys whose signed order, descending, is top-k's order of the values x: the fp32 bits made
    order-preserving (negative floats have their 31 low bits flipped), -0.0 -> +0.0 (they tie), every NaN ->
    one positive NaN above +inf; complemented for the k smallest. Every key is above INT32_MIN."""
    b = x.to(tl.float32).to(tl.int32, bitcast=True)
    mag = b & 0x7FFFFFFF
    b = tl.where(mag > 0x7F800000, 0x7FC00000, b)  # every NaN (either sign) -> one positive NaN, above +inf
    b = tl.where(mag == 0, 0, b)  # -0.0 -> +0.0 (they tie); in integer ops, which no compiler folds
    key = b ^ ((b >> 31) & 0x7FFFFFFF)  # signed order == float order
    if not LARGEST:
        key = ~key  # the smallest first, still one descending order
    return key


@triton.jit
def braze_topk(x_ptr, x_row, vals_ptr, idx_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
               LARGEST: tl.constexpr, LOG: tl.constexpr, INTERPRETED: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < N
    row = x_ptr + r * x_row
    key32 = _order_key(tl.load(row + i, mask=m, other=0.0), LARGEST)  # [BLOCK]
    key32 = tl.where(m, key32, -2147483648)  # padding sorts last
    low32 = tl.full([BLOCK], 0xFFFFFFFF, tl.int64)
    key = (key32.to(tl.int64) << 32) | (low32 - i.to(tl.int64))  # equal keys: the lower index first
    if INTERPRETED:
        key = _bitonic_sort(key, BLOCK, LOG, True)
    else:
        key = tl.sort(key, descending=True)
    idx = low32 - (key & low32)
    o = i < K
    tl.store(idx_ptr + r * K + i, idx, mask=o)
    tl.store(vals_ptr + r * K + i, tl.load(row + idx, mask=o), mask=o)


@triton.jit
def braze_topk_rank(x_ptr, x_row, vals_ptr, idx_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_I: tl.constexpr,
                    BLOCK_J: tl.constexpr, LARGEST: tl.constexpr):
    """Program (r, p): values p*BLOCK_I.. of row r, each ranked against the whole row and stored at its rank
    when that is below K. Ranks are distinct (ties go by index), so every place 0..K-1 is written once."""
    r = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = i < N
    row = x_ptr + r * x_row
    xi = tl.load(row + i, mask=mi, other=0.0)
    ki = _order_key(xi, LARGEST)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < N
        kj = _order_key(tl.load(row + j, mask=mj, other=0.0), LARGEST)
        # j is ahead of i: a larger key, or an equal one at a lower index (kj >= ki is kj > ki - 1: no key is
        # INT32_MIN, so ki - 1 does not wrap)
        ahead = kj[None, :] > ki[:, None] - (j[None, :] < i[:, None]).to(tl.int32)
        rank += tl.sum((ahead & mj[None, :]).to(tl.int32), axis=1)
    o = mi & (rank < K)
    tl.store(idx_ptr + r * K + rank, i.to(tl.int64), mask=o)
    tl.store(vals_ptr + r * K + rank, xi, mask=o)  # the input's own bits: -0.0 and NaN payloads kept


def topk_warps(n: int) -> int:
    """Warps for the sort kernel's row of n values (one program per row)."""
    block = triton.next_power_of_2(n)
    return 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8


@dataclass(frozen=True)
class TopKPlan:
    """Which kernel runs a call, and its launch: `rank` (grid rows x cdiv(n, block_i)) or `sort` (one program
    per row; block_i, block_j unused)."""

    kernel: str
    warps: int
    block_i: int = 0
    block_j: int = 0


# Cost model of the two kernels on an H100 (µs per call, fitted to benchmarks/results/topk.md, session 9):
# the sort is one program per row, latency-bound, ~1.5 + 1e-4 * B * log2(B)^2 for rows padded to B (2.8, 5.7,
# 11.6, 28, 72 µs at B = 256 ... 4096, flat in the row count up to 64 rows); the rank kernel costs a base that
# grows with its j loop plus its comparisons at ~1.7e6 per µs (3.7 µs for one row of 576, 14 for 64 rows).
SORT_BASE_US, SORT_PER_STEP_US = 1.5, 1e-4
RANK_BASE_US, RANK_PER_VALUE_US, RANK_PAIRS_PER_US = 2.0, 0.0015, 1.7e6
RANK_SMALL_BLOCK_PROGRAMS = 512  # up to this many programs of 16 rows each the rank kernel keeps block_i 16


def rank_max_rows(n: int) -> int:
    """The most rows of n values for which the rank kernel is estimated faster than the sort (0: never)."""
    block = triton.next_power_of_2(n)
    sort_us = SORT_BASE_US + SORT_PER_STEP_US * block * (block.bit_length() - 1) ** 2
    spare_us = sort_us - RANK_BASE_US - RANK_PER_VALUE_US * n
    return max(0, int(spare_us * RANK_PAIRS_PER_US / (n * n)))


def topk_plan(n: int, rows, kernel: str | None = None, interpreted: bool = False) -> TopKPlan:
    """The kernel for `rows` rows of n values: the rank kernel up to `rank_max_rows(n)` rows, else the sort.
    `rows` may be symbolic (a compile with dynamic shapes): the rank kernel is then chosen only where every row
    count it can take is known to fit, with no guard added. `kernel` forces one ("rank" or "sort"; the tests
    run both). Rank blocks (from the sweep in topk.md): 16 values x 256 per program with 4 warps while that
    makes few programs (one row: 3.7 µs for 576 values), else 64 x 256 with 2 warps; under the interpreter,
    up to 512 x 512 (its cost there is per operation, not per element)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if kernel is None:
        kernel = "rank" if statically_known_true(rows <= rank_max_rows(n)) else "sort"
    if kernel == "sort":
        return TopKPlan("sort", topk_warps(n))
    if kernel != "rank":
        raise ValueError(f"braze topk: kernel {kernel!r}; expected 'rank' or 'sort'")
    block = triton.next_power_of_2(n)
    if interpreted:
        return TopKPlan("rank", 1, min(block, 512), min(block, 512))
    few = statically_known_true(rows * triton.cdiv(n, 16) <= RANK_SMALL_BLOCK_PROGRAMS)
    block_i, block_j = min(block, 16 if few else 64), min(block, 256)
    warps = 1 if block_i * block_j < 1024 else 4 if block_i == 16 else 2
    return TopKPlan("rank", warps, block_i, block_j)

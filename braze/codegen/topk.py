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
"""

from __future__ import annotations

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
def braze_topk(x_ptr, x_row, vals_ptr, idx_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
               LARGEST: tl.constexpr, LOG: tl.constexpr, INTERPRETED: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < N
    row = x_ptr + r * x_row
    x = tl.load(row + i, mask=m, other=0.0).to(tl.float32)  # [BLOCK]
    b = x.to(tl.int32, bitcast=True)
    mag = b & 0x7FFFFFFF
    b = tl.where(mag > 0x7F800000, 0x7FC00000, b)  # every NaN (either sign) -> one positive NaN, above +inf
    b = tl.where(mag == 0, 0, b)  # -0.0 -> +0.0 (they tie); in integer ops, which no compiler folds
    key32 = b ^ ((b >> 31) & 0x7FFFFFFF)  # signed order == float order
    if not LARGEST:
        key32 = ~key32  # the smallest first, still one descending sort
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


def topk_warps(n: int) -> int:
    """Warps for a row of n values (one program per row)."""
    block = triton.next_power_of_2(n)
    return 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8

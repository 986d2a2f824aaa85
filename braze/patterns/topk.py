"""Top-k over short rows: the recognizer of `aten.topk` sites braze's one-kernel sort can take, and its reference.

Decode graphs select over short rows: a router's top-8 of 256 experts, DeepSeek V3.2's per-group top-2 and
top-4 groups, its indexer's top-2048 of a short context. ATen runs each as a radix-select or a segmented sort
of several launches (5-22 µs on an H100 for rows of 8-576 values); one Triton program per row sorts a row of up
to `MAX_ROW` values in registers. The reference is the semantics braze's kernel implements exactly:

- the k largest (or smallest) values of each row, in order, with their indices;
- equal values in index order (a stable sort: `torch.topk` leaves the order of ties unspecified, so this is one
  of the results it may return), -0.0 equal to +0.0;
- NaN larger than every number, as `torch.topk` and `torch.sort` order it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import Miss, aten, is_op, val
from .stages import FlatJsonSpec

KERNEL_MAX_ROW = 4096  # one program sorts the row in registers: 4096 int64 keys over 8 warps is 16 per thread
# The pass takes rows up to 2048: on an H100 braze's kernels beat ATen's top-k there up to 64 rows (and at rows of
# at most 1024 values up to 256 rows), while at 4096 values only one row's rank kernel does (benchmarks/results/
# topk.md); above LONG_ROW values the pass needs the row count known to be at most LONG_ROW_MAX_ROWS: at 256 rows
# of 2048 ATen's radix select is faster (44.6 vs 48.7 µs).
MAX_ROW = 2048
LONG_ROW, LONG_ROW_MAX_ROWS = 1024, 64
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# The kernels and the pass take all three dtypes: their CPU tests run them all, and the H100 tests passed for each
# (session 9; an earlier bfloat16 failure was the test's reference, CUDA's sort, putting a negative NaN first).


@dataclass(frozen=True)
class TopK(FlatJsonSpec):
    """One top-k over the last dim: rows of `n` values in `dtype`, the first `k` of them kept."""

    n: int
    k: int
    largest: bool
    dtype: str


@dataclass(frozen=True)
class TopKMatch:
    node: Node  # the aten.topk node (its users are getitem 0 = values, 1 = indices)
    x: Node
    spec: TopK


def topk_reference(x: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (values [..., k] in x's dtype, indices [..., k] int64): a stable sort, cut at k."""
    values, indices = torch.sort(x, dim=-1, descending=largest, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous()


def topk_args(node: Node) -> tuple[object, object, object, object]:
    """(x, k, dim, largest) of an `aten.topk` node, defaults filled in."""
    args = list(node.args) + [None] * 5
    dim = node.kwargs.get("dim", args[2] if args[2] is not None else -1)
    largest = node.kwargs.get("largest", args[3] if args[3] is not None else True)
    return args[0], args[1], dim, largest


def match_topk(node: Node) -> TopKMatch | Miss:
    """An `aten.topk` whose rows braze's kernel can sort, or why not."""
    if not is_op(node, aten.topk):
        return Miss("not a topk", candidate=False)
    x, k, dim, largest = topk_args(node)
    xv = val(x)
    if xv is None or xv.dim() == 0:
        return Miss("the input's shape is unknown or a scalar", candidate=False)
    if dim not in (-1, xv.dim() - 1):
        return Miss(f"it selects along dim {dim} of a {xv.dim()}-d tensor, not the last",
                    "select along the last dim (move the dim with movedim first)", node=node)
    n = xv.shape[-1]
    if not isinstance(n, int):
        return Miss(f"the row length {n} is dynamic", "mark the selected dim static", node=node)
    if not isinstance(k, int):
        return Miss(f"k={k} is dynamic", "make k a Python int", node=node)
    if xv.dtype not in DTYPES:
        return Miss(f"the values are {xv.dtype}; braze takes float32, bfloat16 and float16 rows",
                    "select over .float() scores", node=node)
    if n > MAX_ROW:
        return Miss(f"rows of {n} values: above {MAX_ROW} ATen's top-k is faster than one program's sort",
                    "", node=node)
    if not 0 < k <= n:
        return Miss(f"k={k} for rows of {n}", "", node=node)
    return TopKMatch(node, x, TopK(n=n, k=k, largest=bool(largest), dtype=DTYPES[xv.dtype]))

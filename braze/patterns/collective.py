"""All-reduces in a post-grad ATen graph, as Dynamo and functionalization leave them.

`torch.distributed.all_reduce(x, group=g)` (in place) and
`torch.distributed._functional_collectives.all_reduce(x, "sum", g)` both reach
the post-grad graph as `_c10d_functional.all_reduce(x, "sum", group_name)`
followed by `_c10d_functional.wait_tensor`. The group is recorded by name in
the graph; the recognizer reads it from there, so a TP group inside a larger
world is reduced over that group and no other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import Miss, describe, dtype_of, is_op, shape_of

c10d = torch.ops._c10d_functional

# Reductions braze fuses: a sum is what tensor parallelism needs between layers.
FUSED_REDUCE_OPS = ("sum",)


@dataclass(frozen=True)
class AllReduceMatch:
    start: Node  # _c10d_functional.all_reduce(input, op, group_name)
    wait: Node  # wait_tensor(start): the reduced value its readers see
    input: Node  # the tensor each rank contributes
    op: str
    group_name: str


def is_wait(node: object) -> bool:
    return is_op(node, c10d.wait_tensor)


def match_all_reduce(wait: Node) -> AllReduceMatch | Miss:
    """Recognize the all-reduce whose result `wait` (a wait_tensor) hands to its readers."""
    if not is_wait(wait):
        return Miss("not a wait_tensor", candidate=False)
    start = wait.args[0]
    if not is_op(start, c10d.all_reduce):
        if is_op(start, c10d.all_reduce_):
            return Miss("an in-place all_reduce_ survived functionalization", "report this graph as a braze bug")
        return Miss(f"waits on {describe(start)}, not an all_reduce", candidate=False)
    x, op, group = (list(start.args) + [None, None])[:3]
    op = start.kwargs.get("reduce_op", op)
    group = start.kwargs.get("group_name", group)
    if not isinstance(x, Node) or shape_of(x) is None:
        return Miss("the reduced tensor has no shape in the graph", candidate=False)
    if group is None or not isinstance(group, str):
        return Miss(f"the all_reduce names its group as {group!r}, not by a group name",
                    "reduce over a ProcessGroup (Dynamo records its name)")
    if op not in FUSED_REDUCE_OPS:
        return Miss(f"the all_reduce reduces with {op!r}; braze fuses {', '.join(FUSED_REDUCE_OPS)}",
                    "sum partial results, as tensor parallelism does")
    users = [u for u in start.users if u is not wait]
    if users:
        return Miss(f"the all_reduce's result is also read by {describe(users[0])} before its wait",
                    "read the reduced value after wait_tensor only")
    if dtype_of(x) is None or not dtype_of(x).is_floating_point:
        return Miss(f"the all_reduce sums {dtype_of(x)} values; braze fuses float sums", candidate=False)
    return AllReduceMatch(start, wait, x, op, str(group))


def all_reduce_reference(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `x` over the group named `group_name` (any backend), as a new tensor."""
    out = c10d.all_reduce(x, "sum", group_name)
    return c10d.wait_tensor(out)

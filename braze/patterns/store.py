"""In-place cache writes as they appear in a post-grad graph.

`cache.view(-1, *row)[slots] = rows` is functionalized to
`index_put(view(cache, [-1, *row]), [slots], rows)`, viewed back to the cache's
shape, and copied into the cache (a graph input) by one `copy_` at the end. The
recognizer starts from that copy_ and reports the cache, the row shape, the slot
indices and the rows written, or why the write is not one braze can take over.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from .fx import Miss, aten, describe, dtype_of, is_cast, is_op, is_view, known_eq, shape_of
from .stages import CacheWrite, dtype_name


@dataclass(frozen=True)
class StoreMatch:
    stage: CacheWrite
    cache: Node  # the graph input written in place
    row_shape: tuple[int, ...]  # trailing dims of the written rows (the cache viewed as [-1, *row])
    slots: Node  # [T] indices into the flattened slots
    rows: Node  # [T, *row] the values written

    def sources(self) -> list[Node]:
        """The rows, and what they were cast from when the cast is to the cache dtype (the
        kernel's write rounds to it anyway)."""
        out, n = [self.rows], self.rows
        while is_view(n):
            n = n.args[0]
            out.append(n)
        if is_cast(n) and dtype_of(n) == dtype_of(self.cache):
            out.append(n.args[0])
        return out
    index_put: Node
    copy: Node  # the copy_ epilogue


def match_store(copy: Node) -> StoreMatch | Miss:
    """Recognize the cache write that `copy` (copy_(cache, new_value)) finishes."""
    if copy.target is not aten.copy_.default:
        return Miss("not a copy_", candidate=False)
    cache, new = copy.args[0], copy.args[1]
    if not isinstance(cache, Node) or cache.op not in ("placeholder", "get_attr"):
        return Miss("copies into something other than a graph input", candidate=False)
    while is_view(new):
        new = new.args[0]
    if not is_op(new, aten.index_put):
        return Miss("the new cache value is not an index_put", candidate=False)
    put = new
    base, indices, values = put.args[:3]
    accumulate = put.args[3] if len(put.args) > 3 else put.kwargs.get("accumulate", False)
    if accumulate:
        return Miss(f"{describe(put)} accumulates into the cache", "write with `=`, not `+=`", node=put)
    if base is cache and len(indices) == 3 and indices[0] is None and indices[1] is None \
            and isinstance(indices[2], Node):
        return _match_bhsd(cache, put, indices[2], values, copy)
    view = base
    if not (view is cache or (is_view(view) and view.args[0] is cache)):
        return Miss(f"{describe(put)} writes into {describe(base)}, not the cache or a view of it",
                    "write as cache.view(-1, *row)[slots] = rows", node=put)
    if len(indices) != 1 or not isinstance(indices[0], Node):
        return Miss(f"{describe(put)} indexes the cache with {len(indices)} index tensors",
                    "flatten the block/offset pair into one slot index: cache.view(-1, *row)[slots]", node=put)
    slots = indices[0]
    view_shape, slot_shape = shape_of(view), shape_of(slots)
    if view_shape is None or slot_shape is None or len(slot_shape) != 1:
        return Miss("slot indices are not one per token", candidate=True)
    row_shape = tuple(view_shape[1:])
    if not all(isinstance(s, int) for s in row_shape):
        return Miss("the cache row shape is dynamic", "use a static cache layout")
    rows = values
    return StoreMatch(CacheWrite(dtype_name(dtype_of(cache))), cache, row_shape, slots, rows, put, copy)


def _match_bhsd(cache: Node, put: Node, pos: Node, values: Node, copy: Node) -> StoreMatch | Miss:
    """`cache[:, :, pos] = values` / `cache.index_copy_(2, pos, values)` into a [B, H, S, D] cache."""
    c_shape, v_shape, p_shape = shape_of(cache), shape_of(values), shape_of(pos)
    if c_shape is None or v_shape is None or p_shape is None or len(c_shape) != 4 or len(v_shape) != 4:
        return Miss(f"{describe(put)} writes [batch, heads, positions] rows of an unknown shape", candidate=True,
                    node=put)
    if not (len(p_shape) == 1 and known_eq(p_shape[0], 1) and known_eq(v_shape[2], 1)):
        return Miss(f"{describe(put)} writes {p_shape} positions per sequence; braze fuses one new token per "
                    "sequence (decode)", node=put)
    if not (known_eq(v_shape[0], c_shape[0]) and known_eq(v_shape[1], c_shape[1]) and known_eq(v_shape[3], c_shape[3])):
        return Miss(f"{describe(put)} writes rows of {tuple(v_shape)} into a cache of {tuple(c_shape)}", node=put)
    row_shape = tuple(c_shape[1:2]) + tuple(c_shape[3:])
    if not all(isinstance(s, int) for s in row_shape):
        return Miss("the cache row shape is dynamic", "use a static cache layout")
    return StoreMatch(CacheWrite(dtype_name(dtype_of(cache)), "bhsd"), cache, row_shape, pos, values, put, copy)

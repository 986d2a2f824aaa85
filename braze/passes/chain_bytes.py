"""Byte caches for the chain pass: which chain values land, as bytes, in which packed cache rows.

A packed byte store (braze.patterns.packed) is taken over only when every piece of every one of
its writes is a value some chain computes (its result, fp8 values or scales) and the byte image
nodes between the value and the store feed nothing else. The chains then carry FieldWrites and
one launch writes the bytes in place; the store's index_put / slice_scatter nodes go dead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from braze.patterns.fx import aten, is_cast, is_op, is_view, val
from braze.patterns.packed import BytePiece, ByteStoreMatch, ByteWrite, match_byte_store
from braze.patterns.stages import FieldWrite, dtype_name

_SHAPE_OPS = (aten.squeeze, aten.unsqueeze, aten.alias, aten.detach)


def base_of(node: Node) -> Node:
    """`node` through shape views (view, reshape, squeeze, unsqueeze, alias)."""
    while is_view(node) or is_op(node, *_SHAPE_OPS):
        node = node.args[0]
    return node


@dataclass
class Claim:
    store: ByteStoreMatch
    write: ByteWrite
    piece: BytePiece
    image: frozenset[Node]  # the nodes between the value and the write that only make its bytes

    def field(self, value: str) -> FieldWrite:
        w = self.write
        return FieldWrite(value, -1, dtype_name(self.piece.dtype), w.base + self.piece.offset, w.row_stride,
                          w.n_slots, w.block, w.page_stride)


@dataclass
class ByteStores:
    """Every packed byte store of a graph, indexed by the values whose bytes they write."""

    stores: list[ByteStoreMatch]
    by_value: dict[Node, list[Claim]] = field(default_factory=dict)

    @classmethod
    def collect(cls, graph: Graph) -> ByteStores:
        stores = []
        for n in graph.nodes:
            if n.target is aten.copy_.default and isinstance(n.args[0], Node) and n.args[0].op in ("placeholder",
                                                                                                   "get_attr"):
                m = match_byte_store(n)
                if isinstance(m, ByteStoreMatch):
                    stores.append(m)
        out = cls(stores)
        for store in stores:
            for w in store.writes:
                images = _images(w)
                if images is None:
                    continue
                for piece, image in zip(w.pieces, images):
                    out.by_value.setdefault(base_of(piece.source), []).append(Claim(store, w, piece, image))
        return out

    def claims(self, value: Node, *, through_cast: bool = False) -> list[Claim]:
        """Claims on `value`'s bytes (or, with through_cast, on a cast of it, e.g. fp32 -> bf16 bytes)."""
        found = list(self.by_value.get(base_of(value), ()))
        if through_cast:
            for u in value.users:
                if is_cast(u):
                    found += self.by_value.get(base_of(u), [])
                    for v in u.users:
                        if is_view(v) or is_op(v, *_SHAPE_OPS):
                            found += self.by_value.get(base_of(v), [])
        seen, unique = set(), []
        for c in found:
            if id(c) not in seen:
                seen.add(id(c))
                unique.append(c)
        return unique

    def complete(self, store: ByteStoreMatch, claimed: set[int]) -> bool:
        """Every piece of every write of `store` is claimed (by id of its Claim's piece)."""
        return all(id(p) in claimed for w in store.writes for p in w.pieces)


def _images(write: ByteWrite) -> list[frozenset[Node]] | None:
    """Per piece, the nodes that turn the value into the bytes the write stores; None when one of
    them is read by anything else (then the bytes must exist as a tensor and the write stays)."""
    values = write.index_put.args[2]
    sources = {p.source for p in write.pieces}
    images = []
    top = values
    while is_view(top):
        top = top.args[0]
    parts = list(top.args[0]) if is_op(top, aten.cat) and len(write.pieces) > 1 else [top]
    shared = {values, top}  # the row (a cat of the images) and its views
    n = values
    while n is not top:
        shared.add(n)
        n = n.args[0]
    for part in parts:
        nodes: set[Node] = set()
        stack = [part]
        while stack:  # back from the piece's bytes to its value
            n = stack.pop()
            if n not in nodes and n not in sources:
                nodes.add(n)
                stack += n.all_input_nodes
        images.append(frozenset(nodes))
    every = shared.union(*images)
    for n in every:
        if any(u not in every and u is not write.index_put for u in n.users):
            return None
    return images


def consumed_by_bytes(node: Node, claims: list[Claim]) -> bool:
    """Whether `node` (a user of a chain value) only feeds the byte images of `claims`."""
    images = set().union(*(c.image for c in claims)) if claims else set()
    if node in images:
        return True
    if is_view(node) or is_op(node, *_SHAPE_OPS) or is_cast(node):
        return bool(node.users) and all(consumed_by_bytes(u, claims) for u in node.users)
    return False


def per_token(node: Node) -> int | None:
    """Elements per token of `node` [T, ...] (None when unknown or not static)."""
    v = val(node)
    if v is None or v.dim() == 0:
        return None
    total = 1
    for d in v.shape[1:]:
        if not isinstance(d, int):
            return None
        total *= d
    return total


def byte_dtype_ok(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)

"""Byte caches as a post-grad graph writes them: byte images of values, packed rows, paged runs.

DeepSeek V3.2 keeps its caches as bytes. The MLA row is `cat([bytes(fp8 latent), bytes(fp32
scales), bytes(bf16 rope)])` written at `cache.view(-1, 656)[slots]`; the indexer's paged cache
holds, per page of B slots, B fp8 key rows and then B fp32 scales, written as
`keys[slot // B, slot % B] = bytes(k8)` and `scales[...] = bytes(scale)` into two column slices
of one `[pages, B·132]` tensor (functionalized to index_put -> slice_scatter chains).

`match_byte_store(copy)` reads such a write back to the values whose bytes land where:
a list of pieces (source node, its dtype, its byte offset in the slot's row) and the addressing
(bytes per row, pages). A chain producing those values can then write the bytes itself
(braze.patterns.stages.FieldWrite), so no byte tensor is ever materialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import Miss, aten, describe, dtype_of, is_cast, is_op, is_view, known_eq, scalar, shape_of, val

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}
_BYTE_DTYPES = (torch.float8_e4m3fn, torch.uint8, torch.int8)


@dataclass(frozen=True)
class BytePiece:
    source: Node  # the value whose little-endian bytes are written
    dtype: torch.dtype  # the dtype those bytes encode
    offset: int  # byte offset of the piece within the slot's row


@dataclass(frozen=True)
class ByteWrite:
    """One index_put of packed bytes: at slot s the row starts at byte
    (s // block) * page_stride + (s % block) * row_stride + base (block 0: s * row_stride + base)."""

    pieces: tuple[BytePiece, ...]
    slots: Node  # [T] slot indices (block and offset derived from them when paged)
    row_bytes: int
    row_stride: int
    base: int
    block: int
    page_stride: int
    n_slots: int
    index_put: Node


@dataclass(frozen=True)
class ByteStoreMatch:
    cache: Node  # the uint8 graph input written in place
    writes: tuple[ByteWrite, ...]
    final: Node  # the new cache value copy_ writes back (readers of it read the written cache)
    copy: Node


def _strip(node: Node) -> Node:
    """Through shape views and the alias / detach nodes some graphs carry around `view.dtype`."""
    while is_view(node) or is_op(node, aten.alias, aten.detach):
        node = node.args[0]
    return node


def byte_image(node: Node) -> tuple[Node, torch.dtype] | None:
    """(source, dtype) if `node` [..., n·size] uint8 holds the little-endian bytes of source [..., n].

    Spellings: `x.view(torch.uint8)` of a 1-byte x; the shift-and-mask image of a 2- or 4-byte x,
    `stack([(x.view(intN).to(int32) >> 8k) & 0xFF for k], -1).to(uint8).flatten(-2)`."""
    node = _strip(node)
    if is_op(node, aten.view.dtype) and dtype_of(node) == torch.uint8:
        src = node.args[0]
        return (src, dtype_of(src)) if dtype_of(src) in _BYTE_DTYPES else None
    if not (is_cast(node) and dtype_of(node) == torch.uint8 and is_op(node.args[0], aten.cat)):
        return None
    parts = node.args[0].args[0]
    dim = node.args[0].args[1] if len(node.args[0].args) > 1 else 0
    shape = shape_of(node.args[0])
    if shape is None or dim not in (-1, len(shape) - 1) or len(parts) not in _INT_OF_SIZE:
        return None
    ints = None
    for k, part in enumerate(parts):
        if not (is_op(part, aten.unsqueeze) and part.args[1] in (-1, len(shape) - 1)):
            return None
        masked = part.args[0]
        if not (is_op(masked, aten.bitwise_and) and scalar(masked.args[1]) == 255):
            return None
        shifted = _strip(masked.args[0])
        if is_op(shifted, aten.__rshift__, aten.bitwise_right_shift) and scalar(shifted.args[1]) == 8 * k:
            shifted = _strip(shifted.args[0])
        elif k != 0:
            return None
        if ints is not None and shifted is not ints:
            return None
        ints = shifted
    size = len(parts)
    # the same-size integer view, maybe widened to int32 first
    if is_cast(ints) and dtype_of(ints) == torch.int32 and size == 2:
        ints = _strip(ints.args[0])
    if not (is_op(ints, aten.view.dtype) and dtype_of(ints) == _INT_OF_SIZE[size]):
        return None
    src = ints.args[0]
    dt = dtype_of(src)
    return (src, dt) if dt is not None and dt.itemsize == size and dt.is_floating_point else None


def packed_pieces(rows: Node) -> list[BytePiece] | Miss:
    """The byte images `rows` [T, R] uint8 is made of: one image, or a cat of images along the row."""
    node = rows
    while is_view(node):
        node = node.args[0]
    parts = [node]
    if is_op(node, aten.cat) and (node.args[1] if len(node.args) > 1 else 0) in (-1, len(shape_of(node) or ()) - 1):
        parts = list(node.args[0])
    pieces, offset = [], 0
    for part in parts:
        image = byte_image(part)
        shape = shape_of(part)
        if image is None or shape is None:
            return Miss(f"{describe(part)} is not the bytes of a value (x.view(torch.uint8), or the shift-and-mask "
                        "image of a 2- or 4-byte value)", candidate=True, node=part)
        width = 1
        for d in shape[1:]:
            width *= d
        pieces.append(BytePiece(image[0], image[1], offset))
        offset += width
    return pieces


def _slots_of_pair(blk: Node, off: Node) -> tuple[Node, int] | None:
    """(slots, B) when blk = slots // B and off = slots % B."""
    if not (is_op(blk, aten.div) and blk.kwargs.get("rounding_mode") == "floor" or is_op(blk, aten.floor_divide)):
        return None
    if not is_op(off, aten.remainder):
        return None
    b1, b2 = scalar(blk.args[1]), scalar(off.args[1])
    if blk.args[0] is not off.args[0] or b1 is None or b1 != b2 or b1 <= 0 or b1 != int(b1):
        return None
    return blk.args[0], int(b1)


def _byte_write(cache: Node, put: Node, region: tuple[int, int] | None) -> ByteWrite | Miss:
    """One index_put into the cache (or the column slice `region` of a [pages, P] cache)."""
    base, indices, values = put.args[:3]
    accumulate = put.args[3] if len(put.args) > 3 else put.kwargs.get("accumulate", False)
    if accumulate:
        return Miss(f"{describe(put)} accumulates into the cache", node=put)
    c_shape, b_shape = shape_of(cache), shape_of(base)
    if c_shape is None or b_shape is None or not all(isinstance(d, int) for d in (*c_shape, *b_shape)):
        return Miss("a byte cache of dynamic shape", node=put)
    pieces = packed_pieces(values)
    if isinstance(pieces, Miss):
        return pieces
    row = b_shape[-1]
    if len(indices) == 1 and isinstance(indices[0], Node) and region is None and len(b_shape) == 2:
        slots, block, page = indices[0], 0, 0
        n_slots = b_shape[0]
    elif len(indices) == 2 and all(isinstance(i, Node) for i in indices) and len(b_shape) == 3:
        pair = _slots_of_pair(*indices)
        if pair is None or pair[1] != b_shape[1]:
            return Miss(f"{describe(put)} indexes pages with a (block, offset) pair that is not (slot // {b_shape[1]}, "
                        f"slot % {b_shape[1]})", node=put)
        slots, block = pair
        page = c_shape[-1] if len(c_shape) == 2 else c_shape[1] * c_shape[2]
        n_slots = b_shape[0] * block
    else:
        return Miss(f"{describe(put)} writes {len(indices)} index tensors into {tuple(b_shape)}", node=put)
    start = region[0] if region else 0
    width = sum((val(p.source).numel() // max(1, val(p.source).shape[0])) * p.dtype.itemsize for p in pieces)
    t = (shape_of(slots) or (None,))[0]
    rows = _strip(values)  # at T = 1 the graph may drop the token dim of the values, not of what they view
    if t is None or val(rows).dim() < 2 or not known_eq(val(rows).shape[0], t) or width != row:
        return Miss(f"{describe(put)} writes rows of {shape_of(values)} bytes for {t} slots into rows of {row}", node=put)
    return ByteWrite(tuple(pieces), slots, row, row, start, block, page, n_slots, put)


def match_byte_store(copy: Node) -> ByteStoreMatch | Miss:
    """The packed byte writes that `copy` (copy_(cache, new)) finishes, in the spellings above."""
    cache, new = copy.args[0], copy.args[1]
    if dtype_of(cache) != torch.uint8 or cache.op not in ("placeholder", "get_attr") or not val(cache).is_contiguous():
        return Miss("not a contiguous byte cache", candidate=False)
    final, node = new, new
    while is_view(node):
        node = node.args[0]
    writes: list[ByteWrite] = []
    while is_op(node, aten.slice_scatter):  # column slices of a [pages, P] cache, written one after another
        prev, src, dim, start, end = (list(node.args) + [None, None, None])[:5]
        c_shape = shape_of(cache)
        if dim != 1 or len(c_shape) != 2:
            return Miss(f"{describe(node)} scatters along dim {dim} of {c_shape}", node=node)
        end = min(end if end is not None else c_shape[1], c_shape[1])
        while is_view(src):
            src = src.args[0]
        if not is_op(src, aten.index_put):
            return Miss(f"{describe(node)} scatters something other than an index_put", candidate=False)
        base = src.args[0]
        while is_view(base):
            base = base.args[0]
        if not (is_op(base, aten.slice) and base.args[0] is prev and base.args[1] == 1
                and base.args[2] == start and min(base.args[3], c_shape[1]) == end):
            return Miss(f"{describe(src)} writes into something other than the slice it scatters back", node=src)
        w = _byte_write(cache, src, (start, end))
        if isinstance(w, Miss):
            return w
        writes.append(w)
        node = prev
    if node is not cache:
        if not is_op(node, aten.index_put) or writes:
            return Miss("the new cache value is not an index_put", candidate=False)
        base = node.args[0]
        while is_view(base):
            base = base.args[0]
        if base is not cache:
            return Miss(f"{describe(node)} writes into {describe(base)}", candidate=False)
        w = _byte_write(cache, node, None)
        if isinstance(w, Miss):
            return w
        writes.append(w)
    return ByteStoreMatch(cache, tuple(reversed(writes)), final, copy)

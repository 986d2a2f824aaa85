"""What a fused head chain replaces (HeadSite), and the sites that need no RoPE: a norm read only by
GEMMs (norm-only, optional: braze.passes.chain_groups) and a plain cache write (store-only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from braze.patterns.fx import aten, is_op, is_view, known_eq, shape_of, val
from braze.patterns.layernorm import LayerNormMatch
from braze.patterns.quant import QuantMatch
from braze.patterns.rmsnorm import NormMatch
from braze.patterns.scale_product import ScaleProductMatch
from braze.patterns.stages import HeadAbsorb, HeadChain, dtype_name
from braze.patterns.store import StoreMatch

from .base import PassContext
from .chain_bytes import Claim
from .cost import _source, is_extern


@dataclass(frozen=True)
class HeadSite:
    chain: HeadChain
    inputs: tuple[Node, ...]  # HeadChain.input_names order
    cache: Node | None
    result: Node | None  # the node the chain's output replaces (None: nothing else reads it)
    store: StoreMatch | None
    anchor: Node
    quant: QuantMatch | None = None  # the FP8 quant of the result, per head (its q and scale nodes are replaced)
    claims: tuple[Claim, ...] = ()  # packed byte stores the chain's fields write (chain.fields, same order)
    product: ScaleProductMatch | None = None  # a quant scale times head weights, stored in place of the scale

    def quant_nodes(self) -> list[Node]:
        """The nodes the quant outputs replace: the fp8 values, then each scale (or its product); for a HeadAbsorb,
        the bmm (its output is a separate buffer like a quant's, so it may differ in dtype from the launch's)."""
        if isinstance(self.chain, HeadAbsorb):
            return [self.result]
        if self.quant is None or not self.chain.quant_out:
            return []
        scales = list(self.quant.scale_nodes)
        if self.product is not None:
            scales[self.product.stage.scale] = self.product.output
        return [self.quant.q, *scales]


def _as_tokens(node: Node, heads: int, head_dim: int) -> Node | None:
    """`node` as [T, ...] rows: 2-D and 3-D as they are; [B, 1, H, D] or [B, H, 1, D] (one token per
    sequence) with the singleton dim squeezed out by a new view node; else None."""
    shape = shape_of(node)
    if shape is not None and len(shape) in (2, 3):
        return node
    if shape is None or len(shape) != 4:
        return None
    for d in (1, 2):
        rest = shape[:d] + shape[d + 1:]
        if known_eq(shape[d], 1) and known_eq(rest[1], heads) and known_eq(rest[2], head_dim):
            with node.graph.inserting_after(node):
                squeezed = node.graph.call_function(aten.squeeze.dim, (node, d))
            squeezed.meta["val"] = val(node).squeeze(d)
            return squeezed
    return None


def _through_views(node: Node) -> Node:
    while is_view(node):
        node = node.args[0]
    return node


def _only_feeds(node: Node, targets: set[Node]) -> bool:
    """Every use of `node` (through views and lossless casts) ends in `targets`."""
    for u in node.users:
        if u in targets:
            continue
        if (is_view(u) or is_op(u, aten.unsqueeze)) or (u.target is torch.ops.prims.convert_element_type.default):
            if not _only_feeds(u, targets):
                return False
            continue
        return False
    return True


_GEMMS = (aten.mm.default, aten.addmm.default, aten.bmm.default)


def _gemm_operand_only(node: Node) -> bool:
    """`node` has readers, and every one (through views and permutes) is a matmul."""
    if not node.users:
        return False
    for u in node.users:
        if u.target in _GEMMS:
            continue
        if not ((is_view(u) or is_op(u, aten.permute, aten.unsqueeze)) and _gemm_operand_only(u)):
            return False
    return True


def norm_site(norm: NormMatch | LayerNormMatch) -> HeadSite | None:
    """A norm over [T, width] rows whose output only GEMMs read (DeepSeek's q_c RMSNorm, read by q_b and
    the indexer's wq_b): a norm-only chain, worth a place only in a launch with other chains."""
    x, out = norm.x, norm.output
    width = norm.stage.width
    shape, out_val = shape_of(x), val(out)
    if shape is None or len(shape) != 2 or not known_eq(shape[1], width) or not isinstance(width, int):
        return None
    if out_val is None or dtype_name(out_val.dtype) != norm.stage.out_dtype or not _gemm_operand_only(out):
        return None
    chain = HeadChain(in_dtype=dtype_name(val(x).dtype), heads=1, head_dim=width, norm=norm.stage, rope=None,
                      gather=False, out=True, write=None)
    inputs = [x] + ([norm.weight] if norm.weight is not None else []) + (
        [norm.bias] if getattr(norm, "bias", None) is not None else [])
    return HeadSite(chain, tuple(inputs), None, out, None, norm.anchor)


def store_site(store: StoreMatch, ctx: PassContext) -> HeadSite | None:
    """A cache write of rows no chain produced: `cache.view(-1, *row)[slots] = rows` as a store-only chain.

    Inductor can lower such a write into a view of a graph input as a functional copy of the whole
    cache plus a copy back (seen on CUDA, torch 2.11); the fused op writes the T rows in place."""
    cache_val, slots_val = val(store.cache), val(store.slots)
    shape = tuple(store.row_shape)
    if cache_val is None or slots_val is None or not cache_val.is_contiguous():
        return None
    t = slots_val.shape[0]
    width = 1
    for d in shape:
        width *= d
    # the rows as [T, *row] or [T, width]: index_put broadcasts, so at T=1 the graph may carry them
    # without the token dim; the view chain back to the model's tensor usually still has it
    rows = next((n for n in store.sources() if val(n) is not None and known_eq(val(n).shape[0], t)
                 and (tuple(val(n).shape[1:]) == shape or tuple(val(n).shape[1:]) == (width,))), None)
    if store.stage.layout == "bhsd":  # [B, H, 1, D] values, one token per sequence
        rows = _as_tokens(store.rows, shape[0], shape[1])
    elif rows is None and known_eq(t, 1) and tuple(shape_of(store.rows) or ()) == shape:
        with store.rows.graph.inserting_after(store.rows):
            rows = store.rows.graph.call_function(aten.unsqueeze.default, (store.rows, 0))
        rows.meta["val"] = val(store.rows).unsqueeze(0)
    rows = rows if rows is not None else store.rows
    rows_val = val(rows)
    if rows_val is None:
        return None
    if store.stage.layout == "rows" and not known_eq(rows_val.shape[0], t):
        ctx.remark("missed", "store-layout", store.copy, "cache write left to Inductor",
                   reason=f"{tuple(rows_val.shape)} rows broadcast to {t} slots: braze writes one row per slot",
                   suggestion="if there is one slot per token, say so in the model: "
                              "torch._check(slots.shape[0] == tokens.shape[0])", ops=("store",))
        return None
    byte_rows = rows_val.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn) and rows_val.dtype == cache_val.dtype
    if not ((rows_val.dtype.is_floating_point and rows_val.dtype.itemsize >= 2) or byte_rows):
        ctx.remark("missed", "store-dtype", store.copy, "cache write left to Inductor",
                   reason=f"rows of {rows_val.dtype} into a {cache_val.dtype} cache: braze's plain store takes "
                          "16- and 32-bit floats, or bytes (uint8, int8, fp8) into a cache of the same dtype",
                   ops=("store",))
        return None
    if len(shape) > 2 or tuple(rows_val.shape[1:]) not in (shape, (width,)) or not all(isinstance(d, int) for d in shape):
        ctx.remark("missed", "store-layout", store.copy, "cache write left to Inductor",
                   reason=f"rows of shape {tuple(rows_val.shape)} into cache rows of {shape}: braze's plain "
                          "store takes [T, heads, head_dim] or [T, width] rows",
                   suggestion="view the cache as [slots, heads, head_dim] where its rows allow it", ops=("store",))
        return None
    heads, head_dim = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    chain = HeadChain(in_dtype=dtype_name(rows_val.dtype), heads=heads, head_dim=head_dim, norm=None, rope=None,
                      gather=False, out=False, write=store.stage)
    return HeadSite(chain, (rows, store.slots), store.cache, None, store, store.index_put)


def absorb_site(bmm: Node) -> HeadSite | None:
    """`bmm(a, W)` with a [H, T, D] (the heads of T rows of a projection's output, through views) and W [H, D, C] a
    view of a weight (a graph input): MLA's absorbed W_UK. An optional chain, kept only where it joins another chain's launch (the GEMM
    it replaces is a kernel of its own)."""
    if bmm.op != "call_function" or bmm.target is not aten.bmm.default:
        return None
    a, w, out = bmm.args[0], bmm.args[1], val(bmm)
    av, wv = val(a), val(w)
    if av is None or wv is None or out is None or av.dtype != wv.dtype or out.dtype != av.dtype:
        return None
    if av.dtype not in (torch.bfloat16, torch.float16, torch.float32) or av.stride(2) != 1 or wv.stride(2) != 1:
        return None
    heads, in_dim, head_dim = wv.shape
    if not all(isinstance(v, int) for v in (heads, in_dim, head_dim, *wv.stride())) or av.shape[0] != heads:
        return None
    if _source(w).op not in ("placeholder", "get_attr"):
        return None  # a weight computed in the graph
    if not is_extern(_source(a)):
        return None  # the heads are not a projection's output (attention's probabilities times V, say)
    with a.graph.inserting_after(a):
        x = a.graph.call_function(aten.permute.default, (a, [1, 0, 2]))  # [T, H, D], the chain input convention
    x.meta["val"] = av.permute(1, 0, 2)
    chain = HeadAbsorb(in_dtype=dtype_name(av.dtype), heads=heads, in_dim=in_dim, head_dim=head_dim,
                       out_dtype=dtype_name(out.dtype))
    return HeadSite(chain, (x, w), None, bmm, None, bmm)

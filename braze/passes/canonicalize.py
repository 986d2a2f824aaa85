"""Canonicalize the post-grad graph so harmless spelling differences do not defeat matching.

Every rewrite keeps the graph's values and strides exactly:
- a view/reshape to the shape it already has, an identity permute, an alias and a
  slice over a whole dim are their input;
- view(view(x)) is one view of x; reshape/_unsafe_view of a contiguous input is a view;
- a cast to the dtype a tensor already has is the tensor; cast(cast(x, a), b) is
  cast(x, b) when the first cast loses nothing;
- split / split_with_sizes / narrow read through getitem become slices.
Graph outputs are left as they are (their aliasing is fixed before Inductor).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from braze.patterns.fx import aten, dtype_of, is_cast, is_lossless, is_op, is_view, same_shape, shape_of, val

from .base import Pass, PassContext


class Canonicalize(Pass):
    name = "canonicalize"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        returned = {a for a in output.all_input_nodes}
        for node in list(graph.nodes):
            if node.op != "call_function" or node in returned:
                continue
            stat = (
                self._noop(node)
                or self._view_chain(node)
                or self._cast_chain(node)
                or self._split(node, graph)
            )
            if stat:
                ctx.bump(stat)

    @staticmethod
    def _noop(node: Node) -> str | None:
        v = val(node)
        if v is None:
            return None
        src = node.args[0] if node.args else None
        if not isinstance(src, Node) or val(src) is None:
            return None
        s = val(src)
        same_meta = same_shape(s.shape, v.shape) and same_shape(s.stride(), v.stride()) and s.dtype == v.dtype
        if is_view(node) and same_meta:
            node.replace_all_uses_with(src)
            return "noop-views"
        if is_op(node, aten.permute) and list(node.args[1]) == list(range(len(s.shape))):
            node.replace_all_uses_with(src)
            return "noop-permutes"
        if is_cast(node) and same_meta:
            node.replace_all_uses_with(src)
            return "noop-casts"
        if is_op(node, aten.alias, aten.slice) and same_meta and node.target is not aten.slice_scatter.default:
            # alias, and a slice over a whole dim: what Inductor's remove_noop_ops drops too
            node.replace_all_uses_with(src)
            return "noop-slices"
        return None

    @staticmethod
    def _view_chain(node: Node) -> str | None:
        if not is_view(node):
            return None
        src = node.args[0]
        if is_op(node, aten.reshape, aten._unsafe_view):
            s = val(src)
            if s is None or not statically_known_true(s.is_contiguous()):
                return None
            node.target = aten.view.default
            return "reshape-to-view"
        if src.target is aten.view.default and val(src.args[0]) is not None:
            node.args = (src.args[0], *node.args[1:])
            return "view-chains"
        return None

    @staticmethod
    def _cast_chain(node: Node) -> str | None:
        if not (is_cast(node) and is_cast(node.args[0])):
            return None
        inner = node.args[0]
        base = inner.args[0]
        if not is_lossless(dtype_of(base), dtype_of(inner)):
            return None
        node.args = (base, *node.args[1:])
        return "cast-chains"

    @staticmethod
    def _split(node: Node, graph: torch.fx.Graph) -> str | None:
        if is_op(node, aten.narrow):
            src, dim, start, length = node.args[:4]
            node.target = aten.slice.Tensor
            node.args = (src, dim, start, start + length)
            return "narrow-to-slice"
        if not is_op(node, aten.split, aten.split_with_sizes):
            return None
        src = node.args[0]
        shape = shape_of(src)
        if shape is None:
            return None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = dim % len(shape)
        sizes = node.args[1]
        if isinstance(sizes, int):
            total = shape[dim]
            if not isinstance(total, int):
                return None
            sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
        if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) for s in sizes):
            return None  # a symbolic split size (chunk of a dynamic width) stays a split
        users = list(node.users)
        if not all(u.target is operator.getitem for u in users):
            return None
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for u in users:
            i = u.args[1]
            with graph.inserting_before(u):
                sl = graph.call_function(aten.slice.Tensor, (src, dim, starts[i], starts[i] + sizes[i]))
            sl.meta = dict(u.meta)
            u.replace_all_uses_with(sl)
            graph.erase_node(u)
        graph.erase_node(node)
        return "split-to-slices"


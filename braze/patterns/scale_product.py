"""Recognizer: a per-head FP8 quant scale times a per-(token, head) tensor, constants folded.

DeepSeek V3.2's indexer scales its head weights by the query's quant scales, `w' = w·s_h·128^-½·64^-½`:
in the graph, `mul(mul(convert(w), c), squeeze(scale))`. The chain that computes the scale can store
that product in place of the scale (ScaleProduct) when nothing else reads the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from .fx import aten, binary_operands, dtype_of, is_op, is_view, known_eq, shape_of
from .quant import QuantMatch, unary_step
from .stages import ScaleProduct, UnaryOp, dtype_name

_SHAPE_OPS = (aten.squeeze, aten.unsqueeze)


@dataclass(frozen=True)
class ScaleProductMatch:
    stage: ScaleProduct
    w: Node  # the [T, heads] tensor
    output: Node  # the node whose value the product is (the mul, or the last constant op after it)
    nodes: frozenset[Node]  # the nodes between the scale and `output`


@dataclass(frozen=True)
class ScaleProductMiss:
    name: str  # remark name
    node: Node
    reason: str
    suggestion: str


def _readers(node: Node, skip: frozenset[Node], path: tuple[Node, ...] = ()) -> list[tuple[Node, tuple[Node, ...]]]:
    """The non-view readers of `node` through views (squeeze, unsqueeze, view), each with the views on its way."""
    out = []
    for u in node.users:
        if u in skip:
            continue
        if is_view(u) or is_op(u, *_SHAPE_OPS):
            out += _readers(u, skip, path + (u,))
        else:
            out.append((u, path))
    return out


def match_scale_product(quant: QuantMatch, tokens: object, heads: int, order: dict[Node, int],
                        chain_nodes: frozenset[Node]) -> ScaleProductMatch | ScaleProductMiss | None:
    """The product of one of `quant`'s scales (one per head of [tokens, heads]) with a [tokens, heads]
    tensor w that reads none of the chain's values (`chain_nodes`, positions in `order`); None when no
    scale of the quant is multiplied by a tensor."""
    for i, s in enumerate(quant.scale_nodes):
        readers = _readers(s, quant.nodes)
        # a multiply by another tensor (a multiply by a constant is no product with head weights)
        muls = [(u, path) for u, path in readers
                if is_op(u, aten.mul) and all(isinstance(a, Node) for a in binary_operands(u))]
        if not muls:
            continue
        mul, path = muls[0]
        if len(readers) > 1:
            return ScaleProductMiss("scale-product-shared", mul, "the quant scale has other readers besides its "
                                    "product with the head weights, so it must be stored as well",
                                    "read the product (or the scale) only")
        a, b = binary_operands(mul)
        scale_side = path[-1] if path else s
        other = b if a is scale_side else a
        if not isinstance(other, Node) or (a is not scale_side and b is not scale_side):
            return None
        want = (tokens, heads)
        got = shape_of(mul)
        w, steps = other, []
        while isinstance(w, Node) and len(w.users) == 1:
            step = unary_step(w)
            if step is None or not isinstance(step[0], Node):
                break
            steps.append(step[1])
            w = step[0]
        shape = shape_of(w)
        if not (got is not None and shape is not None and len(got) == 2 and len(shape) == 2
                and all(known_eq(x, y) for x, y in zip(got, want)) and all(known_eq(x, y) for x, y in zip(shape, want))):
            return ScaleProductMiss("scale-product-shape", mul,
                                    f"the scale of each head multiplies a tensor of shape {shape} into {got}; braze "
                                    f"folds a [tokens, heads] = {list(want)} tensor, one value per token and head",
                                    "give the head weights as [tokens, heads]")
        if dtype_of(w) is None or not dtype_of(w).is_floating_point or not dtype_of(mul).is_floating_point:
            return None
        if w in chain_nodes or _depends_on(w, chain_nodes | quant.nodes, order):
            return ScaleProductMiss("scale-product-dependent", mul, "the head weights are computed from the "
                                    "chain's own values", "compute them from the chain's inputs")
        stage_dtype = dtype_name(dtype_of(mul))
        post, out = [], mul
        while len(out.users) == 1:
            (u,) = out.users
            step = unary_step(u)
            if step is None or step[0] is not out:
                break
            post.append(step[1])
            out = u
        pre = (UnaryOp("cast", dtype_name(dtype_of(w))), *steps[::-1])
        stage = ScaleProduct(i, dtype_name(dtype_of(w)), pre, stage_dtype, tuple(post))
        nodes = frozenset(path) | {mul, out} | _between(mul, out)
        return ScaleProductMatch(stage, w, out, nodes)
    return None


def _between(start: Node, end: Node) -> set[Node]:
    nodes, n = set(), end
    while n is not start:
        nodes.add(n)
        n = n.args[0] if isinstance(n.args[0], Node) else n.args[1]
    return nodes


def _depends_on(w: Node, chain_nodes: frozenset[Node], order: dict[Node, int]) -> bool:
    """Whether `w` reads, directly or not, a value the chain computes (a node of `chain_nodes`); nodes
    defined before the first of them cannot, so the walk stops there."""
    limit = min(order[n] for n in chain_nodes)
    stack, seen = [w], set()
    while stack:
        n = stack.pop()
        if n in seen or order.get(n, -1) < limit:
            continue
        if n in chain_nodes:
            return True
        seen.add(n)
        stack += n.all_input_nodes
    return False

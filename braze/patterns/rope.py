"""Rotary position embedding (NeoX rotate-half, GPT-J interleaved, partial) in a post-grad ATen graph.

Two spellings cover what models write:
- pairs: x1, x2 are the two halves (NeoX) or the even/odd lanes (GPT-J) of the
  rotated dims; out = [x1·c − x2·s, x2·c + x1·s], concatenated (NeoX) or
  interleaved back (GPT-J); cos/sin hold r/2 values per token.
- rotate-half (Hugging Face): out = x·cos + cat(−x2, x1)·sin with cos/sin of the
  full rotary width r (the kernel reads all r, it does not assume the halves repeat).
Partial rotary is a concatenation of the rotated dims with the untouched ones,
rope dims first or last. Head count, head dim and rotary dim are read from shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import (
    Miss, aten, binary_operands, dtype_of, is_cast, is_op, known_eq, same_shape, same_value, shape_of,
    strip_lossless_casts,
)
from .stages import dtype_name, round_to as _round

_FULL = 2**62


@dataclass(frozen=True)
class Rope:
    """Rotate `rotary_dim` dims of each head, starting at `offset` within the head.

    `table` is the width of the cos/sin rows: rotary_dim // 2 (pairs spelling) or
    rotary_dim (rotate-half spelling). `mul`/`out` are the dtypes the products
    and the results are rounded to.
    """

    style: str  # "neox" | "gptj"
    head_dim: int
    rotary_dim: int
    offset: int
    table: int
    mul: str
    out: str
    kind: str = "rope"


@dataclass(frozen=True)
class RopeMatch:
    stage: Rope
    x: Node  # the tensor being rotated: [..., head_dim] (before any upcast)
    cos: Node  # [T, 1.., table] as the graph broadcasts it
    sin: Node
    output: Node  # [..., head_dim] after the rotation (partial: after the concatenation)
    nodes: frozenset[Node]


def _slice(node: object) -> tuple[Node, int, int, int, int] | None:
    """(src, dim, start, end, step) of aten.slice, end clipped to the dim size."""
    if not is_op(node, aten.slice):
        return None
    src = node.args[0]
    shape = shape_of(src)
    if shape is None:
        return None
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else _FULL
    step = node.args[4] if len(node.args) > 4 else 1
    size = shape[dim]
    if not all(isinstance(v, int) for v in (start, end, step, size)):
        return None
    return src, dim, start, min(end, size), step


def _strip(node: object) -> object:
    """Through unsqueeze/view of size-1 dims and lossless casts (how cos/sin get broadcast)."""
    def squeezed(shape: tuple) -> list:
        return [s for s in shape if not known_eq(s, 1)]

    while isinstance(node, Node) and (is_op(node, aten.unsqueeze) or is_cast(node) or (
            node.target is aten.view.default and same_shape(squeezed(shape_of(node)), squeezed(shape_of(node.args[0]))))):
        node = node.args[0]
    return node


def _product(node: object) -> tuple[Node, Node] | None:
    """(x side, table side) of a product of a [.., r'] lane tensor with a broadcast cos/sin."""
    if not is_op(node, aten.mul):
        return None
    a, b = binary_operands(node)
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    sa, sb = shape_of(a), shape_of(b)
    if sa is None or sb is None:
        return None
    # the table broadcasts over heads: it has at least as many size-1 dims
    if sum(1 for s in sb if known_eq(s, 1)) < sum(1 for s in sa if known_eq(s, 1)):
        a, b = b, a
    return a, b


def _pairs(out0: Node, out1: Node) -> tuple[Node, Node, Node, Node, list[Node]] | None:
    """out0 = x1·c − x2·s, out1 = x2·c + x1·s -> (x1, x2, c, s, nodes)."""
    if not (is_op(out0, aten.sub) and is_op(out1, aten.add)):
        return None
    p = [_product(n) for n in (*binary_operands(out0), *binary_operands(out1))]
    if any(v is None for v in p):
        return None
    (x1, c), (x2, s), (x2b, c2), (x1b, s2) = p
    if not (same_value(x1, x1b) and same_value(x2, x2b) and _strip(c) is _strip(c2) and _strip(s) is _strip(s2)):
        return None
    nodes = [out0, out1, *binary_operands(out0), *binary_operands(out1)]
    return x1, x2, c, s, nodes


def _lanes(x1: Node, x2: Node) -> tuple[Node, str, int] | None:
    """The tensor x1, x2 are the two halves (neox) or the even/odd lanes (gptj) of: (x, style, r)."""
    s1 = _slice(x1) or _slice(strip_lossless_casts(x1))
    s2 = _slice(x2) or _slice(strip_lossless_casts(x2))
    if s1 is None or s2 is None or not same_value(s1[0], s2[0]) or s1[1] != s2[1]:
        return None
    src, dim, a0, a1, st1 = s1
    _, _, b0, b1, st2 = s2
    if dim != len(shape_of(src)) - 1:
        return None
    if st1 == st2 == 1 and a0 == 0 and a1 == b0:
        return src, "neox", b1
    if st1 == st2 == 2 and a0 == 0 and b0 == 1 and a1 == b1 == shape_of(src)[-1]:
        return src, "gptj", a1
    return None


def _lane_nodes(x1: Node, x2: Node, src: Node) -> list[Node]:
    """The slices (and casts) between the rotated tensor and its two lanes."""
    out = []
    for n in (x1, x2):
        while isinstance(n, Node) and n is not src and (is_cast(n) or _slice(n) is not None):
            out.append(n)
            n = n.args[0]
    if is_cast(src):
        out.append(src)
    return out


def match_rope(anchor: Node) -> RopeMatch | Miss:
    """Recognize the rotation whose result is `anchor` (a cat, a GPT-J view, or an HF add)."""
    nodes: list[Node] = []
    node = anchor
    out_dtype = dtype_of(anchor)
    if out_dtype is None or not out_dtype.is_floating_point:
        return Miss("not a float tensor", candidate=False)
    if is_cast(node):
        nodes.append(node)
        node = node.args[0]
    # rotate-half: x·cos + cat(−x2, x1)·sin
    if is_op(node, aten.add):
        return _match_rotate_half(anchor, node, nodes)
    style = None
    if node.target is aten.view.default and is_op(node.args[0], aten.cat):
        # GPT-J: stack([e0, e1], -1).flatten(-2) -> cat of unsqueezes, viewed back
        nodes.append(node)
        node = node.args[0]
        style = "gptj"
    if not is_op(node, aten.cat) or len(node.args[0]) != 2:
        return Miss("not a concatenation of two rotated halves", candidate=False)
    nodes.append(node)
    a, b = node.args[0]
    if style == "gptj":
        if not (is_op(a, aten.unsqueeze) and is_op(b, aten.unsqueeze)):
            return Miss("GPT-J interleave is not a stack of the two rotated lanes", candidate=False)
        nodes += [a, b]
        a, b = a.args[0], b.args[0]
    found = _pairs(a, b)
    if found is None:
        return Miss("halves are not x1·cos − x2·sin and x2·cos + x1·sin", candidate=False)
    x1, x2, c, s, pair_nodes = found
    nodes += pair_nodes
    lanes = _lanes(x1, x2)
    if lanes is None:
        return Miss("the rotated values are not the halves or even/odd lanes of one tensor's last dim",
                    "slice x[..., :r/2], x[..., r/2:r] (NeoX) or x[..., 0::2], x[..., 1::2] (GPT-J)")
    src, lane_style, r = lanes
    nodes += _lane_nodes(x1, x2, src)
    if style is None:
        style = "neox"
    if lane_style != style:
        return Miss(f"{lane_style}-style lanes recombined {style}-style", "rotate and recombine in one style")
    table = shape_of(_strip(c))
    if table is None or not known_eq(table[-1], r // 2):
        return Miss(f"cos/sin rows have {table and table[-1]} values, expected {r // 2}", candidate=True)
    x = strip_lossless_casts(src)
    return _finish(Rope(style, 0, r, 0, r // 2, dtype_name(dtype_of(pair_nodes[2])), dtype_name(out_dtype)),
                   x, c, s, anchor, nodes)


def _match_rotate_half(anchor: Node, add: Node, nodes: list[Node]) -> RopeMatch | Miss:
    p0, p1 = (_product(n) for n in binary_operands(add))
    if p0 is None or p1 is None:
        return Miss("not x·cos + rotate_half(x)·sin", candidate=False)
    (xa, ta), (xb, tb) = p0, p1
    if is_op(xa, aten.cat):
        (xa, ta), (xb, tb) = (xb, tb), (xa, ta)
    if not is_op(xb, aten.cat) or len(xb.args[0]) != 2:
        return Miss("not x·cos + rotate_half(x)·sin", candidate=False)
    neg, x1 = xb.args[0]
    if not is_op(neg, aten.neg):
        return Miss("rotate_half does not negate its second half", candidate=False)
    lanes = _lanes(x1, neg.args[0])
    if lanes is None or lanes[1] != "neox" or not same_value(lanes[0], xa):
        return Miss("rotate_half is not of the tensor multiplied by cos",
                    "write x * cos + rotate_half(x) * sin with one x")
    r = lanes[2]
    nodes += _lane_nodes(x1, neg.args[0], lanes[0])
    table = shape_of(_strip(ta))
    if table is None or not known_eq(table[-1], r):
        return Miss(f"cos/sin rows have {table and table[-1]} values, expected {r}", candidate=True)
    nodes += [add, *binary_operands(add), xb, neg]
    x = strip_lossless_casts(lanes[0])
    stage = Rope("neox", 0, r, 0, r, dtype_name(dtype_of(binary_operands(add)[0])), dtype_name(dtype_of(add)))
    return _finish(stage, x, ta, tb, anchor, nodes)


def _finish(stage: Rope, x: Node, cos: Node, sin: Node, output: Node, nodes: list[Node]) -> RopeMatch:
    """Fill in head_dim/offset: the rotated x may be a slice of the head (partial rotary).

    It is partial only when the rotated dims are concatenated back with the rest of the
    same head; a slice rotated on its own (k_pe split off a fused projection) is the head.
    """
    head = x
    offset = 0
    sl = _slice(x)
    user = next(iter(output.users)) if len(output.users) == 1 else None
    if sl is not None and sl[4] == 1 and sl[1] == len(shape_of(sl[0])) - 1 and is_op(user, aten.cat) \
            and len(user.args[0]) == 2:
        other = [a for a in user.args[0] if a is not output]
        ps = _slice(other[0]) if other else None
        src = strip_lossless_casts(sl[0])
        rest = (0, sl[2]) if sl[2] > 0 else (sl[3], shape_of(src)[-1])
        if ps is not None and strip_lossless_casts(ps[0]) is src and (ps[2], ps[3]) == rest \
                and (user.args[0][0] is output) == (sl[2] == 0):
            head, offset = src, sl[2]
            nodes += [x, user, other[0]]
            output = user
    head_dim = shape_of(head)[-1]
    stage = dataclasses.replace(stage, head_dim=head_dim, offset=offset)
    return RopeMatch(stage, head, cos, sin, output, frozenset(nodes))


# ---------------------------------------------------------------------------
# Reference: pure torch. x [T, H, head_dim]; cos/sin [T, table] (fp32-held).



def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stage: Rope) -> torch.Tensor:
    """The stage's rotation of x [T, H, head_dim] with cos/sin [T, table]; fp32 out (rounded to `out`)."""
    x = x.float()
    r, o = stage.rotary_dim, stage.offset
    rot = x[..., o:o + r]
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    if stage.style == "neox":
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    if stage.table == r:  # rotate-half with full-width tables
        c1, c2, s1, s2 = c[..., : r // 2], c[..., r // 2:], s[..., : r // 2], s[..., r // 2:]
        y1 = _round(_round(x1 * c1, stage.mul) + _round(-x2 * s1, stage.mul), stage.out)
        y2 = _round(_round(x2 * c2, stage.mul) + _round(x1 * s2, stage.mul), stage.out)
    else:
        y1 = _round(_round(x1 * c, stage.mul) - _round(x2 * s, stage.mul), stage.out)
        y2 = _round(_round(x2 * c, stage.mul) + _round(x1 * s, stage.mul), stage.out)
    out = x.clone()
    if stage.style == "neox":
        out[..., o:o + r] = torch.cat([y1, y2], -1)
    else:
        out[..., o:o + r] = torch.stack([y1, y2], -1).flatten(-2)
    return _round(out, stage.out)

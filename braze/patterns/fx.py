"""Small helpers for reading a post-grad ATen FX graph: ops, dtypes, casts, locations."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

aten = torch.ops.aten
prims = torch.ops.prims

# The float dtypes the recognizers accept for activations, weights and scale math.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Miss:
    """A recognizer's "no", with the reason and what to do about it.

    `candidate` says whether the site looked like the thing being recognized
    (a near miss, worth a `missed` remark) or was never a candidate.
    """

    reason: str
    suggestion: str = ""
    candidate: bool = True
    node: Node | None = None


def is_op(node: object, *targets: object) -> bool:
    """Whether `node` calls one of `targets` (overload packets or overloads)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return node.target in targets or (packet is not None and packet in targets)


def val(node: object) -> torch.Tensor | None:
    if isinstance(node, Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v
    return None


def dtype_of(node: object) -> torch.dtype | None:
    v = val(node)
    return v.dtype if v is not None else None


def shape_of(node: object) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if v is not None else None


def is_view(node: object) -> bool:
    """A shape view/reshape (not `view.dtype`, which reinterprets bytes)."""
    return isinstance(node, Node) and node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def known_eq(a: object, b: object) -> bool:
    """a == b for ints or symbolic sizes, without adding a guard (unknown -> False)."""
    return bool(statically_known_true(sym_eq(a, b)))


_INDEX_DTYPES = (torch.int64, torch.int32)  # narrower ints wrap (an int8 arange past 127) and uint8 is a mask


def is_identity_index(node: object, rows: object) -> bool:
    """Whether `node` is `arange(rows)` spelled any way the graph may hold it (aten.arange with start 0 and
    step 1, or prims.iota), integer-typed: indexing with it reads rows 0..rows-1 in order, so a fused
    kernel can use its row number instead of loading the index."""
    if not isinstance(node, Node) or dtype_of(node) not in _INDEX_DTYPES or len(shape_of(node) or ()) != 1:
        return False
    if is_op(node, prims.iota):
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    elif node.target is aten.arange.default:
        start, step = 0, 1
    elif node.target is aten.arange.start:
        start, step = node.args[0], 1
    elif node.target is aten.arange.start_step:
        start = node.args[0]
        step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
    else:
        return False
    if isinstance(start, bool) or isinstance(step, bool) or start != 0 or step != 1:
        return False
    return known_eq(shape_of(node)[0], rows)


def same_shape(a: object, b: object) -> bool:
    """Shapes (or strides) equal dim by dim, without adding guards."""
    if a is None or b is None:
        return False
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def scalar(arg: object) -> float | None:
    """A Python number argument as float; None for tensors, bools and nodes."""
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return None
    return float(arg)


def is_cast(node: object) -> bool:
    """A dtype conversion that changes nothing else (device, layout, memory format)."""
    if is_op(node, prims.convert_element_type):
        return True
    if is_op(node, aten._to_copy):
        extra = set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}
        src = val(node.args[0])
        dst = val(node)
        return (
            not extra
            and src is not None
            and dst is not None
            and src.device == dst.device
            and node.kwargs.get("memory_format") in (None, torch.preserve_format)
        )
    return False


# dtype -> dtypes that represent every value of it exactly
_LOSSLESS = {
    torch.float16: {torch.float32, torch.float64},
    torch.bfloat16: {torch.float32, torch.float64},
    torch.float32: {torch.float64},
    torch.float8_e4m3fn: {torch.float16, torch.bfloat16, torch.float32, torch.float64},
}


def is_lossless(src: torch.dtype | None, dst: torch.dtype | None) -> bool:
    return src == dst or (src is not None and dst in _LOSSLESS.get(src, ()))


def strip_lossless_casts(node: Node) -> Node:
    """Walk back through casts that lose nothing (e.g. bf16 -> fp32)."""
    while is_cast(node) and is_lossless(dtype_of(node.args[0]), dtype_of(node)):
        node = node.args[0]
    return node


def same_value(a: object, b: object) -> bool:
    """Whether two nodes hold the same values, up to lossless casts."""
    if not isinstance(a, Node) or not isinstance(b, Node):
        return False
    return strip_lossless_casts(a) is strip_lossless_casts(b)


def binary_operands(node: Node) -> tuple[object, object]:
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def users_outside(node: Node, inside: Iterable[Node]) -> list[Node]:
    inside = set(inside)
    return [u for u in node.users if u not in inside]


_MODULE_KEY = re.compile(r"^L\[['\"](\w+)['\"]\]\.?")


def module_path(node: Node) -> str:
    """The nn.Module path of a node, e.g. `layers.3.self_attn.kv_a_layernorm`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _MODULE_KEY.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"](\w+)['\"]\]", r".\1", path)
    path = re.sub(r"\._modules\.", ".", path)
    return path.strip(".")


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_line(node: Node) -> str:
    """`file.py:123` of the innermost user frame in the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def describe(node: Node) -> str:
    """`name` (aten.op) of a node, for remarks."""
    if node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target))
        if node.target is operator.getitem:
            target = "getitem"
        return f"`{node.name}` ({target})"
    return f"`{node.name}` ({node.op})"


def topo_sorted(nodes: Iterable[Node]) -> list[Node]:
    order = {}
    for n in nodes:
        if n.graph not in order:
            order[n.graph] = {m: i for i, m in enumerate(n.graph.nodes)}
    return sorted(nodes, key=lambda n: order[n.graph][n])

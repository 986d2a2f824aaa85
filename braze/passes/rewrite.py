"""Splice a fused op into a post-grad graph, in the form Inductor lowers best.

The replacement is traced with functionalization, exactly as AOTAutograd traces
user code: a `triton_op` on CUDA tensors becomes its Triton kernel launch
(`triton_kernel_wrapper_functional`), which Inductor emits and launches
directly; on CPU it becomes the opaque CPU op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.proxy_tensor import make_fx

from braze.patterns.fx import topo_sorted


def graph_fake_mode(graph: Graph):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def trace_functional(fn: Callable[..., Sequence[torch.Tensor]], example: Sequence[torch.Tensor], fake_mode):
    """fn traced with functionalization on the graph's fake tensors."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.functional_tensor import dispatch_functionalize

    with fake_mode, enable_python_dispatcher():
        return make_fx(dispatch_functionalize(fn), tracing_mode="real")(*example)


def splice(graph: Graph, traced: torch.fx.GraphModule, inputs: Sequence[Node], meta_from: Node) -> list[Node]:
    """Copy `traced` into `graph` right after the last of `inputs`; returns its output nodes."""
    last = topo_sorted(inputs)[-1]
    env: dict[Node, Node] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(inputs)
    env.update(zip(placeholders, inputs))
    outputs: list[Node] = []
    anchor = last
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            outputs = [env[a] for a in _flatten(n.args[0])]
            break
        with graph.inserting_after(anchor):
            new = graph.node_copy(n, lambda a: env[a])
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in meta_from.meta:
                new.meta[key] = meta_from.meta[key]
        env[n] = new
        anchor = new
    return outputs


def view_as(graph: Graph, node: Node, like: Node) -> Node:
    """`node` viewed to `like`'s shape when they differ (e.g. [T, G] scale vs [T, G, 1])."""
    want, have = like.meta["val"], node.meta["val"]
    if tuple(want.shape) == tuple(have.shape):
        return node
    with graph.inserting_after(node):
        v = graph.call_function(torch.ops.aten.view.default, (node, list(want.shape)))
    v.meta["val"] = have.view(want.shape)
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            v.meta[key] = like.meta[key]
    return v


def _flatten(x: object) -> list[Node]:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    return [x] if isinstance(x, Node) else []

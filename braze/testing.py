"""Helpers for testing fusions without a full compile: a post-grad-like ATen graph, braze's passes on it.

`aten_graph(fn, *args)` traces `fn` with Inductor's decompositions on fake
tensors, which gives the same ATen ops, casts and views as Inductor's post-grad
graph. `run_passes(gm, config)` runs braze's PassManager on it in place and
returns the GraphRecord; the graph module can then be called on real tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from braze.config import FusionConfig
from braze.passes.base import Pass, current_record
from braze.passes.manager import PASSES, PassManager
from braze.report import GraphRecord


def aten_graph(fn: Callable[..., object], *args: torch.Tensor) -> GraphModule:
    """`fn` traced to a functional ATen graph with Inductor's decompositions (meta['val'] set)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.functional_tensor import dispatch_functionalize

    def wrapper(*xs):
        return fn(*xs)

    with torch.no_grad():
        traced = make_fx(dispatch_functionalize(wrapper), decomposition_table=select_decomp_table(),
                         tracing_mode="fake", _allow_non_fake_inputs=True)
        return traced(*args)


def run_passes(
    gm: GraphModule,
    config: FusionConfig | None = None,
    passes: Sequence[type[Pass]] = PASSES,
) -> GraphRecord:
    """Run braze's passes on `gm` in place; returns what they recorded."""
    record = GraphRecord(index=0)
    token = current_record.set(record)
    try:
        PassManager(config or FusionConfig(), passes)(gm.graph)
    finally:
        current_record.reset(token)
    gm.recompile()
    return record


def fused_ops(gm: GraphModule) -> list[str]:
    """Names of braze ops (or their Triton launches) in a graph."""
    out = []
    for n in gm.graph.nodes:
        name = str(n.target)
        if "braze" in name or "triton_kernel_wrapper" in name:
            out.append(name)
    return out

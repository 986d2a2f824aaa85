"""Dual-stream scheduling: where the cost model says overlapping two independent branches pays, both are
outlined into subgraphs that Inductor compiles, and one `braze::parallel_branches` call runs one on the side
stream beside the other (braze.runtime.streams; one side stream per device): the smaller branch beside the
larger, or the largest branch beside the rest of its region (`branches.Pairing`: every node that depends on the
other branches and not on it, their joins among themselves included), whichever the model says saves more.

Runs after gemm-merge, on the graph as it will execute, and decides with the branch analysis's
cost model (`braze.passes.branches.decide`). A fork's two branches are outlined only when the
rewrite is provably the same computation:
- both branches are pure (no in-place op, no mutation of a graph input, no multi-output value
  leaving the branch) and all their sizes are static (the op compiles its branches per shape);
- every value a branch reads exists before the first value it produces is used, so the op can sit
  where its inputs are ready. Two kinds of nodes are moved to make that hold, both pure: a view of
  a weight (`permute(W)`, which Inductor's graph places just before its GEMM, after work that
  reads the other branch's outputs) moves before the branches' first node, and a tensor the graph
  creates from nothing (`full`, `iota`, `scalar_tensor`) that only one branch reads moves into that
  branch. Anything else computed late is left in place, and the branches stay on one stream;
- a dtype cast of the fork's value that opens a branch stays in the outer graph (and moves before the
  branches if need be) where a generated kernel computes that value: Inductor computes it there;
- the token count lies in `FusionConfig.token_ranges['dual_stream']` (default [1, 64]: above it the
  branches' GEMMs approach compute-bound and each fills the GPU alone);
- no node of either branch is already part of another outlined pair;
- the graph runs on CUDA: a CPU graph has no second stream, and its outlined branches would only lose
  Inductor's compile (tests set `ON_CPU` to exercise the rewrite on CPU graphs, where the op runs the
  branches one after the other).
On by default (`FusionConfig(dual_stream=False)` turns it off); STREAMS_DESIGN.md has the measurements
(where it acts on the three models and what it saves) and what the GPU tests check.
"""

from __future__ import annotations

import dataclasses
import operator
import pickle

import torch
from torch.fx import Graph, GraphModule, Node

import braze.runtime.streams  # noqa: F401  registers braze::parallel_branches
from braze.patterns.fx import aten, describe, module_path, val
from braze.runtime.streams import TritonCalls, encode_spec, kernel_ref

from .base import Pass, PassContext
from .branches import Branch, Decision, Fork, decide, find_forks
from .cost import device_model, is_extern, is_free, is_reduction
from .rewrite import graph_fake_mode

prims = torch.ops.prims


def order_of(graph: Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _static(v: object) -> bool:
    if isinstance(v, torch.Tensor):
        return all(isinstance(s, int) for s in v.shape) and all(isinstance(s, int) for s in v.stride())
    if isinstance(v, (list, tuple)):
        return all(_static(x) for x in v)
    return not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _mutates(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    return "auto_functionalized" in str(node.target) or "triton_kernel_wrapper_mutation" in str(node.target)


def why_not_outlined(branch: Branch) -> str:
    """Why a branch cannot move into a subgraph ("" when it can)."""
    inside = set(branch.nodes)
    for n in branch.nodes:
        if n.op != "call_function":
            return f"{describe(n)} is not an operator call"
        if _mutates(n):
            return f"{describe(n)} writes in place"
        if _communicates(n):  # every rank must issue collectives in one order, and braze's one-shot ops
            # share one workspace per group that two streams must not use at once (COLLECTIVE_DESIGN.md)
            return f"{describe(n)} communicates across ranks"
        if not _static(n.meta.get("val")):
            return f"{describe(n)} has symbolic sizes (a dynamic token count)"
        if not isinstance(n.meta.get("val"), torch.Tensor) and any(u not in inside for u in n.users):
            return f"{describe(n)} leaves the branch as a non-tensor value"
        for a in n.all_input_nodes:
            if a not in inside and not isinstance(a.meta.get("val"), torch.Tensor):
                return f"{describe(n)} reads {describe(a)}, which is not a tensor"
        if "constant_args_idx" in n.kwargs and (why := why_not_portable(n)):
            return f"{describe(n)}: {why}"
    return ""


def why_not_portable(node: Node) -> str:
    """Why a Triton kernel call cannot be named in a spec that any process can run ("" when it can)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    ref = kernel_ref(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]))
    if isinstance(ref, str):
        return ref
    try:
        pickle.dumps(kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
        pickle.dumps(ref)
    except Exception as e:  # noqa: BLE001  (whatever pickle refuses)
        return f"its Triton kernel's constants cannot be written into the spec ({type(e).__name__})"
    return ""


_BRAZE_COLLECTIVES = ("allreduce_rowwise", "tp_rmsnorm")


def _communicates(node: Node) -> bool:
    """A functional collective, or one of braze's fused collective ops."""
    ns = getattr(node.target, "namespace", "")
    if ns in ("_c10d_functional", "c10d_functional", "_dtensor"):
        return True
    return ns == "braze" and node.target.name().split("::")[-1].split(".")[0] in _BRAZE_COLLECTIVES


# Ops that create a tensor from no tensor input, deterministically (no RNG): free to move anywhere.
_CREATION = (aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
             aten.scalar_tensor.default, aten.arange.default, aten.arange.start, aten.arange.start_step,
             prims.iota.default)


# dtype casts: pure and cheap, fused by Inductor into the kernel that computes their input
_CASTS = (prims.convert_element_type.default, aten._to_copy.default)


def _movable(node: Node, before: int, order: dict[Node, int], inside: set[Node]) -> bool:
    """Whether `node` (outside the branches) can be computed before position `before` by moving it and the
    nodes it needs there: a pure view, slice, getitem or dtype cast, or a creation op, of earlier or movable
    values."""
    if node in inside or node.op != "call_function" or _mutates(node):
        return False
    if not (is_free(node) or node.target in _CREATION or node.target in _CASTS):
        return False
    return all(order[a] < before or _movable(a, before, order, inside) for a in node.all_input_nodes)


def _is_dtype_cast(node: Node) -> bool:
    """A cast that changes the dtype only (an `_to_copy` to another device or layout is not one)."""
    if node.target is prims.convert_element_type.default:
        return True
    return node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}


def _generated(node: Node) -> bool:
    """A pointwise op or a reduction, which Inductor computes in a kernel it generates (and can fuse a cast
    into), rather than a fallback or an extern call."""
    if node.op != "call_function" or is_free(node) or is_extern(node):
        return False
    return torch.Tag.pointwise in getattr(node.target, "tags", ()) or is_reduction(node)


def without_fused_casts(branch: Branch, fork: Node) -> Branch:
    """`branch` without the dtype casts of the fork's value it opens with, where a kernel Inductor generates
    computes that value: left in the outer graph, the cast is computed by that kernel (DeepSeek V3.2's norm
    writes the hidden state in bf16 and, for the router, in fp32); outlined, it would be a kernel of its own,
    one more per overlapped layer on the H200."""
    if not _generated(fork):
        return branch
    inside = set(branch.nodes)
    casts = {n for n in fork.users if n in inside and _is_dtype_cast(n) and n.all_input_nodes == [fork]}
    rest = tuple(n for n in branch.nodes if n not in casts)
    if not casts or not any(n.op == "call_function" and not is_free(n) for n in rest):
        return branch
    return Branch(rest[0], rest, branch.cost)


def with_created_inputs(branch: Branch, others: set[Node]) -> Branch:
    """`branch` plus the creation ops (`full`, `iota`, ...) that only it reads: computed inside the subgraph
    rather than passed in."""
    inside = set(branch.nodes)
    extra = {a for n in branch.nodes for a in n.all_input_nodes
             if a.op == "call_function" and a.target in _CREATION and not a.all_input_nodes and not _mutates(a)
             and all(u in inside for u in a.users) and a not in others}
    if not extra:
        return branch
    order = {n: i for i, n in enumerate(next(iter(inside)).graph.nodes)}
    return Branch(branch.head, tuple(sorted(inside | extra, key=order.__getitem__)), branch.cost)


def schedule(main: Branch, side: Branch) -> tuple[list[Node], str]:
    """Where the op can go: the nodes to move before the branches' first node (graph order), or why the
    branches cannot be replaced by one op (a value they read is computed after a value they produce is used)."""
    graph = main.head.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    inside = set(main.nodes) | set(side.nodes)
    first = min(order[n] for n in inside)
    external = {a for n in inside for a in n.all_input_nodes if a not in inside}
    hoist: set[Node] = set()

    def collect(a: Node) -> None:
        if order[a] > first and a not in hoist:
            hoist.add(a)
            for b in a.all_input_nodes:
                collect(b)

    for a in external:
        if order[a] > first and _movable(a, first, order, inside):
            collect(a)
    ready_at = {a: (first if a in hoist else order[a]) for a in external}
    ready = max(ready_at.values(), default=first)
    early = [u for n in inside for u in n.users if u not in inside and order[u] <= ready]
    if early:
        u = min(early, key=order.__getitem__)
        late = max(ready_at, key=lambda a: (ready_at[a], order[a]))
        return [], (f"{describe(u)} uses a branch value before {describe(late)}, which a branch reads, "
                    "is computed (braze moves only views, dtype casts and creation ops of earlier values)")
    # The op reads its inputs at `ready`, the branches read them anywhere up to their last node: no write in
    # place into their storage may fall in between (a cache written by another op, say).
    lo, hi = min(first, ready), max(max(order[n] for n in inside), ready)
    roots = {_root(a): a for a in external}
    # a moved cast copies its input earlier than it did: a write in place into that input in between would
    # now come after the copy (a view moved instead still sees the write, through the storage it shares)
    roots.update({_root(x): h for h in hoist if h.target in _CASTS for x in h.all_input_nodes})
    for m in graph.nodes:
        if lo < order[m] < hi and m not in inside and _mutates(m):
            hit = next((roots[_root(x)] for x in m.all_input_nodes if _root(x) in roots), None)
            if hit is not None:
                return [], (f"{describe(m)} writes in place into {describe(hit)}, which a branch reads, between "
                            "where the branches would run and where they ran")
    return sorted(hoist, key=order.__getitem__), ""


def _root(node: Node) -> Node:
    """The node whose storage `node` views (itself unless it is a view, slice or getitem)."""
    while node.op == "call_function" and is_free(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


# Outline CPU graphs too (tests: the CPU stands in for the GPU; the results are the same, streams a no-op).
# Part of the pass manager's cache key.
ON_CPU = False


def outline(nodes: tuple[Node, ...]) -> tuple[GraphModule, list[Node], list[Node], TritonCalls]:
    """`nodes` (one branch, graph order) as a GraphModule of their external inputs -> the values used outside,
    and the kernels and constants its Triton calls now number from 0 (runtime/streams.py says why)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    calls = TritonCalls()
    inside = set(nodes)
    g = Graph()
    env: dict[Node, Node] = {}
    inputs: list[Node] = []
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            if a not in inside and a not in env:
                env[a] = g.placeholder(f"in{len(inputs)}")
                env[a].meta["val"] = a.meta["val"]
                inputs.append(a)
        env[n] = g.node_copy(n, lambda a: env[a])
        if "constant_args_idx" in n.kwargs:  # a user Triton kernel (a braze op traced through)
            ref = kernel_ref(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]))
            if isinstance(ref, str):
                raise ValueError(f"{describe(n)} cannot be outlined: {ref} (why_not_outlined says so first)")
            constants = kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"])
            env[n].kwargs = {**env[n].kwargs, "kernel_idx": calls.local_index(calls.kernels, ref),
                             "constant_args_idx": calls.local_index(calls.constants, constants)}
        # named by position, so the same branch in every layer is the same graph: the op compiles it once
        # (runtime/streams.py caches by the spec's text and the input shapes)
        env[n]._rename(f"v{i}")
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    g.output(tuple(env[o] for o in outputs))
    return GraphModule(torch.nn.Module(), g), inputs, outputs, calls


class DualStream(Pass):
    name = "dual-stream"
    family = "dual_stream"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        taken: set[Node] = set()
        try:
            device = device_model(graph)
            forks = [(f, decide(f, device)) for f in find_forks(graph)]
        except Exception as e:  # a bug in braze's analysis must not break the user's compile
            ctx.remark("failed", "internal-error", next(iter(graph.nodes)), "dual-stream scheduling skipped after "
                       "an error in braze", reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug")
            return
        on_cuda = any(isinstance(v := val(n), torch.Tensor) and v.device.type == "cuda"
                      for n in graph.find_nodes(op="placeholder"))
        for fork, decision in forks:
            if decision.side is None:
                continue  # serial: the branch analysis said why
            if not (on_cuda or ON_CPU):
                ctx.remark("missed", "dual-stream", fork.fork, "branches left on one stream",
                           reason="the graph runs on the CPU, which has no second stream to overlap them on",
                           suggestion="compile for a CUDA device", ops=("fork",))
                continue
            try:
                (main, side, hoist, prepared), why = self._plan(graph, fork, decision, taken, ctx)
                if why and decision.pairing is not None:
                    # the rest of the region cannot move into the op: the pair may still (its own checks)
                    pair = decide(dataclasses.replace(fork, pairings=()), device)
                    if pair.side is not None:
                        plan, why_pair = self._plan(graph, fork, pair, taken, ctx)
                        if not why_pair:
                            decision = dataclasses.replace(pair, reason=f"{pair.reason}; the largest branch beside "
                                                           f"the rest of the region would save more, but {why}")
                            (main, side, hoist, prepared), why = plan, ""
            except Exception as e:
                ctx.remark("failed", "internal-error", fork.fork, "branches left on one stream after an error in "
                           "braze", reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug")
                continue
            if why:
                ctx.remark("missed", "dual-stream", fork.fork, "branches left on one stream", reason=why,
                           suggestion="see braze/passes/streams.py for what can be outlined", ops=("fork",))
                continue
            order = order_of(graph)
            first = min(main.nodes + side.nodes, key=order.__getitem__)
            for n in hoist:  # pure views of weights and creation ops the branches read: before their first node
                first.prepend(n)
            self._rewrite(graph, fork, main, side, *prepared)
            taken |= set(main.nodes) | set(side.nodes)
            work = lambda b: [n.name for n in b.nodes if n.op == "call_function"]
            ctx.remark("applied", "dual-stream", fork.fork,
                       f"{len(side.nodes)} nodes from {describe(side.head)} run on the side stream beside "
                       f"{len(main.nodes)} nodes from {describe(main.head)} (both compiled by Inductor); "
                       f"{decision.reason}",
                       ops=("fork", "join"),
                       args={"stream0": work(main), "stream1": work(side), "side_head": module_path(side.head),
                             "main_head": module_path(main.head)})
            ctx.bump("forks-overlapped")
            ctx.bump("side-stream-nodes", len(side.nodes))

    def _plan(self, graph: Graph, fork: Fork, decision: Decision, taken: set[Node],
              ctx: PassContext) -> tuple[tuple, str]:
        """(main, side, nodes to hoist, what `_rewrite` needs) for `decision`'s two sides, and why they cannot be
        replaced by one op ("" when they can). Changes nothing in the graph."""
        side = decision.side
        main = decision.main or next(b for b in fork.branches if b is not side)
        main = with_created_inputs(without_fused_casts(main, fork.fork), set(side.nodes))
        side = with_created_inputs(without_fused_casts(side, fork.fork), set(main.nodes))
        why = self._why_not(fork, main, side, taken, ctx)
        hoist, why = ([], why) if why else schedule(main, side)
        prepared = None if why else self._prepare(graph, main, side)
        return (main, side, hoist, prepared), why

    @staticmethod
    def _why_not(fork: Fork, main: Branch, side: Branch, taken: set[Node], ctx: PassContext) -> str:
        if taken & (set(main.nodes) | set(side.nodes)):
            return "a node of these branches is already in another pair of overlapped branches"
        v = val(fork.fork)
        why = ctx.token_check("dual_stream", v.shape[0] if v is not None and v.dim() else 1)
        if why:
            return why
        for b in (main, side):
            why = why_not_outlined(b)
            if why:
                return why
        return ""

    @staticmethod
    def _prepare(graph: Graph, main: Branch, side: Branch) -> tuple:
        """Everything the rewrite needs, computed before the graph changes (an error leaves it untouched)."""
        main_gm, main_in, main_out, main_calls = outline(main.nodes)
        side_gm, side_in, side_out, side_calls = outline(side.nodes)
        inputs = list(dict.fromkeys(main_in + side_in))
        outputs = main_out + side_out
        meta = [{"shape": list(val(o).shape), "stride": list(val(o).stride()),
                 "dtype": str(val(o).dtype).removeprefix("torch.")} for o in outputs]
        spec = encode_spec(main_gm, side_gm, [inputs.index(a) for a in main_in], [inputs.index(a) for a in side_in],
                           meta, main_calls, side_calls)
        with graph_fake_mode(graph):
            fake = torch.ops.braze.parallel_branches.default(spec, [val(a) for a in inputs])
        return spec, inputs, outputs, fake

    @staticmethod
    def _rewrite(graph: Graph, fork: Fork, main: Branch, side: Branch, spec: str, inputs: list[Node],
                 outputs: list[Node], fake: list[torch.Tensor]) -> None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        with graph.inserting_after(max(inputs, key=order.__getitem__)):
            call = graph.call_function(torch.ops.braze.parallel_branches.default, (spec, inputs))
        call.meta["val"] = fake
        for key in ("nn_module_stack", "stack_trace"):
            if key in fork.fork.meta:
                call.meta[key] = fork.fork.meta[key]
        inside = set(main.nodes) | set(side.nodes)
        anchor = call
        for i, o in enumerate(outputs):
            with graph.inserting_after(anchor):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta.update({k: v for k, v in o.meta.items() if k in ("nn_module_stack", "stack_trace")})
            item.meta["val"] = call.meta["val"][i]
            o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
            anchor = item
        for n in sorted(inside, key=order.__getitem__, reverse=True):
            graph.erase_node(n)

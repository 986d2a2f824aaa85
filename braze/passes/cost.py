"""Shape-based cost estimates of post-grad nodes and branches: bytes moved, FLOPs, kernels, roofline time.

The estimates read only `meta['val']` shapes and dtypes (symbolic sizes at their hint, the size
the graph was traced with), so they are cheap and deterministic. They are a model, not a
measurement: bytes count each kernel's inputs and outputs once (what a fused Inductor kernel
reads and writes), FLOPs count 2·M·N·K per GEMM and one per element elsewhere, and kernels count
the ops that start a kernel of their own (GEMMs and other extern calls, reductions) plus one for
pointwise work that has no such anchor to fuse into. Times use a roofline over `DeviceModel`,
whose defaults are an H100 SXM's datasheet figures; the launch gap is an assumption for the
benchmark to calibrate.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from braze.patterns.fx import aten, is_view, val

prims = torch.ops.prims


@dataclass(frozen=True)
class DeviceModel:
    """The machine the cost model assumes.

    bandwidth: HBM bytes/s; flops: dense bf16 FLOP/s; launch_gap: seconds a small kernel costs beyond its
    roofline time in a CUDA-graph replay (launch, ramp-up, tail), what merging two launches wins back;
    fork_join: seconds the fork and join events of two streams add to a CUDA-graph replay.
    The defaults (`REFERENCE`) are an H100 SXM's datasheet figures with a 2 µs launch gap and two launch
    gaps for the events, the model braze uses on the CPU and on cards it has no measurement of.
    """

    name: str = "H100 SXM datasheet"
    bandwidth: float = 3.35e12
    flops: float = 989e12
    launch_gap: float = 2e-6
    fork_join: float = 4e-6

    def seconds(self, bytes_moved: float, flops: float, kernels: int) -> float:
        return max(bytes_moved / self.bandwidth, flops / self.flops) + kernels * self.launch_gap

    def memory_bound(self, bytes_moved: float, flops: float) -> bool:
        return bytes_moved / self.bandwidth >= flops / self.flops


REFERENCE = H100 = DeviceModel()
# Cards braze was measured on, by a substring of torch.cuda.get_device_name(). H200 (session 15,
# benchmarks/results/session15_gpu): copy 4.03-4.17 TB/s and bf16 matmul 751-803 TFLOP/s over ten bench probes;
# a fork and a join inside a CUDA graph cost ~0.3 µs (benchmarks/stream_overhead.py: two tiny kernels on two
# streams then one reading both, 2.32 µs a round, against 3.09 for the three on one stream). The launch gap,
# what one more small kernel costs a step: 3.6 µs per kernel merging removed from DeepSeek V3.2's step at T=1
# (1509.5 -> 1480.7 µs, 141 -> 133 kernels), 3.9 µs per kernel the model counts in the router the MoE block hid
# beside its shared expert (7.9 µs, moe_streams.py); a trivial kernel alone costs 0.8 µs.
CARDS = {"H200": DeviceModel("NVIDIA H200 (measured)", bandwidth=4.1e12, flops=780e12, launch_gap=3.5e-6,
                             fork_join=0.3e-6)}


def device_model(graph: torch.fx.Graph) -> DeviceModel:
    """The model of the card the graph's inputs live on: a measured one (`CARDS`), else `REFERENCE`."""
    for n in graph.find_nodes(op="placeholder"):
        v = val(n)
        if isinstance(v, torch.Tensor) and v.device.type == "cuda" and torch.cuda.is_available():
            name = torch.cuda.get_device_name(v.device)
            return next((m for key, m in CARDS.items() if key in name), REFERENCE)
    return REFERENCE


GEMMS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._scaled_mm.default,
         aten._grouped_mm.default)
_REDUCTIONS = (
    aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var_mean, aten.var, aten.prod,
    aten.argmax, aten.argmin, aten.topk, aten.sort, aten.cumsum, aten._softmax, aten._log_softmax,
)
# Ops that cost nothing at run time (metadata only) or that Inductor folds into their consumer.
_FREE = (aten.slice.Tensor, aten.select.int, aten.permute.default, aten.t.default, aten.expand.default,
         aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.alias.default,
         aten.split.Tensor, aten.split_with_sizes.default, aten.as_strided.default)


def numel(node: object) -> int:
    v = val(node)
    if v is None:
        return 0
    return math.prod(_hint(s) for s in v.shape)


def nbytes(node: object) -> int:
    v = val(node)
    return numel(node) * v.element_size() if v is not None else 0


def _hint(s: object) -> int:
    """An int size, or a symbolic size at its hint (the value it was traced with; 1 if it has none)."""
    if isinstance(s, torch.SymInt):
        hint = getattr(s.node, "hint", None)
        return int(hint) if hint is not None else 1
    return int(s)


def is_free(node: Node) -> bool:
    """A view, slice or getitem: no kernel and no bytes of its own."""
    return (node.op != "call_function" or node.target is operator.getitem or is_view(node)
            or node.target in _FREE)


def is_gemm(node: Node) -> bool:
    return node.op == "call_function" and node.target in GEMMS


def is_reduction(node: Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return node.op == "call_function" and packet in _REDUCTIONS


def is_extern(node: Node) -> bool:
    """A call Inductor cannot fuse with neighbours (GEMMs, braze's and other custom ops, collectives)."""
    if node.op != "call_function" or is_free(node):
        return False
    if is_gemm(node):
        return True
    ns = getattr(getattr(node.target, "_schema", None), "name", "") or ""
    return not ns.startswith(("aten::", "prims::"))


def gemm_flops(node: Node) -> int:
    """2·M·N·K (times the batch for bmm) from the output and the reduced dim of the first operand."""
    out = numel(node)
    a = node.args[1] if node.target in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
    shape = val(a).shape if val(a) is not None else ()
    k = _hint(shape[-1]) if shape else 0
    return 2 * out * k


@dataclass(frozen=True)
class Cost:
    """What a set of nodes moves and computes, and the kernels it takes (estimates; see module doc)."""

    bytes_moved: int = 0
    flops: int = 0
    kernels: int = 0
    gemms: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes_moved + other.bytes_moved, self.flops + other.flops,
                    self.kernels + other.kernels, self.gemms + other.gemms)

    def seconds(self, device: DeviceModel = H100) -> float:
        return device.seconds(self.bytes_moved, self.flops, self.kernels)

    def describe(self, device: DeviceModel = H100) -> str:
        return (f"{self.kernels} kernel(s), {self.gemms} GEMM(s), {_si(self.bytes_moved)}B, "
                f"{_si(self.flops)}FLOP, ~{self.seconds(device) * 1e6:.1f} us")


def node_cost(node: Node, inside: set[Node] | frozenset[Node] = frozenset()) -> Cost:
    """One node's cost. An extern call or a GEMM reads all its inputs and writes its output; a
    reduction or pointwise op counts only reads from outside `inside` (within a region Inductor
    fuses the rest) and its output when someone outside `inside` reads it."""
    if is_free(node):
        return Cost()
    ins = [a for a in node.all_input_nodes if val(a) is not None]
    if is_extern(node):
        read = sum(_source_bytes(a) * _expert_fraction(node, a) for a in ins)
        flops = gemm_flops(node) if is_gemm(node) else numel(node)
        return Cost(read + nbytes(node), flops, 1, int(is_gemm(node)))
    read = sum(_source_bytes(a) for a in ins if _source(a) not in inside)
    written = nbytes(node) if any(u not in inside for u in node.users) else 0
    return Cost(read + written, numel(node), int(is_reduction(node)), 0)


def _expert_fraction(node: Node, arg: Node) -> float:
    """The share of a stacked expert weight [E, ...] that a grouped GEMM or braze's fused experts read: at
    most one expert per (token, expert) pair, so min(1, pairs / E); 1 for every other operand."""
    name = str(node.target)
    if node.target is aten._grouped_mm.default and arg is node.args[1] and len(val(arg).shape) == 3:
        pairs, experts = _hint(val(node.args[0]).shape[0]), _hint(val(arg).shape[0])
    elif "braze.moe_experts" in name and arg in node.args[1:3]:
        pairs, experts = _hint(val(node.args[3]).numel()), _hint(val(arg).shape[0])
    else:
        return 1.0
    return min(1.0, pairs / max(experts, 1))


def region_cost(nodes: list[Node] | set[Node]) -> Cost:
    """The cost of running `nodes` (one branch): the sum of node costs, plus one kernel for
    pointwise work when the region has no GEMM, extern call or reduction to fuse it into."""
    inside = set(nodes)
    total = Cost()
    pointwise = False
    for n in nodes:
        c = node_cost(n, inside)
        total = total + c
        pointwise |= c.kernels == 0 and c.flops > 0
    if pointwise and total.kernels == 0:
        total = total + Cost(kernels=1)
    return total


def _source(node: Node) -> Node:
    while node.op == "call_function" and is_free(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _source_bytes(node: Node) -> int:
    """Bytes a read of `node` moves: a slice or view reads its own extent, not its base."""
    return nbytes(node)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} "

"""The registry of passes, in order, and the PassManager Inductor runs as its post-grad custom pass.

The PassManager's uuid() hashes the source of every pass it runs, of braze's
recognizers, codegen and runtime, and the config, so Inductor's FX-graph cache
never serves a graph compiled with other passes. The KernelCounter is a
scheduler pass that counts, per layer, the kernels the scheduled graph will launch.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

from braze.config import FusionConfig
from braze.report import GraphRecord, layer_of

from .base import Pass, PassContext, current_record
from .branches import BranchAnalysis
from .canonicalize import Canonicalize
from .chain import HeadChainFusion
from .collective import AllReduceNormFusion
from .decode_gemm import DecodeGemm
from .delta_rule import DeltaRuleFusion
from .gated_norm import GatedNormFusion
from .gemm_merge import SiblingGemmMerge
from .moe import ExpertsFusion
from .norm_quant import NormQuantFusion
from .post_conv import PostConvFusion
from .router import RouterFusion
from .streams import DualStream
from .topk import TopKSort
from .tp_norm import TPNormFusion

# Every pass braze runs, in order. The collective passes come before norm-quant, which would
# otherwise take the residual add and norm behind an all-reduce without the all-reduce; the
# TP-reduced norm before the head-chain pass, which then takes the RoPE and cache write after it.
# The post-conv pass takes the conv state write with its conv update before the head-chain pass
# would take it alone, and the delta-rule pass the recurrent state's row write with its update (it
# reads the post-conv outputs); the head-chain pass takes a norm -> quant whose bytes a packed cache row
# stores before the row passes would; the gated norm takes the FP8 quant after it before the
# norm-quant pass would call that quant's input a non-norm.
PASSES: tuple[type[Pass], ...] = (
    Canonicalize,
    TPNormFusion,
    AllReduceNormFusion,
    PostConvFusion,
    DeltaRuleFusion,
    HeadChainFusion,
    GatedNormFusion,
    NormQuantFusion,
    ExpertsFusion,
    RouterFusion,  # before small-topk, which takes the top-k sites it leaves
    TopKSort,
    BranchAnalysis,  # before gemm-merge: it reports the branches as the model wrote them
    SiblingGemmMerge,
    DecodeGemm,  # after gemm-merge, which makes the same kernel choice for the GEMMs it merges
    DualStream,  # last: it outlines regions of the graph as it will run
)

try:  # torch >= 2.12 checks scheduler passes for a uuid before caching
    from torch._inductor.custom_graph_pass import CustomSchedulerPass
except ImportError:  # torch 2.11 takes any callable there
    CustomSchedulerPass = object  # type: ignore[assignment,misc]

_PACKAGE = Path(__file__).resolve().parent.parent
_HASHED_DIRS = ("patterns", "passes", "codegen", "runtime")


def _source_hash(passes: Sequence[type[Pass]]) -> str:
    h = hashlib.sha256()
    for folder in _HASHED_DIRS:
        for path in sorted((_PACKAGE / folder).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    for p in passes:  # passes defined outside the package (e.g. by tests) count too
        try:
            h.update(inspect.getsource(p).encode())
        except (OSError, TypeError):
            h.update(repr(p).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()


class PassManager(CustomGraphPass):
    """Runs braze's passes on one post-grad graph and records what they did."""

    def __init__(
        self,
        config: FusionConfig,
        passes: Sequence[type[Pass]] = PASSES,
        user_pass: object | None = None,
    ) -> None:
        self.config = config
        self.passes = tuple(passes)
        self.user_pass = user_pass  # a post-grad pass the user had installed; runs first
        self._uuid = None

    def __call__(self, graph: Graph) -> None:
        if self.user_pass is not None:
            self.user_pass(graph)
        record = current_record.get()
        if record is None:  # installed by hand, outside braze's backend
            record = GraphRecord(index=-1)
        gm = graph.owning_module
        assert isinstance(gm, GraphModule), "braze passes need the graph's owning module"
        ctx = PassContext(gm, self.config, record)
        record.nodes = len(graph.nodes)
        for cls in self.passes:
            if cls.family is not None and not self.config.enabled(cls.family):
                continue
            ctx.pass_name = cls.name
            start = time.perf_counter()
            if self.config.dump_dir:
                _dump_graph(gm, self.config.dump_dir, record.index, f"before-{cls.name}")
            cls().run(gm, ctx)
            graph.eliminate_dead_code()
            record.pass_seconds[cls.name] = record.pass_seconds.get(cls.name, 0.0) + time.perf_counter() - start
        graph.lint()
        if self.config.dump_dir:
            _dump_graph(gm, self.config.dump_dir, record.index, "after-braze")

    def uuid(self) -> str | None:
        if self._uuid is None:
            user = ""
            if self.user_pass is not None:
                if not isinstance(self.user_pass, CustomGraphPass):
                    return None  # the user's pass has no uuid: caching must be off
                user = repr(self.user_pass.uuid())
            from . import streams

            h = hashlib.sha256()
            for part in (_source_hash(self.passes), self.config.fingerprint(), user, f"streams.ON_CPU={streams.ON_CPU}",
                         ",".join(f"{p.__module__}.{p.__qualname__}" for p in self.passes)):
                h.update(part.encode())
            self._uuid = h.hexdigest()
        return self._uuid


def _dump_graph(gm: GraphModule, folder: str, index: int, stage: str) -> None:
    out = Path(folder) / "graphs"
    out.mkdir(parents=True, exist_ok=True)
    text = gm.print_readable(print_output=False, include_stride=True, include_device=True)
    (out / f"graph{index}-{stage}.py").write_text(text)


class KernelCounter(CustomSchedulerPass):
    """Counts the kernels of the fused schedule, per layer, into the current record."""

    def __init__(self, target: str = "kernels", user_pass: object | None = None) -> None:
        self.target = target
        self.user_pass = user_pass

    def __call__(self, nodes: list) -> list:
        if self.user_pass is not None:
            nodes = self.user_pass(nodes)
        record = current_record.get()
        if record is not None:
            counts: Counter = Counter()
            for node in nodes:
                n = _kernel_launches(node)
                if n:
                    counts[_node_layer(node)] += n
            setattr(record, self.target, dict(counts))
        return nodes

    def uuid(self) -> str:
        user = repr(self.user_pass.uuid()) if hasattr(self.user_pass, "uuid") else ""
        return "braze-kernel-counter-1" + user


# Extern IR nodes that launch nothing: output unpacking, waits on collectives, mutation markers.
_NOT_LAUNCHES = ("MultiOutput", "_WaitKernel", "MutationOutput", "ReinterpretView")


def _kernel_launches(node: object) -> int:
    """Kernel launches one scheduler node makes: 0 for no-ops, views and waits, else 1."""
    kind = type(node).__name__
    if kind == "NopKernelSchedulerNode":
        return 0
    if kind == "ExternKernelSchedulerNode" and type(getattr(node, "node", None)).__name__ in _NOT_LAUNCHES:
        return 0
    return 1


def _node_layer(node: object) -> str:
    origins = []
    for sub in getattr(node, "get_nodes", lambda: [node])():
        ir = getattr(sub, "node", None)
        origins.extend(getattr(ir, "origins", ()) or ())
    from braze.patterns.fx import module_path

    paths = [module_path(o) for o in origins if hasattr(o, "meta")]
    paths = [p for p in paths if p]
    if not paths:
        return "(top)"
    return layer_of(Counter(layer_of(p) for p in paths).most_common(1)[0][0])

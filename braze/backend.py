"""The torch.compile backend: Inductor with braze's passes, and the report of what they did.

`torch.compile(model, backend="braze")` (the `torch_dynamo_backends` entry
point) or `torch.compile(model, backend=braze.backend(FusionConfig(...)))`.
Each graph Dynamo hands over is compiled by Inductor with braze's PassManager
as the post-grad custom pass (after any pass the user installed) and a
scheduler pass that counts kernels. What the passes did is kept in a record
per graph, and stored beside Inductor's cache: when Inductor serves a graph
from its cache and the passes do not run, the stored record is reloaded, so
the report is complete on a warm cache too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

from braze.config import FusionConfig
from braze.passes.base import Pass, current_inputs, current_record
from braze.passes.manager import PASSES, KernelCounter, PassManager
from braze.report import GraphRecord, Remark, Report


class Backend:
    """A braze backend instance; its `report` aggregates every graph it compiled."""

    def __init__(self, config: FusionConfig | None = None, passes: Sequence[type[Pass]] | None = None) -> None:
        if config is not None and not isinstance(config, FusionConfig):
            raise TypeError(f"braze.backend(config=...) expects a braze.FusionConfig, got {type(config).__name__}")
        self.config = config or FusionConfig()
        self.passes = tuple(passes) if passes is not None else PASSES
        self.report = Report()

    def __repr__(self) -> str:
        return f"braze.backend({self.config!r})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[object]):
        import braze.runtime  # noqa: F401  fused ops must exist before a cached graph loads

        record = GraphRecord(index=len(self.report.graphs), device=_device_of(example_inputs))
        manager = PassManager(self.config, self.passes, user_pass=inductor_config.post_grad_custom_post_pass)
        counter = KernelCounter(user_pass=inductor_config._post_fusion_custom_pass)
        key = _record_key(gm, example_inputs, manager.uuid())
        pristine = _copy_graph_module(gm)
        if self.config.count_stock_kernels:
            self._count_stock_kernels(_copy_graph_module(gm), example_inputs, record)
        compiled = self._compile(gm, example_inputs, manager, counter, record, {})
        if not record.pass_seconds:  # Inductor served the graph from its cache
            stored = _load_record(key)
            if stored is not None:
                stored.index, stored.cache = record.index, "hit"
                stored.compile_seconds = record.compile_seconds
                if self.config.count_stock_kernels:
                    stored.stock_kernels = record.stock_kernels
                record = stored
            else:  # compiled elsewhere without braze's record: compile again to see it
                compiled = self._compile(pristine, example_inputs, manager, counter, record,
                                         {"force_disable_caches": True})
        if record.cache == "miss" and key is not None:
            _save_record(key, record)
        _share_weights(record, example_inputs)
        from braze.runtime.rowwise import cpu_backend

        if record.device == "cpu":
            record.cpu_execution = cpu_backend()
        self.report.graphs.append(record)
        return compiled

    @staticmethod
    def _compile(gm, example_inputs, manager, counter, record, extra: dict):
        from torch._inductor.compile_fx import compile_fx

        patches = {"post_grad_custom_post_pass": manager, "_post_fusion_custom_pass": counter, **extra}
        token = current_record.set(record)
        inputs_token = current_inputs.set(tuple(example_inputs))
        start = time.perf_counter()
        try:
            with inductor_config.patch(patches):
                compiled = compile_fx(gm, example_inputs)
        finally:
            current_inputs.reset(inputs_token)
            current_record.reset(token)
        record.compile_seconds += time.perf_counter() - start
        return compiled

    @staticmethod
    def _count_stock_kernels(gm, example_inputs, record: GraphRecord) -> None:
        """Compile the graph with stock Inductor (caches off) only to count its kernels."""
        from torch._inductor.compile_fx import compile_fx

        counter = KernelCounter(target="stock_kernels")
        token = current_record.set(record)
        try:
            with inductor_config.patch({"_post_fusion_custom_pass": counter, "force_disable_caches": True}):
                compile_fx(gm, example_inputs)
        finally:
            current_record.reset(token)


def _share_weights(record: GraphRecord, example_inputs: Sequence[object]) -> None:
    """Re-point the weights each merged GEMM reads into one buffer (also on a warm cache, where the
    passes did not run but the compiled graph holds the merged GEMMs), and say what it cost."""
    from braze.runtime.sibling_mm import share_rows

    for group in record.shared_weights:
        weights = [example_inputs[i] for i in group["inputs"]]
        try:
            status, _ = share_rows(weights)
        except Exception as e:  # noqa: BLE001  an odd parameter must not break the compile: the op concatenates
            status = f"refused: re-pointing failed ({type(e).__name__}: {e})"
        if status in ("shared", "already"):
            continue
        record.remarks.append(Remark(
            kind="missed", pass_name="gemm-merge", name="weights-not-shared", location=group["location"],
            source="", ops=("gemm",) * len(weights),
            message="merged GEMM concatenates its weights on every call (correct, slower than unmerged)",
            reason=status.removeprefix("refused: "),
            suggestion="freeze the weights as nn.Parameters of their own, or FusionConfig(gemm_merge=False)"))
        record.bump("gemm-merge", "missed")


def backend(config: FusionConfig | None = None, *, passes: Sequence[type[Pass]] | None = None) -> Backend:
    """A braze backend for `torch.compile(..., backend=braze.backend(config))`."""
    return Backend(config, passes)


# What `torch.compile(model, backend="braze")` finds through the entry point.
braze_backend = Backend()


def report(obj: object) -> Report:
    """The report of a braze backend, or of a model/function compiled with one."""
    found = _find_backend(obj)
    if found is None:
        raise ValueError(
            f"braze.report: {type(obj).__name__} was not compiled with braze; pass the result of "
            "torch.compile(model, backend='braze') or a braze.backend(...) instance"
        )
    return found.report


def _find_backend(obj: object) -> Backend | None:
    from torch._dynamo.eval_frame import innermost_backend

    if isinstance(obj, Backend):
        return obj
    ctxs = []
    if hasattr(obj, "dynamo_ctx"):  # OptimizedModule
        ctxs.append(obj.dynamo_ctx)
    for cell in getattr(obj, "__closure__", None) or ():  # a compiled function
        try:
            ctxs.append(cell.cell_contents)
        except ValueError:
            continue
    for ctx in ctxs:
        fn = getattr(ctx, "callback", ctx)
        for _ in range(8):
            if isinstance(fn, Backend):
                return fn
            if hasattr(fn, "_torchdynamo_orig_backend"):
                fn = innermost_backend(fn)
            elif hasattr(fn, "compiler_fn"):
                fn = fn.compiler_fn
            else:
                break
    return None


def _device_of(example_inputs: Sequence[object]) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the graph that shares the module's parameters and buffers."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new


# -- the record store beside Inductor's cache -------------------------------------


def _plain(value: object) -> object:
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if all(i is not _SKIP for i in items) else _SKIP
    return _SKIP


_SKIP = object()


def _record_key(gm: torch.fx.GraphModule, example_inputs: Sequence[object], uuid: str | None) -> str | None:
    """What the record depends on: braze's uuid, the graph and its locations, the inputs, Inductor's config."""
    if uuid is None:
        return None
    h = hashlib.sha256()
    h.update(uuid.encode())
    h.update(torch.__version__.encode())
    h.update(gm.code.encode())
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        h.update(repr([v[0] for v in stack.values()]).encode())
        h.update((node.meta.get("stack_trace") or "").encode())
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            h.update(repr((tuple(x.shape), x.stride(), x.dtype, x.device.type, x.requires_grad)).encode())
        else:
            h.update(repr(type(x)).encode())
    settings = {k: _plain(v) for k, v in inductor_config.get_config_copy().items()}
    h.update(json.dumps({k: v for k, v in sorted(settings.items()) if v is not _SKIP}, default=str).encode())
    return h.hexdigest()


def _store_dir() -> Path:
    from braze.codegen.cache import cache_root

    return cache_root() / "records"


def _save_record(key: str, record: GraphRecord) -> None:
    folder = _store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record.to_dict()))
    os.replace(tmp, folder / f"{key}.json")


def _load_record(key: str | None) -> GraphRecord | None:
    if key is None:
        return None
    path = _store_dir() / f"{key}.json"
    try:
        return GraphRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None

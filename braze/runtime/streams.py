"""`braze::parallel_branches`: two independent branches of a graph, each compiled by Inductor, the smaller
on a side CUDA stream while the larger runs on the current one, joined before the op returns.

The braze pass (`braze.passes.streams`) outlines both branches of a fork into ATen subgraphs and
replaces them with one call of this op, so every data dependency stays explicit in the outer graph:
the op reads the branches' inputs and returns both branches' outputs as fresh tensors. Why both
branches and not only the side one: an op that only forks would need a second "join" op that the
consumers of the side outputs depend on, and a custom op cannot return its inputs (aliases); with
one op the join is inside it and Inductor's scheduler cannot move a consumer before it.

On CUDA, per call:
  fork: an event recorded on the current stream, waited on by the side stream (one per device);
  the side branch's compiled callable runs under the side stream, the main one under the current;
  join: an event recorded on the side stream, waited on by the current stream.
Lifetimes: the side branch reads tensors the current stream allocated; they are `record_stream`ed
to the side stream, so the caching allocator does not hand their blocks to the current stream
before the side branch is done (Inductor frees them after the op returns, and the current stream
already waits on the join by then, but a `del` inside the main branch's own callable may not). The
side branch's outputs are allocated on the side stream and `record_stream`ed to the current one.
Capture: events and record_stream are legal while a CUDA graph captures (the side stream joins the
capture through the fork event and leaves it through the join event); compiling is not, so the
branches compile on the first call (warm up before capturing). On CPU the branches run one after
the other, as ATen graphs (`COMPILE_ON_CPU`): streams are a no-op, the results are the same.

Each branch compiles once per (subgraph, input shapes/strides/dtypes/device); shapes are static
(the pass outlines only branches without symbolic sizes).

Triton kernel calls in a branch (a braze op traced through) name their kernel and constants by index into
Inductor's side table, which belongs to one process and which `torch._dynamo.reset()` empties. A spec must
mean the same in any process: Inductor's FX graph cache replays the outer graph, spec included, without
running braze's passes again. So the outlined graph numbers its calls' kernels and constants from 0, and
the spec says what they are (`TritonCalls`): each kernel as the module and name of its `@triton.jit`
function (with the source of a kernel braze generated, which another process loads as braze's kernel cache
does), plus the configs of the autotuner torch wraps a launch with `num_warps` in; the constants as
values. The op enters them in its own process's table before it compiles or runs the branch. Identical
layers thereby give identical specs, whatever their side-table indices.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import importlib
import json
import pickle
import sys
import threading
import time
from pathlib import Path

import torch
from torch.library import custom_op

# On CPU there is no stream to overlap on, so the outlined branches run as the ATen graphs they are
# (the same ops, one after the other); compiling them there would only cost time. True compiles them
# with Inductor on CPU as well (what the opt-in test does).
COMPILE_ON_CPU = False
_compiled: dict[tuple, object] = {}
# branch compiles done by this process and the seconds they took (read by benchmarks/branches_compile_time.py)
COMPILE_STATS = {"compiles": 0, "seconds": 0.0}
_lock = threading.Lock()
_side_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
# The side stream's priority: "normal" (the default stream's) or "high" (the device's highest: its pending
# thread blocks are scheduled before the current stream's as SMs free up). A CUDA graph keeps the priority of
# the stream each kernel was captured on (torch instantiates graphs with per-node priorities).
SIDE_PRIORITY = "normal"


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream braze uses on `device` at `SIDE_PRIORITY` (created on first use; not one per site)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, SIDE_PRIORITY)
    if key not in _side_streams:
        if SIDE_PRIORITY not in ("normal", "high"):
            raise ValueError(f"SIDE_PRIORITY must be 'normal' or 'high', not {SIDE_PRIORITY!r}")
        # torch maps a priority beyond the device's range to the nearest one it has: -100 is the highest
        _side_streams[key] = torch.cuda.Stream(device=index, priority=-100 if SIDE_PRIORITY == "high" else 0)
    return _side_streams[key]


def _b64(obj: object) -> str:
    return base64.b64encode(pickle.dumps(obj, protocol=4)).decode()


def _unb64(text: str) -> object:
    return pickle.loads(base64.b64decode(text))


@dataclasses.dataclass(frozen=True)
class _Arg:
    """A reference to the value of the `index`-th node, in an encoded graph."""

    index: int


@dataclasses.dataclass(frozen=True)
class _Op:
    """An operator passed as an argument (`with_effects(token, op, ...)`), by reference: operators do not pickle."""

    ref: tuple


def _map(x: object, fn) -> object:
    """`x` with every Node, _Arg, operator or _Op in it (nested in tuples, lists, dicts and slices) replaced by
    `fn` of it."""
    if isinstance(x, (torch.fx.Node, _Arg, _Op, torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return fn(x)
    if isinstance(x, tuple):
        return tuple(_map(y, fn) for y in x)
    if isinstance(x, list):
        return [_map(y, fn) for y in x]
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(_map(x.start, fn), _map(x.stop, fn), _map(x.step, fn))
    return x


def _target_ref(target: object) -> tuple:
    if isinstance(target, str):  # placeholder, output
        return ("str", target)
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target._schema.name, target._overloadname)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return ("hop", target.name())
    return ("py", target.__module__, target.__qualname__)  # operator.getitem and the like


def _load_target(ref: tuple) -> object:
    kind, *rest = ref
    if kind == "str":
        return rest[0]
    if kind == "op":
        ns, name = rest[0].split("::")
        return getattr(getattr(getattr(torch.ops, ns), name), rest[1])
    if kind == "hop":
        return getattr(torch.ops.higher_order, rest[0])
    obj = importlib.import_module(rest[0])
    for part in rest[1].split("."):
        obj = getattr(obj, part)
    return obj


def encode_graph(gm: torch.fx.GraphModule) -> str:
    """An outlined branch, node by node. Not GraphModule's own pickle: loading one traces its code again with
    torch.fx's symbolic tracer, which runs each call that reads no graph value (`empty`, `full`) and keeps the
    result as a constant tensor; a Triton kernel's output buffer made so reaches Inductor as a graph input,
    which it must copy before every launch (two copy kernels per router call, seen on the H200)."""
    index: dict[torch.fx.Node, int] = {}
    nodes = []

    def enc(a: object) -> object:
        return _Arg(index[a]) if isinstance(a, torch.fx.Node) else _Op(_target_ref(a))

    for n in gm.graph.nodes:
        assert n.op in ("placeholder", "call_function", "output"), f"{n.op} node {n.name} in an outlined branch"
        nodes.append((n.op, _target_ref(n.target), _map(n.args, enc), _map(dict(n.kwargs), enc), n.name))
        index[n] = len(index)
    return _b64({"format": 2, "nodes": nodes})


def decode_graph(text: str) -> torch.fx.GraphModule:
    """The GraphModule `encode_graph` encoded: the same nodes, no call run."""
    doc = _unb64(text)
    if not isinstance(doc, dict) or doc.get("format") != 2:
        raise ValueError("braze::parallel_branches: a spec from another braze version (its branches are not "
                         "encoded node by node); clear Inductor's cache (TORCHINDUCTOR_CACHE_DIR) and recompile")
    g = torch.fx.Graph()
    env: list[torch.fx.Node] = []

    def dec(a: _Arg | _Op) -> object:
        return env[a.index] if isinstance(a, _Arg) else _load_target(a.ref)

    for op, target, args, kwargs, name in doc["nodes"]:
        env.append(g.create_node(op, _load_target(target), _map(args, dec), _map(kwargs, dec), name=name))
    return torch.fx.GraphModule(torch.nn.Module(), g)


@dataclasses.dataclass
class TritonCalls:
    """The kernels and constants an outlined graph's Triton calls number from 0: `kernels[i]` is a
    `kernel_ref`, `constants[j]` a kernel's constant arguments (each pickled, base64)."""

    kernels: list[str] = dataclasses.field(default_factory=list)
    constants: list[str] = dataclasses.field(default_factory=list)

    def local_index(self, table: list[str], entry: object) -> int:
        text = _b64(entry)
        if text not in table:
            table.append(text)
        return table.index(text)


# Attributes of triton's Autotuner that could make two wrappers of one function differ unseen, or that a
# rebuilt wrapper would not have; a wrapper with any of them set is not portable (reset_idx/restore_idx:
# older triton's names).
_AUTOTUNER_EXTRAS = ("perf_model", "early_config_prune", "reset_to_zero", "restore_value", "reset_idx",
                     "restore_idx", "user_defined_pre_hook", "user_defined_post_hook")


def _find_jit(module: str, qualname: str, source: str | None = None) -> object:
    """The object at `module`.`qualname`; a generated kernel's module (braze_kernels.*) loads from `source`."""
    if source is not None:
        from braze.codegen.cache import load_generated

        obj: object = load_generated(module, source)
    else:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def kernel_ref(kernel: object) -> dict | str:
    """How any process finds `kernel` again: {"module", "qualname", "configs"}; or why it cannot."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    jit, configs = kernel, None
    if type(kernel) is Autotuner:
        if kernel.keys or any(getattr(kernel, a, None) for a in _AUTOTUNER_EXTRAS) or any(
                c.pre_hook is not None for c in kernel.configs):
            return "its Triton kernel is autotuned with keys, hooks or pruning"
        jit, configs = kernel.fn, [{k: v for k, v in vars(c).items() if k != "pre_hook"} for c in kernel.configs]
    if type(jit) not in (JITFunction, InterpretedFunction):  # (the latter: @triton.jit under TRITON_INTERPRET=1)
        return f"its Triton kernel is a {type(jit).__name__}, not a @triton.jit function"
    module, qualname = jit.fn.__module__, jit.fn.__qualname__
    source = None
    if module.startswith("braze_kernels.") and module in sys.modules:  # generated by braze: carry its source
        source = Path(sys.modules[module].__file__).read_text()
    try:
        found = _find_jit(module, qualname, source)
    except (ImportError, OSError, ValueError):
        found = None
    if found is not jit:
        return f"its Triton kernel `{qualname}` is made at run time, so another process could not find it"
    return {"module": module, "qualname": qualname, "source": source, "configs": configs}


_kernels: dict[str, object] = {}


def _load_kernel(ref_text: str) -> object:
    """The kernel a `kernel_ref` names (one object per ref, so the side table keeps one entry for it)."""
    if ref_text not in _kernels:
        import triton

        ref = _unb64(ref_text)
        kernel = _find_jit(ref["module"], ref["qualname"], ref["source"])
        if ref["configs"] is not None:
            configs = []
            for attrs in ref["configs"]:
                c = triton.Config({})
                c.__dict__.update(attrs)
                configs.append(c)
            kernel = triton.autotune(configs=configs, key=[])(kernel)
        _kernels[ref_text] = kernel
    return _kernels[ref_text]


def _triton_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "constant_args_idx" in n.kwargs]


class _Bound:
    """An outlined graph whose Triton calls point at this process's side table. Run uncompiled (CPU), it checks
    the entries before every call and enters them again after a `torch._dynamo.reset()` emptied the table."""

    def __init__(self, text: str, calls: TritonCalls) -> None:
        self.gm = decode_graph(text)
        self.local = [(n, n.kwargs["kernel_idx"], n.kwargs["constant_args_idx"]) for n in _triton_nodes(self.gm)]
        self.calls = calls
        self.entries: list[tuple[int, object, int, object]] = []
        self.bind()

    def bind(self) -> None:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        kernels = [_load_kernel(r) for r in self.calls.kernels]
        constants = [_unb64(c) for c in self.calls.constants]
        kidx = [kernel_side_table.add_kernel(k) for k in kernels]
        cidx = [kernel_side_table.add_constant_args(c) for c in constants]
        self.entries = [(kidx[i], kernels[i], cidx[j], constants[j]) for _, i, j in self.local]
        for (n, _, _), (k, _, c, _) in zip(self.local, self.entries, strict=True):
            n.kwargs = {**n.kwargs, "kernel_idx": k, "constant_args_idx": c}
        self.gm.recompile()

    def current(self) -> bool:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        return all(kernel_side_table.id_to_kernel.get(k) is kernel and kernel_side_table.constant_args.get(c) is args
                   for k, kernel, c, args in self.entries)

    def __call__(self, *args):
        if not self.current():
            self.bind()
        return self.gm(*args)


def encode_spec(main: torch.fx.GraphModule, side: torch.fx.GraphModule, main_inputs: list[int],
                side_inputs: list[int], outputs: list[dict], main_calls: TritonCalls | None = None,
                side_calls: TritonCalls | None = None) -> str:
    """The op's `spec` argument: both subgraphs (pickled), which op inputs feed each, the outputs' metadata,
    and the Triton kernels and constants each subgraph's calls number from 0."""
    calls = {"main": dataclasses.asdict(main_calls or TritonCalls()),
             "side": dataclasses.asdict(side_calls or TritonCalls())}
    doc = {"main": encode_graph(main), "side": encode_graph(side), "main_inputs": main_inputs, "side_inputs": side_inputs,
           "outputs": outputs, "triton": calls}
    return json.dumps(doc, sort_keys=True)


def _branch(spec_doc: dict, which: str, inputs: list[torch.Tensor], key: str):
    meta = tuple((tuple(x.shape), x.stride(), x.dtype, str(x.device)) for x in inputs)
    compile_it = COMPILE_ON_CPU or any(x.is_cuda for x in inputs)
    ck = (key, which, meta, compile_it)
    fn = _compiled.get(ck)
    if fn is None:
        if any(x.is_cuda for x in inputs) and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "braze::parallel_branches: a branch would compile while a CUDA graph is being captured; "
                "run the compiled model once (warm-up) before capturing it")
        from torch._inductor.compile_fx import compile_fx

        gm = _Bound(spec_doc[which], TritonCalls(**spec_doc["triton"][which]))
        if not compile_it:
            fn = gm if gm.local else gm.gm
        else:
            gm = gm.gm  # Inductor's compiled code carries the kernels themselves: no side-table lookups
            with _lock, torch.no_grad():
                t0 = time.perf_counter()
                fn = compile_fx(gm, list(inputs))
                COMPILE_STATS["compiles"] += 1
                COMPILE_STATS["seconds"] += time.perf_counter() - t0
        _compiled[ck] = fn
    return fn


def _fresh(outs: list[torch.Tensor], inputs: list[torch.Tensor], expected: list[dict]) -> list[torch.Tensor]:
    """Outputs with the strides the outer graph was compiled for, sharing no storage with the op's inputs or
    with each other (a custom op's contract); a copy only where a compiled branch returned otherwise."""
    seen = {x.untyped_storage().data_ptr() for x in inputs if x.numel()}
    fresh = []
    for o, want in zip(outs, expected, strict=True):
        ptr = o.untyped_storage().data_ptr()
        if (o.numel() and ptr in seen) or list(o.stride()) != list(want["stride"]):
            o = torch.empty_strided(want["shape"], want["stride"], dtype=o.dtype, device=o.device).copy_(o)
            ptr = o.untyped_storage().data_ptr()
        seen.add(ptr)
        fresh.append(o)
    return fresh


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> tuple[dict, str]:
    """The spec's document and its digest, once per spec: outside a CUDA graph the op runs every step, and
    parsing a spec of a few tens of kB each time would cost tens of µs of host time per site."""
    return json.loads(spec), hashlib.sha256(spec.encode()).hexdigest()


@custom_op("braze::parallel_branches", mutates_args=())
def parallel_branches(spec: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the main and the side branch of `spec` on `inputs`; returns main's outputs, then side's."""
    doc, key = _parse(spec)
    main_in = [inputs[i] for i in doc["main_inputs"]]
    side_in = [inputs[i] for i in doc["side_inputs"]]
    main_fn = _branch(doc, "main", main_in, key)
    side_fn = _branch(doc, "side", side_in, key)
    cuda = any(x.is_cuda for x in inputs)
    if not cuda:
        return _fresh(list(main_fn(*main_in)) + list(side_fn(*side_in)), inputs, doc["outputs"])
    device = next(x.device for x in inputs if x.is_cuda)
    current = torch.cuda.current_stream(device)
    side = side_stream(device)
    forked = torch.cuda.Event()
    forked.record(current)
    side.wait_event(forked)
    for x in side_in:
        if x.is_cuda:
            x.record_stream(side)
    with torch.cuda.stream(side):
        side_out = list(side_fn(*side_in))
    main_out = list(main_fn(*main_in))
    joined = torch.cuda.Event()
    joined.record(side)
    current.wait_event(joined)
    for o in side_out:
        if o.is_cuda:
            o.record_stream(current)
    return _fresh(main_out + side_out, inputs, doc["outputs"])


@parallel_branches.register_fake
def _(spec: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    doc = json.loads(spec)
    device = inputs[0].device if inputs else torch.device("cpu")
    return [torch.empty_strided(o["shape"], o["stride"], dtype=getattr(torch, o["dtype"]), device=device)
            for o in doc["outputs"]]

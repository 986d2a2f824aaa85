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
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import pickle
import threading
import time

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
_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream braze uses on `device` (created on first use; not one per site)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def encode_spec(main: torch.fx.GraphModule, side: torch.fx.GraphModule, main_inputs: list[int],
                side_inputs: list[int], outputs: list[dict]) -> str:
    """The op's `spec` argument: both subgraphs (pickled), which op inputs feed each, the outputs' metadata."""
    doc = {"main": base64.b64encode(pickle.dumps(main)).decode(), "side": base64.b64encode(pickle.dumps(side)).decode(),
           "main_inputs": main_inputs, "side_inputs": side_inputs, "outputs": outputs}
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

        gm = pickle.loads(base64.b64decode(spec_doc[which]))
        if not compile_it:
            fn = gm
        else:
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

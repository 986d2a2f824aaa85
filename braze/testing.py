"""Helpers for testing fusions without a full compile: a post-grad-like ATen graph, braze's passes on it.

`aten_graph(fn, *args)` traces `fn` with Inductor's decompositions on fake
tensors, which gives the same ATen ops, casts and views as Inductor's post-grad
graph. `run_passes(gm, config)` runs braze's PassManager on it in place and
returns the GraphRecord; the graph module can then be called on real tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from braze.config import FusionConfig
from braze.passes.base import Pass, current_inputs, current_record
from braze.passes.manager import PASSES, PassManager
from braze.report import GraphRecord


def aten_graph(fn: Callable[..., object], *args: torch.Tensor) -> GraphModule:
    """`fn` traced to a functional ATen graph with Inductor's decompositions (meta['val'] set)."""
    from torch._inductor.decomposition import select_decomp_table

    def wrapper(*xs):
        return fn(*xs)

    with torch.no_grad():
        # Decompose first (decompositions may emit in-place ops), then functionalize that graph
        # like AOTAutograd: in-place ops become functional and a mutated input gets its new value
        # back with one copy_ at the end, as in Inductor's post-grad graph.
        decomposed = make_fx(wrapper, decomposition_table=select_decomp_table(), tracing_mode="fake",
                             _allow_non_fake_inputs=True)(*args)
        gm = make_fx(torch.func.functionalize(decomposed, remove="mutations"), tracing_mode="fake",
                     _allow_non_fake_inputs=True)(*args)
    gm.graph.eliminate_dead_code()  # as Inductor's post-grad passes start with
    gm.recompile()
    return gm


def post_grad_graph(model: torch.nn.Module, inputs: Sequence[object]) -> tuple[GraphModule, tuple]:
    """The ATen graph Inductor's post-grad passes would see for `model(*inputs)` (Dynamo, then AOTAutograd
    with Inductor's decompositions; without Inductor's own pattern passes), and its real example inputs,
    parameters included, one per placeholder. Calling the graph module on those inputs runs it eagerly
    (in-place buffer updates come back as extra outputs, the buffers stay untouched)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    got: dict[str, object] = {}

    def keep(gm, example_inputs):
        got["gm"] = gm
        return gm

    def capture(gm, example_inputs):
        got["inputs"] = tuple(example_inputs)
        return aot_autograd(fw_compiler=keep, decompositions=select_decomp_table())(gm, example_inputs)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture, fullgraph=True)(*inputs)
    finally:
        torch._dynamo.reset()
    return got["gm"], got["inputs"]


def run_passes(
    gm: GraphModule,
    config: FusionConfig | None = None,
    passes: Sequence[type[Pass]] = PASSES,
    inputs: Sequence[object] | None = None,
) -> GraphRecord:
    """Run braze's passes on `gm` in place; returns what they recorded. `inputs`: the real tensors
    behind the graph's placeholders, as braze's backend gives them (passes that must know whether a
    placeholder is a parameter read them)."""
    record = GraphRecord(index=0)
    token = current_record.set(record)
    inputs_token = current_inputs.set(tuple(inputs) if inputs is not None else None)
    try:
        PassManager(config or FusionConfig(), passes)(gm.graph)
    finally:
        current_inputs.reset(inputs_token)
        current_record.reset(token)
    gm.recompile()
    return record


def fused_ops(gm: GraphModule) -> list[str]:
    """Names of braze ops (or their Triton launches) in a graph."""
    out = []
    for n in gm.graph.nodes:
        name = str(n.target)
        if "auto_functionalized" in name and n.args:  # a mutating op, functionalized
            name = str(n.args[0])
        if "braze" in name or "triton_kernel_wrapper" in name:
            out.append(name)
    return out


@contextlib.contextmanager
def single_rank_group() -> Iterator[object]:
    """A gloo process group of this process alone (world size 1): enough to trace and run graphs with
    collectives in one process (an all-reduce over one rank returns its input). Yields the world group."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def shared_workspace(folder: str, rank: int, world_size: int, nbytes: int = 1 << 16,
                     signal_pad_bytes: int = 4096):
    """A stand-in for a symmetric-memory workspace on CPU: every rank maps every rank's buffer (and signal
    pad, which the kernels no longer use) from files in `folder` (shared memory, e.g. under /dev/shm), as
    symmetric memory maps its peers' memory over NVLink, so braze's one-shot kernels run under the Triton
    interpreter across real processes. The files must exist (make_shared_workspace_files) before the ranks
    map them."""
    from types import SimpleNamespace

    from braze.runtime.symm_mem import Workspace

    bufs = [torch.from_file(f"{folder}/buffer{r}", shared=True, size=nbytes, dtype=torch.uint8)
            for r in range(world_size)]
    pads = [torch.from_file(f"{folder}/signal{r}", shared=True, size=signal_pad_bytes // 4, dtype=torch.int32)
            for r in range(world_size)]
    buf_table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    pad_table = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
    handle = SimpleNamespace(buffer_ptrs_dev=buf_table.data_ptr(), signal_pad_ptrs_dev=pad_table.data_ptr(),
                             keep=(bufs, pads, buf_table, pad_table), buffers=bufs, signal_pads=pads)
    return Workspace(f"shared:{folder}", bufs[rank], handle, rank, world_size, nbytes, signal_pad_bytes,
                     torch.zeros(2, dtype=torch.int32))


def make_shared_workspace_files(folder: str, world_size: int, nbytes: int = 1 << 16,
                                signal_pad_bytes: int = 4096) -> None:
    """The files shared_workspace maps: buffers of sentinel bytes (as symm_mem.prepare fills them), zero pads."""
    from braze.runtime.symm_mem import SENTINEL_BYTE

    for r in range(world_size):
        with open(f"{folder}/buffer{r}", "wb") as f:
            f.write(bytes([SENTINEL_BYTE]) * nbytes)
        with open(f"{folder}/signal{r}", "wb") as f:
            f.truncate(signal_pad_bytes)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable[..., None], *args: object) -> None:
    """Run fn(rank, world_size, *args) in `world_size` CPU processes joined by a gloo group.

    fn must be a module-level function (it is pickled to the workers); a failure
    on any rank fails the caller.
    """
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)


@triton.jit
def double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = 2·x: a Triton kernel at module level, which any process can find by name (the dual-stream tests
    outline calls of it, as braze's traced ops leave them in a graph)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)

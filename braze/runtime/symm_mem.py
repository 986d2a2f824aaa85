"""Symmetric-memory workspaces for braze's one-shot collective kernels: one per process group, made once.

A workspace is a byte buffer allocated with `torch.distributed._symmetric_memory.empty`
and rendezvoused over the group, so each rank can write into every peer's copy over
NVLink, filled with 0xFF bytes (the kernels' sentinel) before the rendezvous, plus a
local launch counter (the kernels' only state; see braze.codegen.collective). Allocation is a collective over
the group: call `prepare(group, nbytes)` on every rank at set-up (after
`init_process_group`, before compiling or capturing CUDA graphs). The fused ops
never allocate inside compilation or a graph capture; without a prepared
workspace they may make one on their first eager call (`BRAZE_SYMM_LAZY=1`, the
default: every rank reaches the same call), and otherwise use NCCL.

Every launch checks the bytes it needs (one slot per rank in half the buffer)
against the real buffer, and falls back to NCCL rather than overrun it.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A workspace byte outside a launch: every element of every dtype with all bits set (the one-shot
# kernels' "not arrived" sentinel, see braze.codegen.collective).
SENTINEL_BYTE = 0xFF
# Bytes of a lazily made workspace: two halves of 8 ranks x 128 tokens x 8192 bf16 values (or 4 x 256, 2 x 512).
LAZY_BYTES = int(os.environ.get("BRAZE_SYMM_WORKSPACE_BYTES", str(2 * 8 * 128 * 8192 * 2)))


@dataclass(frozen=True)
class Workspace:
    group_name: str
    buffer: torch.Tensor  # uint8 [nbytes], this rank's copy (kept alive: peers map it)
    handle: object  # .buffer_ptrs_dev, .signal_pad_ptrs_dev: device arrays of every rank's addresses
    rank: int
    world_size: int
    nbytes: int
    signal_pad_bytes: int
    counters: torch.Tensor | None = None  # int32 [2] on this rank's device: launches so far, programs done

    @property
    def half_bytes(self) -> int:
        """Bytes of each of the buffer's two halves (alternate launches use alternate halves), 16-aligned."""
        return (self.nbytes // 2) & ~15

    def fits(self, nbytes: int) -> bool:
        """Whether a launch that sends `nbytes` from every rank fits: one slot per rank in a half."""
        return nbytes * self.world_size <= self.half_bytes


_workspaces: dict[str, Workspace] = {}


def available() -> str | None:
    """None if one-shot kernels can run here, else why not."""
    if os.environ.get("BRAZE_SYMM_MEM", "1") == "0":
        return "BRAZE_SYMM_MEM=0"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not (dist.is_available() and dist.is_initialized()):
        return "torch.distributed is not initialized"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")  # an import here would shadow `torch`
    except ImportError as e:
        return f"torch.distributed._symmetric_memory is unavailable: {e}"
    return None


def prepare(group: dist.ProcessGroup | str, nbytes: int = LAZY_BYTES) -> Workspace:
    """The group's workspace, allocated and rendezvoused now if it has none (a collective over the group)."""
    import torch.distributed._symmetric_memory as symm_mem

    name = group if isinstance(group, str) else group.group_name
    if name in _workspaces:
        return _workspaces[name]
    why = available()
    if why:
        raise RuntimeError(f"braze: cannot make a symmetric-memory workspace for group {name!r}: {why}")
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"braze: the symmetric-memory workspace of group {name!r} must be made before CUDA "
                           "graph capture; call braze.runtime.symm_mem.prepare(group) at set-up")
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed on older torch, deprecated (a no-op) on newer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(name)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    buffer.fill_(SENTINEL_BYTE)  # every element the sentinel: the state every launch starts from
    torch.cuda.synchronize(device)  # filled before any peer can push into it (after the rendezvous below)
    symm = symm_mem.rendezvous(buffer, name)
    pad = getattr(symm, "signal_pad_size", None)
    if pad is None and hasattr(symm_mem, "get_signal_pad_size"):
        pad = symm_mem.get_signal_pad_size()
    pad = int(pad or 0)
    ws = Workspace(name, buffer, _pointer_tables(symm, buffer, nbytes, pad), symm.rank, symm.world_size, nbytes,
                   pad, torch.zeros(2, dtype=torch.int32, device=device))
    _workspaces[name] = ws
    return ws


@dataclass(frozen=True)
class PointerTables:
    """Device arrays of every rank's buffer and signal-pad addresses, as the kernels read them."""

    buffer_ptrs_dev: int
    signal_pad_ptrs_dev: int
    tables: tuple[torch.Tensor, ...]  # kept alive
    symm: object  # the _SymmetricMemory handle


def _pointer_tables(symm, buffer: torch.Tensor, nbytes: int, pad_bytes: int) -> PointerTables:
    """The peers' addresses of *this* tensor (the handle's own tables point at allocations, which a pooled
    tensor may sit inside at an offset): each rank's view through get_buffer / get_signal_pad."""
    world = symm.world_size
    try:
        bufs = [symm.get_buffer(r, (nbytes,), torch.uint8).data_ptr() for r in range(world)]
        pads = [symm.get_signal_pad(r, (pad_bytes // 4,), torch.int32).data_ptr() for r in range(world)]
    except (AttributeError, TypeError, RuntimeError):  # older handles: the allocation tables themselves
        return PointerTables(symm.buffer_ptrs_dev, symm.signal_pad_ptrs_dev, (), symm)
    offset = buffer.data_ptr() - bufs[symm.rank]  # 0 unless the views start at the allocation, not the tensor
    if offset < 0:
        raise RuntimeError(f"braze: the symmetric-memory handle's view of this rank's buffer ({bufs[symm.rank]:#x}) "
                           f"lies after the buffer ({buffer.data_ptr():#x}); refusing to address peers through it")
    bufs = [b + offset for b in bufs]  # allocations are symmetric: every peer's tensor sits at the same offset
    tables = (torch.tensor(bufs, dtype=torch.int64, device=buffer.device),
              torch.tensor(pads, dtype=torch.int64, device=buffer.device))
    return PointerTables(tables[0].data_ptr(), tables[1].data_ptr(), tables, symm)


def lookup(group_name: str) -> Workspace | None:
    """The group's workspace: the prepared one, or one made now on an eager call if lazy making is on."""
    ws = _workspaces.get(group_name)
    if ws is not None or available() is not None:
        return ws
    if os.environ.get("BRAZE_SYMM_LAZY", "1") != "1" or torch.cuda.is_current_stream_capturing():
        return None
    if torch.compiler.is_compiling():
        return None
    return prepare(group_name, LAZY_BYTES)


def release_all() -> None:
    """Forget every workspace (before destroy_process_group)."""
    _workspaces.clear()

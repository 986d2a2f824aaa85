"""Symmetric-memory workspaces on a machine without them: clear refusals, no allocation, and the peer
address tables built from the handle's views (a pooled tensor at an offset inside its allocation)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from braze.runtime import symm_mem


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_without_cuda_there_is_no_workspace_and_a_clear_reason():
    assert symm_mem.available() == "no CUDA device"
    assert symm_mem.lookup("0") is None
    with pytest.raises(RuntimeError, match="cannot make a symmetric-memory workspace for group '0': no CUDA device"):
        symm_mem.prepare("0", 1024)


def test_peer_tables_follow_the_tensor_not_the_allocation():
    allocations = [torch.zeros(4096, dtype=torch.uint8) for _ in range(2)]  # each rank's allocation (here: host)
    pads = [torch.zeros(64, dtype=torch.int32) for _ in range(2)]

    def get_buffer(rank, sizes, dtype):  # the handle's view: the allocation's start
        return allocations[rank][: sizes[0]].view(dtype)

    def get_signal_pad(rank, sizes, dtype):
        return pads[rank][: sizes[0]].view(dtype)

    symm = SimpleNamespace(world_size=2, rank=1, get_buffer=get_buffer, get_signal_pad=get_signal_pad)
    mine = allocations[1][512:1536]  # a pooled tensor 512 bytes into rank 1's allocation
    tables = symm_mem._pointer_tables(symm, mine, 1024, 256)
    bufs, signals = (t.tolist() for t in tables.tables)
    assert bufs == [allocations[0].data_ptr() + 512, mine.data_ptr()]
    assert signals == [p.data_ptr() for p in pads]
    assert tables.buffer_ptrs_dev == tables.tables[0].data_ptr()

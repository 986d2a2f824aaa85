"""Helpers shared by the model tests: running a function on P gloo ranks (CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_tp(world_size: int, fn, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` processes joined by a gloo group; fn must be a
    module-level function. A failure in any rank fails the caller."""
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)


@pytest.fixture
def tp_runner():
    return run_tp

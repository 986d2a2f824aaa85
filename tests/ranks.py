"""Gloo ranks (CPU processes) kept for the whole test session, one set per world size.

Spawning two ranks costs ~10-15 s on a 2-core machine, nearly all of it each process importing
torch, Dynamo and braze; the TP tests spawned them once each. `Ranks.run(fn, *args)` runs
fn(rank, world_size, *args) on every rank of one long-lived group instead, as
`braze.testing.run_on_ranks` does in fresh processes: fn must be a module-level function (it is
pickled to the ranks), and a failure on any rank fails the caller with that rank's traceback. A
failed run leaves the group in an unknown state (a rank may wait in a collective forever), so the
ranks are killed and the next run starts new ones.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable

_POLL_S = 1.0  # how often a waiting side checks that the other side is still alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks, results) -> None:
    """One rank: join the group, then run each task it is sent until it is sent None."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # as braze.testing.run_on_ranks' ranks
    import torch
    import torch.distributed as dist

    parent = mp.parent_process()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        while True:
            try:
                task = tasks.get(timeout=_POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if task is None:
                return
            try:
                fn, args = pickle.loads(task)  # here, so that a test module failing to import is reported
                fn(rank, world_size, *args)
                results.put((rank, None))
            except BaseException:  # noqa: BLE001  reported to the caller, which fails the test
                results.put((rank, traceback.format_exc()))
            finally:
                torch._dynamo.reset()  # what a fresh process would start with: no compiled frames
    finally:
        dist.destroy_process_group()


class Ranks:
    """`world_size` processes joined by a gloo group, running one function at a time on every rank."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.stopped = False
        port = _free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.tasks[r], self.results),
                                  name=f"braze-test-rank-{r}") for r in range(world_size)]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable[..., None], *args: object) -> None:
        task = pickle.dumps((fn, args))
        for q in self.tasks:
            q.put(task)
        errors: dict[int, str] = {}
        done = 0
        while done < self.world_size and not errors:
            try:
                rank, error = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    codes = {r: self.procs[r].exitcode for r in dead}
                    self.close(kill=True)
                    raise RuntimeError(f"rank(s) {dead} of {self.world_size} died running {fn.__qualname__} "
                                       f"(exit codes {codes})") from None
                continue
            done += 1
            if error is not None:
                errors[rank] = error
        if errors:
            self.close(kill=True)  # the other ranks may be stuck in a collective with the failed one
            text = "\n".join(f"-- rank {r} of {self.world_size}:\n{e}" for r, e in sorted(errors.items()))
            raise AssertionError(f"{fn.__qualname__} failed on rank(s) {sorted(errors)}:\n{text}")

    def stop(self) -> None:
        """Ask every rank to leave the group and exit (close() waits for them)."""
        if not self.stopped:
            self.stopped = True
            for q in self.tasks:
                q.put(None)

    def close(self, kill: bool = False) -> None:
        if not kill:
            self.stop()
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


class RankPools:
    """The session's `Ranks`, one per world size, started on first use."""

    def __init__(self):
        self.pools: dict[int, Ranks] = {}

    def __call__(self, world_size: int, fn: Callable[..., None], *args: object) -> None:
        pool = self.pools.get(world_size)
        if pool is None or not pool.alive():
            pool = self.pools[world_size] = Ranks(world_size)
        pool.run(fn, *args)

    def close(self) -> None:
        for pool in self.pools.values():  # all at once: each rank's exit takes a few seconds
            pool.stop()
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

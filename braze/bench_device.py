"""Measurement on the device for `python -m braze bench`: the card's two ceilings, CUDA-graph timing,
kernel counts from the profiler, and a CPU stand-in that is labelled as such.

Every timer takes `step`, a zero-argument callable that runs one decode step.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CPU_TIMING = "CPU wall clock (time.perf_counter, median of calls after one warm-up): NOT comparable with GPU numbers"


@dataclass(frozen=True)
class Timing:
    """Seconds per decode step: median and the 10th/90th percentiles over n samples."""

    median_s: float
    p10_s: float
    p90_s: float
    n: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KernelCount:
    """Device activity of one decode step as the profiler saw it (launched outside a CUDA graph)."""

    kernels: int
    memcpy: int
    memset: int
    names: dict[str, int]  # kernel name -> launches in the step (memcpy/memset excluded)
    time_us: dict[str, float] = field(default_factory=dict)  # kernel name -> device µs summed over its launches
    copy_us: float = 0.0  # memcpy + memset device µs

    def to_dict(self) -> dict:
        return {**asdict(self), "by_kind": kernel_time_by_kind(self.names, self.time_us, self.copy_us)}


# What each kernel is, from its name (first match wins). braze names every kernel it generates `braze_*`;
# Inductor's are `triton_*` (`triton_tem_*`: its GEMM templates); torch._grouped_mm runs CUTLASS's grouped
# (GroupProblemShape) kernels; cuBLAS's are nvjet / xmma / gemv / gemm kernels plus its split-K reduce.
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("braze", ("braze_",)),
    ("grouped GEMM", ("groupproblemshape", "grouped")),
    ("attention", ("flash", "fmha", "attention")),  # before GEMM: PyTorch's flash/efficient kernels are cutlass::
    ("GEMM", ("triton_tem", "nvjet", "xmma", "gemm", "gemv", "cutlass", "splitkreduce", "cublas")),
    ("collective", ("nccl", "allreduce", "all_reduce")),
    ("Inductor Triton", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel by its name: one of KERNEL_KINDS' labels, else "other"."""
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if low.startswith(marks[0]) if kind in ("braze", "Inductor Triton") else any(m in low for m in marks):
            return kind
    return "other"


def kernel_time_by_kind(names: dict[str, int], time_us: dict[str, float], copy_us: float = 0.0) -> dict:
    """{kind: {"us": device µs, "kernels": launches}} over one step, plus "memcpy/memset"."""
    out: dict[str, dict] = {}
    for name, n in names.items():
        slot = out.setdefault(kernel_kind(name), {"us": 0.0, "kernels": 0})
        slot["us"] += time_us.get(name, 0.0)
        slot["kernels"] += n
    if copy_us:
        out["memcpy/memset"] = {"us": copy_us, "kernels": None}
    return out


def _quantiles(samples: list[float], method: str) -> Timing:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(s), pick(0.1), pick(0.9), len(s), method)


# ----------------------------------------------------------------------------
# the card's ceilings
# ----------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median of `repeats`)."""
    a = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t0)
        return 2 * nbytes / statistics.median(times)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Flop/s of an n×n×n matrix product in `dtype` (median of `repeats`); CUDA only."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


# ----------------------------------------------------------------------------
# timing a step
# ----------------------------------------------------------------------------


def capture_cuda_graph(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """One call of `step` captured in a CUDA graph, after two calls outside it on a side stream (lazy
    initialization: cuBLAS workspaces, kernel loading, braze's first-call branch compiles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (the NCCL watchdog under TP) may query the device during the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph


# Warm-up replays last at least this long: a graph timed right after a compile (seconds with the GPU idle) read
# ~10 µs slow at MoE-block scale on the H200 with a fixed 10 warm-up replays (2 ms of them); a GPU that was
# idle may run at lower clocks for a while (the likely cause, not measured).
MIN_WARMUP_S = 0.25


def warm_up(graph: torch.cuda.CUDAGraph, replays: int, min_s: float = MIN_WARMUP_S,
            agree: Callable[[int], int] | None = None) -> int:
    """Replay `graph` `replays` times, then 10 more to time one, then as many as make at least `min_s` seconds
    in all; returns the replays run. Under TP `agree` maps this rank's extra count to the one all ranks use (the
    largest): a graph with collectives must be replayed as often on every rank."""
    def replay(n: int) -> None:
        for i in range(n):
            graph.replay()
            if i % 10 == 9:  # keep the host within 10 replays of the device
                torch.cuda.synchronize()
        torch.cuda.synchronize()

    replay(replays)
    t0 = time.perf_counter()
    replay(10)
    per = (time.perf_counter() - t0) / 10
    extra = math.ceil(max(0.0, min_s - (replays + 10) * per) / per) if per > 0 else 0
    extra = agree(extra) if agree is not None else extra
    replay(extra)
    return replays + 10 + extra


def time_cuda_graph(step: Callable[[], object], warmup: int, replays: int,
                    agree: Callable[[int], int] | None = None) -> Timing:
    """Capture one step in a CUDA graph and time `replays` replays with device events, back to back after
    `warmup` replays and at least `MIN_WARMUP_S` of them. The step's weights (hundreds of MB and up) exceed L2,
    so replays read HBM as a real decode step does; caches written in place are rewritten at the same slots
    each replay."""
    graph = capture_cuda_graph(step)
    warmup = warm_up(graph, warmup, agree=agree)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    del graph
    method = (f"CUDA graph of one decode step, median of {replays} back-to-back replays after {warmup} "
              f"warm-up replays (at least {MIN_WARMUP_S} s of them), device events")
    return _quantiles(samples, method)


def l2_flusher(device: torch.device) -> Callable[[], None]:
    """A callable that reads a buffer of 4x the device's L2 size (one reduction kernel): after it, L2 holds
    only clean lines of that buffer, so what runs next reads its data from HBM and pays no write-backs."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    buf = torch.ones(l2, dtype=torch.float32, device=device)  # 4 bytes per element: 4x L2
    sink = torch.empty((), dtype=torch.float32, device=device)
    return lambda: torch.sum(buf, dim=0, out=sink)


def time_cuda_graph_cold(step: Callable[[], object], warmup: int, replays: int) -> Timing:
    """Like `time_cuda_graph`, for a step whose weights fit in L2 or nearly (one layer's prologue): every replay
    first flushes L2 (`l2_flusher`), so the step's weights come from HBM as they do in a whole decode step. Two
    graphs are captured, [flush, step] and [flush]; each sample is the difference of one replay of each."""
    device = torch.device("cuda", torch.cuda.current_device())
    flush = l2_flusher(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            flush()
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    both, alone = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both, capture_error_mode="thread_local"):
        flush()
        step()
    with torch.cuda.graph(alone, capture_error_mode="thread_local"):
        flush()
    for _ in range(warmup):
        both.replay()
        alone.replay()
    torch.cuda.synchronize()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(replays)]
    for a, b, c, d in events:
        a.record()
        both.replay()
        b.record()
        c.record()
        alone.replay()
        d.record()
    torch.cuda.synchronize()
    samples = [(a.elapsed_time(b) - c.elapsed_time(d)) / 1e3 for a, b, c, d in events]
    del both, alone
    method = (f"CUDA graphs of [L2 flush (read of {4 * l2 >> 20} MB), step] and [L2 flush], median over {replays} "
              f"pairs of replays of their difference, after {warmup} warm-up pairs, device events")
    return _quantiles(samples, method)


def time_cpu(step: Callable[[], object], repeats: int) -> Timing:
    """Wall-clock seconds per step on the CPU (after one warm-up call): a smoke-test number only."""
    step()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return _quantiles(samples, CPU_TIMING)


def count_cuda_kernels(step: Callable[[], object]) -> KernelCount:
    """Kernels, memcpys and memsets of one step and their device time, from the profiler's CUDA activity.
    The step is launched eagerly (not replayed from a graph): each kernel's duration is what it takes in the
    graph too, but their sum leaves out the gaps between dependent kernels that the graph's time includes."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: Counter = Counter()
    time_us: Counter = Counter()
    memcpy = memset = 0
    copy_us = 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        low, us = e.name.lower(), e.time_range.elapsed_us()
        if low.startswith("memcpy"):
            memcpy += 1
            copy_us += us
        elif low.startswith("memset"):
            memset += 1
            copy_us += us
        else:
            kernels[e.name] += 1
            time_us[e.name] += us
    return KernelCount(sum(kernels.values()), memcpy, memset, dict(kernels.most_common()),
                       {k: round(v, 3) for k, v in time_us.most_common()}, round(copy_us, 3))


@dataclass(frozen=True)
class Timeline:
    """Where the device's time goes inside one CUDA-graph replay of a step, from the profiler's kernel records
    (start, end, stream). `span_us` runs from the first kernel's start to the last one's end; `busy_us` is the
    time at least one kernel runs, `idle_us` the rest of the span (launch gaps between dependent kernels and
    waits); `overlap_us` is the time two or more kernels run at once (kernels on the second stream beside the
    first), `kernel_us` the kernels' summed durations (= busy + the overlap counted once per extra kernel)."""

    span_us: float
    busy_us: float
    idle_us: float
    overlap_us: float
    kernel_us: float
    kernels: int
    streams: dict[str, int]  # stream id -> kernels on it, most kernels first
    side_kernel_us: float  # summed durations of the kernels that are not on the stream with the most kernels
    side_hidden_us: float  # of those, the time the main stream was busy too
    longest_gaps: list[tuple[float, str, str]]  # (idle µs, kernel before, kernel after), largest first, at most 8
    # every kernel as (start µs from the first one's start, µs, stream, name), when asked for (small graphs)
    records: list[tuple[float, float, str, str]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def timeline_of(records: list[tuple[int, int, int, str]], keep_records: bool = False) -> Timeline:
    """The `Timeline` of kernel records (start ns, end ns, stream, name); with `keep_records`, the records too."""
    if not records:
        raise ValueError("no kernel records: the profiler saw nothing of the replay")
    records = sorted(records)
    streams = Counter(str(r[2]) for r in records)
    main = streams.most_common(1)[0][0]

    def union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for a, b in sorted(spans):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]

    def covered(spans: list[tuple[int, int]], a: int, b: int) -> int:
        return sum(max(0, min(b, y) - max(a, x)) for x, y in spans)

    busy = union([(a, b) for a, b, _, _ in records])
    busy_ns = sum(b - a for a, b in busy)
    kernel_ns = sum(b - a for a, b, _, _ in records)
    # time covered by two or more kernels: sweep over start (+1) / end (-1) events
    events = sorted([(a, 1) for a, _, _, _ in records] + [(b, -1) for _, b, _, _ in records])
    overlap_ns, depth, last = 0, 0, events[0][0]
    for t, step in events:
        if depth >= 2:
            overlap_ns += t - last
        depth, last = depth + step, t
    main_busy = union([(a, b) for a, b, s, _ in records if str(s) == main])
    side = [(a, b) for a, b, s, _ in records if str(s) != main]
    side_ns = sum(b - a for a, b in side)
    hidden_ns = sum(covered(main_busy, a, b) for a, b in side)
    # gaps between consecutive busy intervals, named by the kernel that ended last and the one that starts next
    gaps = []
    for (_, end), (start, _) in itertools.pairwise(busy):
        before = max((r for r in records if r[1] <= end), key=lambda r: r[1])
        after = min((r for r in records if r[0] >= start), key=lambda r: r[0])
        gaps.append((round((start - end) / 1e3, 3), before[3], after[3]))
    gaps.sort(key=lambda g: -g[0])
    span_ns = max(b for _, b, _, _ in records) - records[0][0]
    return Timeline(round(span_ns / 1e3, 3), round(busy_ns / 1e3, 3), round((span_ns - busy_ns) / 1e3, 3),
                    round(overlap_ns / 1e3, 3), round(kernel_ns / 1e3, 3), len(records), dict(streams.most_common()),
                    round(side_ns / 1e3, 3), round(hidden_ns / 1e3, 3), gaps[:8],
                    [(round((a - records[0][0]) / 1e3, 3), round((b - a) / 1e3, 3), str(st), name)
                     for a, b, st, name in records] if keep_records else None)


def _is_sync_record(name: str) -> bool:
    """The profiler's CUDA synchronization records (CUPTI's sync activity, by kineto's names for its kinds): not
    device work. Kernels, memcpys and memsets are."""
    return name in ("Event Sync", "Stream Wait Event", "Stream Sync", "Context Sync", "Unknown")


def graph_timeline(step: Callable[[], object], replays: int = 5) -> Timeline:
    """The `Timeline` of `step` captured in a CUDA graph (`replay_timeline`)."""
    return replay_timeline(capture_cuda_graph(step), replays)


def replay_timeline(graph: torch.cuda.CUDAGraph, replays: int = 5, keep_records: bool = False) -> Timeline:
    """The `Timeline` of a captured graph's replay: `replays` replays are profiled one at a time (each in its own
    profiler session, after warm-up replays outside it) and the one with the median span is kept. The profiler
    records kernels without tracing CPU launches, so the span stays close to the graph's timed step; the bench
    reports both."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    lines = []
    for _ in range(replays):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        records = [(e.start_ns(), e.end_ns(), e.device_resource_id(), e.name())
                   for e in prof.profiler.kineto_results.events()
                   if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0
                   and not _is_sync_record(e.name())]
        if records:
            lines.append(timeline_of(records, keep_records))
    if not lines:
        raise RuntimeError("the profiler saw no kernel of the CUDA-graph replay")
    return sorted(lines, key=lambda t: t.span_us)[len(lines) // 2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------
# the machine
# ----------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Card, library versions, and the code's commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - CPU machines without triton
        triton_version = None
    env = {
        "device": device.type,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "git_commit": _git_commit(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm=f"{props.major}.{props.minor}", gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                   l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), driver=_driver_version())
    return env


def _git_commit() -> str | None:
    """BRAZE_COMMIT if set (a copied working tree can carry stale git metadata: say which code ran), else git's."""
    if os.environ.get("BRAZE_COMMIT"):
        return os.environ["BRAZE_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None

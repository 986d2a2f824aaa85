"""What the branch cost model's constants are on this card: the time one more dependent kernel adds to a
CUDA-graph replay, what a fork/join across two streams costs inside a graph, and what overlapping a
launch-bound chain beside a bandwidth-bound GEMM saves.

    python benchmarks/stream_overhead.py [--out FILE.json]

All timings are CUDA-graph replays (median of 50, device events), as braze's decode steps run:
- `gap`: a graph of N dependent one-element kernels; µs per kernel is the launch gap plus the smallest
  kernel's run time, what merging two launches into one wins back (`DeviceModel.launch_gap`).
- `fork_join`: R rounds of [fork, one tiny kernel on each stream, join] against R rounds of the same two
  kernels on one stream; the difference per round is what the two events cost minus the overlap of two
  tiny kernels (`DeviceModel.fork_join`).
- `overlap`: a bandwidth-bound GEMV (a shared expert's [1, H] x [H, 3I] weights) beside a chain of k tiny
  kernels (a router's), on one stream and on two; the saving against the model's prediction.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def _replay_us(fn, replays: int = 50, warmup: int = 5) -> float:
    """Median µs of one replay of `fn`'s graph, each replay alone (synchronized), unlike braze.bench_device's
    back-to-back timing, so no replay hides under the previous one. Each replay includes the graph launch's fixed
    cost (~14 µs on the H200); what the cost model takes (per kernel, fork/join, saved) are differences of two
    medians, in which it cancels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def _two_streams(main, side_fn, side: torch.cuda.Stream) -> None:
    """`main` on the current stream, `side_fn` on `side`, forked and joined with events (as braze's op)."""
    cur = torch.cuda.current_stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        side_fn()
    main()
    cur.wait_stream(side)


def gap(n: int = 200) -> dict:
    x = torch.zeros(1, device="cuda")

    def chain(k):
        def run():
            for _ in range(k):
                x.add_(1.0)
        return run

    t_n, t_1 = _replay_us(chain(n)), _replay_us(chain(1))
    return {"kernels": n, "graph_us": t_n, "one_kernel_graph_us": t_1, "us_per_kernel": (t_n - t_1) / (n - 1)}


def fork_join(rounds: int = 100, per_kernel_us: float | None = None) -> dict:
    """R rounds of two independent tiny kernels then one reading both: on one stream (3 dependent launches
    a round) and with the first two on two streams (fork, join). With g the cost of one launch, the
    two-stream round costs 2·g + fork/join, so fork/join = two-stream − serial + g."""
    a, b = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()

    def serial():
        for _ in range(rounds):
            a.add_(1.0)
            b.add_(1.0)
            a.add_(b)

    def parallel():
        for _ in range(rounds):
            _two_streams(lambda: a.add_(1.0), lambda: b.add_(1.0), side)
            a.add_(b)

    t_serial, t_parallel = _replay_us(serial) / rounds, _replay_us(parallel) / rounds
    row = {"rounds": rounds, "serial_us_per_round": t_serial, "two_stream_us_per_round": t_parallel}
    if per_kernel_us is not None:
        row["fork_join_us"] = t_parallel - t_serial + per_kernel_us
    return row


def overlap(hidden: int = 7168, inter: int = 2048, chain: int = 6) -> dict:
    """A shared expert's GEMVs (gate_up [H, 2I], down [I, H]) beside a router-like chain of tiny kernels."""
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    w_gu = torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16)
    w_d = torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(16, hidden, device="cuda")
    r = torch.zeros(1, 16, device="cuda")
    side = torch.cuda.Stream()

    def expert():
        h = x @ w_gu.t()
        torch.mm(h[:, :inter] * h[:, inter:], w_d.t())

    def router():
        s = x.float() @ g.t()
        for _ in range(chain - 1):
            s = s.sigmoid()
        r.copy_(s)

    t_expert, t_router = _replay_us(expert), _replay_us(router)

    def both_serial():
        expert()
        router()

    t_serial = _replay_us(both_serial)
    t_two = _replay_us(lambda: _two_streams(expert, router, side))
    weight_bytes = (w_gu.numel() + w_d.numel()) * 2
    return {"expert_us": t_expert, "router_us": t_router, "serial_us": t_serial, "two_stream_us": t_two,
            "saved_us": t_serial - t_two, "expert_weight_MB": weight_bytes / 1e6, "router_kernels": chain + 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("stream_overhead.py measures CUDA graphs: it needs a GPU")
    props = torch.cuda.get_device_properties(0)
    g = gap()
    rows = {"card": props.name, "torch": torch.__version__, "gap": g,
            "fork_join": fork_join(per_kernel_us=g["us_per_kernel"]), "overlap": overlap()}
    print(json.dumps(rows, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark: top-k over the short rows of decode steps, ATen (what stock Inductor calls) vs braze's kernels, H100.

    python benchmarks/topk.py [--tokens 1,8,64] [--sweep] [--out DIR]

Stock Inductor keeps `aten.topk` as an ATen fallback (torch 2.11-2.13 lower it to Triton only with
TORCHINDUCTOR_DECOMPOSE_SORT_OPS=1), so ATen's kernels are what a stock step runs; braze's pass
(small-topk) replaces each by `braze::topk`, which runs one of two kernels (braze.codegen.topk.topk_plan): a
sort in one program per row, or each value ranked against its row over many programs. Both are timed, and
braze's choice. `--sweep` also times the rank kernel over a grid of blocks and warps at rows of 256 and more
and T in SWEEP_TOKENS (the best is reported; it is how the plan's blocks were picked). The shapes are the three
models' selections at their real and bench sizes. Per row: µs per call (median of 100 CUDA-graph replays of a
graph that makes 20 calls on 20 different inputs, divided by 20: a lone small kernel's time is below a graph
launch's), kernels per call (profiler), and whether braze's result is the reference's (a stable sort cut at k) and selects the same
values as torch.topk. There is no useful bandwidth floor here: the rows are 32 B to 16 KB, read from L2;
a call is launch- and latency-bound, so the floor is an empty kernel's time, measured and printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton

import braze
import braze.runtime.topk as rt  # also registers braze::topk
from braze.bench_device import count_cuda_kernels, time_cuda_graph
from braze.codegen.topk import TopKPlan, topk_plan
from braze.patterns.topk import DTYPES, TopK, topk_reference

# name -> (rows per token, n, k, largest); "real" sizes from the models' configs, "bench" from braze's bench configs
SHAPES = {
    "deepseek indexer, context 576 (bench)": (1, 576, 576, True),
    "deepseek indexer, context 2048": (1, 2048, 2048, True),
    "deepseek indexer, top-2048 of 4096": (1, 4096, 2048, True),
    "deepseek router groups, top-2 of 32 (real)": (8, 32, 2, True),
    "deepseek router, top-4 of 8 groups": (1, 8, 4, True),
    "deepseek router, top-8 of 256 (real)": (1, 256, 8, True),
    "deepseek router groups, top-2 of 2 (bench)": (8, 2, 2, True),
    "deepseek router, top-8 of 16 (bench)": (1, 16, 8, True),
    "qwen3.5 router, top-10 of 512 (real)": (1, 512, 10, True),
    "qwen3.5 router, top-10 of 16 (bench)": (1, 16, 10, True),
    "minimax router, top-8 of 256 (real)": (1, 256, 8, True),
}
CALLS = 20


@triton.jit
def _empty(x_ptr):
    pass


SWEEP = [TopKPlan("rank", w, bi, bj) for bi in (16, 32, 64) for bj in (128, 256) for w in (2, 4)]
SWEEP_TOKENS = (1, 64)


def _time(fn, xs) -> float:
    return time_cuda_graph(lambda: [fn(x) for x in xs], warmup=10, replays=100).median_s * 1e6 / CALLS


def run(name: str, T: int, rows_per_token: int, n: int, k: int, largest: bool, sweep: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(T, rows_per_token, n, device="cuda", generator=g).squeeze(1) for _ in range(CALLS)]
    spec = TopK(n=n, k=k, largest=largest, dtype=DTYPES[torch.float32]).to_json()
    rows = xs[0].numel() // n

    def aten(x):
        return torch.topk(x, k, dim=-1, largest=largest)

    def fused(x):
        return torch.ops.braze.topk(x, spec)

    def forced(plan: TopKPlan):
        return lambda x: rt._run(x, spec, plan=plan)

    sort, rank = forced(topk_plan(n, rows, "sort")), forced(topk_plan(n, rows, "rank"))
    row: dict = {"shape": name, "tokens": T, "rows": rows, "n": n, "k": k, "plan": topk_plan(n, rows).kernel}
    for label, fn in (("aten", aten), ("braze", fused), ("sort", sort), ("rank", rank)):
        kc = count_cuda_kernels(lambda fn=fn: fn(xs[0]))
        row[label] = {"us": _time(fn, xs), "kernels": kc.kernels, "names": sorted(kc.names)}
    rv, ri = topk_reference(xs[0], k, largest)
    av, _ = aten(xs[0])
    row["equals_reference"] = {}
    for label, fn in (("braze", fused), ("sort", sort), ("rank", rank)):
        bv, bi = fn(xs[0])
        row["equals_reference"][label] = bool(torch.equal(bi, ri) and torch.equal(bv, rv))
    bv, _ = fused(xs[0])
    row["same_values_as_aten"] = bool(torch.equal(bv.sort(-1).values, av.sort(-1).values))
    row["speedup"] = row["aten"]["us"] / row["braze"]["us"]
    if sweep and n >= 256 and T in SWEEP_TOKENS:
        timed = []
        for p in SWEEP:
            if p.block_i > triton.next_power_of_2(n):
                continue
            fn = forced(p)
            v, i = fn(xs[0])
            assert torch.equal(i, ri) and torch.equal(v, rv), p
            timed.append((_time(fn, xs), p))
        best_us, best = min(timed, key=lambda t: t[0])
        row["rank_sweep"] = [{"us": us, "block_i": p.block_i, "block_j": p.block_j, "warps": p.warps}
                             for us, p in timed]
        row["rank_best"] = {"us": best_us, "block_i": best.block_i, "block_j": best.block_j, "warps": best.warps}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,8,64")
    p.add_argument("--sweep", action="store_true", help="also time the rank kernel over a grid of blocks")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    x = torch.zeros(1, device="cuda")
    empty = time_cuda_graph(lambda: [_empty[(1,)](x) for _ in range(CALLS)], warmup=10, replays=100).median_s * 1e6 / CALLS
    rows = []
    for name, (r, n, k, largest) in SHAPES.items():
        for T in tokens:
            row = run(name, T, r, n, k, largest, a.sweep)
            rows.append(row)
            best = row.get("rank_best")
            print(f"{name:45s} T={T:3d} rows={row['rows']:4d}  aten {row['aten']['us']:7.2f} us "
                  f"({row['aten']['kernels']} kernels)  braze {row['braze']['us']:6.2f} us ({row['plan']})  "
                  f"sort {row['sort']['us']:6.2f}  rank {row['rank']['us']:6.2f}  x{row['speedup']:.2f}  "
                  f"ref={row['equals_reference']} values={row['same_values_as_aten']}"
                  + (f"  best rank {best['us']:.2f} {best}" if best else ""), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "braze": braze.__version__ if hasattr(braze, "__version__") else "",
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "empty_kernel_us": empty,
            "method": f"CUDA graph of {CALLS} calls on {CALLS} inputs, median of 100 replays, / {CALLS}"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "topk.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Top-k over short rows: ATen vs braze (small-topk)\n",
             (f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}. Command: `{meta['command']}`. "
              f"{meta['method']}. An empty Triton kernel: {empty:.2f} µs per call the same way. braze = the kernel "
              "topk_plan picks (named); sort and rank: each kernel forced, rank with the plan's blocks; best rank: "
              "the fastest of the sweep (blocks i x j, warps).\n"),
             ("| selection | T | rows | ATen µs (kernels) | braze µs (kernel) | sort µs | rank µs | best rank µs | "
              "ATen / braze | all = reference | same values as ATen |"),
             "|---|---:|---:|---|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        b = r.get("rank_best")
        best = f"{b['us']:.2f} ({b['block_i']}×{b['block_j']}, {b['warps']})" if b else "-"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['rows']} | {r['aten']['us']:.2f} ({r['aten']['kernels']}) | "
                     f"{r['braze']['us']:.2f} ({r['plan']}) | {r['sort']['us']:.2f} | {r['rank']['us']:.2f} | {best} | "
                     f"{r['speedup']:.2f}× | {all(r['equals_reference'].values())} | {r['same_values_as_aten']} |")
    (out / "topk.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Study: tile shapes of braze's two routed-experts kernels (braze.codegen.moe) against the weight-read floor, H100.

    python benchmarks/moe_tune.py [--tokens 1,8] [--out DIR]

Why: in the T=1 decode steps (session 7) `braze_moe_gate_up` ran at 1.0-1.15× its floor but `braze_moe_down` at
1.3-1.5×. This sweeps (BLOCK_N, BLOCK_K, num_warps, num_stages) of each kernel for the three models' expert
shapes (real expert counts), checks every config against the reference, and reports the best and the one
`braze.codegen.moe.gate_up_blocks` / `down_blocks` pick. Timing: a CUDA graph of 20 launches, median of 30 replays, per launch; the
chosen experts' weights (k per token, distinct) exceed L2 at every shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

from braze.bench_device import copy_bandwidth
from braze.codegen.moe import braze_moe_down, braze_moe_gate_up, down_blocks, gate_up_blocks

DIMS = {"deepseek-v3.2": (7168, 2048, 8, 256), "qwen3.5": (4096, 1024, 10, 512), "minimax-m2.5": (3072, 1536, 8, 256)}


def bench(fn, n: int = 20, replays: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / n)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--kernels", default="down", help="gate_up,down")
    ap.add_argument("--models", default=",".join(DIMS))
    ap.add_argument("--configs", default="", help='only these "BLOCK_N,BLOCK_K,warps;..." (3 stages)')
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for model in args.models.split(","):
        hid, inter, k, e = DIMS[model]
        torch.manual_seed(0)
        w13 = (torch.randn(e, 2 * inter, hid, device="cuda", dtype=torch.bfloat16) * hid ** -0.5).transpose(1, 2)
        w2 = (torch.randn(e, hid, inter, device="cuda", dtype=torch.bfloat16) * inter ** -0.5).transpose(1, 2)
        for t in (int(x) for x in args.tokens.split(",")):
            x = torch.randn(t, hid, device="cuda").to(torch.bfloat16)
            idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
            ids = idx.reshape(-1).contiguous()
            r = torch.rand(t, k, device="cuda")
            distinct = int(idx.unique().numel())
            h = torch.empty(t * k, inter, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(t, hid, device="cuda", dtype=torch.bfloat16)
            # reference h and y from the default configs
            kernels = {"gate_up": (inter, hid, t * k, 2 * inter * hid * 2), "down": (hid, inter, t, inter * hid * 2)}
            kernels = {w: v for w, v in kernels.items() if w in args.kernels.split(",")}
            ref = {}
            bn, bk, warps = gate_up_blocks(hid)  # h for the down kernel: the gate/up kernel's, default tiles
            braze_moe_gate_up[(t * k, triton.cdiv(inter, bn))](
                x, x.stride(0), x.stride(1), ids, w13, *w13.stride(), h, e, TOP_K=k, HIDDEN=hid, INTER=inter,
                ROUND_ACT=True, BLOCK_N=bn, BLOCK_K=bk, SOFT_ROUND=False, num_warps=warps)
            for which, (_, _, _, per_expert) in kernels.items():
                floor_us = distinct * per_expert / bw * 1e6
                default = gate_up_blocks(hid) if which == "gate_up" else down_blocks(hid, inter)
                results = []
                sweep = itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8), (3, 4))
                if args.configs:  # only these (BLOCK_N, BLOCK_K, warps), 3 stages
                    sweep = [(*map(int, c.split(",")), 3) for c in args.configs.split(";")]
                configs = [(*default, 3)] + [c for c in sweep if c != (*default, 3)]
                for bn, bk, warps, stages in configs:
                    if bk > triton.next_power_of_2(depth) or bn * bk > 32768:
                        continue

                    def launch(bn=bn, bk=bk, warps=warps, stages=stages):
                        if which == "gate_up":
                            braze_moe_gate_up[(t * k, triton.cdiv(inter, bn))](
                                x, x.stride(0), x.stride(1), ids, w13, *w13.stride(), h, e, TOP_K=k, HIDDEN=hid,
                                INTER=inter, ROUND_ACT=True, BLOCK_N=bn, BLOCK_K=bk, SOFT_ROUND=False,
                                num_warps=warps, num_stages=stages)
                        else:
                            braze_moe_down[(t, triton.cdiv(hid, bn))](
                                h, ids, w2, *w2.stride(), r, r.stride(0), r.stride(1), y, e, TOP_K=k, HIDDEN=hid,
                                INTER=inter, ROUND_OUT=True, BLOCK_N=bn, BLOCK_K=bk, SOFT_ROUND=False,
                                num_warps=warps, num_stages=stages)

                    try:
                        us = bench(launch)
                    except Exception as err:  # a config the compiler rejects (e.g. too much shared memory)
                        print(f"skip {which} {(bn, bk, warps, stages)}: {type(err).__name__}", flush=True)
                        continue
                    out = (h if which == "gate_up" else y).clone()
                    if which in ref and not torch.equal(out, ref[which]) and not torch.allclose(out.float(), ref[which].float(), rtol=2e-2, atol=2e-2):
                        print(f"MISMATCH {model} T={t} {which} {(bn, bk, warps, stages)}", flush=True)
                        continue
                    ref.setdefault(which, out)  # the default config runs first
                    results.append({"config": [bn, bk, warps, stages], "us": us})
                results.sort(key=lambda d: d["us"])
                if args.configs:
                    print(f"{model:14s} T={t:2d} {which:8s} floor {floor_us:6.1f} us: "
                          + ", ".join(f"{d['config'][:3]} {d['us']:.1f}" for d in results), flush=True)
                picked = next((d for d in results if d["config"] == [*default, 3]), None)
                row = {"model": model, "T": t, "kernel": which, "floor_us": floor_us, "distinct_experts": distinct,
                       "best": results[:5], "default": picked}
                rows.append(row)
                print(f"{model:14s} T={t:2d} {which:8s} floor {floor_us:6.1f} us  default {picked and picked['us']:.1f} "
                      f"{default}  best {results[0]['us']:.1f} {results[0]['config']}  "
                      f"next {[(d['config'], round(d['us'], 1)) for d in results[1:4]]}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_tune.json").write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                  "triton": triton.__version__, "copy_bw_GBps": bw / 1e9,
                                                  "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

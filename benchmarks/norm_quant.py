"""Benchmark: residual + RMSNorm -> FP8 quant, braze vs stock Inductor, under CUDA graphs.

    python benchmarks/norm_quant.py [--hidden 7168] [--tokens 1,8,64,512] [--out DIR]

For each token count and quant flavour (per-token fp32 scales; per-128-group
power-of-two scales, as DeepSeek V3.2 feeds its FP8 GEMMs): both variants are
compiled from the same plain-torch function, checked against eager, captured
in a CUDA graph that calls them `--inner` times, and timed as the median of many
replays with device events. Kernels per call are counted with the profiler.
The floor is the bytes that must move (read x, r, w; write h, q, scales) over
the copy bandwidth measured on the same card.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import braze
from braze.bench_device import copy_bandwidth


def norm_quant_per_token(x, r, w, eps: float = 1e-6):
    h = x + r
    y = h.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    y = w * y.to(h.dtype)
    amax = y.abs().amax(-1, keepdim=True).float()
    s = (amax / 448.0).clamp(min=1e-12)
    q = (y.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, s, h


def norm_quant_group128_ue8m0(x, r, w, eps: float = 1e-6):
    h = x + r
    y = h.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    y = w * y.to(h.dtype)
    g = y.view(*y.shape[:-1], -1, 128).float()
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (g / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(y.shape)
    return q, s.squeeze(-1), h


FLAVOURS = {"per-token": norm_quant_per_token, "group128-ue8m0": norm_quant_group128_ue8m0}


def time_graph(fn, arg_sets, inner: int, replays: int) -> float:
    """Median seconds per call of fn, from CUDA-graph replays of `inner` calls.

    Call i reads arg_sets[i % len(arg_sets)]: with enough sets the working set
    exceeds L2, so the time reflects HBM traffic, as in a real decode step.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets[:3]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(*arg_sets[i % len(arg_sets)])
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / inner)
    return statistics.median(times)


def count_kernels(fn, args) -> tuple[int, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(names), names


def compare(a, b) -> dict:
    out = {}
    for i, (x, y) in enumerate(zip(a, b)):
        if x.dtype == torch.float8_e4m3fn:
            out[f"out{i}_fp8_bytes_differing"] = int((x.view(torch.uint8) != y.view(torch.uint8)).sum())
        else:
            out[f"out{i}_max_abs_diff"] = float((x.float() - y.float()).abs().max())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--tokens", default="1,8,64,512")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("norm_quant benchmark: no CUDA GPU on this machine", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    D = args.hidden
    bw = copy_bandwidth(torch.device("cuda"))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for flavour, fn in FLAVOURS.items():
        for T in [int(t) for t in args.tokens.split(",")]:
            torch._dynamo.reset()
            groups = 1 if flavour == "per-token" else D // 128
            nbytes = T * D * 2 * 2 + D * 2 + T * D * 2 + T * D + T * groups * 4
            n_sets = max(2, min(64, -(-4 * l2 // nbytes)))  # working set >= 4x L2
            sets = [(torch.randn(T, D, device="cuda", dtype=torch.bfloat16),
                     torch.randn(T, D, device="cuda", dtype=torch.bfloat16),
                     (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16)) for _ in range(n_sets)]
            x, r, w = sets[0]
            be = braze.backend()
            stock = torch.compile(fn, dynamic=False)
            fused = torch.compile(fn, backend=be, dynamic=False)
            with torch.no_grad():
                ref = fn(x, r, w)
                out_b = fused(x, r, w)
                out_s = stock(x, r, w)
                rep = braze.report(be)
                inner = max(args.inner, n_sets)
                t_s = time_graph(stock, sets, inner, args.replays)
                t_b = time_graph(fused, sets, inner, args.replays)
                k_s, names_s = count_kernels(stock, (x, r, w))
                k_b, names_b = count_kernels(fused, (x, r, w))
            floor = nbytes / bw
            rows.append({
                "flavour": flavour, "tokens": T, "hidden": D,
                "stock_us": t_s * 1e6, "braze_us": t_b * 1e6, "speedup": t_s / t_b,
                "floor_us": floor * 1e6, "braze_over_floor": t_b / floor,
                "stock_kernels": k_s, "braze_kernels": k_b,
                "stock_kernel_names": names_s, "braze_kernel_names": names_b,
                "applied": len(rep.applied), "missed": len(rep.missed),
                "braze_vs_eager": compare(out_b, ref), "stock_vs_eager": compare(out_s, ref),
            })
            print(f"{flavour:>16} T={T:<4} stock {t_s * 1e6:7.2f} us ({k_s} k)  braze {t_b * 1e6:7.2f} us ({k_b} k)"
                  f"  x{t_s / t_b:4.2f}  floor {floor * 1e6:6.2f} us  braze/floor {t_b / floor:5.2f}"
                  f"  applied={len(rep.applied)}", flush=True)
    meta = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9,
        "command": "python benchmarks/norm_quant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": f"CUDA graph of >= {args.inner} calls rotating over input sets totalling >= 4x L2, "
                  f"median of {args.replays} replays, device events",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_quant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# RMSNorm (+residual) -> FP8 quant: braze vs stock Inductor",
        "",
        f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}. "
        f"Measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write).",
        f"Command: `{meta['command']}`. Timing: {meta['timing']}.",
        "",
        "| flavour | T | stock µs | braze µs | speedup | floor µs | braze / floor | kernels stock → braze |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['flavour']} | {r['tokens']} | {r['stock_us']:.2f} | {r['braze_us']:.2f} | "
                     f"{r['speedup']:.2f}× | {r['floor_us']:.2f} | {r['braze_over_floor']:.2f} | "
                     f"{r['stock_kernels']} → {r['braze_kernels']} |")
    (out / "norm_quant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

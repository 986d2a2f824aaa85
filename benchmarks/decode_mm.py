"""Sweep: braze's decode GEMM kernel (braze/codegen/decode_mm.py) against torch.mm (cuBLAS) per weight shape.

    python benchmarks/decode_mm.py [--tokens 1,2,4] [--out DIR]

For each weight shape of the three bench configs and each token count, every tile config of a grid is checked
against fp32 and timed (CUDA graph over distinct weight copies, so calls read HBM; median of replays, per call)
beside torch.mm and the weight-read floor. The JSON keeps every config's time: it is what `decode_mm_plan`'s
tile rules are fitted to. At T > 1 only the five best configs of T=1 are timed.
"""

from __future__ import annotations

import argparse
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
from skinny_gemm import SHAPES, time_per_call

from braze.codegen.decode_mm import DecodeMMConfig, decode_mm_reference
from braze.runtime.decode_mm import _run

EXTRA = [("deepseek-v3.2", "W_UK absorbed (one head)", 512, 128), ("qwen3.5", "shared_expert gate_up", 1024, 4096)]


def grid() -> list[DecodeMMConfig]:
    cfgs = []
    for bn in (1, 2, 4, 8, 16):
        for bk in (256, 512, 1024, 2048):
            if 1024 <= bn * bk <= 16384:
                cfgs += [DecodeMMConfig(bn, bk, w) for w in (4, 8)]
    cfgs += [DecodeMMConfig(bn, 512, 4, unroll=False, stages=s) for bn in (4, 8) for s in (1, 3)]
    return cfgs


def warm(cfgs: list[DecodeMMConfig], shapes: list[tuple[int, int]], T: int) -> None:
    """Compile every (config, K) in threads (ptxas runs as a subprocess); errors surface at the timed call."""
    dev = torch.device("cuda")

    def one(job):
        cfg, (N, K) = job
        x = torch.zeros(T, K, device=dev, dtype=torch.bfloat16)
        w = torch.zeros(min(N, 64), K, device=dev, dtype=torch.bfloat16)
        try:
            _run(x, w, None, config=cfg)
        except Exception as e:  # noqa: BLE001 - reported by the timed call
            return repr(e)
        return None

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, [(c, s) for c in cfgs for s in shapes]))
    torch.cuda.synchronize()


def measure(T: int, model: str, name: str, N: int, K: int, cfgs: list[DecodeMMConfig], bw: float, l2: int) -> dict:
    dev = torch.device("cuda")
    wbytes = N * K * 2
    copies = max(4, min(128, -(-4 * l2 // wbytes)))
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=gen) * K**-0.5 for _ in range(copies)]
    x = torch.randn(T, K, device=dev, dtype=torch.bfloat16, generator=gen)
    ref = decode_mm_reference(x, ws[0]).float()
    ys = torch.empty(copies, T, N, device=dev, dtype=torch.bfloat16)
    t_mm = time_per_call(lambda i: torch.mm(x, ws[i].t(), out=ys[i]), copies)
    mm_err = ((torch.mm(x, ws[0].t()).float() - ref).norm() / ref.norm()).item()
    times = []
    for cfg in cfgs:
        y = _run(x, ws[0], None, config=cfg)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"{name} T={T} {cfg}: rel err {err:.2e}"
        t = time_per_call(lambda i, c=cfg: _run(x, ws[i], None, config=c, out=ys[i]), copies)
        times.append({"config": cfg.__dict__, "us": t, "rel_err": err})
    times.sort(key=lambda r: r["us"])
    floor = (wbytes + 2 * T * (K + N)) / bw * 1e6
    best = times[0]
    print(f"T={T} {model:14s} {name:30s} N={N:6d} K={K:5d} floor {floor:6.2f}  torch.mm {t_mm:6.2f} "
          f"({t_mm / floor:4.2f}x)  braze {best['us']:6.2f} ({best['us'] / floor:4.2f}x) {best['config']}", flush=True)
    return {"model": model, "weight": name, "T": T, "N": N, "K": K, "weight_mb": wbytes / 1e6, "floor_us": floor,
            "copies": copies, "torch_mm_us": t_mm, "torch_mm_rel_err": mm_err, "best": best, "sweep": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,4")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    from braze.bench_device import copy_bandwidth

    bw = copy_bandwidth(dev)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    shapes = SHAPES + EXTRA
    rows = []
    top: dict[str, list[DecodeMMConfig]] = {}
    for T in (int(t) for t in args.tokens.split(",")):
        for model, name, N, K in shapes:
            cfgs = grid() if T == 1 or name not in top else top[name]
            warm(cfgs, [(N, K)], T)
            r = measure(T, model, name, N, K, cfgs, bw, l2)
            if T == 1:
                top[name] = [DecodeMMConfig(**s["config"]) for s in r["sweep"][:5]]
            rows.append(r)
            write(rows, Path(args.out), args.tokens, bw, dev)  # after every row: a run cut short keeps its rows


def write(rows: list[dict], out: Path, tokens: str, bw: float, dev: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "copy_bandwidth_gbs": bw / 1e9}
    (out / "decode_mm.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [
        "# Decode GEMMs: torch.mm (cuBLAS) vs braze's decode kernel, against the weight-read floor",
        "",
        (f"Card: {env['card']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; copy "
         f"bandwidth {bw / 1e9:.0f} GB/s. Command: `python benchmarks/decode_mm.py --tokens {tokens}`."),
        ("Timing: CUDA graph over distinct weight copies (4× L2 in all, at most 128), median of 50 replays, per "
         "call. braze: best of the tile grid (T=1) or of T=1's five best (T>1), every config checked against "
         "fp32. Floor: weight + activation bytes over the copy bandwidth."),
        "",
        "| T | model | weight | N | K | MB | floor µs | torch.mm µs (× floor) | braze µs (× floor) | config |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b = r["best"]
        c = b["config"]
        loop = "" if c["unroll"] else f", loop, {c['stages']} stages"
        lines.append(f"| {r['T']} | {r['model']} | {r['weight']} | {r['N']} | {r['K']} | {r['weight_mb']:.1f} | "
                     f"{r['floor_us']:.2f} | {r['torch_mm_us']:.2f} ({r['torch_mm_us'] / r['floor_us']:.2f}×) | "
                     f"{b['us']:.2f} ({b['us'] / r['floor_us']:.2f}×) | {c['block_n']}×{c['block_k']}, "
                     f"{c['warps']} warps{loop} |")
    (out / "decode_mm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""An RMSNorm folded into braze's decode GEMM kernel against the unfused pair, per DeepSeek V3.2 weight it may fold
into (the q_c norm's readers): Inductor's norm kernel + torch.mm (cuBLAS), the norm + braze's kernel, and braze's
kernel with the norm folded in. Each in one CUDA graph over distinct weight copies (4x L2 in all), µs per call.

    python benchmarks/decode_mm_norm.py --tokens 1,2,4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import triton
from skinny_gemm import time_per_call

from braze.codegen.decode_mm import DecodeMMConfig, decode_mm_plan, decode_mm_reference
from braze.runtime.decode_mm import _run

SHAPES = [("q_b_proj", 3072, 1536), ("indexer.wq_b", 8192, 1536), ("q_b ‖ wq_b (merged)", 11264, 1536)]
EPS = 1e-6


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # DeepSeek's q_a_layernorm (HF spelling)
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def measure(T: int, name: str, N: int, K: int, l2: int, tiles: bool = False) -> dict:
    dev = torch.device("cuda")
    copies = max(2, min(128, 4 * l2 // (N * K * 2) + 1))
    g = torch.Generator(device=dev).manual_seed(N + T)
    ws = [(torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(torch.bfloat16) for _ in range(copies)]
    x = (3 * torch.randn(T, K, device=dev, generator=g)).to(torch.bfloat16)
    nw = (1 + 0.3 * torch.randn(K, device=dev, generator=g)).to(torch.bfloat16)
    norm = torch.compile(rmsnorm, dynamic=False)  # Inductor's kernel, as the graph would run it unfolded
    want = decode_mm_reference(x, ws[0], None, nw, "cast,w", EPS).float()
    got = _run(x, ws[0], None, norm_weight=nw, norm="cast,w", eps=EPS).float()
    scale = (rmsnorm(x, nw).float().abs() @ ws[0].float().abs().t()).clamp_min(1e-3)
    err = ((got - want).abs() / scale).max().item()
    plan = decode_mm_plan(T, N, K, torch.bfloat16, fold_norm=True)
    cfg = None if isinstance(plan, str) else plan
    row = {"T": T, "weight": name, "N": N, "K": K, "MB": round(N * K * 2 / 1e6, 1), "copies": copies,
           "max_err_rel": err, "plan": plan if isinstance(plan, str) else "braze"}
    row["norm + torch.mm us"] = time_per_call(lambda i: torch.mm(norm(x, nw), ws[i].t()), copies)
    row["norm + braze us"] = time_per_call(lambda i: _run(norm(x, nw), ws[i], None, config=cfg), copies)
    row["braze with the norm us"] = time_per_call(
        lambda i: _run(x, ws[i], None, config=cfg, norm_weight=nw, norm="cast,w", eps=EPS), copies)
    if tiles:  # the fold's best tiles: a norm's statistics cost each program, so fewer, larger programs may win
        best = None
        for bn in (2, 4, 8, 16):
            for bk in (1024, 2048):
                for warps in (4, 8):
                    c = DecodeMMConfig(bn, bk, warps)
                    us = time_per_call(
                        lambda i, c=c: _run(x, ws[i], None, config=c, norm_weight=nw, norm="cast,w", eps=EPS), copies)
                    if best is None or us < best[0]:
                        best = (us, c)
        row["best folded us"], row["best tiles"] = best[0], f"{best[1].block_n}x{best[1].block_k}, {best[1].warps} warps"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,2,4")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiles", action="store_true", help="also sweep the folded kernel's tiles (16 configs a shape)")
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        for name, N, K in SHAPES:
            r = measure(T, name, N, K, l2, args.tiles)
            rows.append(r)
            if args.tiles:
                print(f"T={T} {name:24s} best folded {r['best folded us']:6.2f} us ({r['best tiles']})", flush=True)
            print(f"T={T} {name:24s} norm+mm {r['norm + torch.mm us']:6.2f}  norm+braze {r['norm + braze us']:6.2f}"
                  f"  folded {r['braze with the norm us']:6.2f} us  err {r['max_err_rel']:.1e}  plan {r['plan']}",
                  flush=True)
    card = torch.cuda.get_device_name(0)
    env = (f"{card}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_mm_norm.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = ["# An RMSNorm folded into braze's decode GEMM kernel vs the unfused pair", "",
             f"Card: {env}. Command: `python benchmarks/decode_mm_norm.py --tokens {args.tokens}`.",
             "Timing: one CUDA graph over distinct weight copies (4x L2 in all), median of 50 replays, per call. "
             "The norm is DeepSeek's q_c RMSNorm (HF spelling) compiled by Inductor; the fold is "
             "`braze::decode_mm(x, W, norm='cast,w')`. Error: max |folded - reference| over sum |x̂||w|.", "",
             "| T | weight | N | K | MB | norm + torch.mm µs | norm + braze µs | braze with the norm µs | plan |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['weight']} | {r['N']} | {r['K']} | {r['MB']} | {r['norm + torch.mm us']:.2f} | "
                     f"{r['norm + braze us']:.2f} | {r['braze with the norm us']:.2f} | {r['plan']} |")
    (out / "decode_mm_norm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

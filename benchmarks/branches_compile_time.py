"""Compile time of a built-in model with and without braze's branch passes (branch analysis + gemm-merge
+ dual-stream).

    python benchmarks/branches_compile_time.py --model deepseek-v3.2 [--size tiny] [--device cpu] [--repeats 2]
        [--dtype bfloat16] [--tokens 1]

Each compile runs in a fresh process with empty Inductor and braze caches, alternating the two
configurations, so neither profits from the other's cache or a warm process. Prints the median
first-call time (Dynamo + Inductor + braze) of each, and the seconds braze's two passes took.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch, braze
from braze import models
from braze.passes.branches import BranchAnalysis
from braze.passes.manager import PASSES
name, size, device, on = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "on"
dtype, tokens = getattr(torch, sys.argv[5]), int(sys.argv[6])
model = models.build(name, size, device=device, dtype=dtype)
inputs = [x.to(device) if isinstance(x, torch.Tensor) else x
          for x in models.make_decode_inputs(model, tokens, 8, torch.Generator().manual_seed(0))]
passes = PASSES if on else tuple(p for p in PASSES if p is not BranchAnalysis)
be = braze.backend(braze.FusionConfig(gemm_merge=on, dual_stream=on), passes=passes)
t0 = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend=be, fullgraph=True)(*inputs)
total = time.perf_counter() - t0
seconds = {}
for g in braze.report(be).graphs:
    for k, v in g.pass_seconds.items():
        seconds[k] = seconds.get(k, 0.0) + v
print(json.dumps({"first_call_s": total, "pass_seconds": seconds}))
"""


def run(model: str, size: str, device: str, on: bool, dtype: str, tokens: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(), BRAZE_CACHE_DIR=tempfile.mkdtemp())
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    out = subprocess.run([sys.executable, "-c", CHILD, model, size, device, "on" if on else "off", dtype, str(tokens)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v3.2")
    p.add_argument("--size", default="tiny", choices=("tiny", "bench"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--tokens", type=int, default=3)
    args = p.parse_args()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (False, True):
            dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
            runs[on].append(run(args.model, args.size, args.device, on, dtype, args.tokens))
    off = statistics.median(r["first_call_s"] for r in runs[False])
    on = statistics.median(r["first_call_s"] for r in runs[True])
    passes = statistics.median(sum(r["pass_seconds"].get(k, 0) for k in ("branches", "gemm-merge", "dual-stream"))
                               for r in runs[True])
    print(json.dumps({"model": args.model, "size": args.size, "device": args.device, "repeats": args.repeats,
                      "dtype": args.dtype, "tokens": args.tokens,
                      "first_call_s_without": [r["first_call_s"] for r in runs[False]],
                      "first_call_s_with": [r["first_call_s"] for r in runs[True]]}, indent=1))
    print(f"{args.model} {args.size} on {args.device}: first call {off:.1f} s without, {on:.1f} s with "
          f"({100 * (on - off) / off:+.1f}%); branch analysis + gemm-merge + dual-stream passes {passes * 1e3:.0f} ms")


if __name__ == "__main__":
    main()

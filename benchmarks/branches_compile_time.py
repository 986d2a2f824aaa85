"""Compile time of a built-in model with and without braze's branch passes (branch analysis + gemm-merge
+ dual-stream).

    python benchmarks/branches_compile_time.py --model deepseek-v3.2 [--size tiny] [--device cpu] [--repeats 2]
        [--dtype bfloat16] [--tokens 1] [--configs off,merge,streams,on]

Configurations: `off` (no branch analysis, no merging, no dual-stream), `merge` (analysis + merging),
`streams` (analysis + dual-stream) and `on` (all three). Each compile runs in a fresh process with empty
Inductor and braze caches, the configurations in turn (reversed every other repeat), so none profits from
another's cache or a warm process. Prints the median first-call time (Dynamo + Inductor + braze + the first
run) of each against `off`, the seconds braze's branch passes took, the seconds the dual-stream op spent
compiling its branches at the first call, and where Dynamo/Inductor's own time went
(`torch._dynamo.utils.compilation_time_metrics`, summed per phase; phases nest, so they do not add up, and
those of `streams`/`on` include the branch compiles).
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
name, size, device, config = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
dtype, tokens = getattr(torch, sys.argv[5]), int(sys.argv[6])
merge, streams = config in ("merge", "on"), config in ("streams", "on")
model = models.build(name, size, device=device, dtype=dtype)
inputs = [x.to(device) if isinstance(x, torch.Tensor) else x
          for x in models.make_decode_inputs(model, tokens, 8, torch.Generator().manual_seed(0))]
passes = PASSES if config != "off" else tuple(p for p in PASSES if p is not BranchAnalysis)
be = braze.backend(braze.FusionConfig(gemm_merge=merge, dual_stream=streams), passes=passes)
import braze.passes.streams
braze.passes.streams.ON_CPU = device == "cpu"  # outline on CPU too (the branches run uncompiled there)
t0 = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend=be, fullgraph=True)(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
total = time.perf_counter() - t0
from braze.runtime.streams import COMPILE_STATS
from torch._dynamo.utils import compilation_time_metrics
phases = {k: round(sum(v), 3) for k, v in compilation_time_metrics.items() if sum(v) >= 0.05}
seconds = {}
for g in braze.report(be).graphs:
    for k, v in g.pass_seconds.items():
        seconds[k] = seconds.get(k, 0.0) + v
print(json.dumps({"first_call_s": total, "pass_seconds": seconds, "branch_compiles": COMPILE_STATS, "phases": phases}))
"""


CONFIGS = ("off", "merge", "streams", "on")


def run(model: str, size: str, device: str, config: str, dtype: str, tokens: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(), BRAZE_CACHE_DIR=tempfile.mkdtemp())
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    out = subprocess.run([sys.executable, "-c", CHILD, model, size, device, config, dtype, str(tokens)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"the {config} compile of {model} failed:\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v3.2")
    p.add_argument("--size", default="tiny", choices=("tiny", "bench"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--tokens", type=int, default=3)
    p.add_argument("--warmup", action="store_true",
                   help="one unrecorded compile first (a fresh machine's first process pays for cold file caches)")
    p.add_argument("--configs", default="off,on", help=f"comma-separated, from {', '.join(CONFIGS)}; off is always run")
    args = p.parse_args()
    configs = ["off"] + [c for c in args.configs.split(",") if c != "off"]
    if bad := [c for c in configs if c not in CONFIGS]:
        p.error(f"unknown configuration(s) {bad}; choose from {CONFIGS}")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    if args.warmup:
        run(args.model, args.size, args.device, "off", dtype, args.tokens)
    for i in range(args.repeats):
        for c in configs if i % 2 == 0 else configs[::-1]:  # alternating order: drift hits every configuration
            runs[c].append(run(args.model, args.size, args.device, c, dtype, args.tokens))
    print(json.dumps({"model": args.model, "size": args.size, "device": args.device, "repeats": args.repeats,
                      "dtype": dtype, "tokens": args.tokens, "runs": runs}, indent=1))
    off = statistics.median(r["first_call_s"] for r in runs["off"])
    for c in configs[1:]:
        t = statistics.median(r["first_call_s"] for r in runs[c])
        passes = statistics.median(sum(r["pass_seconds"].get(k, 0) for k in ("branches", "gemm-merge", "dual-stream"))
                                   for r in runs[c])
        branch = statistics.median(r["branch_compiles"]["seconds"] for r in runs[c])
        n = statistics.median(r["branch_compiles"]["compiles"] for r in runs[c])
        print(f"{args.model} {args.size} on {args.device} T={args.tokens}: first call {off:.1f} s off, {t:.1f} s {c} "
              f"({100 * (t - off) / off:+.1f}%); branch passes {passes * 1e3:.0f} ms; {n:.0f} branch compiles "
              f"{branch:.1f} s")


if __name__ == "__main__":
    main()

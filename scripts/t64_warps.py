"""Is the fused norm->quant kernel at T=64 (hidden 7168) latency-bound? Time it at several num_warps."""

import sys

import torch

sys.path.insert(0, "benchmarks")
import braze.runtime.rowwise as rt  # noqa: E402
from braze.codegen.cache import rowwise_kernel  # noqa: E402
from braze.ops import _chain, _quant_stage  # noqa: E402
from norm_quant import time_graph  # noqa: E402

D = 7168
for T in (64, 512):
    sets = [[torch.randn(T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)] for _ in range(16)]
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    x0, r0 = sets[0]
    chain = _chain(x0, w, 1e-6, r0, False, _quant_stage(D, 128, "ue8m0", 1e-10), False)
    k = rowwise_kernel(chain)
    const = rt._constexprs(chain, k, interpreted=False)
    launches = []
    for x, r in sets:
        outs = rt._empty_outputs(chain, x)
        args, n = rt._launch_args(chain, [x, r, w], outs)
        launches.append((args, n))
    for warps in (2, 4, 8, 16):
        def go(i=[0]):
            args, n = launches[i[0] % len(launches)]
            i[0] += 1
            k.jit[(n,)](*args, **const, num_warps=warps)
        t = time_graph(lambda: go(), [()], 32, 100)
        print(f"T={T} num_warps={warps}: {t * 1e6:.2f} us")
    empty = torch.empty(1, device="cuda")
    print(f"T={T} empty-kernel floor (fill_ of 1 element): {time_graph(lambda: empty.fill_(1.0), [()], 32, 100) * 1e6:.2f} us")

"""GPU smoke check: the fused op compiles, is launched by Inductor directly, and matches eager."""

from __future__ import annotations

import sys

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, "benchmarks")
import braze  # noqa: E402
from norm_quant import FLAVOURS  # noqa: E402

print("torch", torch.__version__, torch.cuda.get_device_name())
for name, fn in FLAVOURS.items():
    torch._dynamo.reset()
    be = braze.backend(braze.FusionConfig(verify="compile", count_stock_kernels=True))
    f = torch.compile(fn, backend=be)
    x = torch.randn(8, 7168, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(7168, device="cuda", dtype=torch.bfloat16)
    out, code = run_and_get_code(f, x, r, w)
    ref = fn(x, r, w)
    src = "\n".join(code)
    direct = "braze_add_rmsnorm" in src and "fused_rowwise" not in src
    print(name, "launched directly by Inductor:", direct)
    for a, b in zip(out, ref):
        if a.dtype == torch.float8_e4m3fn:
            print("  fp8 bytes differing:", int((a.view(torch.uint8) != b.view(torch.uint8)).sum()), "of", a.numel())
        else:
            print("  max abs diff:", float((a.float() - b.float()).abs().max()))
    print(braze.report(be))
    if not direct:
        print(src[:6000])

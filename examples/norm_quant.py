"""Compile a plain-PyTorch block whose RMSNorm feeds an FP8 linear; braze fuses norm -> quant and says so.

    python examples/norm_quant.py
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # on CPU, run braze's Triton kernels in the interpreter

import torch  # noqa: E402

import braze  # noqa: E402
from braze.models.demo import build_demo  # noqa: E402

model = build_demo(layers=2)
compiled = torch.compile(model, backend=braze.backend(braze.FusionConfig(verify="compile")))
x = torch.randn(4, 256, dtype=torch.bfloat16)
with torch.no_grad():
    out = compiled(x)
    print("max |compiled - eager|:", (out.float() - model(x).float()).abs().max().item())
print(braze.report(compiled))

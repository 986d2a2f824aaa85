"""A small decoder-style stack with FP8 linears: the built-in model of `python -m braze report --model demo`.

Each layer: h = x + r; y = RMSNorm(h); FP8 per-token quant of y feeding a
`torch._scaled_mm` (per-channel weight scales); SwiGLU; a second FP8 linear.
Written as plain PyTorch, the way people write it, so braze has to find the
norm -> quant chains itself.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_per_token(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # y: [T, D] -> q [T, D] fp8, s [T, 1] fp32
    amax = y.abs().amax(-1, keepdim=True).float()
    s = (amax / 448.0).clamp(min=1e-12)
    q = (y.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, s


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Fp8Linear(nn.Module):
    """y = x @ W^T with W in float8_e4m3fn and one fp32 scale per output channel."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        w = torch.randn(d_out, d_in) / d_in**0.5
        scale = w.abs().amax(-1, keepdim=True) / 448.0
        self.register_buffer("weight", (w / scale).to(torch.float8_e4m3fn))  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous().float())  # [1, out]

    def forward(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # q: [T, in] fp8, s: [T, 1] fp32
        if q.is_cuda:
            return torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.weight_scale,
                                    out_dtype=torch.bfloat16)
        # CPU _scaled_mm takes per-tensor scales only before torch 2.13: the same math, dequantized
        w = self.weight.float() * self.weight_scale.t()
        return ((q.float() * s) @ w.t()).to(torch.bfloat16)


class Layer(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.up = Fp8Linear(hidden, 2 * inter)
        self.down = Fp8Linear(inter, hidden)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + residual
        q, s = quantize_per_token(self.norm(h))
        gate, up = self.up(q, s).chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
        return self.down(*quantize_per_token(a)), h


class DemoModel(nn.Module):
    def __init__(self, hidden: int = 256, inter: int = 512, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(hidden, inter) for _ in range(layers))
        self.final_norm = RMSNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        residual = torch.zeros_like(x)
        for layer in self.layers:
            x, residual = layer(x, residual)
        return self.final_norm(x + residual)


def build_demo(device: str = "cpu", hidden: int = 256, layers: int = 2) -> DemoModel:
    torch.manual_seed(0)
    model = DemoModel(hidden, 2 * hidden, layers)
    model.final_norm.to(torch.bfloat16)
    for layer in model.layers:
        layer.norm.to(torch.bfloat16)
    return model.to(device).eval()

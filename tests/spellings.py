"""The ways models write RMSNorm and FP8 dynamic quant, as plain torch, for the recognizer and pass tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_hf(x, w, eps):
    """Hugging Face Llama: fp32 variance, cast back, then the weight."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def rms_weight_first(x, w, eps):
    """Weight applied in fp32, then cast back (vLLM / nn.RMSNorm order)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h * w.float()).to(x.dtype)


def rms_functional(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def rms_zero_centered(x, w, eps):
    """Gemma / Qwen 3.5: x̂ * (1 + w) in fp32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def rms_square_by_mul(x, w, eps):
    h = x.float()
    var = (h * h).mean(-1, keepdim=True)
    return w * (h / torch.sqrt(var + eps)).to(x.dtype)


NORMS = {
    "hf": rms_hf,
    "weight-first": rms_weight_first,
    "functional": rms_functional,
    "zero-centered": rms_zero_centered,
    "square-by-mul": rms_square_by_mul,
}


def quant_per_token(y):
    amax = y.abs().amax(-1, keepdim=True).float()
    s = (amax / 448.0).clamp(min=1e-12)
    q = (y.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, s


def quant_per_token_floor_first(y):
    amax = y.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    s = amax / 448.0
    return (y.float() / s).clamp(min=-448.0, max=448.0).to(torch.float8_e4m3fn), s


def quant_group128_ue8m0(y):
    g = y.view(*y.shape[:-1], -1, 128).float()
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (g / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(y.shape)
    return q, s.squeeze(-1)


def quant_group_mul_form(y, group=64):
    g = y.view(*y.shape[:-1], -1, group).float()
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    q = (g * (448.0 / amax)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(y.shape)
    return q, (amax / 448.0).squeeze(-1)


QUANTS = {
    "per-token": quant_per_token,
    "per-token-floor-first": quant_per_token_floor_first,
    "group128-ue8m0": quant_group128_ue8m0,
    "group64-mul": quant_group_mul_form,
}


def group_of(quant: str) -> int | None:
    return {"group128-ue8m0": 128, "group64-mul": 64}.get(quant)

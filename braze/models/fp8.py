"""FP8 (e4m3) for braze's models: dynamic activation quant in plain torch, weights quantized at load,
and the scaled GEMM (torch._scaled_mm where the device runs that scaling mode, else the same math
dequantized).

The activation quant is written the way people write it (amax, divide, clamp, cast), because
braze's passes recognize it and fuse it into the producer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)  # floor of a per-token scale (as vLLM), so all-zero rows stay finite


@dataclass(frozen=True)
class Fp8Scheme:
    """block=False: per-output-channel weight scales, per-token activation scales.
    block=True: 128x128 weight blocks, activations per token per 128 channels; ue8m0: scales are powers of two."""

    block: bool = False
    ue8m0: bool = False


FP8_CHANNEL = Fp8Scheme()
FP8_BLOCK = Fp8Scheme(block=True)
FP8_BLOCK_UE8M0 = Fp8Scheme(block=True, ue8m0=True)


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], fp32 scale [..., 1]) with x ≈ q·s."""
    x = x.float()
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def quant_fp8_group(x: torch.Tensor, group: int = 128, ue8m0: bool = False,
                    amax_floor: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], fp32 scale [..., K/group]); ue8m0 rounds s up to 2^⌈log2 s⌉ (DeepSeek)."""
    xg = x.float().unflatten(-1, (-1, group))  # [..., K/group, group]
    amax = xg.abs().amax(-1, keepdim=True).clamp(min=amax_floor)
    s = amax / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2), s.squeeze(-1)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """t [..., n] of a 1-, 2- or 4-byte dtype -> its little-endian bytes [..., n * size] uint8.

    Written with a same-size view and shifts, not `t.view(torch.uint8)`: Inductor (torch 2.11,
    CUDA) rejects a size-changing view of a computed tensor whose layout it chose itself.
    """
    size = t.element_size()
    if size == 1:
        return t.view(torch.uint8)
    i = t.view(_SAME_SIZE_INT[size]).to(torch.int32)
    return torch.stack([(i >> (8 * k)) & 0xFF for k in range(size)], dim=-1).to(torch.uint8).flatten(-2)


def from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Little-endian bytes [..., n * size] uint8 -> [..., n] of `dtype` (the inverse of to_bytes)."""
    size = torch.empty((), dtype=dtype).element_size()
    if size == 1:
        return b.view(dtype)
    parts = b.unflatten(-1, (-1, size)).to(torch.int32)
    i = parts[..., 0]
    for k in range(1, size):
        i = i | (parts[..., k] << (8 * k))
    return i.to(_SAME_SIZE_INT[size]).view(dtype)


def quant_weight_fp8(w: torch.Tensor, scheme: Fp8Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], fp32 scale [N, 1] or [⌈N/128⌉, ⌈K/128⌉]); ragged edge blocks are zero-padded."""
    if not scheme.block:
        return quant_fp8_per_token(w)
    n, k = w.shape
    pn, pk = -n % 128, -k % 128
    wp = F.pad(w.float(), (0, pk, 0, pn)).view((n + pn) // 128, 128, (k + pk) // 128, 128)
    s = (wp.abs().amax(dim=(1, 3), keepdim=True) / FP8_MAX).clamp(min=1e-12)
    if scheme.ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (wp / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n + pn, k + pk)[:n, :k].contiguous()
    return q, s[:, 0, :, 0].contiguous()


def dequant_weight_fp8(q: torch.Tensor, s: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """Inverse of `quant_weight_fp8`, in fp32."""
    if not scheme.block:
        return q.float() * s
    n, k = q.shape
    return q.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


def _scaled_mm_reference(xq, xs, wq, ws, scheme: Fp8Scheme, out_dtype) -> torch.Tensor:
    # Same math as the scaled GEMM: dequantize both operands, fp32 product.
    x = xq.float() * (xs.repeat_interleave(128, -1) if scheme.block else xs)
    return (x @ dequant_weight_fp8(wq, ws, scheme).t()).to(out_dtype)


def _scaled_mm(xq, xs, wq, ws, scheme: Fp8Scheme, out_dtype) -> torch.Tensor:
    if scheme.block:
        # torch wants the activation scales outer-dim-major and the weight scales as [K/128, N/128].
        return torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=out_dtype)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=out_dtype)


_SCALED_MM_OK: dict[tuple[str, Fp8Scheme, torch.dtype], bool] = {}


def scaled_mm_supported(device: torch.device | str, scheme: Fp8Scheme, out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch._scaled_mm runs `scheme` on `device` with `out_dtype` output and agrees with the
    dequantized reference. Probed once per (device type, scheme, dtype), eagerly, outside any trace."""
    key = (torch.device(device).type, scheme, out_dtype)
    if key not in _SCALED_MM_OK:
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(32, 256, generator=g).to(device)
            w = torch.randn(256, 256, generator=g).to(device)
            wq, ws = quant_weight_fp8(w, scheme)
            xq, xs = quant_fp8_group(x, 128, scheme.ue8m0) if scheme.block else quant_fp8_per_token(x)
            got = _scaled_mm(xq, xs, wq, ws, scheme, out_dtype).float()
            ref = _scaled_mm_reference(xq, xs, wq, ws, scheme, torch.float32)
            _SCALED_MM_OK[key] = bool((got - ref).norm() <= 1e-2 * ref.norm())
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            _SCALED_MM_OK[key] = False
    return _SCALED_MM_OK[key]


def use_scaled_mm(device: torch.device | str, scheme: Fp8Scheme, out_dtype: torch.dtype, n: int, k: int) -> bool:
    """torch._scaled_mm for an [M, k] x [k, n] GEMM: when the scheme runs here and the shape suits it
    (dims multiples of 16; whole 128-blocks for block scaling)."""
    shape_ok = n % 16 == 0 and k % 16 == 0 and (not scheme.block or (n % 128 == 0 and k % 128 == 0))
    return shape_ok and scaled_mm_supported(device, scheme, out_dtype)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, scheme: Fp8Scheme, scaled_mm: bool) -> torch.Tensor:
    """x [..., K] @ dequant(wq [N, K])ᵀ with x quantized on the fly -> [..., N] in x.dtype.
    scaled_mm: use torch._scaled_mm (see `use_scaled_mm`), else the same math dequantized."""
    x2 = x.reshape(-1, x.shape[-1])
    if scheme.block:
        xq, xs = quant_fp8_group(x2, 128, scheme.ue8m0)  # xs: [M, K/128]
    else:
        xq, xs = quant_fp8_per_token(x2)  # xs: [M, 1]
    mm = _scaled_mm if scaled_mm else _scaled_mm_reference
    return mm(xq, xs, wq, ws, scheme, x.dtype).reshape(*x.shape[:-1], wq.shape[0])



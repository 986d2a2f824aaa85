"""What the attention-prologue benchmarks share: per-kernel device time, GEMM kernels by name, relative error."""

from __future__ import annotations

import torch


def kernel_times(step, n: int = 20) -> dict[str, float]:
    """Device µs per call of each kernel (profiler, `n` calls outside a graph), by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset")):
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us() / n
    return out


def is_gemm(name: str) -> bool:
    return name.startswith(("nvjet", "void cublas", "sm90_", "cutlass", "ampere_", "void gemm")) or "gemm" in name


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))

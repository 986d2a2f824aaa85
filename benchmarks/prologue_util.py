"""What the attention-prologue benchmarks share: per-kernel device time, GEMM kernels by name, relative error."""

from __future__ import annotations

import torch


def kernel_times(step, n: int = 20, flush=None) -> dict[str, float]:
    """Device µs per call of each kernel (profiler, `n` calls outside a graph), by kernel name; with `flush`
    (braze.bench_device.l2_flusher) L2 is flushed before each call and the flush's own kernels left out."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(fn) -> list:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    step()
    torch.cuda.synchronize()
    skip = {e.name for e in kernels(flush)} if flush is not None else set()
    events = kernels((lambda: (flush(), step())) if flush is not None else step)
    out: dict[str, float] = {}
    for e in events:
        if e.name not in skip and not e.name.lower().startswith(("memcpy", "memset")):
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us() / n
    return out


def is_gemm(name: str) -> bool:
    return name.startswith(("nvjet", "void cublas", "sm90_", "cutlass", "ampere_", "void gemm")) or "gemm" in name


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def reference(attn, inputs: tuple) -> tuple[dict, object, dict]:
    """The caches before the prologue (to restore), its eager output, and the caches it leaves."""
    before = {k: v.clone() for k, v in attn.named_buffers()}
    with torch.no_grad():
        out = attn.prologue(*inputs)
    return before, out, {k: v.clone() for k, v in attn.named_buffers()}


def variant_fn(attn, before: dict, variant: str, backend):
    """The caches restored to `before` and the prologue as `variant` runs it: eager, or compiled afresh
    (Dynamo reset) with `backend` (None: stock Inductor)."""
    torch._dynamo.reset()
    for k, v in attn.named_buffers():
        v.copy_(before[k])
    if variant == "eager":
        return attn.prologue
    return torch.compile(attn.prologue, fullgraph=True, backend=backend or "inductor")

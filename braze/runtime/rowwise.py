"""The fused row-chain custom ops: `braze::fused_rowwise` (CUDA, a `triton_op`) and its CPU twin.

`fused_rowwise(inputs, spec)` runs the RowChain described by the JSON `spec`
on `inputs` (x, [residual], [weight]) and returns its outputs. It is a
`triton_op`, so when it is traced with functionalization (as braze's passes
do, and as AOTAutograd does for user code) the Triton kernel launch itself
lands in the graph and Inductor launches it directly. On CPU tensors it calls
`fused_rowwise_cpu`, which runs the same generated kernel under the Triton
interpreter, or the pure-torch reference (`set_cpu_backend`).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.cache import rowwise_kernel
from braze.patterns.reference import row_chain_reference
from braze.patterns.stages import RowChain, to_dtype

_CPU_BACKENDS = ("interpret", "reference")
# Per-element divides with IEEE rounding (as eager PyTorch) on the GPU: off, it
# doubles the kernel time; the fast divide is what Inductor emits too. The
# interpreter always divides exactly.
DIV_RN = False
_cpu_backend = os.environ.get("BRAZE_CPU_BACKEND", "interpret")


def set_cpu_backend(name: str) -> str:
    """How fused ops run on CPU tensors: "interpret" (the Triton kernel) or "reference"; returns the old one."""
    global _cpu_backend
    if name not in _CPU_BACKENDS:
        raise ValueError(f"cpu backend {name!r} is not one of {_CPU_BACKENDS}")
    old, _cpu_backend = _cpu_backend, name
    return old


def cpu_backend() -> str:
    """The CPU execution in effect: "interpret" only when Triton runs in interpreter mode.

    The interpreter needs TRITON_INTERPRET=1 before `triton` is first imported
    (Triton's own reductions are JIT functions otherwise); without it braze
    runs the pure-torch reference on CPU.
    """
    if _cpu_backend == "interpret" and _interpreter_ready():
        return "interpret"
    return "reference"


@functools.cache
def interpreted(kernel):
    """A @triton.jit kernel as Triton's interpreter runs it on CPU tensors (launched like the kernel)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def _interpreter_ready() -> bool:
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


def _empty_outputs(chain: RowChain, x: torch.Tensor) -> list[torch.Tensor]:
    lead = x.shape[:-1]
    return [torch.empty((*lead, *trail), dtype=to_dtype(dt), device=x.device) for _, dt, trail in chain.output_specs()]


def _as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [N, width] with unit element stride, copying only if it must."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, width)


def _gate_rows(z: torch.Tensor, width: int) -> list[object]:
    """z, its token and head strides, and heads per token: a [T, H, width] z with unit element stride is
    read in place (rows t·H + h, as x's rows), whatever its token stride; anything else as [N, width] rows."""
    if z.dim() == 3 and z.shape[-1] == width and z.stride(-1) == 1 and z.shape[1] > 0:
        return [z, z.stride(0), z.stride(1), z.shape[1]]
    z = _as_rows(z, width)
    return [z, z.stride(0), 0, 1]


def _launch_args(chain: RowChain, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> tuple[list, dict]:
    named = dict(zip(chain.input_names(), inputs))
    x = _as_rows(named["x"], chain.width)
    args: list[object] = [x, x.stride(0)]
    if chain.residual:
        r = _as_rows(named["residual"], chain.width)
        args += [r, r.stride(0)]
    if chain.norm.has_weight:
        args.append(named["weight"].contiguous())
    if chain.gate is not None:
        args += _gate_rows(named["gate"], chain.width)
    args += outs
    args.append(x.shape[0])
    return args, x.shape[0]


def _constexprs(chain: RowChain, kernel, *, interpreted: bool) -> dict:
    src = kernel.source
    return dict(D=chain.width, G=chain.n_groups, GS=chain.width // chain.n_groups,
                BLOCK_G=src.block_g, BLOCK_GS=src.block_gs,
                SOFT_ROUND=interpreted, DIV_RN=interpreted or DIV_RN)


@triton_op("braze::fused_rowwise", mutates_args=())
def fused_rowwise(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    if inputs[0].device.type == "cpu":
        return torch.ops.braze.fused_rowwise_cpu(inputs, spec)
    chain = RowChain.from_json(spec)
    kernel = rowwise_kernel(chain)
    outs = _empty_outputs(chain, inputs[0])
    args, n_rows = _launch_args(chain, inputs, outs)
    wrap_triton(kernel.jit)[(n_rows,)](*args, **_constexprs(chain, kernel, interpreted=False),
                                       num_warps=kernel.source.num_warps)
    return outs


@custom_op("braze::fused_rowwise_cpu", mutates_args=())
def fused_rowwise_cpu(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    chain = RowChain.from_json(spec)
    if cpu_backend() == "reference":
        return row_chain_reference(chain, inputs)
    kernel = rowwise_kernel(chain)
    outs = _empty_outputs(chain, inputs[0])
    args, n_rows = _launch_args(chain, inputs, outs)
    if n_rows > 0:
        kernel.interpreted[(n_rows,)](*args, **_constexprs(chain, kernel, interpreted=True))
    return outs


@fused_rowwise_cpu.register_fake
def _(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    return _empty_outputs(RowChain.from_json(spec), inputs[0])

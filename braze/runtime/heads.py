"""The fused head-chain ops: `braze::fused_heads` (CUDA, a `triton_op`) and its CPU twin.

`fused_heads(inputs, caches, spec)` runs the HeadChain described by the JSON `spec`:
norm -> RoPE per token, returning the result if the chain has an output, and writing
it in place into `caches[0]` at the slot indices if the chain has a cache write.
Traced with functionalization, the kernel launch lands in the graph with the cache
as its only cloned argument, which Inductor reinplaces when the cache is a graph
input written back at the end (CHAIN_DESIGN.md).
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.cache import heads_kernel
from braze.patterns.reference import head_chain_reference
from braze.patterns.stages import HeadChain, to_dtype

from .rowwise import DIV_RN, cpu_backend


def _outputs(chain: HeadChain, x: torch.Tensor) -> list[torch.Tensor]:
    """The chain's output buffer; a 0-element stand-in when it has none (ops return one Tensor)."""
    shape = (x.shape[0], chain.heads, chain.head_dim) if chain.out else (0,)
    return [torch.empty(shape, dtype=to_dtype(chain.out_dtype), device=x.device)]


def _launch(kernel, fn, chain: HeadChain, inputs: list[torch.Tensor], caches: list[torch.Tensor],
            outs: list[torch.Tensor], interpreted: bool) -> None:
    named = dict(zip(chain.input_names(), inputs))
    x = named["x"]
    t = x.shape[0]
    x2 = x.reshape(t, chain.heads * chain.head_dim) if x.stride(-1) == 1 else x.contiguous().reshape(t, -1)
    args: list[object] = [x2, x2.stride(0)]
    if "weight" in named:
        args.append(named["weight"].contiguous())
    if chain.rope is not None:
        cos, sin = named["cos"], named["sin"]
        cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
        args += [cos, sin, cos.stride(0), sin.stride(0)]
        if chain.gather:
            args.append(named["positions"])
    if chain.write is not None:
        cache = caches[0]
        args += [named["slots"], cache, cache.numel() // (chain.heads * chain.head_dim)]
    if chain.out:
        args += outs
    args.append(t)
    const = dict(kernel.source.constexprs, SOFT_ROUND=interpreted, DIV_RN=interpreted or DIV_RN)
    extra = {} if interpreted else {"num_warps": kernel.source.num_warps}
    fn[(t,)](*args, **const, **extra)


@triton_op("braze::fused_heads", mutates_args=("caches",))
def fused_heads(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str) -> torch.Tensor:
    if inputs[0].device.type == "cpu":
        return torch.ops.braze.fused_heads_cpu(inputs, caches, spec)
    chain = HeadChain.from_json(spec)
    kernel = heads_kernel(chain)
    outs = _outputs(chain, inputs[0])
    _launch(kernel, wrap_triton(kernel.jit), chain, inputs, caches, outs, interpreted=False)
    return outs[0]


@custom_op("braze::fused_heads_cpu", mutates_args=("caches",))
def fused_heads_cpu(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str) -> torch.Tensor:
    chain = HeadChain.from_json(spec)
    outs = _outputs(chain, inputs[0])
    if cpu_backend() == "reference":
        ref = head_chain_reference(chain, inputs, caches)
        return ref[0] if ref else outs[0]
    kernel = heads_kernel(chain)
    if inputs[0].shape[0] > 0:
        _launch(kernel, kernel.interpreted, chain, inputs, caches, outs, interpreted=True)
    return outs[0]


@fused_heads_cpu.register_fake
def _(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str) -> torch.Tensor:
    return _outputs(HeadChain.from_json(spec), inputs[0])[0]


# Chains without a cache write mutate nothing: a pure op, so functionalization adds no
# auto_functionalized wrapper with an empty list of mutated tensors (Inductor's decomposition
# of that left a dangling getitem on torch 2.13).


@triton_op("braze::fused_heads_pure", mutates_args=())
def fused_heads_pure(inputs: list[torch.Tensor], spec: str) -> torch.Tensor:
    if inputs[0].device.type == "cpu":
        return torch.ops.braze.fused_heads_pure_cpu(inputs, spec)
    chain = HeadChain.from_json(spec)
    kernel = heads_kernel(chain)
    outs = _outputs(chain, inputs[0])
    _launch(kernel, wrap_triton(kernel.jit), chain, inputs, [], outs, interpreted=False)
    return outs[0]


@custom_op("braze::fused_heads_pure_cpu", mutates_args=())
def fused_heads_pure_cpu(inputs: list[torch.Tensor], spec: str) -> torch.Tensor:
    return fused_heads_cpu(inputs, [], spec)


@fused_heads_pure_cpu.register_fake
def _(inputs: list[torch.Tensor], spec: str) -> torch.Tensor:
    return _outputs(HeadChain.from_json(spec), inputs[0])[0]

"""The fused head-chain ops: `braze::fused_heads` (CUDA, a `triton_op`) and its CPU twin.

`fused_heads(inputs, caches, spec)` runs the HeadGroup described by the JSON `spec`:
per token and chain, norm -> RoPE -> FP8 quant, the results in one flat output buffer,
the chains with a cache write writing their rows in place into `caches` (in chain order,
then the byte caches of packed fields), and the quant chains' fp8 values and scales into
the flat buffers that end `caches`.
Traced with functionalization, the kernel launch lands in the graph with the caches as
its only cloned arguments, which Inductor reinplaces when each cache is a graph input
written back at the end (CHAIN_DESIGN.md). Groups without a cache write use the pure
`fused_heads_pure`.
"""

from __future__ import annotations

import math

import torch
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.cache import heads_kernel
from braze.patterns.reference import head_group_reference
from braze.patterns.stages import HeadAbsorb, HeadGroup, to_dtype

from .rowwise import DIV_RN, cpu_backend


def _outputs(group: HeadGroup, x: torch.Tensor) -> list[torch.Tensor]:
    """The flat output buffer (chain after chain, each output chain's [T, H, hd]), then each quant
    chain's flat fp8 values and scales."""
    t = x.shape[0]
    flat = torch.empty(t * sum(group.out_widths()), dtype=to_dtype(group.out_dtype), device=x.device)
    quant = [torch.empty(t * math.prod(shape), dtype=to_dtype(dt), device=x.device)
             for dt, shape in group.quant_outputs()]
    return [flat, *quant]


def _chain_args(chain, inputs: list[torch.Tensor], caches: list[torch.Tensor]) -> list[object]:
    if isinstance(chain, HeadAbsorb):  # x [T, H, D], w [H, D, C]: any strides but a unit last one
        x, w = (v if v.stride(-1) == 1 else v.contiguous() for v in inputs)
        return [x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1)]  # then its output buffer (_launch)
    named = dict(zip(chain.input_names(), inputs))
    x = named["x"]
    t = x.shape[0]
    x = x.reshape(t, chain.heads, chain.head_dim) if x.dim() == 2 else x  # [T, H, hd], no copy
    if x.stride(-1) != 1:
        x = x.contiguous()
    args: list[object] = [x, x.stride(0), x.stride(1)]
    if "weight" in named:
        args.append(named["weight"].contiguous())
    if "bias" in named:
        args.append(named["bias"].contiguous())
    if chain.rope is not None:
        cos, sin = named["cos"], named["sin"]
        width = chain.rope.table
        cos = cos.reshape(-1, width) if cos.stride(-1) == 1 else cos.contiguous().reshape(-1, width)
        sin = sin.reshape(-1, width) if sin.stride(-1) == 1 else sin.contiguous().reshape(-1, width)
        if not chain.gather:  # one row per token, or one row broadcast to every token (row stride 0)
            cos, sin = _rows_per_token(cos, t), _rows_per_token(sin, t)
        args += [cos, sin, cos.stride(0), sin.stride(0)]
        if chain.gather:  # one position per token, or one for every token (made T long: the kernel reads pos[row])
            positions = named["positions"].reshape(-1)
            args.append((positions.expand(t) if positions.shape[0] == 1 else positions).contiguous())
    # the kernel reads slots[row] (or slots[0]): unit stride, whatever view the indices came as
    slots = named["slots"].reshape(-1).contiguous() if "slots" in named else None
    if chain.write is not None and chain.write.layout == "bhsd":
        cache = caches[0]
        args += [slots, cache, cache.shape[2], 0 if slots.numel() == 1 else 1, *(cache.stride(i) for i in (0, 1, 2))]
    elif chain.write is not None:
        cache = caches[0]
        args += [slots, cache, cache.numel() // (chain.heads * chain.head_dim)]
    elif chain.fields:
        args.append(slots)
    if chain.product is not None:  # w [T, heads], any strides (a slice of a projection's output)
        w = named["head_weights"].reshape(t, chain.heads)
        args += [w, w.stride(0), w.stride(1)]
    return args


def _rows_per_token(table: torch.Tensor, t: int) -> torch.Tensor:
    if table.shape[0] == t:
        return table
    if table.shape[0] == 1:
        return table.expand(t, table.shape[1])
    raise ValueError(f"RoPE table of {table.shape[0]} rows for {t} tokens (braze's pass admits 1 or T)")


def _launch(kernel, fn, group: HeadGroup, inputs: list[torch.Tensor], caches: list[torch.Tensor],
            outs: list[torch.Tensor], interpreted: bool) -> None:
    args: list[object] = []
    i = c = 0
    quant = iter(outs[1:])
    for chain in group.chains:
        n_in, n_c = len(chain.input_names()), 1 if chain.write is not None else 0
        args += _chain_args(chain, inputs[i:i + n_in], caches[c:c + n_c])
        args += [next(quant) for _ in chain.quant_outputs()]
        i, c = i + n_in, c + n_c
    fields = caches[c:]
    assert len(fields) == group.n_field_caches, (len(fields), group.n_field_caches)
    for cache in fields:  # byte caches the fields write: contiguous uint8 (the pass checks it)
        assert cache.dtype == torch.uint8 and cache.is_contiguous(), (cache.dtype, cache.stride())
    t = inputs[0].shape[0]
    args += [*fields, outs[0], t]
    const = dict(kernel.source.constexprs, SOFT_ROUND=interpreted, DIV_RN=interpreted or DIV_RN)
    extra = {} if interpreted else {"num_warps": kernel.source.num_warps}
    fn[(t, group.program_starts()[-1])](*args, **const, **extra)


def _run(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str, *, quant_in_caches: bool = False
         ) -> list[torch.Tensor]:
    """[flat output, *quant buffers]. `quant_in_caches`: the quant chains' buffers are the last entries of
    `caches`, filled in place (the writing op), rather than allocated here."""
    group = HeadGroup.from_json(spec)
    n_quant = len(group.quant_outputs()) if quant_in_caches else 0
    given = caches[len(caches) - n_quant:]
    caches = caches[:len(caches) - n_quant]
    if inputs[0].device.type == "cpu" and cpu_backend() == "reference":
        outs = head_group_reference(group, inputs, caches)
        for buf, ref in zip(given, outs[1:]):
            buf.copy_(ref.reshape(buf.shape))
        return [outs[0], *given] if n_quant else outs
    outs = _outputs(group, inputs[0])
    if n_quant:
        outs = [outs[0], *given]
    kernel = heads_kernel(group)
    if inputs[0].device.type == "cpu":
        if inputs[0].shape[0] > 0:
            _launch(kernel, kernel.interpreted, group, inputs, caches, outs, interpreted=True)
        return outs
    _launch(kernel, wrap_triton(kernel.jit), group, inputs, caches, outs, interpreted=False)
    return outs


# The writing op returns the flat buffer alone: functionalization (torch 2.11-2.13) rejects a custom
# op that mutates a list and returns a list. A quant chain in a writing group gets its fp8 values and
# scales through buffers the caller allocates and appends to `caches` (mutated in place like a cache).


@triton_op("braze::fused_heads", mutates_args=("caches",))
def fused_heads(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str) -> torch.Tensor:
    if inputs[0].device.type == "cpu":
        return torch.ops.braze.fused_heads_cpu(inputs, caches, spec)
    return _run(inputs, caches, spec, quant_in_caches=True)[0]


@custom_op("braze::fused_heads_cpu", mutates_args=("caches",))
def fused_heads_cpu(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str) -> torch.Tensor:
    return _run(inputs, caches, spec, quant_in_caches=True)[0]


@fused_heads_cpu.register_fake
def _(inputs: list[torch.Tensor], caches: list[torch.Tensor], spec: str) -> torch.Tensor:
    return _outputs(HeadGroup.from_json(spec), inputs[0])[0]


# Groups without a cache write mutate nothing: a pure op, so functionalization adds no
# auto_functionalized wrapper with an empty list of mutated tensors (Inductor's
# decomposition of that left a dangling getitem on torch 2.13).


@triton_op("braze::fused_heads_pure", mutates_args=())
def fused_heads_pure(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    if inputs[0].device.type == "cpu":
        return torch.ops.braze.fused_heads_pure_cpu(inputs, spec)
    return _run(inputs, [], spec)


@custom_op("braze::fused_heads_pure_cpu", mutates_args=())
def fused_heads_pure_cpu(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    return _run(inputs, [], spec)


@fused_heads_pure_cpu.register_fake
def _(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    return _outputs(HeadGroup.from_json(spec), inputs[0])

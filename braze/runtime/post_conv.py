"""The fused Gated DeltaNet post-conv op: `braze::post_conv` (CUDA, a `triton_op`) and its CPU twin.

`post_conv(inputs, state, spec)` runs the PostConv site described by the JSON `spec`
(braze.patterns.gdn): the causal conv update of x [T, C], shifting the conv state rows
`indices` IN PLACE, then each segment's values (L2-normed per head where the spec says),
then g and beta. It returns the outputs in PostConv.output_specs order. Traced with
functionalization, the launch lands in the graph with `state` as its only cloned
argument, which Inductor reinplaces because the state is a graph input written back at
the end (as for the head-chain cache writes, CHAIN_DESIGN.md).
"""

from __future__ import annotations

import math

import torch
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.cache import post_conv_kernel
from braze.patterns.gdn import PostConv, post_conv_reference
from braze.patterns.stages import to_dtype

from .rowwise import DIV_RN, cpu_backend


def _buffers(spec: PostConv, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, (w32, wlo) = x.shape[0], spec.placement()[1]
    return (torch.empty(t * w32, dtype=torch.float32, device=x.device),
            torch.empty(t * wlo, dtype=to_dtype(spec.conv.out), device=x.device))


def unpack(spec: PostConv, buffers: tuple[torch.Tensor, torch.Tensor], t: int) -> list[torch.Tensor]:
    """The op's two flat buffers -> its outputs, each [T, *shape] (views, no copies)."""
    outs = []
    for (buf, off), (_, shape) in zip(spec.placement()[0], spec.output_specs()):
        n = math.prod(shape)
        outs.append(buffers[buf].narrow(0, t * off, t * n).view(t, *shape))
    return outs


def _pack(spec: PostConv, outs: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bufs = _buffers(spec, x)
    for dst, src in zip(unpack(spec, bufs, x.shape[0]), outs):
        dst.copy_(src)
    return bufs


def check(spec: PostConv, inputs: list[torch.Tensor], state: torch.Tensor) -> None:
    named = dict(zip(spec.input_names(), inputs))
    x, C, K, L = named["x"], spec.conv.channels, spec.conv.width, spec.conv.state_len
    if x.dim() != 2 or x.shape[1] != C:
        raise ValueError(f"braze post_conv: x of shape {tuple(x.shape)}, expected [T, {C}]")
    if state.dim() != 3 or tuple(state.shape[1:]) != (C, L) or not state.is_contiguous():
        raise ValueError(f"braze post_conv: state of shape {tuple(state.shape)} (contiguous: "
                         f"{state.is_contiguous()}), expected a contiguous [rows, {C}, {L}]")
    if named["weight"].numel() != C * K:
        raise ValueError(f"braze post_conv: weight of {named['weight'].numel()} values, expected [{C}, {K}]")
    if spec.conv.indexed and named["indices"].numel() != x.shape[0]:
        raise ValueError(f"braze post_conv: {named['indices'].numel()} state indices for {x.shape[0]} tokens")
    if not spec.conv.indexed and state.shape[0] < x.shape[0]:
        raise ValueError(f"braze post_conv: {x.shape[0]} tokens for a state of {state.shape[0]} rows")


def conv_args(spec: PostConv, inputs: list[torch.Tensor], state: torch.Tensor) -> list[object]:
    """The kernel arguments x_ptr .. n_slots [, a_ptr .. dt_ptr] of the site's inputs and state."""
    named = dict(zip(spec.input_names(), inputs))
    x = named["x"]
    if x.stride(-1) != 1:
        x = x.contiguous()
    indices = named["indices"].reshape(-1).contiguous() if spec.conv.indexed else x  # (unread without indices)
    args: list[object] = [x, x.stride(0), named["weight"].contiguous(), indices, state, state.shape[0]]
    if spec.gating:
        hv = spec.gating.heads
        a, b = (t.reshape(-1, hv) if t.stride(-1) == 1 else t.contiguous().reshape(-1, hv)
                for t in (named["a"], named["b"]))
        args += [a, a.stride(0), b, b.stride(0), named["a_log"].contiguous(), named["dt_bias"].contiguous()]
    return args


def _launch(kernel, fn, spec: PostConv, inputs: list[torch.Tensor], state: torch.Tensor,
            bufs: tuple[torch.Tensor, torch.Tensor], interpreted: bool) -> None:
    t = inputs[0].shape[0]
    args = [*conv_args(spec, inputs, state), *bufs, t]
    src = kernel.source
    block = _block(spec)
    extra = {} if interpreted else {"num_warps": src.num_warps}
    fn[(t, src.programs)](*args, BLOCK_D=block, SOFT_ROUND=interpreted, DIV_RN=interpreted or DIV_RN, **extra)


def _block(spec: PostConv) -> int:
    from braze.codegen.post_conv import layout

    return layout(spec)[0]


def _run(inputs: list[torch.Tensor], state: torch.Tensor, spec_json: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = PostConv.from_json(spec_json)
    check(spec, inputs, state)
    if inputs[0].device.type == "cpu" and cpu_backend() == "reference":
        return _pack(spec, post_conv_reference(spec, inputs, state), inputs[0])
    outs = _buffers(spec, inputs[0])
    if inputs[0].shape[0] == 0:
        return outs
    kernel = post_conv_kernel(spec)
    if inputs[0].device.type == "cpu":
        _launch(kernel, kernel.interpreted, spec, inputs, state, outs, interpreted=True)
    else:
        _launch(kernel, wrap_triton(kernel.jit), spec, inputs, state, outs, interpreted=False)
    return outs


# Two flat buffers, not a list of outputs: functionalization (torch 2.11-2.13) rejects a custom op
# that mutates an argument and returns a list.


@triton_op("braze::post_conv", mutates_args=("state",))
def post_conv(inputs: list[torch.Tensor], state: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs[0].device.type == "cpu":
        return torch.ops.braze.post_conv_cpu(inputs, state, spec)
    return _run(inputs, state, spec)


@custom_op("braze::post_conv_cpu", mutates_args=("state",))
def post_conv_cpu(inputs: list[torch.Tensor], state: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(inputs, state, spec)


@post_conv_cpu.register_fake
def _(inputs: list[torch.Tensor], state: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _buffers(PostConv.from_json(spec), inputs[0])


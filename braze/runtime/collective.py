"""Fused collective ops: all-reduce + row chain (`braze::allreduce_rowwise`) and TP-reduced norms (`braze::tp_rmsnorm`).

Both are opaque custom ops (they communicate, so Inductor must not look inside)
with fake functions for tracing. Each picks its path per call from what the
host already knows (the token count, the device, the group's workspace), never
from device values, so every rank picks the same path and a CUDA graph can
capture it:

- CUDA, tokens <= `symm_max_tokens`, a symmetric-memory workspace that fits:
  one Triton kernel does the one-shot all-reduce and the rest
  (`braze.codegen.collective`).
- otherwise: the functional all-reduce on the group's own backend (NCCL, or
  gloo on CPU), then braze's fused kernel (the Triton interpreter or the
  reference on CPU).

The group is the one named in the graph (`group_name`), never the default one.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import custom_op

from braze.codegen.cache import allreduce_chain_kernel, tp_norm_kernel
from braze.patterns.collective import all_reduce_reference
from braze.patterns.stages import RowChain, to_dtype
from braze.patterns.tp_norm import TPNormGroup, finish_reference, local_means_reference

from . import symm_mem
from .rowwise import DIV_RN, _constexprs, _empty_outputs, _launch_args, cpu_backend

# Launches taken by each path since start-up (tests and benchmarks read it; no device sync).
PATH_COUNTS = {"one-shot": 0, "all-reduce+kernel": 0}


def _one_shot_workspace(x: torch.Tensor, rows: int, nbytes: int, group_name: str, symm_max_tokens: int):
    """The workspace for a one-shot launch over `rows` rows sending `nbytes` per rank, or None for NCCL."""
    if x.device.type != "cuda" or rows == 0 or rows > symm_max_tokens:
        return None
    if -(-rows // _programs(x, rows)) > MAX_ROWS_PER_PROGRAM:  # the row loop is unrolled: bound it
        return None
    ws = symm_mem.lookup(group_name)
    if ws is None or not ws.fits(nbytes):
        return None
    return ws


def one_shot_gap(device: torch.device, max_rows: int | None, row_bytes: int, group_name: str,
                 symm_max_tokens: int) -> str | None:
    """Why a CUDA launch of up to `max_rows` rows (None: unbounded) of `row_bytes` each could take the NCCL
    path instead of the one-shot kernel, or None when every such launch takes the one-shot kernel (given a
    workspace: the group's prepared one, or the lazily made default). The compile-time twin of
    `_one_shot_workspace`'s per-call choice."""
    if device.type != "cuda":
        return None
    why = symm_mem.available()
    if why:
        return f"no symmetric memory here ({why})"
    if max_rows is None:
        return "the token count has no upper bound"
    if max_rows > symm_max_tokens:
        return f"up to {max_rows} tokens, above symm_max_tokens={symm_max_tokens}"
    if torch.cuda.is_available():
        limit = MAX_ROWS_PER_PROGRAM * _sm_count(torch.device("cuda", device.index or 0))
        if max_rows > limit:
            return f"up to {max_rows} tokens, above the one-shot kernel's {limit} rows ({MAX_ROWS_PER_PROGRAM} per SM)"
    try:
        world = torch.distributed.distributed_c10d._resolve_process_group(group_name).size()
    except Exception as e:  # noqa: BLE001 - an unknown group: the caller reports it
        return f"the size of group {group_name!r} is unknown here ({type(e).__name__})"
    ws = symm_mem._workspaces.get(group_name)
    half = ws.half_bytes if ws is not None else (symm_mem.LAZY_BYTES // 2) & ~15
    need = max_rows * row_bytes * world
    if need > half:
        return (f"{max_rows} tokens x {row_bytes} bytes x {world} ranks = {need} bytes exceed the workspace half of "
                f"{half} bytes")
    return None


# Programs of a one-shot launch under the Triton interpreter (two, so that tests see a program take
# several rows); on a GPU one per SM at most (see braze.codegen.collective).
INTERPRETER_PROGRAMS = 2
MAX_ROWS_PER_PROGRAM = 4


def _programs(x: torch.Tensor, rows: int) -> int:
    if x.device.type == "cpu":
        return min(rows, INTERPRETER_PROGRAMS)
    return min(rows, _sm_count(x.device))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------
# all-reduce -> residual add -> RMSNorm (-> FP8 quant)


@custom_op("braze::allreduce_rowwise", mutates_args=())
def allreduce_rowwise(inputs: list[torch.Tensor], spec: str, group_name: str,
                      symm_max_tokens: int) -> list[torch.Tensor]:
    """The RowChain `spec` on (sum of inputs[0] over the group, *inputs[1:])."""
    chain = RowChain.from_json(spec)
    x = inputs[0]
    rows = x.numel() // chain.width
    ws = _one_shot_workspace(x, rows, x.numel() * x.element_size(), group_name, symm_max_tokens)
    if ws is not None:
        PATH_COUNTS["one-shot"] += 1
        return _one_shot_chain(chain, inputs, ws)
    PATH_COUNTS["all-reduce+kernel"] += 1
    reduced = all_reduce_reference(x.contiguous(), group_name)
    return torch.ops.braze.fused_rowwise([reduced, *inputs[1:]], spec)


@allreduce_rowwise.register_fake
def _(inputs: list[torch.Tensor], spec: str, group_name: str, symm_max_tokens: int) -> list[torch.Tensor]:
    return _empty_outputs(RowChain.from_json(spec), inputs[0])


def _one_shot_chain(chain: RowChain, inputs: list[torch.Tensor], ws: symm_mem.Workspace) -> list[torch.Tensor]:
    """The one-shot kernel over the workspace `ws` (CPU tensors: under the Triton interpreter, against a
    workspace of shared host memory that tests build; see braze.testing.shared_workspace)."""
    kernel = allreduce_chain_kernel(chain, ws.world_size)
    outs = _empty_outputs(chain, inputs[0])
    args, n_rows = _launch_args(chain, inputs, outs)
    x_args, stage_args = args[:2], args[2:-1]  # _launch_args ends with n_rows
    interpreted = inputs[0].device.type == "cpu"
    launch = kernel.interpreted if interpreted else kernel.jit
    extra = {} if interpreted else {"num_warps": kernel.source.num_warps}
    programs = _programs(inputs[0], n_rows)
    launch[(programs,)](
        *x_args, *stage_args, ws.handle.buffer_ptrs_dev, ws.counters, programs, n_rows,
        **_constexprs(chain, kernel, interpreted=interpreted), RANK=ws.rank, WORLD=ws.world_size,
        HALF_BYTES=ws.half_bytes, ITERS=-(-n_rows // programs), **extra)
    return outs


def allreduce_rowwise_reference(inputs: list[torch.Tensor], spec: str, group_name: str) -> list[torch.Tensor]:
    """Pure torch: the functional all-reduce, then the chain's reference."""
    from braze.patterns.reference import row_chain_reference

    reduced = all_reduce_reference(inputs[0].contiguous(), group_name)
    return row_chain_reference(RowChain.from_json(spec), [reduced, *inputs[1:]])


# ---------------------------------------------------------------------------
# TP-reduced norms: local means -> one packed [T, N] fp32 all-reduce -> normalize


def _tp_outputs(group: TPNormGroup, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    named = dict(zip(group.input_names(), inputs))
    outs = []
    for i, side in enumerate(group.sides):
        x = named[f"x{i}"]
        outs.append(torch.empty((*x.shape[:-1], side.norm.width), dtype=to_dtype(side.norm.out_dtype),
                                device=x.device))
    return outs


def _tp_args(group: TPNormGroup, inputs: list[torch.Tensor], outs: list[torch.Tensor] | None) -> list[object]:
    named = dict(zip(group.input_names(), inputs))
    args: list[object] = []
    for i, side in enumerate(group.sides):
        x = named[f"x{i}"]
        x = x if x.dim() == 2 and x.stride(-1) == 1 else x.contiguous().reshape(-1, side.norm.width)
        args += [x, x.stride(0)]
        if outs is not None:
            if side.norm.has_weight:
                args.append(named[f"w{i}"].contiguous())
            args.append(outs[i])
    return args


def _tp_constexprs(group: TPNormGroup, interpreted: bool) -> dict:
    blocks = {f"BLOCK{i}": 1 << max(0, (s.norm.width - 1).bit_length()) for i, s in enumerate(group.sides)}
    return dict(blocks, SOFT_ROUND=interpreted, DIV_RN=interpreted or DIV_RN)


def _tp_launch(group: TPNormGroup, phase: str, grid_rows: int, args: list, interpreted: bool, **extra) -> None:
    if grid_rows <= 0:
        return
    kernel = tp_norm_kernel(group, phase)
    consts = _tp_constexprs(group, interpreted)
    if interpreted:
        kernel.interpreted[(grid_rows,)](*args, **consts, **extra)
    else:
        kernel.jit[(grid_rows,)](*args, **consts, **extra, num_warps=kernel.source.num_warps)


# The TP norms' one-shot kernel (the exchange of the means inside the normalizing kernel), on unless
# BRAZE_TP_NORM_ONE_SHOT=0, which sends the op to its two small kernels around an NCCL all-reduce of the
# [T, N] means. It hung at T=8 on 4 H100s (commit 4d41bf4: a warp cleared a slot another warp of its
# program had not read); `_emit_take` clears only after a barrier since, and at commit 5e5d852 the
# reproducer, the MiniMax prologue at T=1 and 8 and the MiniMax step at T=8 all ran on 4 H100s.
TP_NORM_ONE_SHOT = os.environ.get("BRAZE_TP_NORM_ONE_SHOT", "1") != "0"


@custom_op("braze::tp_rmsnorm", mutates_args=())
def tp_rmsnorm(inputs: list[torch.Tensor], spec: str, group_name: str, symm_max_tokens: int) -> list[torch.Tensor]:
    """Each side of the TPNormGroup `spec` normalized over its full (all-rank) width."""
    group = TPNormGroup.from_json(spec)
    x0 = inputs[0]
    rows = x0.numel() // group.sides[0].norm.width
    n = len(group.sides)
    ws = _one_shot_workspace(x0, rows, rows * n * 4, group_name, symm_max_tokens) if TP_NORM_ONE_SHOT else None
    if ws is not None:
        PATH_COUNTS["one-shot"] += 1
        return _one_shot_tp(group, inputs, ws)
    PATH_COUNTS["all-reduce+kernel"] += 1
    interpreted = x0.device.type == "cpu"
    if interpreted and cpu_backend() == "reference":
        xs = [dict(zip(group.input_names(), inputs))[f"x{i}"] for i in range(n)]
        means = local_means_reference(group, xs)
        return finish_reference(group, inputs, all_reduce_reference(means.contiguous(), group_name))
    means = torch.empty(rows, n, dtype=torch.float32, device=x0.device)
    _tp_launch(group, "local", rows, _tp_args(group, inputs, None) + [means], interpreted)
    reduced = all_reduce_reference(means, group_name)
    outs = _tp_outputs(group, inputs)
    _tp_launch(group, "finish", rows, _tp_args(group, inputs, outs) + [reduced], interpreted)
    return outs


def _one_shot_tp(group: TPNormGroup, inputs: list[torch.Tensor], ws: symm_mem.Workspace) -> list[torch.Tensor]:
    """One kernel: local means, their exchange over the workspace `ws`, the normalization (CPU tensors: under
    the Triton interpreter, as for _one_shot_chain)."""
    rows = inputs[0].numel() // group.sides[0].norm.width
    outs = _tp_outputs(group, inputs)
    programs = _programs(inputs[0], rows)
    args = _tp_args(group, inputs, outs) + [ws.handle.buffer_ptrs_dev, ws.counters, programs, rows]
    _tp_launch(group, "symm", programs, args, inputs[0].device.type == "cpu", RANK=ws.rank,
               WORLD=ws.world_size, HALF_BYTES=ws.half_bytes, ITERS=-(-rows // programs))
    return outs


@tp_rmsnorm.register_fake
def _(inputs: list[torch.Tensor], spec: str, group_name: str, symm_max_tokens: int) -> list[torch.Tensor]:
    return _tp_outputs(TPNormGroup.from_json(spec), inputs)

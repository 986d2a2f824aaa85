"""Collective kernels: a row chain behind a one-shot all-reduce, and TP-reduced norms, as Triton source.

One-shot all-reduce over PyTorch symmetric memory (peer-to-peer, no multicast):
each rank copies its rows into its own symmetric buffer, meets its peers at a
barrier, reads every peer's rows straight over NVLink, sums them in fp32 in rank
order (so every rank gets bit-identical sums), rounds to the all-reduce's
dtype, and runs the row chain (residual add -> RMSNorm -> FP8 quant) on the
registers it holds. A second barrier keeps a peer from overwriting a buffer
another rank is still reading. Bytes per row of D values and P ranks: read
D·(1 + P) (+ residual, weight), write D (copy in) + the chain's outputs.

The barrier is self-resetting (a signal is set 0 -> 1 by the sender and taken
1 -> 0 by the receiver), so a kernel needs no host-side reset between launches
and can be captured in a CUDA graph. Program `row` of every rank meets program
`row` of its peers in signal slot `row * P + rank`.

TP-reduced norms run as three phases from one generator: "local" (each side's
mean of squares into a [T, N] fp32 tensor), "finish" (normalize with the
all-reduced means), or "symm" (both, with the exchange of means over
symmetric memory in between: one kernel).
"""

from __future__ import annotations

import hashlib

from braze.patterns.stages import RowChain
from braze.patterns.tp_norm import TPNormGroup

from .rowwise import (
    _TL_DTYPE,
    ROW_CONSTEXPRS,
    KernelSource,
    _Emitter,
    _next_pow2,
    emit_mean_square,
    emit_rmsnorm,
    emit_row_tile,
    emit_stages,
    kernel_source,
    stage_params,
    tile,
)

# Appended to every symmetric-memory kernel's module: the cross-rank barrier of one program.
BARRIER_SOURCE = '''

@triton.jit
def _symm_barrier(signal_ptrs, slot, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Program `slot` of every rank meets here; stores before it are visible to every peer after it."""
    tl.debug_barrier()  # every thread's stores are issued before the release below
    pads = signal_ptrs.to(tl.pointer_type(tl.uint64))
    for p in tl.static_range(WORLD):
        remote = tl.load(pads + p).to(tl.pointer_type(tl.int32))
        # a 1 still there is the previous launch's signal, not yet taken by the peer: wait for it
        while tl.atomic_cas(remote + slot * WORLD + RANK, 0, 1, sem="release", scope="sys") != 0:
            pass
    local = tl.load(pads + RANK).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        while tl.atomic_cas(local + slot * WORLD + p, 1, 0, sem="acquire", scope="sys") != 1:
            pass
    tl.debug_barrier()
'''

SYMM_CONSTEXPRS = ["RANK: tl.constexpr", "WORLD: tl.constexpr"]


def _name(prefix: str, signature: str) -> str:
    return f"braze_{prefix}_{hashlib.sha256(signature.encode()).hexdigest()[:12]}"


def generate_allreduce_chain(chain: RowChain, world: int) -> KernelSource:
    """One-shot all-reduce of x over `world` ranks, then `chain`, in one kernel (one program per row)."""
    signature = chain.to_json() + f"|one-shot-all-reduce|world={world}"
    name = _name(f"allreduce_{chain.name}_w{world}", signature)
    block_g, block_gs, num_warps = tile(chain)
    params = ["x_ptr", "x_row_stride", *stage_params(chain), "buf_ptrs", "signal_ptrs", *ROW_CONSTEXPRS,
              *SYMM_CONSTEXPRS]
    elem = _TL_DTYPE[chain.in_dtype]
    em = _Emitter()
    emit_row_tile(em)
    em.line("# one-shot all-reduce: my rows into my symmetric buffer, then every rank's rows summed in rank order")
    em.line("bufs = buf_ptrs.to(tl.pointer_type(tl.uint64))")
    em.line("xin = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0)")
    em.line(f"mine = tl.load(bufs + RANK).to(tl.pointer_type({elem}))")
    em.line("tl.store(mine + row * D + col, xin, mask=mask)")
    em.line("_symm_barrier(signal_ptrs, row, RANK, WORLD)")
    em.line("acc = tl.zeros([BLOCK_G, BLOCK_GS], dtype=tl.float32)")
    em.line("for p in tl.static_range(WORLD):")
    em.indent += 1
    em.line(f"peer = tl.load(bufs + p).to(tl.pointer_type({elem}))")
    em.line("acc += tl.load(peer + row * D + col, mask=mask, other=0.0).to(tl.float32)")
    em.indent -= 1
    x = em.round_to("acc", chain.in_dtype)  # the all-reduce's result, in its dtype
    emit_stages(em, chain, x)
    em.line("_symm_barrier(signal_ptrs, row, RANK, WORLD)  # peers are done reading my rows")
    source = kernel_source("braze.codegen.collective", "one-shot all-reduce + row chain", signature, name, params,
                           em.lines) + BARRIER_SOURCE
    return KernelSource(name, source, block_g, block_gs, num_warps)


PHASES = ("local", "finish", "symm")


def generate_tp_norm(group: TPNormGroup, phase: str) -> KernelSource:
    """A TP-reduced norm group's kernel for `phase` (see the module docstring); one program per row."""
    assert phase in PHASES, phase
    signature = group.to_json() + f"|{phase}"
    name = _name(f"{group.name}_{phase}", signature)
    n = len(group.sides)
    params: list[str] = []
    for i, side in enumerate(group.sides):
        params += [f"x{i}_ptr", f"x{i}_row_stride"]
        if phase != "local":
            params += [f"w{i}_ptr"] if side.norm.has_weight else []
            params.append(f"out{i}_ptr")
    params += ["buf_ptrs", "signal_ptrs"] if phase == "symm" else ["var_ptr"]
    params += [f"BLOCK{i}: tl.constexpr" for i in range(n)]
    params += ["SOFT_ROUND: tl.constexpr", "DIV_RN: tl.constexpr"]
    params += SYMM_CONSTEXPRS if phase == "symm" else []
    widest = max(_next_pow2(s.norm.width) for s in group.sides)
    num_warps = 1 if widest <= 256 else 2 if widest <= 1024 else 4 if widest <= 4096 else 8

    em = _Emitter()
    em.line("row = tl.program_id(0).to(tl.int64)")
    means = []
    for i, side in enumerate(group.sides):
        _select_side(em, i, side.norm.width)
        em.line(f"x{i} = tl.load(x{i}_ptr + row * x{i}_row_stride + col, mask=mask, other=0.0).to(tl.float32)")
        if phase != "finish":
            means.append(emit_mean_square(em, side.norm, f"x{i}"))
    if phase == "local":
        for i, m in enumerate(means):
            em.line(f"tl.store(var_ptr + row * {n} + {i}, {m})")
    elif phase == "symm":
        em.line(f"# exchange of the [T, {n}] means: mine into my symmetric buffer, every rank's summed in rank order")
        em.line("bufs = buf_ptrs.to(tl.pointer_type(tl.uint64))")
        em.line("mine = tl.load(bufs + RANK).to(tl.pointer_type(tl.float32))")
        for i, m in enumerate(means):
            em.line(f"tl.store(mine + row * {n} + {i}, {m})")
        em.line("_symm_barrier(signal_ptrs, row, RANK, WORLD)")
        em.line("peer = tl.load(bufs).to(tl.pointer_type(tl.float32))")
        for i in range(n):
            em.line(f"v{i} = tl.load(peer + row * {n} + {i})")
        em.line("for p in tl.static_range(1, WORLD):")
        em.indent += 1
        em.line("peer = tl.load(bufs + p).to(tl.pointer_type(tl.float32))")
        for i in range(n):
            em.line(f"v{i} += tl.load(peer + row * {n} + {i})")
        em.indent -= 1
    if phase != "local":
        for i, side in enumerate(group.sides):
            v = f"v{i}" if phase == "symm" else em.let(f"tl.load(var_ptr + row * {n} + {i})", "v")
            for op in side.post:
                v = em.unary(v, op)
            _select_side(em, i, side.norm.width)
            y = emit_rmsnorm(em, side.norm, f"x{i}", mean=v, w_ptr=f"w{i}_ptr")
            em.line(f"tl.store(out{i}_ptr + row * {side.norm.width} + col, "
                    f"{y}.to({_TL_DTYPE[side.norm.out_dtype]}), mask=mask)")
    if phase == "symm":
        em.line("_symm_barrier(signal_ptrs, row, RANK, WORLD)  # peers are done reading my means")
    source = kernel_source("braze.codegen.collective", f"TP-reduced norms ({phase})", signature, name, params,
                           em.lines)
    if phase == "symm":
        source += BARRIER_SOURCE
    return KernelSource(name, source, 1, 1, num_warps)


def _select_side(em: _Emitter, i: int, width: int) -> None:
    """Point `col`/`mask` (the names the norm emitter reads) at side i's row: a [1, BLOCK_i] tile."""
    em.line(f"col = tl.arange(0, BLOCK{i})[None, :]")
    em.line(f"mask = col < {width}")

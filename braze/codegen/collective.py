"""Collective kernels: a row chain behind a one-shot all-reduce, and TP-reduced norms, as Triton source.

One-shot all-reduce over PyTorch symmetric memory (peer-to-peer, no multicast), with no barrier:
each rank *pushes* its rows straight into every peer's symmetric buffer over NVLink (16-byte
stores), then reads the peers' rows from its *own* buffer, polling until no element holds the
sentinel (all bits set: a NaN pattern the sender never sends, it sends another NaN instead), sums
every rank's row in rank order in fp32 (so every rank gets bit-identical sums), rounds to the
all-reduce's dtype and runs the row chain on the registers it holds. Each element it read it sets
back to the sentinel, so the buffer is all sentinel again when the launch ends (the invariant every
launch starts from), once every warp of the program has read it (a CTA barrier: an element several warps
hold must not be cleared under a warp that has not read it yet). An element is written once per launch, so "not the sentinel" means "arrived":
no flag, no fence, no second barrier.

The buffer has two halves, used by alternate launches: a peer that has finished launch k may start
pushing launch k+1 while this rank still reads launch k, but only into the other half; it cannot
reach launch k+2 (the first half again) before this rank has pushed its launch k+1 rows, which it
does only after launch k. Which half a launch uses comes from a per-rank device counter (the launch
count, the same on every rank as every rank runs the same launches), read by every program at the
start and advanced by the last program to finish, so the kernel needs no host state, no reset
between launches, and replays in a CUDA graph.

Layout of one half: element (row, rank q, column c) at (row * WORLD + q) * D + c, each rank's rows
in its own slot. Bytes per rank and row of D values: push D·(P-1) over NVLink, read D·(P-1)
locally, clear D·(P-1), plus the chain's own traffic.

Programs: at most one per SM (every program resident, so a program polling for a peer never keeps
the peer's pushing program from running); a program takes rows pid, pid + nprog, ... and pushes all
of them before it polls any.

TP-reduced norms run as three phases from one generator: "local" (each side's mean of squares into
a [T, N] fp32 tensor), "finish" (normalize with the all-reduced means), or "symm" (both, with the
exchange of the means over symmetric memory as above in between: one kernel).
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
    emit_stages,
    kernel_source,
    stage_params,
    tile,
)

# The integer type a value of each exchanged dtype travels as (its bits), and the sentinel (all bits set).
BITS = {"bfloat16": "tl.int16", "float16": "tl.int16", "float32": "tl.int32"}
SENTINEL = -1
# What a value whose bits are the sentinel is sent as: another NaN (the sum is NaN either way).
CANONICAL_NAN = {"bfloat16": 0x7FFF, "float16": 0x7FFF, "float32": 0x7FFFFFFF}
SYMM_PARAMS = ["buf_ptrs", "ctr_ptr", "nprog"]  # nprog: the grid
# ITERS: rows per program, ceil(rows / nprog), unrolled (the interpreter cannot loop to a runtime bound)
SYMM_CONSTEXPRS = ["RANK: tl.constexpr", "WORLD: tl.constexpr", "HALF_BYTES: tl.constexpr", "ITERS: tl.constexpr"]


def _name(prefix: str, signature: str) -> str:
    return f"braze_{prefix}_{hashlib.sha256(signature.encode()).hexdigest()[:12]}"


def _emit_prologue(em: _Emitter) -> None:
    """The launch's half of every buffer, from the device launch counter, and the peer address table."""
    em.line("pid = tl.program_id(0)")
    em.line("epoch = tl.load(ctr_ptr)  # launches on this workspace so far: the same count on every rank")
    em.line("half = (epoch & 1).to(tl.uint64) * HALF_BYTES")
    em.line("bufs = buf_ptrs.to(tl.pointer_type(tl.uint64))")


def _emit_epilogue(em: _Emitter) -> None:
    """The last program to finish advances the launch counter (every other one has read it by then: its
    read feeds every address it pushed to and polled, all before its increment). A single program just
    stores it."""
    em.line("if nprog == 1:")
    em.line("    tl.store(ctr_ptr, epoch + 1)")
    em.line("else:")
    em.line("    done = tl.atomic_add(ctr_ptr + 1, 1, sem='relaxed', scope='gpu')")
    em.line("    if done == nprog - 1:")
    em.line("        tl.store(ctr_ptr + 1, 0)")
    em.line("        tl.store(ctr_ptr, epoch + 1)")


def _peer_base(p: str, bits: str) -> str:
    """Rank p's buffer, this launch's half, as a 16-byte aligned pointer to `bits`."""
    return f"tl.multiple_of((tl.load(bufs + {p}) + half).to(tl.pointer_type({bits})), 16)"


def _emit_push(em: _Emitter, value: str, offset: str, mask: str, bits: str) -> None:
    """Store `value` (bits) at `offset` of this rank's slot in every peer's buffer."""
    em.line("for q in tl.static_range(WORLD):")
    em.line("    if q != RANK:")
    em.line(f"        tl.store({_peer_base('q', bits)} + {offset}, {value}, mask={mask})")


def _emit_take(em: _Emitter, slot: str, mask: str, shape: str, bits: str, out: str, probe: str | None = None) -> None:
    """Poll this rank's buffer at `slot` until no element is the sentinel, then set it back to the sentinel.
    With `probe` (one element of the slot), first spin on that one value: a whole row re-read in a loop by
    every waiting program would compete with the incoming NVLink writes for the L2."""
    if probe is not None:
        em.line(f"while tl.load({probe}, volatile=True) == {SENTINEL}:")
        em.line("    pass")
    em.line(f"{out} = tl.load({slot}, mask={mask}, other=0, volatile=True)")
    em.line(f"while tl.max(tl.where({mask} & ({out} == {SENTINEL}), 1, 0)) > 0:")
    em.line(f"    {out} = tl.load({slot}, mask={mask}, other=0, volatile=True)")
    # Several warps can hold the same element (the probe; a tile smaller than the program, as the TP norms'
    # [N] means): a warp that cleared it before a slower one had read it would leave that one polling
    # forever (seen: the MiniMax prologue at TP=4, T=8, hung in CUDA-graph replays). Clear only after
    # every warp of the program has read the slot.
    em.line("tl.debug_barrier()")
    em.line(f"tl.store({slot}, tl.full({shape}, {SENTINEL}, {bits}), mask={mask})")


def generate_allreduce_chain(chain: RowChain, world: int) -> KernelSource:
    """One-shot all-reduce of x over `world` ranks, then `chain`, in one kernel (see the module docstring)."""
    signature = chain.to_json() + f"|one-shot-all-reduce-push|world={world}"
    name = _name(f"allreduce_{chain.name}_w{world}", signature)
    block_g, block_gs, num_warps = tile(chain)
    # twice the row kernel's warps: more 16-byte stores and loads in flight per program (a sweep on 2 H100s,
    # benchmarks/collective_pieces.py --sweep, favoured it at 7168 and 3072 values per row)
    num_warps = min(16, 2 * num_warps)
    params = ["x_ptr", "x_row_stride", *stage_params(chain), *SYMM_PARAMS, *ROW_CONSTEXPRS, *SYMM_CONSTEXPRS]
    elem, bits = _TL_DTYPE[chain.in_dtype], BITS[chain.in_dtype]
    shape = "[BLOCK_G, BLOCK_GS]"
    em = _Emitter()
    _emit_prologue(em)
    em.line("g = tl.arange(0, BLOCK_G)[:, None]")
    em.line("e = tl.arange(0, BLOCK_GS)[None, :]")
    em.line("col = g * GS + e  # [BLOCK_G, BLOCK_GS]: element (group, i) of the row")
    em.line("mask = (g < G) & (e < GS)")
    em.line("# push: every row of this program into this rank's slot of every peer's buffer")
    em.line("for it in tl.static_range(ITERS):")
    em.line("    prow = (pid + it * nprog).to(tl.int64)")
    em.line("    if prow < n_rows:")
    em.indent += 2
    em.line(f"xb = tl.load(x_ptr + prow * x_row_stride + col, mask=mask, other=0.0).to({bits}, bitcast=True)")
    em.line(f"xb = tl.where(xb == {SENTINEL}, {CANONICAL_NAN[chain.in_dtype]}, xb)")
    _emit_push(em, "xb", "(prow * WORLD + RANK) * D + col", "mask", bits)
    em.indent -= 2
    em.line(f"mine = {_peer_base('RANK', bits)}")
    if chain.norm.has_weight:
        em.line("w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)  # before any wait")
    em.line("# sum: every rank's row in rank order, in fp32; this rank's own from x")
    em.line("for it in tl.static_range(ITERS):")
    em.line("    row = (pid + it * nprog).to(tl.int64)")
    em.line("    if row < n_rows:")
    em.indent += 2
    em.line("# this rank's row and the residual load while the peers' rows are on their way")
    em.line("xs = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0).to(tl.float32)")
    if chain.residual:
        em.line("r = tl.load(r_ptr + row * r_row_stride + col, mask=mask, other=0.0).to(tl.float32)")
    em.line(f"acc = tl.zeros({shape}, dtype=tl.float32)")
    em.line("for p in tl.static_range(WORLD):")
    em.line("    if p == RANK:")
    em.line("        acc += xs")
    em.line("    else:")
    em.indent += 2
    _emit_take(em, "mine + (row * WORLD + p) * D + col", "mask", shape, bits, "vb",
               probe="mine + (row * WORLD + p) * D + (D - 1)")
    em.line(f"acc += vb.to({elem}, bitcast=True).to(tl.float32)")
    em.indent -= 2
    x = em.round_to("acc", chain.in_dtype)  # the all-reduce's result, in its dtype
    emit_stages(em, chain, x, preloaded=True)
    em.indent -= 2
    _emit_epilogue(em)
    source = kernel_source("braze.codegen.collective", "one-shot all-reduce + row chain", signature, name, params,
                           em.lines)
    return KernelSource(name, source, block_g, block_gs, num_warps)


PHASES = ("local", "finish", "symm")


def generate_tp_norm(group: TPNormGroup, phase: str) -> KernelSource:
    """A TP-reduced norm group's kernel for `phase` (see the module docstring)."""
    assert phase in PHASES, phase
    signature = group.to_json() + f"|{phase}" + ("-push" if phase == "symm" else "")
    name = _name(f"{group.name}_{phase}", signature)
    n = len(group.sides)
    params: list[str] = []
    for i, side in enumerate(group.sides):
        params += [f"x{i}_ptr", f"x{i}_row_stride"]
        if phase != "local":
            params += [f"w{i}_ptr"] if side.norm.has_weight else []
            params.append(f"out{i}_ptr")
    params += SYMM_PARAMS + ["n_rows"] if phase == "symm" else ["var_ptr"]
    params += [f"BLOCK{i}: tl.constexpr" for i in range(n)]
    params += ["SOFT_ROUND: tl.constexpr", "DIV_RN: tl.constexpr"]
    params += SYMM_CONSTEXPRS if phase == "symm" else []
    widest = max(_next_pow2(s.norm.width) for s in group.sides)
    num_warps = 1 if widest <= 256 else 2 if widest <= 1024 else 4 if widest <= 4096 else 8

    em = _Emitter()
    if phase == "symm":
        # one row per iteration: push this rank's means, take the peers' (program pid of every rank takes
        # the same rows in the same order, so each has pushed before it polls)
        _emit_prologue(em)
        em.line(f"k = tl.arange(0, {_next_pow2(n)})  # the group's means of one row, as a vector")
        em.line(f"kmask = k < {n}")
        em.line(f"mine = {_peer_base('RANK', 'tl.int32')}")
        for i, side in enumerate(group.sides):  # the weights, before any wait
            if side.norm.has_weight:
                _select_side(em, i, side.norm.width)
                em.line(f"wl{i} = tl.load(w{i}_ptr + col, mask=mask, other=0.0).to(tl.float32)")
        em.line("for it in tl.static_range(ITERS):")
        em.line("    row = (pid + it * nprog).to(tl.int64)")
        em.line("    if row < n_rows:")
        em.indent += 2
    else:
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
        em.line("mv = tl.zeros(k.shape, dtype=tl.float32)")
        for i, m in enumerate(means):
            em.line(f"mv = tl.where(k == {i}, {m}, mv)")
        em.line("mb = mv.to(tl.int32, bitcast=True)")
        em.line(f"mb = tl.where(mb == {SENTINEL}, {CANONICAL_NAN['float32']}, mb)")
        _emit_push(em, "mb", f"(row * WORLD + RANK) * {n} + k", "kmask", "tl.int32")
        em.line("vs = tl.zeros(k.shape, dtype=tl.float32)")
        em.line("for p in tl.static_range(WORLD):")
        em.line("    if p == RANK:")
        em.line("        vs += mv")
        em.line("    else:")
        em.indent += 2
        _emit_take(em, f"mine + (row * WORLD + p) * {n} + k", "kmask", "k.shape", "tl.int32", "pb")
        em.line("vs += pb.to(tl.float32, bitcast=True)")
        em.indent -= 2
        for i in range(n):
            em.line(f"v{i} = tl.sum(tl.where(k == {i}, vs, 0.0), axis=0)")
    if phase != "local":
        for i, side in enumerate(group.sides):
            v = f"v{i}" if phase == "symm" else em.let(f"tl.load(var_ptr + row * {n} + {i})", "v")
            for op in side.post:
                v = em.unary(v, op)
            _select_side(em, i, side.norm.width)
            y = emit_rmsnorm(em, side.norm, f"x{i}", mean=v, w_ptr=f"w{i}_ptr",
                             w_loaded=f"wl{i}" if phase == "symm" and side.norm.has_weight else None)
            em.line(f"tl.store(out{i}_ptr + row * {side.norm.width} + col, "
                    f"{y}.to({_TL_DTYPE[side.norm.out_dtype]}), mask=mask)")
    if phase == "symm":
        em.indent -= 2
        _emit_epilogue(em)
    source = kernel_source("braze.codegen.collective", f"TP-reduced norms ({phase})", signature, name, params,
                           em.lines)
    return KernelSource(name, source, 1, 1, num_warps)


def _select_side(em: _Emitter, i: int, width: int) -> None:
    """Point `col`/`mask` (the names the norm emitter reads) at side i's row: a [1, BLOCK_i] tile."""
    em.line(f"col = tl.arange(0, BLOCK{i})[None, :]")
    em.line(f"mask = col < {width}")

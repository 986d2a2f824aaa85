"""`python -m braze bench`: one decode step of a built-in model under eager, stock Inductor and braze, side
by side on the same model object and the same inputs.

    python -m braze bench --model all --size bench --tokens 1,8,64 [--context 512] [--fp8] [--quick]
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --nproc-per-node 2 -m braze bench --model minimax-m2.5 ...   # tensor parallel (NCCL)

For each model: build it once (max_batch = the largest T, max_context = context + 1), prefill that
many random sequences once, snapshot every buffer (the caches the step writes in place), and for each
T take the first T sequences. Then per T, per variant (caches restored before every run):

- correctness: the variant's logits against one eager step (relative Frobenius error, max |diff|,
  per-token errors, top-1 agreement; NaN fails; a few tokens off at MoE-router near-ties pass, flagged:
  `braze.bench_checks.compare_logits`), and the caches it wrote against eager's; where the step takes
  the sparse MoE path, eager's sparse path is also checked against its dense path on the device;
- kernels per step: the profiler's CUDA activity of one step (memcpy/memset counted apart), and for
  braze its report's kernels per layer;
- time per step: the step captured in a CUDA graph, median of many replays, device events;
- compile time (first call) and peak GPU memory;
- the floor (`braze.bench_floor`): bytes that must move over the measured copy bandwidth, and weight
  GEMM flops over the measured matmul rate.

Shapes: by default T is marked dynamic (`--shapes dynamic`), as vLLM compiles one graph for all batch
sizes and captures a CUDA graph per size. T=1 gets its own graph (Dynamo specializes size 1, and the step
takes the sparse MoE path there) and the T > 1 steps share one wherever the shape-decided choices agree:
2 compiled variants × 2 graphs per model at T = 1,8,64 instead of × 3, because compile time dominates the
run (a cold Inductor compile of one bench model is 20-40 s). Kernel counts and times are still measured
per T. `--shapes static` compiles every T on its own (`dynamic=False`), so each graph and braze's
per-token-count decisions are exact for that T; it costs a third more compile time.

Results go to `--out` as `<model>_<size>_tp<P>[_fp8][_cpu].{json,md,png}`, rewritten after every T so a
run cut short keeps what it measured; only rank 0 writes. On CPU (`--device cpu`) nothing is captured
or profiled and times are wall clock, labelled as not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from braze import bench_device as dev
from braze.bench_checks import CacheSnapshot, compare_logits, compare_state, dense_moe, router_margins
from braze.bench_floor import decode_floor
from braze.bench_variants import EXTRA_VARIANTS, VARIANTS, Variants, dynamo_limits

TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-3}  # relative Frobenius error of the logits vs eager
FP8_TOLERANCE = 1e-1  # FP8 activation quant can round a value to the next step when upstream math differs


def add_arguments(p: argparse.ArgumentParser) -> None:
    from braze.models import MODEL_NAMES

    p.add_argument("--model", default="all", help=f"all, or a comma list of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"))
    p.add_argument("--tokens", default="1,8,64", help="decode-step sizes T (sequences, one token each)")
    p.add_argument("--context", type=int, default=512, help="cached tokens per sequence before the step")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of: {', '.join(VARIANTS + EXTRA_VARIANTS)} (braze: FusionConfig(); each "
                        "braze-* variant sets the switches of braze.bench_variants.VARIANT_SWITCHES)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON, markdown and PNG")
    p.add_argument("--fp8", action="store_true", help="FP8 linear layers (each model's released scheme)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the benchmark) or cpu (a smoke run: wall clock, no graphs, not comparable)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--quick", action="store_true", help="fewer warm-ups and replays (3 and 20 instead of 10 and 100)")
    p.add_argument("--replays", type=int, help="timed CUDA-graph replays (overrides --quick)")
    p.add_argument("--tol", type=float, help="max relative error of the logits vs eager "
                                             "(default 5e-2 bf16, 1e-3 fp32, 1e-1 with --fp8)")
    p.add_argument("--budget-s", type=float, help="stop starting new variants after this many seconds "
                                                  "(the rest are recorded as skipped); results are still written")
    p.add_argument("--shapes", default="dynamic", choices=("dynamic", "static"),
                   help="dynamic (default): T marked dynamic, one compile per variant for T=1 and one shared by "
                        "the T>1 steps; static: one compile per T and variant (exact per-T graphs, 1/3 slower)")
    p.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    size: str
    tokens: tuple[int, ...]
    context: int
    variants: tuple[str, ...]
    out: Path
    fp8: bool
    dtype: torch.dtype
    warmup: int
    replays: int
    cpu_repeats: int
    tol: float
    budget_s: float | None
    shapes: str
    seed: int
    command: str


@dataclass
class Context:
    """Where this process runs: its device, its rank in the TP group, the card's measured ceilings."""

    device: torch.device
    rank: int = 0
    world: int = 1
    group: object = None
    env: dict = dataclasses.field(default_factory=dict)
    copy_bw: float = 0.0
    matmul_rate: float | None = None
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[bench {time.perf_counter() - self.start:7.1f}s] {msg}", flush=True)

    def gather(self, obj: object) -> list:
        """`obj` from every rank (all ranks must call this in the same order)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def settings_from_args(args: argparse.Namespace, argv: list[str] | None) -> Settings:
    """Validate the arguments (ValueError says which and why)."""
    from braze.models import MODEL_NAMES

    models = MODEL_NAMES if args.model == "all" else tuple(m.strip() for m in args.model.split(",") if m.strip())
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        raise ValueError(f"--model {args.model!r}: unknown {unknown}; expected 'all' or some of {MODEL_NAMES}")
    try:
        tokens = tuple(sorted({int(t) for t in args.tokens.split(",") if t.strip()}))
    except ValueError:
        raise ValueError(f"--tokens {args.tokens!r}: expected a comma list of positive integers, e.g. 1,8,64") from None
    if not tokens or tokens[0] < 1:
        raise ValueError(f"--tokens {args.tokens!r}: expected a comma list of positive integers, e.g. 1,8,64")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS + EXTRA_VARIANTS for v in variants):
        raise ValueError(f"--variants {args.variants!r}: expected a comma list of {VARIANTS + EXTRA_VARIANTS}")
    if args.context < 1:
        raise ValueError(f"--context {args.context}: expected at least 1 cached token")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    tol = args.tol if args.tol is not None else (FP8_TOLERANCE if args.fp8 else TOLERANCE[dtype])
    warmup, replays = (3, 20) if args.quick else (10, 100)
    argv = list(argv) if argv is not None else sys.argv[1:]
    launcher = f"torchrun --nproc-per-node {os.environ.get('WORLD_SIZE')} -m braze" \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python -m braze"
    return Settings(models, args.size, tokens, args.context, variants, Path(args.out), args.fp8, dtype, warmup,
                    args.replays or replays, 1 if args.quick else 3, tol, args.budget_s, args.shapes, args.seed,
                    f"{launcher} {' '.join(argv)}")


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------


def bench_command(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 if every variant ran and matched eager, 1 if any failed or was skipped, 2 on
    bad usage or without the requested device."""
    try:
        s = settings_from_args(args, argv)
    except ValueError as e:
        print(f"python -m braze bench: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m braze bench: no CUDA GPU on this machine (torch.cuda.is_available() is False). The "
              "benchmark times CUDA graphs on a GPU; for a CPU smoke run, whose numbers are not comparable, "
              "pass --device cpu.", file=sys.stderr)
        return 2
    ctx = _setup(torch.device(args.device))
    try:
        ok = True
        with dynamo_limits():
            for name in s.models:
                ok &= bench_model(name, s, ctx)
        ctx.log("done: every variant ran and matched eager" if ok else
                "done: some variant failed, mismatched eager or was skipped (see the tables)")
        return 0 if ok else 1
    finally:
        if ctx.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _setup(device: torch.device) -> Context:
    """Join the TP group when launched by torchrun; measure the card's ceilings."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = Context(device)
    if world > 1:
        import datetime

        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
            ctx.device = torch.device("cuda", local)
            dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5), device_id=ctx.device)
        else:
            dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
        ctx.rank, ctx.world, ctx.group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    ctx.env = dev.environment(ctx.device)
    if ctx.device.type == "cuda":
        ctx.copy_bw = dev.copy_bandwidth(ctx.device)
        ctx.matmul_rate = dev.matmul_rate(ctx.device, torch.bfloat16)
    else:
        ctx.copy_bw = dev.copy_bandwidth(ctx.device, nbytes=1 << 26, repeats=3)
    ctx.log(f"{ctx.env['card']}: copy {ctx.copy_bw / 1e9:.0f} GB/s"
            + (f", bf16 matmul {ctx.matmul_rate / 1e12:.0f} TFLOP/s" if ctx.matmul_rate else "")
            + (f", TP={ctx.world}" if ctx.world > 1 else ""))
    return ctx


# ----------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------


@torch.no_grad()
def bench_model(name: str, s: Settings, ctx: Context) -> bool:
    """Every T and variant of one model; True if all ran and matched eager. Never raises: a model that
    cannot be built or prefilled is reported and the run moves on."""
    if s.budget_s is not None and any(ctx.gather(time.perf_counter() - ctx.start > s.budget_s)):
        ctx.log(f"{name}: skipped, the time budget of {s.budget_s:.0f} s is spent")
        return False
    try:
        return _bench_model(name, s, ctx)
    except Exception:
        print(f"[rank {ctx.rank}] {name} failed outside any variant:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        return False
    finally:
        torch._dynamo.reset()
        _release(ctx.device)


def _bench_model(name: str, s: Settings, ctx: Context) -> bool:
    from braze import models

    ctx.log(f"{name} ({s.size}): building, max_batch={max(s.tokens)}, context={s.context}")
    model = models.build(name, s.size, device=ctx.device, dtype=s.dtype, group=ctx.group, fp8=s.fp8,
                         max_batch=max(s.tokens), max_context=s.context + 1, seed=s.seed)
    model.eval()
    gen = torch.Generator().manual_seed(s.seed)
    full = models.make_decode_inputs(model, max(s.tokens), s.context, gen)  # prefill max(T) sequences
    dev.synchronize(ctx.device)
    snapshot = CacheSnapshot(model)
    doc = {"meta": _meta(s, ctx), "model": _model_info(name, model, s, ctx), "floors": {}, "checks": {},
           "rows": []}
    ok = True
    variants = Variants(model, s.shapes)
    for T in s.tokens:
        batch = tuple(x[:T] for x in full)  # sequences 0..T-1, each one new token
        floor = decode_floor(model, T, s.context, batch)
        times = floor.seconds(ctx.copy_bw, ctx.matmul_rate)
        doc["floors"][str(T)] = {**floor.to_dict(), **times, "moe_path": _moe_path(model, T)}
        ctx.log(f"{name} T={T}: floor {times['floor_s'] * 1e6:.1f} us ({floor.total_bytes / 1e9:.3f} GB), "
                f"MoE {doc['floors'][str(T)]['moe_path']}")
        try:
            ref_logits, ref_state, margin, checks = _reference(model, batch, snapshot, s, ctx)
        except Exception as e:  # without eager there is nothing to compare against: every variant fails
            print(f"[rank {ctx.rank}] {name} T={T}: the eager reference failed:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            ref_logits, ref_state, margin = None, {}, None
            checks = {"eager_reference": f"{type(e).__name__}: {e}"[:2000]}
        doc["checks"][str(T)] = checks
        ok &= all(c.get("passed", False) for c in checks.values() if isinstance(c, dict)) and ref_logits is not None
        for variant in s.variants:
            over = s.budget_s is not None and time.perf_counter() - ctx.start > s.budget_s
            if any(ctx.gather(over)):  # decided together: a rank that skipped alone would hang the others
                row = {"tokens": T, "variant": variant, "skipped": f"time budget of {s.budget_s:.0f} s spent"}
            elif ref_logits is None:
                row = {"tokens": T, "variant": variant, "ok": False, "error": f"no eager reference: {checks}"}
            else:
                row = _run_variant(variant, variants, batch, snapshot, (ref_logits, ref_state, margin), s, ctx)
            row = _merge_ranks(row, ctx)
            ok &= bool(row.get("ok"))  # a skipped variant leaves the run incomplete: not ok either
            doc["rows"].append(row)
            ctx.log(_row_line(name, row, times["floor_s"]))
        del ref_logits, ref_state, margin, batch
        snapshot.restore()
        if ctx.rank == 0:
            from braze.bench_output import write_results

            write_results(doc, s.out, _stem(name, s, ctx))
    if ctx.rank == 0:
        ctx.log(f"{name}: wrote {s.out / _stem(name, s, ctx)}.{{json,md,png}}")
    return ok


def _reference(model, batch, snapshot: CacheSnapshot, s: Settings,
               ctx: Context) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, dict]:
    """One eager step: its logits, the caches it wrote, each token's router margin (`router_margins`).
    Where the step takes the sparse MoE path, also the same step with every MoE dense, compared with it:
    the grouped GEMM is checked on this device."""
    snapshot.restore()
    with router_margins(model) as margins:
        ref_logits = model(*batch)
    dev.synchronize(ctx.device)
    ref_state = snapshot.changed()
    margin = margins[0] if margins else None
    checks: dict = {}
    if "sparse" in (_moe_path(model, batch[0].shape[0]) or ""):
        snapshot.restore()
        with dense_moe(model):
            dense = model(*batch)
        checks["sparse_moe_vs_dense"] = compare_logits(ref_logits, dense, s.tol, margin)
        del dense
        ctx.log(f"  eager sparse MoE vs dense: rel err {checks['sparse_moe_vs_dense']['rel_fro']}")
    snapshot.restore()
    return ref_logits, ref_state, margin, checks


def _run_variant(variant: str, variants: Variants, batch, snapshot: CacheSnapshot, ref: tuple, s: Settings,
                 ctx: Context) -> dict:
    """One variant at one T; `ref` is `_reference`'s (logits, written caches, router margins)."""
    from torch._dynamo.utils import counters

    ref_logits, ref_state, margin = ref

    row: dict = {"tokens": batch[0].shape[0], "variant": variant, "rank": ctx.rank}
    _release(ctx.device)
    cuda = ctx.device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
            base = torch.cuda.memory_allocated(ctx.device)
        fn, backend = variants.get(variant, batch)
        graphs_before = len(backend.report.graphs) if backend is not None else 0
        cache_before, compiles_before = _fxgraph_counters(), counters["stats"]["unique_graphs"]
        snapshot.restore()
        t0 = time.perf_counter()
        out = fn(*batch)
        dev.synchronize(ctx.device)
        row["first_call_s"] = time.perf_counter() - t0
        row["compiled_graphs"] = counters["stats"]["unique_graphs"] - compiles_before
        # With --shapes dynamic a T can run on a graph compiled for an earlier T: no compile time then.
        row["compile_s"] = row["first_call_s"] if variant != "eager" and row["compiled_graphs"] else None
        row["fxgraph_cache"] = {k: v - cache_before.get(k, 0) for k, v in _fxgraph_counters().items()}
        row["correctness"] = compare_logits(out, ref_logits, s.tol, margin)
        row["state"] = compare_state(dict(snapshot.buffers), ref_state)
        del out
        if backend is not None:
            graphs, reused = variants.graphs(variant, backend, graphs_before)
            row["braze"] = {**_braze_summary(graphs), "reused_graph": reused}
            print(f"[rank {ctx.rank}] braze T={row['tokens']}: {row['braze']['summary']}"
                  + (" (graph of an earlier T)" if reused else ""), flush=True)
        step = lambda: fn(*batch)  # noqa: E731
        if cuda:
            snapshot.restore()
            row["kernels"] = _count_kernels(step, row)
            snapshot.restore()
            ctx.barrier()
            row["time"] = dev.time_cuda_graph(step, s.warmup, s.replays,
                                              agree=lambda n: max(ctx.gather(n))).to_dict()
            snapshot.restore()
            row["timeline"] = _graph_timeline(step, row)
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
            row["extra_mem_bytes"] = row["peak_mem_bytes"] - base
        else:
            snapshot.restore()
            row["time"] = dev.time_cpu(step, s.cpu_repeats).to_dict()
            row["kernels"] = row["peak_mem_bytes"] = row["extra_mem_bytes"] = None
        row["ok"] = row["correctness"]["passed"]
    except Exception as e:  # one broken variant must not cost the others their numbers
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        row["traceback"] = traceback.format_exc()[-6000:]
        print(f"[rank {ctx.rank}] {variant} T={row['tokens']} failed:\n{row['traceback']}", file=sys.stderr, flush=True)
    finally:
        snapshot.restore()
    return row


def _count_kernels(step, row: dict) -> dict | None:
    """The profiler's count, or None with the reason in row["kernels_error"]: a profiler that cannot run
    here must not cost the variant its time."""
    try:
        count = dev.count_cuda_kernels(step)
    except Exception as e:
        row["kernels_error"] = f"{type(e).__name__}: {e}"[:500]
        return None
    if count.kernels == 0:
        row["kernels_error"] = "the profiler saw no CUDA kernels (no CUPTI activity on this machine?)"
        return None
    return count.to_dict()


def _graph_timeline(step, row: dict) -> dict | None:
    """Busy, idle and overlapped time inside one CUDA-graph replay (`bench_device.graph_timeline`), or None with
    the reason in row["timeline_error"]."""
    try:
        return dev.graph_timeline(step).to_dict()
    except Exception as e:
        row["timeline_error"] = f"{type(e).__name__}: {e}"[:500]
        return None


def _release(device: torch.device) -> None:
    """Free what the last variant left (Dynamo's compiled code only when shapes are static: the caller resets)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------


def _braze_summary(graphs: list) -> dict:
    from braze.report import Report

    rep = Report(list(graphs))
    after, before = rep.kernels_per_layer()
    return {"summary": str(rep).splitlines()[0], "applied": len(rep.applied), "missed": len(rep.missed),
            "failed": len(rep.failed), "kernels_per_layer": after, "stock_kernels_per_layer": before,
            "kernels_total": sum(after.values()), "pass_seconds": rep.pass_seconds,
            "applied_names": sorted({r.name for r in rep.applied}),
            "missed_reasons": sorted({f"{r.name}: {r.reason}" for r in rep.missed})[:50],
            # dual-stream: per layer, the nodes on the side stream and the cost model's reason
            "streams": [{"location": r.location, "stream0": list(dict(r.args)["stream0"]),
                         "stream1": list(dict(r.args)["stream1"]), "message": r.message}
                        for r in rep.applied if r.name == "dual-stream"]}


def _fxgraph_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}


def _merge_ranks(row: dict, ctx: Context) -> dict:
    """Rank 0's row, with every rank's median time and verdict (the slowest rank sets the step time)."""
    summary = {"ok": row.get("ok", False), "median_s": (row.get("time") or {}).get("median_s"),
               "error": row.get("error")}
    ranks = ctx.gather(summary)
    if ctx.world == 1:
        return row
    row = dict(row)
    row["ranks"] = ranks
    row["ok"] = all(r["ok"] for r in ranks)
    medians = [r["median_s"] for r in ranks if r["median_s"] is not None]
    if medians and row.get("time"):
        row["time"] = {**row["time"], "median_s_rank0": row["time"]["median_s"], "median_s": max(medians)}
    return row


def _moe_path(model, T: int) -> str | None:
    from braze.models.common import MoE

    paths = {("sparse" if m.experts.is_sparse(T, m.router.top_k) else "dense") for m in model.modules()
             if isinstance(m, MoE)}
    return "+".join(sorted(paths)) or None


def _stem(name: str, s: Settings, ctx: Context) -> str:
    return (f"{name}_{s.size}_tp{ctx.world}" + ("_fp8" if s.fp8 else "") + ("_fp32" if s.dtype == torch.float32 else "")
            + ("_cpu" if ctx.device.type == "cpu" else ""))


def _meta(s: Settings, ctx: Context) -> dict:
    timing = (f"CUDA graph of one decode step, median of {s.replays} replays after {s.warmup} warm-up replays "
              f"(and at least {dev.MIN_WARMUP_S} s of them), device events" if ctx.device.type == "cuda" else dev.CPU_TIMING)
    return {**ctx.env, "command": s.command, "tp": ctx.world, "copy_bandwidth_GBps": ctx.copy_bw / 1e9,
            "matmul_bf16_TFLOPs": ctx.matmul_rate / 1e12 if ctx.matmul_rate else None, "timing": timing,
            "tolerance": s.tol,
            "shapes": ("static (dynamic=False, fullgraph=True), one compile per T and variant" if s.shapes == "static"
                       else "dynamic T (maybe_mark_dynamic on dim 0 for T > 1, fullgraph=True), compiles reused "
                            "across T"),
            "compile_time": "wall time of the first call (Dynamo, AOT, Inductor, kernel compiles, one step). Variants "
                            "compile in the order listed; a later one reuses kernels Inductor already compiled from "
                            "identical source, so it reads lower than a cold compile. braze's own share is its "
                            "report's pass time",
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
            "torch_symm_mem_disable_multicast": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")}


def _model_info(name: str, model, s: Settings, ctx: Context) -> dict:
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"name": name, "size": s.size, "dtype": str(s.dtype).removeprefix("torch."), "fp8": s.fp8,
            "tp": ctx.world, "context": s.context, "tokens": list(s.tokens), "variants": list(s.variants),
            "max_batch": max(s.tokens), "max_context": model.pages.max_context,
            "param_bytes": nbytes(model.parameters()), "buffer_bytes": nbytes(model.buffers()),
            "num_layers": len(model.layers), "config": dataclasses.asdict(model.config)}


def _row_line(name: str, row: dict, floor_s: float) -> str:
    head = f"{name} T={row['tokens']} {row['variant']:>8}:"
    if "skipped" in row:
        return f"{head} skipped ({row['skipped']})"
    if "error" in row:
        return f"{head} FAILED {row['error'][:300]}"
    c, t, k = row["correctness"], row["time"], row.get("kernels")
    parts = [f"{t['median_s'] * 1e6:9.1f} us ({t['median_s'] / floor_s:5.2f}x floor)"]
    if k:
        parts.append(f"{k['kernels']} kernels")
    if row.get("compile_s") is not None:
        parts.append(f"compile {row['compile_s']:.1f} s")
    parts.append(f"rel err {c.get('rel_fro')}" + ("" if c["passed"] else " FAILS"))
    return f"{head} " + ", ".join(parts)

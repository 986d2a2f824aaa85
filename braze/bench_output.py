"""Writes one model's `python -m braze bench` results: JSON (everything), a markdown table, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from braze.bench_device import KERNEL_KINDS, kernel_time_by_kind

VARIANT_LABEL = {"eager": "eager", "inductor": "stock Inductor", "braze": "braze",
                 "braze-merge": "braze + GEMM merging", "braze-streams": "braze + dual stream",
                 "braze-no-streams": "braze, one stream", "braze-side-high": "braze, side stream at high priority",
                 "braze-no-decode-gemm": "braze, GEMMs on cuBLAS",
                 "braze-collective": "braze + collective fusions", "braze-no-collective": "braze, no collective fusions",
                 "braze-no-delta": "braze without delta rule", "braze-no-topk": "braze without small-topk"}


def write_results(doc: dict, out: Path, stem: str) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` under `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(doc, indent=2, default=str))
    paths[1].write_text(markdown(doc))
    png = out / f"{stem}.png"
    try:
        plot(doc, png)
        paths.append(png)
    except ImportError as e:  # the JSON and markdown matter more than the picture
        print(f"bench: no plot ({e}); pip install matplotlib", flush=True)
    return paths


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def markdown(doc: dict) -> str:
    meta, model = doc["meta"], doc["model"]
    cuda = meta["device"] == "cuda"
    title = (f"# {model['name']} ({model['size']}, TP={model['tp']}, {model['dtype']}"
             + (", FP8 linears" if model["fp8"] else "") + "): one decode step, eager vs stock Inductor vs braze")
    lines = [title, ""]
    if not cuda:
        lines += ["**CPU run: wall-clock times, no CUDA graphs, no kernel counts. Not comparable with GPU "
                  "numbers; this checks that the harness runs.**", ""]
    lines += [
        f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"Python {meta['python']}; commit {meta.get('git_commit') or 'unknown'}; {meta['date_utc']} UTC.",
        f"Measured copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write)"
        + (f"; bf16 matmul {meta['matmul_bf16_TFLOPs']:.0f} TFLOP/s." if meta.get("matmul_bf16_TFLOPs") else "."),
        f"Command: `{meta['command']}`",
        f"Timing: {meta['timing']}. Shapes: {meta['shapes']}.",
        f"Compile time: {meta.get('compile_time', 'first call')}.",
        f"Each of T sequences holds {model['context']} cached tokens and decodes one token "
        f"(max_context {model['max_context']}, max_batch {model['max_batch']}); caches restored before every "
        f"variant. Correct = finite logits with relative Frobenius error vs eager <= {meta['tolerance']}, or at "
        "most T/8 tokens beyond it, each at a router near-tie in the eager step (flagged: rounding upstream of "
        "a near-tie picks another expert; see `braze/bench_checks.py`).",
        "",
        "| T | variant | µs / step | vs eager | floor µs | × floor | kernels / step (memcpy, memset) "
        "| braze kernels (report) | compile s | peak GiB (+variant MiB) | rel err vs eager (median token) "
        "| top-1 agree | ok |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    eager_time = {r["tokens"]: r["time"]["median_s"] for r in doc["rows"]
                  if r["variant"] == "eager" and r.get("time")}
    for r in doc["rows"]:
        T, floor = r["tokens"], doc["floors"][str(r["tokens"])]
        label = VARIANT_LABEL.get(r["variant"], r["variant"])
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r["error"].splitlines()[0][:120]
            lines.append(f"| {T} | {label} | - | - | {_us(floor['floor_s'])} | - | - | - | - | - | - | - | "
                         f"{'skipped' if 'skipped' in r else 'FAILED'}: {why.replace('|', '/')} |")
            continue
        t = r["time"]["median_s"]
        vs = f"{eager_time[T] / t:.2f}×" if T in eager_time else "-"
        k = r.get("kernels")
        kern = f"{k['kernels']} ({k['memcpy']}, {k['memset']})" if k else "-"
        bz = str(r["braze"]["kernels_total"]) if r.get("braze") else "-"
        mem = (f"{r['peak_mem_bytes'] / 2**30:.2f} (+{r['extra_mem_bytes'] / 2**20:.0f})"
               if r.get("peak_mem_bytes") is not None else "-")
        c = r["correctness"]
        err = f"{_fmt(c.get('rel_fro'))} ({_fmt(c.get('median_token_rel'))})"
        lines.append(f"| {T} | {label} | {_us(t)} | {vs} | {_us(floor['floor_s'])} | {t / floor['floor_s']:.2f} | "
                     f"{kern} | {bz} | {_fmt(r.get('compile_s'), '.1f')} | {mem} | {err} | "
                     f"{_fmt(c.get('top1_agree'), '.3f')} | {_verdict(r)} |")
    lines += ["", *_checks(doc), *_floor_table(doc), "", *_time_table(doc), *_timeline_table(doc),
              *_braze_section(doc), *_failures(doc)]
    return "\n".join(lines) + "\n"


def _verdict(r: dict) -> str:
    c = r["correctness"]
    if not r["ok"]:
        return "**NO**" if not c.get("passed") else "**NO** (on another rank)"
    if c.get("verdict") == "router near-tie":
        return f"yes: token(s) {c['diverged_tokens']} took other experts at a router near-tie"
    return "yes"


def _checks(doc: dict) -> list[str]:
    """The per-T checks of the eager step itself (sparse MoE path vs dense; a failed eager reference)."""
    lines = []
    for T, checks in doc.get("checks", {}).items():
        for name, c in checks.items():
            if isinstance(c, dict):
                lines.append(f"- T={T} {name}: rel err {_fmt(c.get('rel_fro'))}, top-1 agree "
                             f"{_fmt(c.get('top1_agree'), '.3f')}: {'ok' if c['passed'] else '**FAILS**'}")
            else:
                lines.append(f"- T={T} {name}: **FAILED** `{str(c)[:300]}`")
    if not lines:
        return []
    return ["Checks of the eager step (the sparse MoE path's grouped GEMMs against the dense path, on this "
            "device):", "", *lines, ""]


def _floor_table(doc: dict) -> list[str]:
    kinds = sorted({k for f in doc["floors"].values() for k in f["bytes_by_kind"]})
    lines = ["## Floor", "",
             "Bytes a step must move over the copy bandwidth, and weight-GEMM flops over the matmul rate; the "
             "floor is the larger. Every parameter read once (routed experts: only those a step must read, "
             "T·k of E when T·k < E, else E; embedding: T rows); caches: each token's context read and its "
             "row written (sparse MLA: top-k rows); recurrent state read and written; logits written. "
             "Rules: `braze/bench_floor.py`.", "",
             "| T | MB total | " + " | ".join(f"{k} MB" for k in kinds) + " | experts read | MoE path | GEMM GFLOP "
             "| bytes µs | flops µs |",
             "|---:|---:|" + "---:|" * len(kinds) + "---|---|---:|---:|---:|"]
    for T, f in doc["floors"].items():
        per = " | ".join(f"{f['bytes_by_kind'].get(k, 0) / 1e6:.1f}" for k in kinds)
        experts = sorted(set(f["experts_read"].values()))
        lines.append(f"| {T} | {f['total_bytes'] / 1e6:.1f} | {per} | {'/'.join(map(str, experts)) or '-'} | "
                     f"{f.get('moe_path') or '-'} | {f['gemm_flops'] / 1e9:.1f} | {_us(f['bytes_s'])} | "
                     f"{_us(f.get('flops_s'))} |")
    return lines


def _time_table(doc: dict) -> list[str]:
    """Device time of one step by kernel kind (the profiler's launch of the step, see `count_cuda_kernels`),
    and each row's three longest kernels."""
    rows = [r for r in doc["rows"] if (r.get("kernels") or {}).get("time_us")]
    if not rows:
        return []
    by = {id(r): r["kernels"].get("by_kind") or kernel_time_by_kind(
        r["kernels"]["names"], r["kernels"]["time_us"], r["kernels"].get("copy_us", 0.0)) for r in rows}
    kinds = [k for k, _ in KERNEL_KINDS] + ["other", "memcpy/memset"]
    kinds = [k for k in kinds if any(k in b for b in by.values())]
    lines = ["## Where the time goes", "",
             "Device µs per kind of kernel in one step launched without a CUDA graph (the profiler's run that "
             "counts kernels), with launches in parentheses; `busy` is their sum, `gaps` the graph's step time "
             "minus it (idle time between dependent kernels). Kinds come from kernel names "
             "(`braze.bench_device.KERNEL_KINDS`)."
             + (" Under TP the profiled launch is not synchronized across ranks, so a collective kernel's time "
                "(NCCL's, and braze's one-shot kernels') includes waiting for the other ranks: busy and gaps "
                "are not meaningful there, the other kinds are." if doc["model"].get("tp", 1) > 1 else ""), "",
             "| T | variant | step µs | busy µs | gaps µs | " + " | ".join(kinds) + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(kinds)]
    tops = []
    for r in rows:
        b = by[id(r)]
        busy = sum(v["us"] for v in b.values())
        step = r["time"]["median_s"] * 1e6
        cells = " | ".join((f"{b[k]['us']:.1f}" + (f" ({b[k]['kernels']})" if b[k]["kernels"] is not None else ""))
                           if k in b else "-" for k in kinds)
        label = VARIANT_LABEL.get(r["variant"], r["variant"])
        lines.append(f"| {r['tokens']} | {label} | {step:.1f} | {busy:.1f} | {step - busy:.1f} | {cells} |")
        longest = sorted(r["kernels"]["time_us"].items(), key=lambda kv: -kv[1])[:3]
        tops.append(f"- T={r['tokens']} {label}: " + "; ".join(
            f"`{n[:70]}{'…' if len(n) > 70 else ''}` {us:.1f} µs × {r['kernels']['names'].get(n, 0)}"
            for n, us in longest))
    return lines + ["", "Longest kernels (µs summed over launches × launches):", "", *tops, ""]


def _timeline_table(doc: dict) -> list[str]:
    """Busy, idle and overlapped time inside one CUDA-graph replay of each row's step (`graph_timeline`)."""
    rows = [r for r in doc["rows"] if r.get("timeline")]
    if not rows:
        return []
    lines = ["## Inside the CUDA graph", "",
             "One replay of the step's CUDA graph under the profiler (the median span of 5): `span` from the first "
             "kernel's start to the last one's end, `busy` the time some kernel runs, `idle` the rest (launch gaps "
             "and waits), `overlap` the time two or more kernels run at once; `side` the summed time of kernels "
             "off the main stream and, in parentheses, how much of it ran while the main stream was busy.", "",
             "| T | variant | step µs | span µs | busy µs | idle µs | overlap µs | side µs (hidden) | kernels | "
             "largest gap |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = r["timeline"]
        gap = t["longest_gaps"][0] if t["longest_gaps"] else None
        gap_cell = f"{gap[0]:.1f} µs before `{gap[2][:50]}`" if gap else "-"
        lines.append(f"| {r['tokens']} | {VARIANT_LABEL.get(r['variant'], r['variant'])} | "
                     f"{r['time']['median_s'] * 1e6:.1f} | {t['span_us']:.1f} | {t['busy_us']:.1f} | "
                     f"{t['idle_us']:.1f} | {t['overlap_us']:.1f} | {t['side_kernel_us']:.1f} "
                     f"({t['side_hidden_us']:.1f}) | {t['kernels']} | {gap_cell} |")
    return lines + [""]


def _braze_section(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r.get("braze")]
    if not rows:
        return []
    lines = ["## braze report", ""]
    for r in rows:
        b = r["braze"]
        per_layer = ", ".join(f"{k}: {v}" for k, v in b["kernels_per_layer"].items())
        lines.append(f"- T={r['tokens']} ({VARIANT_LABEL.get(r['variant'], r['variant'])}): {b['summary']}; braze passes {b['pass_seconds']:.2f} s of the compile. "
                     f"Applied: {', '.join(b['applied_names']) or 'none'}. Kernels per layer: {per_layer or '-'}.")
        for reason in b["missed_reasons"][:8]:
            lines.append(f"  - missed {reason}")
        for st in b.get("streams", []):
            side, main = st["stream1"], st["stream0"]
            lines.append(f"  - two streams at {st['location']}: side stream {len(side)} nodes ({', '.join(side[:3])} ... "
                         f"{side[-1]}), default stream {len(main)} nodes ({', '.join(main[:3])} ... {main[-1]}); "
                         f"{st['message'].split('(both compiled by Inductor); ')[-1]}")
    return lines + [""]


def _failures(doc: dict) -> list[str]:
    bad = [r for r in doc["rows"] if "error" in r]
    if not bad:
        return []
    lines = ["## Failures", ""]
    for r in bad:
        lines.append(f"- T={r['tokens']} {r['variant']}: `{r['error'][:500]}`")
    return lines + [""]


def plot(doc: dict, path: Path) -> None:
    """Time per step (with the floor) and kernels per step, grouped by T, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, model = doc["meta"], doc["model"]
    tokens = sorted({r["tokens"] for r in doc["rows"]})
    variants = list(model["variants"])
    ok_rows = {(r["tokens"], r["variant"]): r for r in doc["rows"] if r.get("time")}
    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(variants))
    xs = range(len(tokens))
    for i, v in enumerate(variants):
        offs = [x - 0.4 + width * (i + 0.5) for x in xs]
        times = [ok_rows[(T, v)]["time"]["median_s"] * 1e6 if (T, v) in ok_rows else 0 for T in tokens]
        bars = ax_t.bar(offs, times, width, label=VARIANT_LABEL.get(v, v))
        ax_t.bar_label(bars, labels=[f"{t:.0f}" if t else "" for t in times], fontsize=7)
        kernels = []
        for T in tokens:
            r = ok_rows.get((T, v))
            k = (r or {}).get("kernels")
            kernels.append(k["kernels"] if k else ((r or {}).get("braze") or {}).get("kernels_total", 0))
        bars = ax_k.bar(offs, kernels, width, label=VARIANT_LABEL.get(v, v))
        ax_k.bar_label(bars, labels=[str(k) if k else "" for k in kernels], fontsize=7)
    floors = [doc["floors"][str(T)]["floor_s"] * 1e6 for T in tokens]
    ax_t.hlines(floors, [x - 0.45 for x in xs], [x + 0.45 for x in xs], colors="black", linestyles="dashed",
                label="floor")
    for ax, ylabel in ((ax_t, "µs per decode step" + ("" if meta["device"] == "cuda" else " (CPU wall clock)")),
                       (ax_k, "kernels per decode step" if meta["device"] == "cuda"
                        else "kernels (braze report; CPU: no profiler)")):
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"T={T}" for T in tokens])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model['name']} ({model['size']}, TP={model['tp']}, {model['dtype']}"
                 + (", FP8" if model["fp8"] else "") + f", context {model['context']}) on {meta['card']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The fusion report: remarks (applied / missed / failed / analysis) and statistics per compiled graph.

Modelled on LLVM/MLIR optimization remarks: every remark has a stable
kebab-case name, the pass that made it, a location (nn.Module path and source
line), the stages or ops involved, key/value arguments, and for missed and
failed remarks a reason and a suggestion. Records are plain data so they can be
stored beside Inductor's cache and reloaded on a warm start.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("applied", "missed", "failed", "analysis")


@dataclass(frozen=True)
class Remark:
    kind: str
    pass_name: str
    name: str
    location: str
    source: str
    ops: tuple[str, ...]
    message: str
    reason: str = ""
    suggestion: str = ""
    args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", self.name), self.name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = d.pop("pass_name")
        d["ops"] = list(self.ops)
        d["args"] = {k: v for k, v in self.args}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Remark:
        d = dict(d)
        d["pass_name"] = d.pop("pass")
        d["ops"] = tuple(d["ops"])
        d["args"] = tuple(d["args"].items())
        return Remark(**d)

    def __str__(self) -> str:
        where = self.location or "<top>"
        if self.source:
            where += f" ({self.source})"
        text = f"[{self.kind}] {self.pass_name}/{self.name} at {where}: {self.message}"
        if self.reason:
            text += f"\n    reason: {self.reason}"
        if self.suggestion:
            text += f"\n    suggestion: {self.suggestion}"
        return text


@dataclass
class GraphRecord:
    """What braze did to one compiled graph."""

    index: int
    device: str = ""
    nodes: int = 0
    remarks: list[Remark] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # pass -> statistic -> count
    pass_seconds: dict[str, float] = field(default_factory=dict)
    compile_seconds: float = 0.0
    kernels: dict[str, int] | None = None  # layer -> kernels braze's graph launches
    stock_kernels: dict[str, int] | None = None  # layer -> kernels stock Inductor launches
    cache: str = "miss"  # "miss": passes ran; "hit": restored from braze's record store
    cpu_execution: str = ""
    # weights a merged GEMM reads as one buffer, {"inputs": [placeholder indices], "location": module
    # path}: the backend re-points them into one storage at set-up (braze.runtime.sibling_mm.share_rows)
    shared_weights: list[dict[str, Any]] = field(default_factory=list)

    def bump(self, pass_name: str, stat: str, n: int = 1) -> None:
        d = self.stats.setdefault(pass_name, {})
        d[stat] = d.get(stat, 0) + n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["remarks"] = [r.to_dict() for r in self.remarks]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GraphRecord:
        d = dict(d)
        d["remarks"] = [Remark.from_dict(r) for r in d["remarks"]]
        return GraphRecord(**d)


class Report:
    """All graphs a braze backend compiled, with their remarks and statistics."""

    def __init__(self, graphs: list[GraphRecord] | None = None) -> None:
        self.graphs: list[GraphRecord] = graphs or []

    # -- remarks ---------------------------------------------------------
    @property
    def remarks(self) -> list[Remark]:
        return [r for g in self.graphs for r in g.remarks]

    def _kind(self, kind: str) -> list[Remark]:
        return [r for r in self.remarks if r.kind == kind]

    @property
    def applied(self) -> list[Remark]:
        return self._kind("applied")

    @property
    def missed(self) -> list[Remark]:
        return self._kind("missed")

    @property
    def failed(self) -> list[Remark]:
        return self._kind("failed")

    @property
    def analysis(self) -> list[Remark]:
        return self._kind("analysis")

    # -- statistics ------------------------------------------------------
    @property
    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = defaultdict(Counter)
        for g in self.graphs:
            for p, d in g.stats.items():
                out[p].update(d)
        return {p: dict(c) for p, c in out.items()}

    @property
    def pass_seconds(self) -> float:
        return sum(sum(g.pass_seconds.values()) for g in self.graphs)

    @property
    def compile_seconds(self) -> float:
        return sum(g.compile_seconds for g in self.graphs)

    def kernels_per_layer(self) -> tuple[dict[str, int], dict[str, int] | None]:
        """(braze, stock) kernels per layer over all graphs; stock is None if not counted."""
        after: Counter = Counter()
        before: Counter | None = Counter()
        for g in self.graphs:
            after.update(g.kernels or {})
            if g.stock_kernels is None:
                before = None
            elif before is not None:
                before.update(g.stock_kernels)
        return dict(after), (dict(before) if before is not None else None)

    # -- rendering -------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        after, before = self.kernels_per_layer()
        doc = {
            "graphs": [g.to_dict() for g in self.graphs],
            "summary": {
                "applied": len(self.applied),
                "missed": len(self.missed),
                "failed": len(self.failed),
                "analysis": len(self.analysis),
                "kernels": sum(after.values()),
                "stock_kernels": sum(before.values()) if before is not None else None,
                "pass_seconds": self.pass_seconds,
                "compile_seconds": self.compile_seconds,
                "stats": self.stats,
            },
        }
        return json.dumps(doc, indent=indent, default=str)

    @staticmethod
    def from_json(text: str) -> Report:
        return Report([GraphRecord.from_dict(g) for g in json.loads(text)["graphs"]])

    def __str__(self) -> str:
        lines = [f"braze report: {len(self.graphs)} graph(s), "
                 f"{len(self.applied)} applied, {len(self.missed)} missed, {len(self.failed)} failed"]
        by_pass: dict[str, Counter] = defaultdict(Counter)
        for r in self.remarks:
            by_pass[r.pass_name][r.kind] += 1
        if by_pass:
            lines.append("")
            lines.append(f"{'pass':<24}{'applied':>9}{'missed':>9}{'failed':>9}{'analysis':>10}")
            for p, c in sorted(by_pass.items()):
                lines.append(f"{p:<24}{c['applied']:>9}{c['missed']:>9}{c['failed']:>9}{c['analysis']:>10}")
        after, before = self.kernels_per_layer()
        if after:
            lines.append("")
            lines.append(f"{'layer':<40}{'stock':>8}{'braze':>8}")
            for layer in sorted(set(after) | set(before or {}), key=_layer_key):
                stock = str(before.get(layer, 0)) if before is not None else "-"
                lines.append(f"{layer:<40}{stock:>8}{after.get(layer, 0):>8}")
            total_before = str(sum(before.values())) if before is not None else "-"
            lines.append(f"{'total':<40}{total_before:>8}{sum(after.values()):>8}")
            if before is None:
                lines.append("(stock kernel counts: set FusionConfig(count_stock_kernels=True))")
        lines.extend(self._branches_table())
        if self.compile_seconds:
            share = 100.0 * self.pass_seconds / self.compile_seconds
            lines.append("")
            lines.append(f"braze passes: {self.pass_seconds * 1e3:.1f} ms of {self.compile_seconds:.2f} s "
                         f"compile ({share:.1f}%)")
        hits = sum(g.cache == "hit" for g in self.graphs)
        if hits:
            lines.append(f"{hits} graph(s) restored from the warm cache")
        cpu = {g.cpu_execution for g in self.graphs if g.cpu_execution}
        if cpu:
            lines.append(f"fused ops on CPU run: {', '.join(sorted(cpu))} (a correctness path for testing, "
                         "not a fast one; CPU kernel counts only illustrate)")
        for title, rs in (("applied", self.applied), ("missed", self.missed), ("failed", self.failed)):
            if rs:
                lines.append("")
                lines.append(f"{title}:")
                lines.extend("  " + str(r).replace("\n", "\n  ") for r in rs)
        return "\n".join(lines)

    def branches_per_layer(self) -> dict[str, dict[str, int]]:
        """layer -> decision ("merge+serial", "overlap", ...) -> forks, from the branch analysis remarks."""
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.remarks:
            if r.name == "independent-branches":
                out[layer_of(r.location)][dict(r.args).get("decision", "?")] += 1
        return {k: dict(v) for k, v in out.items()}

    def side_stream_nodes(self) -> dict[str, list[str]]:
        """layer -> the nodes braze runs on the side stream (from the dual-stream pass's applied remarks)."""
        out: dict[str, list[str]] = defaultdict(list)
        for r in self.applied:
            if r.name == "dual-stream":
                out[layer_of(r.location)].extend(dict(r.args).get("stream1", []))
        return dict(out)

    def _branches_table(self) -> list[str]:
        per_layer = self.branches_per_layer()
        side = self.side_stream_nodes()
        if not per_layer and not side:
            return []
        lines = ["", "independent branches per layer (decision: forks) and the nodes on the side stream "
                     "(all others run on the default stream):"]
        for layer in sorted(set(per_layer) | set(side), key=_layer_key):
            decisions = ", ".join(f"{d}: {n}" for d, n in sorted(per_layer.get(layer, {}).items()))
            nodes = side.get(layer, [])
            on_side = f"; side stream: {len(nodes)} nodes ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''})"
            lines.append(f"  {layer:<38}{decisions or '-'}{on_side if nodes else ''}")
        if not side:
            lines.append("  (no branches on a second stream: dual-stream acts on CUDA graphs where the cost model says "
                         "overlap pays; the remarks say why each fork stayed serial)")
        return lines

    def plot(self, path: str) -> str:
        """Bar chart of kernels per layer, stock Inductor vs braze, written as a PNG."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("Report.plot needs matplotlib: pip install 'braze[plot]'") from e
        after, before = self.kernels_per_layer()
        layers = sorted(set(after) | set(before or {}), key=_layer_key)
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 2), 4))
        xs = range(len(layers))
        width = 0.4
        if before is not None:
            ax.bar([x - width / 2 for x in xs], [before.get(k, 0) for k in layers], width, label="stock Inductor")
        ax.bar([x + (width / 2 if before is not None else 0) for x in xs], [after.get(k, 0) for k in layers],
               width, label="braze")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("kernels")
        ax.set_title("kernels per layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _layer_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def layer_of(module_path: str) -> str:
    """The layer a module path belongs to: up to its first numeric component."""
    if not module_path:
        return "(top)"
    parts = module_path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]

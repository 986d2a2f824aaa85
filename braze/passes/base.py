"""What every pass sees: the Pass interface and the PassContext that records remarks and statistics."""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from braze.config import FusionConfig, TokenRange
from braze.patterns.fx import module_path, source_line
from braze.report import GraphRecord, Remark

# The record of the graph being compiled; set by the backend around Inductor.
current_record: contextvars.ContextVar[GraphRecord | None] = contextvars.ContextVar("braze_record", default=None)
# The real example inputs of the graph being compiled (one per placeholder, in order), when known;
# set by the backend. Passes that must know what a placeholder holds (a parameter?) read them.
current_inputs: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("braze_inputs", default=None)


class Pass:
    """A graph pass over the post-grad ATen graph. Subclasses set `name` and `family`."""

    name: ClassVar[str]
    family: ClassVar[str | None] = None  # FusionConfig switch; None = always on

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        raise NotImplementedError


class PassContext:
    """Where a pass records what it did; passes never write the report directly."""

    def __init__(self, gm: GraphModule, config: FusionConfig, record: GraphRecord) -> None:
        self.gm = gm
        self.config = config
        self.record = record
        self.pass_name = ""
        self.inputs = current_inputs.get()
        # what a pass leaves for a later one on the same graph (e.g. the post-conv sites the delta-rule pass may fold)
        self.shared: dict[str, Any] = {}

    def bump(self, stat: str, n: int = 1) -> None:
        self.record.bump(self.pass_name, stat, n)

    def remark(
        self,
        kind: str,
        name: str,
        at: Node | Iterable[Node],
        message: str,
        *,
        reason: str = "",
        suggestion: str = "",
        ops: Iterable[str] = (),
        args: dict[str, Any] | None = None,
    ) -> Remark:
        node = at if isinstance(at, Node) else next(iter(at))
        r = Remark(
            kind=kind,
            pass_name=self.pass_name,
            name=name,
            location=module_path(node),
            source=source_line(node),
            ops=tuple(ops),
            message=message,
            reason=reason,
            suggestion=suggestion,
            args=tuple(sorted((args or {}).items())),
        )
        self.record.remarks.append(r)
        self.bump(kind)
        return r

    def token_check(self, family: str, rows: object) -> str | None:
        """None if `rows` tokens lie in the family's range, else the reason they may not."""
        rng: TokenRange = self.config.token_range(family)
        if isinstance(rows, int):
            return None if rows in rng else f"{rows} tokens is outside the configured range {rng}"
        if isinstance(rows, torch.SymInt):
            lo, hi = _symbol_bounds(rows)
            if lo >= rng.lo and (rng.hi is None or (hi is not None and hi <= rng.hi)):
                return None
            bound = f"[{lo}, {'inf' if hi is None else hi}]"
            return f"the token count {rows} is dynamic ({bound}) and may fall outside the configured range {rng}"
        return f"the token count {rows!r} is unknown"


def _symbol_bounds(s: torch.SymInt) -> tuple[int, int | None]:
    """The value range the shape env knows for a symbolic size (hi None = unbounded)."""
    node = s.node
    ranges = node.shape_env.bound_sympy(node.expr)

    def finite(v: object) -> int | None:
        try:
            f = float(v)
        except (TypeError, ValueError, AttributeError):
            return None
        return int(f) if abs(f) != float("inf") else None

    return finite(ranges.lower) or 0, finite(ranges.upper)

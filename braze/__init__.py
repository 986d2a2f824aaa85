"""braze: graph-level fusion compiler for LLM inference, built on torch.compile.

    torch.compile(model, backend="braze")
    torch.compile(model, backend=braze.backend(braze.FusionConfig(verify="compile")))
    print(braze.report(compiled))
"""

from __future__ import annotations

from .backend import Backend, backend, report
from .config import FusionConfig, TokenRange
from .report import Remark, Report

__version__ = "0.1.0"

__all__ = ["Backend", "FusionConfig", "Remark", "Report", "TokenRange", "backend", "report", "__version__"]


def __getattr__(name: str):
    if name == "ops":
        import importlib

        return importlib.import_module("braze.ops")
    raise AttributeError(f"module 'braze' has no attribute {name!r}")

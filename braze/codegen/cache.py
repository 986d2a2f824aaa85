"""Kernel cache: generated source -> importable module -> Triton JIT function, keyed by signature.

Sources are written to files (Triton and Inductor read kernel source through
`inspect`), under `$BRAZE_CACHE_DIR` or Inductor's cache dir. The same file is
the readable dump of the kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from braze.patterns.delta_rule import DeltaRule
from braze.patterns.gdn import PostConv
from braze.patterns.stages import HeadGroup, RowChain
from braze.patterns.tp_norm import TPNormGroup

from . import collective, delta_rule, heads, post_conv, rowwise


def cache_root() -> Path:
    env = os.environ.get("BRAZE_CACHE_DIR")
    if env:
        return Path(env)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "braze"


@dataclass(frozen=True)
class LoadedKernel:
    source: object  # rowwise.KernelSource | heads.HeadKernelSource
    path: Path
    jit: object  # triton.runtime.jit.JITFunction

    @functools.cached_property
    def interpreted(self) -> object:
        """The same kernel for the Triton interpreter (runs on CPU tensors)."""
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(self.jit.fn)


def _load_module(name: str, source: str) -> tuple[Path, object]:
    folder = cache_root() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"braze_kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return path, module


def load_generated(module: str, source: str) -> object:
    """The module `braze_kernels.<name>` of a generated kernel: already imported, or loaded from `source` (a
    process that runs a dual-stream spec another process wrote; braze.runtime.streams)."""
    if module in sys.modules:
        return sys.modules[module]
    prefix, _, name = module.partition(".")
    if prefix != "braze_kernels" or not name:
        raise ValueError(f"braze kernel cache: {module!r} is not a generated kernel's module")
    return _load_module(name, source)[1]


@functools.lru_cache(maxsize=None)
def _rowwise_kernel(signature: str) -> LoadedKernel:
    chain = RowChain.from_json(signature)
    src = rowwise.generate(chain)
    path, module = _load_module(src.name, src.source)
    jit = getattr(module, src.name)
    # When TRITON_INTERPRET=1 is set, triton.jit already returns an interpreted function.
    return LoadedKernel(src, path, jit)


def rowwise_kernel(chain: RowChain) -> LoadedKernel:
    return _rowwise_kernel(chain.to_json())


def _loaded(src) -> LoadedKernel:
    """A generated source imported as a module, with its kernel."""
    path, module = _load_module(src.name, src.source)
    return LoadedKernel(src, path, getattr(module, src.name))


@functools.lru_cache(maxsize=None)
def _heads_kernel(signature: str) -> LoadedKernel:
    src = heads.generate(HeadGroup.from_json(signature))
    return _loaded(src)


def heads_kernel(group: HeadGroup) -> LoadedKernel:
    return _heads_kernel(group.to_json())


@functools.lru_cache(maxsize=None)
def _post_conv_kernel(signature: str) -> LoadedKernel:
    src = post_conv.generate(PostConv.from_json(signature))
    return _loaded(src)


def post_conv_kernel(spec: PostConv) -> LoadedKernel:
    return _post_conv_kernel(spec.to_json())


@functools.lru_cache(maxsize=None)
def _delta_rule_gated_kernel(spec: str, chain: str) -> LoadedKernel:
    return _loaded(delta_rule.generate_gated(DeltaRule.from_json(spec), RowChain.from_json(chain)))


def delta_rule_gated_kernel(spec: DeltaRule, chain: RowChain) -> LoadedKernel:
    """The delta-rule update with the gated RMSNorm (+ FP8 quant) of each value head's o in one kernel."""
    return _delta_rule_gated_kernel(spec.to_json(), chain.to_json())


@functools.lru_cache(maxsize=None)
def _conv_delta_rule_gated_kernel(post: str, roles: str, spec: str, chain: str) -> LoadedKernel:
    return _loaded(delta_rule.generate_conv_gated(PostConv.from_json(post), tuple(int(r) for r in roles.split(",")),
                                                  DeltaRule.from_json(spec), RowChain.from_json(chain)))


def conv_delta_rule_gated_kernel(post: PostConv, roles: tuple[int, int, int], spec: DeltaRule,
                                 chain: RowChain) -> LoadedKernel:
    """The post-conv path, the delta-rule update and the gated RMSNorm (+ FP8 quant) of each value head in one
    kernel; `roles`: the post-conv segments that are q, k and v."""
    return _conv_delta_rule_gated_kernel(post.to_json(), ",".join(map(str, roles)), spec.to_json(), chain.to_json())


@functools.lru_cache(maxsize=None)
def _allreduce_chain_kernel(signature: str, world: int) -> LoadedKernel:
    src = collective.generate_allreduce_chain(RowChain.from_json(signature), world)
    return _loaded(src)


def allreduce_chain_kernel(chain: RowChain, world: int) -> LoadedKernel:
    """The one-shot all-reduce + row chain kernel over `world` ranks."""
    return _allreduce_chain_kernel(chain.to_json(), world)


@functools.lru_cache(maxsize=None)
def _tp_norm_kernel(signature: str, phase: str) -> LoadedKernel:
    src = collective.generate_tp_norm(TPNormGroup.from_json(signature), phase)
    return _loaded(src)


def tp_norm_kernel(group: TPNormGroup, phase: str) -> LoadedKernel:
    """A TP-reduced norm group's kernel for one phase ("local", "finish" or "symm")."""
    return _tp_norm_kernel(group.to_json(), phase)


def dump(kernel: LoadedKernel, directory: str | os.PathLike) -> Path:
    """Copy a kernel's source into `directory` (the config's dump dir)."""
    out = Path(directory) / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    dest = out / kernel.path.name
    shutil.copyfile(kernel.path, dest)
    return dest

"""Faithful plain-PyTorch models of DeepSeek V3.2, MiniMax-M2.5 and Qwen 3.5, the models braze is judged on.

The contract every family follows:

- `XConfig`: a frozen dataclass with classmethods `tiny()` (MODELS.md's tiny config, CPU tests)
  and `bench(tp=1)` (real hidden size and real per-rank head counts at the published deployment's
  TP, fewer layers and experts, fits one 80 GB GPU). `bench(tp=P)` is the config of a TP group of P
  ranks that keeps those per-rank heads: its full attention heads (and Qwen's GDN key/value heads)
  are the bench's times P; replicated parts (DeepSeek's indexer) and MLP/expert widths, which are
  split over the group, stay as they are. `build(name, "bench", group=g)` passes g's size.
- Heads split over TP. When TP exceeds the kv heads of MiniMax or Qwen (or Qwen's GDN key heads)
  and is a multiple of their count, each such head is replicated over TP/count ranks: rank r holds
  head r // (TP/count).
- `XForCausalLM(config, *, group=None, device=None, dtype=torch.bfloat16, fp8=False,
  max_batch=..., max_context=..., seed=0)`: random weights drawn at full (TP=1) shape from a
  seeded generator and sliced for this rank, so TP=1 and TP=P models of one config and seed match.
  Caches are non-persistent buffers; `model.pages` is the host-side `PageTable`.
- `model.prefill(input_ids [S], seq_idx) -> logits [S, vocab]` starts sequence `seq_idx` and
  fills its caches (eager).
- `model(input_ids [T], positions [T], slot_mapping [T], block_table [T, max_blocks], seq_lens [T])
  -> logits [T, vocab]` is ONE decode step (one new token for each of T sequences); it writes the
  new cache rows in place at slot_mapping and attends to seq_lens tokens (the new one included)
  through block_table. It traces with `torch.compile(fullgraph=True)`. `DecodeBatch` is that
  argument tuple: `model(*batch)`.
- `make_decode_inputs(model, T, context_len, generator) -> DecodeBatch` prefills T random
  sequences and returns the next step's inputs; `model.pages.append(seqs, ids)` makes later ones.
- `load_hf_state_dict(model, hf_model)` (per family) maps a Hugging Face model's weights into ours.
"""

from __future__ import annotations

import importlib

from torch import nn

from braze.models.common import DecodeBatch, make_decode_inputs, tp_size  # noqa: F401

MODEL_NAMES = ("deepseek-v3.2", "minimax-m2.5", "qwen3.5")

# name -> (module, config class, model class); imported lazily so one family's absence breaks no other.
_FAMILIES = {
    "deepseek-v3.2": ("braze.models.deepseek_v32", "DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "minimax-m2.5": ("braze.models.minimax_m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM"),
    "qwen3.5": ("braze.models.qwen3_5", "Qwen35Config", "Qwen35ForCausalLM"),
}


def build(name: str, size: str = "tiny", **kw) -> nn.Module:
    """Build model `name` (one of MODEL_NAMES) at `size` ("tiny" or "bench"); kw go to the model.

    "bench" under a TP group (kw `group`) of P ranks is `bench(tp=P)`: every rank holds the bench's
    per-rank heads, whatever P is (the one place where the group's size picks the config)."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    if size not in ("tiny", "bench"):
        raise ValueError(f"unknown size {size!r}; expected 'tiny' or 'bench'")
    module, config_cls, model_cls = _FAMILIES[name]
    mod = importlib.import_module(module)
    cls = getattr(mod, config_cls)
    config = cls.bench(tp=tp_size(kw.get("group"))) if size == "bench" else cls.tiny()
    return getattr(mod, model_cls)(config, **kw)

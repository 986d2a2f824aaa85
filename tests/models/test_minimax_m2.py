"""MiniMax-M2.5: faithfulness to transformers, TP=2 == TP=1, one graph under torch.compile, in-place cache writes
(compiled == eager, stock Inductor and braze: tests/test_bench.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from braze.models import build
from braze.models.minimax_m2 import MiniMaxM2Config, MiniMaxM2ForCausalLM, load_hf_state_dict, make_decode_inputs

transformers = pytest.importorskip("transformers")


def hf_tiny(dtype: torch.dtype, seed: int = 0):
    """transformers' MiniMaxM2ForCausalLM at our tiny config, random weights, norms and bias randomized."""
    c = MiniMaxM2Config.tiny()
    hc = transformers.MiniMaxM2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.moe_inter,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
        rms_norm_eps=c.rms_norm_eps, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                         "partial_rotary_factor": c.rotary_dim / c.head_dim})
    hc._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.MiniMaxM2ForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # HF initializes norm weights to 1; make them matter
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for layer in hf.model.layers:
            layer.mlp.e_score_correction_bias.copy_(0.1 * torch.randn(c.num_experts))
    hf = hf.to(dtype)
    for layer in hf.model.layers:  # the router runs in fp32, as in vLLM and the released checkpoints
        layer.mlp.gate.float()
        layer.mlp.e_score_correction_bias.data = layer.mlp.e_score_correction_bias.data.float()
    return hf


def hf_logits(hf, prompt: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the prompt [S], then of each next token, with HF's own cache."""
    out = hf(prompt[None], use_cache=True)
    logits, cache = [out.logits[0]], out.cache
    for tok in steps:
        out = hf(tok.view(1, 1), cache=cache, use_cache=True)
        logits.append(out.logits[0])
    return logits


def run_both(dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Two prompts prefilled, then 4 decode steps of both batched (T=2); HF runs each sequence alone."""
    hf = hf_tiny(dtype)
    model = MiniMaxM2ForCausalLM(MiniMaxM2Config.tiny(), dtype=dtype, max_batch=2, max_context=64)
    load_hf_state_dict(model, hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1024, (n,), generator=g) for n in (11, 20)]
    steps = torch.randint(1024, (4, 2), generator=g)
    ours = [[model.prefill(p, seq)] for seq, p in enumerate(prompts)]
    for step in steps:
        logits = model(*model.pages.append([0, 1], step))
        for seq in range(2):
            ours[seq].append(logits[seq:seq + 1])
    out = []
    for seq in range(2):
        ref = hf_logits(hf, prompts[seq], list(steps[:, seq]))
        out += [(f"sequence {seq} " + ("prefill" if i == 0 else f"decode step {i}"), a.float(), b.float())
                for i, (a, b) in enumerate(zip(ours[seq], ref))]
    return out


@torch.no_grad()
def test_matches_transformers_fp32():
    for where, a, b in run_both(torch.float32):
        err = (a - b).abs().max().item()
        assert err < 2e-5, f"{where}: max |diff| {err:.2e}"


@torch.no_grad()
def test_matches_transformers_bf16():
    # HF applies RoPE in bf16 (we do it in fp32), so a near-tie in the router's top-k can flip an
    # expert for an odd token; nearly all tokens must agree to bf16 noise, and none may be far off.
    per_token = torch.cat([(a - b).abs().amax(-1) for _, a, b in run_both(torch.bfloat16)])
    assert (per_token < 0.03).float().mean() > 0.9, per_token
    assert per_token.max() < 0.2, per_token


def count_collectives(model, batch) -> int:
    """Trace one step with Dynamo (fullgraph) and count the all-reduces in the captured graph."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=record, fullgraph=True)(*batch)
    return sum(1 for gm in graphs for n in gm.graph.nodes if "all_reduce" in str(n.target))


def _tp_worker(rank: int, world_size: int) -> None:
    cfg = MiniMaxM2Config.tiny()
    kw = dict(dtype=torch.float32, max_batch=3, max_context=48, seed=3)
    full = MiniMaxM2ForCausalLM(cfg, **kw)
    tp = MiniMaxM2ForCausalLM(cfg, group=dist.group.WORLD, **kw)
    assert tp.layers[0].self_attn.heads == cfg.num_heads // world_size
    with torch.no_grad():
        a = full(*make_decode_inputs(full, 3, [7, 16, 30], torch.Generator().manual_seed(5)))
        b = tp(*make_decode_inputs(tp, 3, [7, 16, 30], torch.Generator().manual_seed(5)))
        # all-reduces per layer, as in the deployments: [T, 2] qk variance, o_proj, MoE
        assert count_collectives(tp, tp.pages.append([0, 1, 2], torch.tensor([1, 2, 3]))) == 3 * cfg.num_layers
    assert torch.allclose(a, b, atol=1e-5), f"rank {rank}: max |diff| {(a - b).abs().max():.2e}"


def test_tp2_equals_tp1(tp_runner):
    tp_runner(2, _tp_worker)


def _valid_slots(model, lens):
    return torch.cat([model.pages.slots(s, torch.arange(n)) for s, n in enumerate(lens)])


@torch.no_grad()
def test_cache_writes_in_place_and_only_at_slots():
    cfg = MiniMaxM2Config.tiny()
    clean = build("minimax-m2.5", dtype=torch.float32, max_batch=3, max_context=48, seed=4)
    dirty = build("minimax-m2.5", dtype=torch.float32, max_batch=3, max_context=48, seed=4)
    lens = [5, 9, 17]
    batches = [make_decode_inputs(m, 3, lens, torch.Generator().manual_seed(6)) for m in (clean, dirty)]
    valid = _valid_slots(dirty, lens)
    caches = [(n, b) for n, b in dirty.named_buffers() if n.endswith("_cache")]
    assert len(caches) == 2 * cfg.num_layers
    for _, buf in caches:  # poison every row no sequence owns: the step must not read them
        rows = buf.view(-1, *buf.shape[2:])
        keep = rows[valid].clone()
        rows.fill_(1e4)
        rows[valid] = keep
    before = {n: (b.data_ptr(), b.clone()) for n, b in caches}
    logits = dirty(*batches[1])
    assert torch.equal(logits, clean(*batches[0]))
    slots = batches[1].slot_mapping
    for name, buf in caches:
        ptr, old = before[name]
        assert buf.data_ptr() == ptr, f"{name} was replaced, not written in place"
        rows, old_rows = buf.view(-1, *buf.shape[2:]), old.view(-1, *old.shape[2:])
        changed = (rows != old_rows).flatten(1).any(-1).nonzero().flatten()
        assert set(changed.tolist()) <= set(slots.tolist()), f"{name}: rows outside slot_mapping changed"
        assert (rows[slots] != old_rows[slots]).any(), f"{name}: the new rows were not written"


@torch.no_grad()
def test_fp8_linears_stay_close_to_bf16_weights():
    cfg = MiniMaxM2Config.tiny()
    ref = MiniMaxM2ForCausalLM(cfg, dtype=torch.float32, max_batch=2, max_context=32, seed=9)
    q = MiniMaxM2ForCausalLM(cfg, dtype=torch.float32, max_batch=2, max_context=32, seed=9, fp8=True)
    assert q.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    a = ref(*make_decode_inputs(ref, 2, [6, 12], torch.Generator().manual_seed(10)))
    b = q(*make_decode_inputs(q, 2, [6, 12], torch.Generator().manual_seed(10)))
    assert (a - b).norm() / a.norm() < 0.1


@torch.no_grad()
def test_bench_config_runs_on_meta():
    # The bench model (real widths, 12/2 heads per rank) traced on the meta device: shapes only.
    model = build("minimax-m2.5", "bench", device="meta", max_batch=8, max_context=4096)
    attn = model.layers[0].self_attn
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (12, 2, 128)
    t = 8
    ids = torch.zeros(t, dtype=torch.long, device="meta")
    logits = model(ids, ids, ids, model.pages.table[:t], ids.int())
    assert logits.shape == (t, 200064)

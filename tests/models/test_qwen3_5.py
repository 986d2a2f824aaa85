"""Qwen 3.5 model: faithfulness to Hugging Face, in-place cache/state writes, one graph under torch.compile
(compiled == eager through braze: tests/passes/test_post_conv_models.py, test_chain_models.py).

The reference is Hugging Face's text-only `Qwen3_5MoeForCausalLM` (transformers >= 5): the same
model as Qwen3.5-397B-A17B without the vision tower, so no vision config is needed. Its
GDN runs the torch fallbacks (`causal_conv1d_fn`/`_update`, `torch_chunk_gated_delta_rule` for
the prompt, `torch_recurrent_gated_delta_rule` per decode token) when causal-conv1d and
flash-linear-attention are absent, as here. It is preferred to `Qwen3NextForCausalLM` because it
has Qwen 3.5's own projection layout (separate in_proj_qkv/z/b/a) and M-RoPE config.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from braze.models.common import make_decode_inputs
from braze.models.qwen3_5 import Qwen35Config, Qwen35ForCausalLM, load_hf_state_dict

transformers = pytest.importorskip("transformers")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    bad = ~torch.isclose(actual.float(), expected.float(), atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}; "
            f"max abs diff {(actual.float() - expected.float()).abs().max().item():.3g}"
        )


# ---------------------------------------------------------------------------- Hugging Face reference


def hf_config(cfg: Qwen35Config):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        layer_types=list(cfg.layer_types), num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor,
                         "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True},
        attn_implementation="eager",
    )


@torch.no_grad()
def hf_model(cfg: Qwen35Config, round_to: torch.dtype = torch.float32, seed: int = 0):
    """A tiny fp32 HF model with random weights, each rounded to `round_to` (so a model of that dtype
    can hold them exactly). Zero-centered norm weights, the gated norm and dt_bias are perturbed (HF
    initializes them to 0, 1 and 1), so the +1 and every weight matter. The model itself stays fp32:
    `.to(bfloat16)` would also round HF's RoPE inv_freq buffer."""
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(hf_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight", "model.norm.weight",
                          "linear_attn.norm.weight", "dt_bias")):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("conv1d.weight"):
            p.mul_(2.0)  # default Conv1d init is small for 4 taps; make the conv matter
        p.copy_(p.to(round_to).float())
    return model


@torch.no_grad()
def run_hf(model, prompt: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """Logits of the prompt [S, V], then of each decode token [V], carrying HF's cache."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    out = [model(prompt[None], cache=cache, use_cache=True).logits[0]]
    for tok in steps:
        out.append(model(torch.tensor([[tok]]), cache=cache, use_cache=True).logits[0, 0])
    return out


def run_ours(model: Qwen35ForCausalLM, prompts: list[torch.Tensor], steps: torch.Tensor) -> list[list[torch.Tensor]]:
    """Prefill each prompt as its own sequence, then decode all of them together, steps [n, B]."""
    out = [[model.prefill(p, i)] for i, p in enumerate(prompts)]
    with torch.no_grad():
        for tokens in steps:
            logits = model(*model.pages.append(list(range(len(prompts))), tokens))
            for i in range(len(prompts)):
                out[i].append(logits[i])
    return out


def prompts_and_steps(cfg: Qwen35Config) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two sequences of 5 and 11 prompt tokens (across pages of 4), then 4 decode steps."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(cfg.vocab_size, (n,), generator=g) for n in (5, 11)]
    return prompts, torch.randint(cfg.vocab_size, (4, 2), generator=g)


def test_matches_hugging_face_over_prefill_and_decode():
    """fp32, same weights: the only differences are summation orders (HF's chunked prompt delta rule
    vs our recurrent one, einsum vs matmul). Measured max difference ~1.3e-6 on logits of ~1."""
    cfg = Qwen35Config.tiny()
    hf = hf_model(cfg)
    ours = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=3, max_context=32)
    load_hf_state_dict(ours, hf)
    prompts, steps = prompts_and_steps(cfg)

    got = run_ours(ours, prompts, steps)
    for i, p in enumerate(prompts):
        want = run_hf(hf, p, steps[:, i].tolist())
        assert_close(got[i][0], want[0], 2e-5, 2e-5, f"prefill of sequence {i}")
        for s in range(1, len(want)):
            assert_close(got[i][s], want[s], 2e-5, 2e-5, f"decode step {s - 1}, sequence {i}")


def test_bf16_strays_from_fp32_no_more_than_hugging_face_bf16():
    """bf16 against HF fp32 holding the same (bf16-rounded) weights, by the mean relative L2 error of
    the logits. Elementwise tolerances are meaningless here: HF's own bf16 model strays 0.1-0.8 from
    its fp32 logits on these random tiny weights (bf16 noise tips MoE routing near-ties). Where we
    round: every GEMM output, the residual stream, norm outputs and caches, like a bf16 model; we keep
    fp32 inside RoPE, the conv + SiLU and β = sigmoid(b), where HF rounds to bf16 (vLLM's kernels
    don't). Measured: ours 0.036, HF bf16 0.086."""
    import copy

    cfg = Qwen35Config.tiny()
    hf = hf_model(cfg, round_to=torch.bfloat16)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours = Qwen35ForCausalLM(cfg, dtype=torch.bfloat16, max_batch=3, max_context=32)
    load_hf_state_dict(ours, hf)
    prompts, steps = prompts_and_steps(cfg)

    ref = [run_hf(hf, p, steps[:, i].tolist()) for i, p in enumerate(prompts)]
    theirs = [run_hf(hf_bf16, p, steps[:, i].tolist()) for i, p in enumerate(prompts)]
    got = run_ours(ours, prompts, steps)

    def rel_err(x: list[list[torch.Tensor]]) -> float:
        errs = [((x[i][s].float() - r).norm(dim=-1) / r.norm(dim=-1)).mean()
                for i, seq in enumerate(ref) for s, r in enumerate(seq)]
        return float(sum(errs) / len(errs))

    ours_err, hf_err = rel_err(got), rel_err(theirs)
    assert ours_err < 0.06 and ours_err <= 1.25 * hf_err, f"bf16 relative error: ours {ours_err:.3f}, HF {hf_err:.3f}"


def test_prefill_in_chunks_equals_prefill_at_once():
    cfg = Qwen35Config.tiny()
    whole = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=1, max_context=32)
    chunked = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=1, max_context=32, prefill_chunk=3)
    prompt = torch.randint(cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(0))
    assert_close(chunked.prefill(prompt, 0), whole.prefill(prompt, 0), 1e-5, 1e-5, "chunked prefill")


# ---------------------------------------------------------------------------- in-place writes


def caches(model: Qwen35ForCausalLM) -> dict[str, torch.Tensor]:
    return {name: buf for name, buf in model.named_buffers() if name.endswith(("_cache", "_state"))}


@torch.no_grad()
def test_decode_writes_only_its_slots():
    cfg = Qwen35Config.tiny()
    model = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=4, max_context=16)
    clean = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=4, max_context=16)
    g = torch.Generator().manual_seed(3)
    batch = make_decode_inputs(model, 2, [3, 6], g)  # sequences 0 and 1; slots 2 and 3 unused
    g = torch.Generator().manual_seed(3)
    make_decode_inputs(clean, 2, [3, 6], g)

    # Poison what the step must neither read nor write: GDN state slots 2, 3 and the KV pages of
    # sequences 2, 3.
    foreign_blocks = model.pages.table[2:].flatten().long()
    for name, buf in caches(model).items():
        if name.endswith("_state"):
            buf[2:] = float("nan")
        else:
            buf[foreign_blocks] = float("nan")
    before = {name: buf.clone() for name, buf in caches(model).items()}

    logits = model(*batch)

    assert_close(logits, clean(*batch), 1e-5, 1e-5, "logits next to poisoned slots")
    for name, buf in caches(model).items():
        changed = ~((buf == before[name]) | (buf.isnan() & before[name].isnan()))
        if name.endswith("_state"):
            rows = changed.flatten(1).any(1).nonzero().flatten().tolist()
            assert rows == [0, 1], f"{name}: rows {rows} changed, expected the two decoded sequences' [0, 1]"
        else:
            slots = changed.flatten(0, 1).flatten(1).any(1).nonzero().flatten()
            assert set(slots.tolist()) <= set(batch.slot_mapping.tolist()), f"{name}: wrote outside slot_mapping"
            assert len(slots) > 0, f"{name}: the new token's row was not written"


@torch.no_grad()
def test_explicit_state_indices():
    """Decoding sequences [1, 0] in that order with state_indices [1, 0] equals decoding [0, 1]."""
    cfg = Qwen35Config.tiny()
    a = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=2, max_context=16)
    b = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=2, max_context=16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(cfg.vocab_size, (n,), generator=g) for n in (4, 7)]
    for m in (a, b):
        for i, p in enumerate(prompts):
            m.prefill(p, i)
    tok = torch.tensor([11, 22])
    ya = a(*a.pages.append([0, 1], tok))
    yb = b(*b.pages.append([1, 0], tok.flip(0)), state_indices=torch.tensor([1, 0]))
    assert_close(yb.flip(0), ya, 1e-5, 1e-5, "reordered batch")


def test_configs():
    tiny, bench, real = Qwen35Config.tiny(), Qwen35Config.bench(), Qwen35Config.real()
    assert tiny.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + (
        "full_attention",)
    assert tiny.rotary_dim == 16 and real.rotary_dim == 64 and sum(tiny.mrope_section) == tiny.rotary_dim // 2
    assert bench.hidden_size == 4096 and bench.layer_types.count("full_attention") == 1
    # bench = one rank of the TEP=8 deployment
    assert bench.num_attention_heads == real.num_attention_heads // 8
    assert bench.linear_num_key_heads == real.linear_num_key_heads // 8
    assert bench.linear_num_value_heads == real.linear_num_value_heads // 8
    assert bench.num_kv_heads == 1


@torch.no_grad()
def test_build_by_name_and_fp8():
    """fp8=True: 128x128 block-quantized linears (router, shared-expert gate and in_proj_ba stay bf16).
    Each FP8 GEMM is ~4-6% off (weights and activations quantized); downstream, that tips near-ties of
    the random tiny router, so closeness is checked on the token mixers, whose input is unquantized."""

    from braze.models import build

    kw = dict(max_batch=2, max_context=16, seed=2)
    model = build("qwen3.5", "tiny", fp8=True, **kw)
    assert model.layers[0].linear_attn.in_proj_qkvz.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].linear_attn.in_proj_ba.weight.dtype == torch.bfloat16
    assert model(*make_decode_inputs(model, 2, [3, 5], torch.Generator().manual_seed(1))).isfinite().all()

    for interval in (4, 1):  # a GDN layer, an attention layer: their mixers see the same (unquantized) input
        cfg = dataclasses.replace(Qwen35Config.tiny(), num_layers=1, full_attention_interval=interval)
        outs = []
        for scheme in (False, True):
            m = Qwen35ForCausalLM(cfg, fp8=scheme, **kw)
            mixer = m.layers[0].linear_attn if interval == 4 else m.layers[0].self_attn
            mixer.register_forward_hook(lambda mod, args, out: outs.append(out.float()))
            m(*make_decode_inputs(m, 2, [3, 5], torch.Generator().manual_seed(1)))
        a, b = outs[2], outs[5]  # the decode step's mixer output (after 2 prefills) of each model
        err = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max()
        assert err < 0.15, f"{cfg.layer_types[0]}: fp8 vs bf16 relative error {err:.3f}"


def test_meta_device_builds_bench_without_memory():
    model = Qwen35ForCausalLM(Qwen35Config.bench(), device="meta", max_batch=64, max_context=4096)
    n = sum(p.numel() for p in model.parameters())
    assert 3e9 < n * 2 < 12e9, f"bench weights {n * 2 / 1e9:.1f} GB"

"""The Qwen 3.5 tiny model compiled with braze equals eager over several decode steps, and every fusion fires."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import braze
from braze.models.common import make_decode_inputs
from braze.models.qwen3_5 import Qwen35Config, Qwen35ForCausalLM

pytestmark = pytest.mark.slow

LINEAR, FULL = (0, 1, 2), (3,)  # one [GDN x 3, full] group of the tiny config: half its compile
DELTA_RULE = ("repeat_interleave", "decay", "delta_rule", "state_store", "readout")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    bad = ~torch.isclose(actual.float(), expected.float(), atol=tol, rtol=tol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}; "
                             f"max abs diff {(actual.float() - expected.float()).abs().max().item():.3g}")


@torch.no_grad()
def test_qwen35_tiny_compiled_with_braze_equals_eager_over_decode_steps_and_reports_every_fusion():
    torch._dynamo.reset()
    cfg = dataclasses.replace(Qwen35Config.tiny(), num_layers=4)
    eager = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=3, max_context=16)
    model = Qwen35ForCausalLM(cfg, dtype=torch.float32, max_batch=3, max_context=16)
    for m in (eager, model):
        make_decode_inputs(m, 3, [3, 6, 2], torch.Generator().manual_seed(9))
    be = braze.backend(braze.FusionConfig())
    compiled = torch.compile(model, backend=be, fullgraph=True)
    g = torch.Generator().manual_seed(10)
    for step in range(3):  # conv and recurrent states carried from step to step
        tok = torch.randint(cfg.vocab_size, (3,), generator=g)
        want = eager(*eager.pages.append([0, 1, 2], tok))
        got = compiled(*model.pages.append([0, 1, 2], tok))
        assert_close(got, want, 1e-4, f"logits of step {step}")
    for (name, a), (_, b) in zip(eager.named_buffers(), model.named_buffers()):
        assert_close(b, a, 1e-4, f"{name} after 3 steps")
    torch._dynamo.reset()
    report = braze.report(be)
    applied = [(r.location, r.ops) for r in report.applied]
    post_conv = ("conv_update", "silu", "split", "l2norm", "gdn_gating")
    for layer in LINEAR:
        # the post-conv path and the gated RMSNorm of the update's output run inside the delta-rule kernel
        # (FusionConfig.delta_rule_conv and delta_rule_norm): one kernel from the conv input to the out projection's
        assert (f"layers.{layer}.linear_attn", post_conv + DELTA_RULE + ("rmsnorm", "silu_gate")) in applied, layer
    for layer in FULL:
        assert (f"layers.{layer}.self_attn.q_norm", ("rmsnorm", "rope")) in applied
        assert (f"layers.{layer}.self_attn.k_norm", ("rmsnorm", "rope", "store")) in applied
        assert (f"layers.{layer}.self_attn", ("store",)) in applied  # V
    for layer in (*LINEAR, *FULL):  # every layer's router (softmax, top-k, renormalized weights) is one kernel
        assert (f"layers.{layer}.mlp", ("scores", "topk", "gather", "renormalize")) in applied, layer
    assert len(applied) == 3 + 3 + 4
    # the recurrent state's [T, Hv, dk, dv] row write is the delta-rule op's now; gemm-merge says why its sibling
    # GEMMs stay apart at 3 tokens (its default range is one). Dual-stream has nothing to say: at this size every
    # MoE fork is launch-bound and the model finds no overlap worth a stream (test_branches.py; on CPU it would
    # say why a fork stays on one stream, test_streams.py)
    assert {(r.pass_name, r.name, r.reason) for r in report.missed} == {
        ("gemm-merge", "token-range", "3 tokens is outside the configured range [1, 1]")}

"""The post-conv, delta-rule and gated-norm fusions on a GPU: Inductor launches the generated kernels itself,
the conv and recurrent states are updated in place (only braze's kernels receive them; nothing allocates
or copies a state), and several decode steps equal eager. CPU twin of the in-place property:
tests/passes/test_post_conv_cuda_lowering.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import braze
from braze.models.common import make_decode_inputs
from braze.models.qwen3_5 import Qwen35Config, Qwen35ForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LINEAR = (0, 1, 2, 4, 5, 6)


def step_args(model, tok: torch.Tensor) -> list:
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in model.pages.append([0, 1, 2], tok)]


def assert_states_in_place(model, src: str) -> None:
    """Each conv / recurrent state input is passed to braze's kernels only: no clone of it feeds them, no
    other kernel reads or copies it back, and no buffer of its shape is allocated. (A count of kernels
    over as many elements as a state proves nothing: at this size the attention's key gather of 3 tokens
    has exactly a 4-slot conv state's 6144 elements.)"""
    launches = re.findall(r"^\s*(\w+)\.run\((.*)\)\s*$", src, flags=re.MULTILINE)
    # (both states go to the one kernel of FusionConfig.delta_rule_conv, `braze_conv_delta_rule_*`)
    for suffix, kernel in (("conv_state", "braze_conv_delta_rule_"), ("ssm_state", "braze_conv_delta_rule_")):
        shapes = {tuple(b.shape) for n, b in model.named_buffers() if n.endswith(suffix)}
        for shape in shapes:
            dims = ", ".join(map(str, shape))
            names = re.findall(rf"assert_size_stride\((\w+), \({re.escape(dims)}\)", src)
            assert names, f"no graph input of the {suffix} shape {shape} in the output code"
            assert not re.search(rf"empty_strided_cuda\(\({re.escape(dims)}\)", src), f"a {suffix}-sized buffer"
            for name in names:
                users = [k for k, args in launches if re.search(rf"\b{name}\b", args)]
                assert users and all(k.startswith(kernel) for k in users), (name, suffix, users)
                assert not re.search(rf"\b{name}\.copy_\(|copy_\({name}\b", src), f"{name} ({suffix}) copied back"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_qwen35_tiny_on_gpu_post_conv_launches_directly_in_place_and_matches_eager(dtype):
    torch._dynamo.reset()
    cfg = Qwen35Config.tiny()
    # 4 state slots for 3 sequences: one slot no token writes
    models = [Qwen35ForCausalLM(cfg, device="cuda", dtype=dtype, max_batch=4, max_context=16) for _ in range(3)]
    for m in models:
        make_decode_inputs(m, 3, [3, 6, 2], torch.Generator().manual_seed(9))
    eager, model, stock_model = models
    be = braze.backend(braze.FusionConfig(count_stock_kernels=True))
    compiled = torch.compile(model, backend=be, fullgraph=True)
    stock = torch.compile(stock_model, backend="inductor", fullgraph=True)
    g = torch.Generator().manual_seed(10)
    # bf16: one step (over several, near-ties in the tiny MoE router make even stock Inductor stray from
    # eager: 0.24 relative error by step 3 on CPU), compared by relative error. Even one step is noisy:
    # eager bf16 vs eager fp32 on the same weights differ by 0.19 (CPU); on an H100 braze's logits
    # differed from eager by 0.067. On CPU stock Inductor 0.016, braze 0.014, braze without post-conv and
    # gated-norm 0.017 (relative to eager bf16). So in bf16 braze may stray as far as stock Inductor
    # does (1.5x), with 5e-2 as the floor.
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    steps = 3 if dtype == torch.float32 else 1
    with inductor_config.patch(force_disable_caches=True):
        for step in range(steps):
            tok = torch.randint(cfg.vocab_size, (3,), generator=g).cuda()
            want = eager(*step_args(eager, tok))
            if step == 0:
                got, code = run_and_get_code(compiled, *step_args(model, tok))
                # count_stock_kernels compiles the graph with stock Inductor too: keep braze's module only
                src = "\n".join(c for c in code if "braze_conv_delta_rule_" in c)
            else:
                got = compiled(*step_args(model, tok))
            err = rel_err(got, want)
            if dtype == torch.float32:
                assert err < tol, (step, err)
            else:
                stock_err = rel_err(stock(*step_args(stock_model, tok)), want)
                assert err <= max(tol, 1.5 * stock_err), (step, err, stock_err)
    for (name, a), (_, b), (_, c) in zip(eager.named_buffers(), model.named_buffers(), stock_model.named_buffers()):
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)
        else:
            assert rel_err(b, a) <= max(tol, 1.5 * rel_err(c, a)), (name, rel_err(b, a), rel_err(c, a))
    if os.environ.get("BRAZE_TEST_DUMP"):  # the output code, to read after a GPU run
        Path(os.environ["BRAZE_TEST_DUMP"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["BRAZE_TEST_DUMP"]) / f"qwen35_tiny_{str(dtype)[6:]}.py").write_text(src)
    assert "braze_conv_delta_rule_" in src and "delta_rule_gated_cpu" not in src, "the fused kernel is not launched directly"
    assert "braze_post_conv_" not in src, "a post-conv kernel of its own"
    assert_states_in_place(model, src)
    report = braze.report(be)
    ops = [(r.location, r.ops) for r in report.applied]
    for layer in LINEAR:  # the post-conv path and the norm inside the update's kernel
        assert (f"layers.{layer}.linear_attn", ("conv_update", "silu", "split", "l2norm", "gdn_gating",
                                                "repeat_interleave", "decay", "delta_rule", "state_store",
                                                "readout", "rmsnorm", "silu_gate")) in ops
    record = report.graphs[0]
    for layer in LINEAR:
        assert record.kernels[f"layers.{layer}"] < record.stock_kernels[f"layers.{layer}"], (record.kernels,
                                                                                            record.stock_kernels)
    torch._dynamo.reset()

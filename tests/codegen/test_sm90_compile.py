"""The router, MoE, delta-rule and post-conv + delta-rule kernels compile for an H100/H200 (sm_90) on a machine without a GPU: Triton's compiler
and ptxas run here, so type and lowering errors the interpreter cannot see (it runs the Python) show in CI.
Their results on a GPU are the CUDA tests' and benchmarks' business. The compile runs in a child process
without TRITON_INTERPRET (the test session's kernels are interpreted functions)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from braze.codegen.moe import braze_moe_down, braze_moe_gate_up
from braze.codegen.router import braze_router


def compile_sm90(fn, pointers, const):
    names = fn.arg_names
    sig = {n: pointers.get(n, "i32") for n in names}
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except (FileNotFoundError, RuntimeError) as e:
        if "ptxas" in str(e):
            print("SKIP no ptxas:", e)
            sys.exit(0)
        raise
    assert kernel.asm["cubin"], fn.__name__
    print("compiled", fn.__name__, const.get("GROUPS", ""), const.get("SHARED", ""))


for groups in (1, 8):
    for scoring in (0, 1):
        compile_sm90(braze_router, {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "w_ptr": "*fp32", "idx_ptr": "*i64",
                                    "scaling": "fp32", "eps": "fp32"},
                     {"E": 256, "K": 8, "BLOCK_E": 256, "BLOCK_K": 8, "SCORING": scoring, "HAS_BIAS": True,
                      "RENORM": True, "GROUPS": groups, "TOP_GROUPS": 4 if groups > 1 else 1, "BLOCK_G": groups})
for shared in (False, True):
    compile_sm90(braze_moe_gate_up, {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "ws_ptr": "*bf16",
                                     "ids_ptr": "*i64"},
                 {"TOP_K": 10, "HIDDEN": 4096, "INTER": 1024, "ROUND_ACT": True, "BLOCK_N": 16, "BLOCK_K": 128,
                  "SOFT_ROUND": False, "SHARED": shared})
    compile_sm90(braze_moe_down, {"h_ptr": "*bf16", "w_ptr": "*bf16", "ws_ptr": "*bf16", "g_ptr": "*bf16",
                                  "y_ptr": "*bf16", "ids_ptr": "*i64", "r_ptr": "*fp32"},
                 {"TOP_K": 10, "HIDDEN": 4096, "INTER": 1024, "ROUND_OUT": True, "BLOCK_N": 4, "BLOCK_K": 256,
                  "SOFT_ROUND": False, "SHARED": shared, "SIGMOID": shared})

from braze.codegen.cache import delta_rule_gated_kernel
from braze.codegen.delta_rule import braze_delta_rule
from braze.patterns.delta_rule import DeltaRule
from braze.patterns.gated_norm import Gate
from braze.patterns.stages import Cast, RMSNorm, RowChain, WeightMul

update = {"q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*bf16", "g_ptr": "*fp32", "b_ptr": "*fp32", "idx_ptr": "*i64",
          "state_ptr": "*fp32", "new_ptr": "*fp32", "scale": "fp64"}  # a Python float, as Inductor types it
shape = {"RATIO": 4, "HV": 8, "DK": 128, "DV": 128, "BLOCK_K": 128, "INDEXED": False}
compile_sm90(braze_delta_rule, {**update, "o_ptr": "*fp32"}, {**shape, "BLOCK_V": 32})
norm = RMSNorm(1e-6, 128, "float32", "float32", "float32", "float32", (Cast("bfloat16"), WeightMul("bfloat16", "bfloat16")),
               store=True)
# o read as fp32: Inductor's joint-graph passes drop the o.to(bf16).float() round trip before braze sees it
chain = RowChain("float32", None, norm, None, Gate("float32", "float32", "bfloat16"))
gated = delta_rule_gated_kernel(DeltaRule(2, 8, 128, 128, 128 ** -0.5, identity=True), chain).jit
compile_sm90(gated, {**{f"u_{k}": v for k, v in update.items()}, "w_ptr": "*bf16", "z_ptr": "*bf16",
                     "norm_out_ptr": "*bf16"},
             {**shape, "BLOCK_V": 128, "D": 128, "G": 1, "GS": 128, "BLOCK_G": 1, "BLOCK_GS": 128, "SOFT_ROUND": False,
              "DIV_RN": False})

# the post-conv path in front of it (the arrival counter's atomics, slot indices): Qwen 3.5's bench heads
from braze.codegen.cache import conv_delta_rule_gated_kernel
from braze.patterns.conv import ConvUpdate
from braze.patterns.gdn import Gating, L2Norm, PostConv, Segment

conv = ConvUpdate(2 * 2 * 128 + 8 * 128, 4, 3, "bfloat16", "float32", "silu", "bfloat16", indexed=True)
post = PostConv(conv, (Segment(0, 2, 128, L2Norm(1e-6, "float32")), Segment(256, 2, 128, L2Norm(1e-6, "float32")),
                       Segment(512, 8, 128, None)), Gating(8, 20.0, "float32", "float32"))
fused = conv_delta_rule_gated_kernel(post, (0, 1, 2), DeltaRule(2, 8, 128, 128, 128 ** -0.5), chain).jit
compile_sm90(fused, {"c_x_ptr": "*bf16", "c_w_ptr": "*bf16", "c_idx_ptr": "*i64", "c_state_ptr": "*bf16",
                     "c_a_ptr": "*bf16", "c_b_ptr": "*bf16", "c_alog_ptr": "*fp32", "c_dt_ptr": "*fp32",
                     "ctr_ptr": "*i32", "u_idx_ptr": "*i64", "u_state_ptr": "*fp32", "u_scale": "fp64",
                     "w_ptr": "*bf16", "z_ptr": "*bf16", "norm_out_ptr": "*bf16"},
             {**shape, "INDEXED": True, "HK": 2, "BLOCK_V": 128, "D": 128, "G": 1, "GS": 128, "BLOCK_G": 1,
              "BLOCK_GS": 128, "SOFT_ROUND": False, "DIV_RN": False})
'''


def test_router_moe_and_delta_rule_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("SKIP"):
        pytest.skip(run.stdout.strip())
    assert run.stdout.count("compiled") == 11, run.stdout

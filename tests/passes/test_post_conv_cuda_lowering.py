"""The CUDA lowering of the post-conv and delta-rule ops, checked on CPU: the graph is retraced on fake CUDA
tensors, so braze's passes trace each op to its Triton launch (`triton_kernel_wrapper_functional`, whose
mutated arguments Triton's TTIR analysis finds, for an sm_90 target), then Inductor's reinplacing runs.
Both states must be updated in place: no clone of a state, no copy back into it (GPU twin:
tests/passes/test_post_conv_gpu.py). The check runs in a process without the Triton interpreter, which
would otherwise turn Triton's own library functions into interpreted ones that TTIR generation rejects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = [(1, 2, "float32"), (2, 3, "bfloat16")]


class _Sm90:
    """Triton's active driver, as far as TTIR generation asks (no GPU needed to build TTIR)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")


def on_fake_cuda(gm: torch.fx.GraphModule, args: list[torch.Tensor]) -> torch.fx.GraphModule:
    """`gm` (a functional ATen graph with its copy_ epilogue) traced again on fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda") for a in args]
    with mode, torch.no_grad():
        return make_fx(gm, tracing_mode="real")(*fake)


def gated_gdn_step(hk: int, hv: int, dk: int, dv: int):
    """The GDN decode step up to the gated RMSNorm of the update's output (RMSNormGated, weight and z as inputs)."""
    from test_post_conv import gdn_step

    inner = gdn_step(hk, hv, dk, dv)

    def step(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm, z, norm_w):
        o = inner(x, conv_state, w, idx, a, b, a_log, dt_bias, ssm).to(x.dtype)
        of = o.float()
        o_hat = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return ((norm_w * o_hat) * torch.nn.functional.silu(z.view(o.shape).float())).to(x.dtype)

    return step


def check_in_place(hk: int, ratio: int, dtype: str, gated: bool = False, conv_fold: bool = False) -> None:
    import triton
    from test_post_conv import gdn_step, make_inputs
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

    from braze.config import FusionConfig
    from braze.testing import aten_graph, run_passes

    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    triton.runtime.driver.set_active(_Sm90())
    hv = hk * ratio
    args = make_inputs(3, hk, hv, 8, 4, 4, getattr(torch, dtype))
    if gated:  # the norm inside the delta-rule kernel: its state argument is u_state_ptr
        args += [torch.randn(3, hv * 4).to(args[0].dtype), torch.randn(4).to(args[0].dtype)]
    gm = on_fake_cuda(aten_graph((gated_gdn_step if gated else gdn_step)(hk, hv, 8, 4), *args), args)
    record = run_passes(gm, FusionConfig(delta_rule_conv=conv_fold))
    fused = [r.name for r in record.remarks if r.kind != "analysis"]
    assert fused == (["delta-rule"] if conv_fold else ["post-conv", "delta-rule"]), fused
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    states = {placeholders[1]: "conv state", placeholders[8]: "recurrent state"}
    launches = [n for n in gm.graph.nodes if n.target is wrapper]
    if conv_fold:  # one launch updates both states and the arrival counters (a buffer of the graph module)
        check_conv_fold_in_place(gm, launches, states)
        return
    assert len(launches) == 2, launches
    key = {n: "u_state_ptr" if "u_state_ptr" in n.kwargs["kwargs"] else "state_ptr" for n in launches}
    assert sorted(key.values()) == (["state_ptr", "u_state_ptr"] if gated else ["state_ptr"] * 2), key
    for n in launches:  # Triton's analysis ran (no "every input is mutated" fallback): it names the state
        clone = n.kwargs["tensors_to_clone"]
        assert key[n] in clone and not {"q_ptr", "u_q_ptr", "x_ptr", "idx_ptr", "u_idx_ptr"} & set(clone), clone
    reinplace_inplaceable_ops_core(gm.graph)
    for n in launches:
        state = n.kwargs["kwargs"][key[n]]
        assert state in states, f"the launch updates {state}, not a state input"
        assert key[n] not in n.kwargs["tensors_to_clone"], f"the {states[state]} is cloned"
    copies = [n.args[0] for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default and n.args[0] in states]
    assert not copies, f"copied back into the {[states[c] for c in copies]}"


def check_conv_fold_in_place(gm, launches, states) -> None:
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

    (launch,) = launches
    kwargs = launch.kwargs["kwargs"]
    counters = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_braze_counters")]
    mutated = {"c_state_ptr": "conv state", "u_state_ptr": "recurrent state"}
    if kwargs["RATIO"] > 1:  # the arrival counters: a [conv state rows, Hk] buffer of the graph module
        mutated["ctr_ptr"] = "counters"
        assert counters == [kwargs["ctr_ptr"]], counters
        assert tuple(counters[0].meta["val"].shape) == (5, kwargs["HK"]), counters[0].meta["val"].shape
    else:
        assert not counters, counters
    # Triton's analysis names what the kernel writes: the states, the counters and its outputs, nothing it only reads
    clone = set(launch.kwargs["tensors_to_clone"])
    assert set(mutated) <= clone and all(k.endswith("_out_ptr") for k in clone - set(mutated)), clone
    reinplace_inplaceable_ops_core(gm.graph)
    for key, what in mutated.items():
        assert key not in launch.kwargs["tensors_to_clone"], f"the {what} is cloned"
    assert states.get(kwargs["c_state_ptr"]) == "conv state" and states.get(kwargs["u_state_ptr"]) == "recurrent state"
    copies = [n.args[0] for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert not copies, f"copied back into {copies}"


def check_gate_reads_z_in_place() -> None:
    """The gated norm's z, a [T, H, dv] view inside the input projection, reaches the row kernel as that view
    (no clone of it into rows first)."""
    import triton

    from braze.testing import aten_graph, run_passes

    triton.runtime.driver.set_active(_Sm90())
    t, h, dv = 3, 4, 16

    def step(o, proj, w):  # RMSNormGated (braze.models.gated_deltanet) with its weight as an input
        x = o.to(torch.bfloat16)
        xf = x.float()
        x_hat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        z = proj[:, 8:8 + h * dv].view(t, h, dv)
        return ((w * x_hat) * torch.nn.functional.silu(z.float())).to(torch.bfloat16)

    args = [torch.randn(t, h, dv), torch.randn(t, 8 + 2 * h * dv).bfloat16(), torch.randn(dv).bfloat16()]
    with torch.no_grad():
        gm = on_fake_cuda(aten_graph(step, *args), args)
    record = run_passes(gm)
    assert [r.name for r in record.remarks if r.kind == "applied"] == ["gated-norm"], record.remarks
    (launch,) = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    z = launch.kwargs["kwargs"]["z_ptr"]
    while z.op != "placeholder":
        assert z.target in (torch.ops.aten.slice.Tensor, torch.ops.aten.view.default), f"z passes through {z.target}"
        z = z.args[0]
    assert launch.kwargs["kwargs"]["z_heads"] == h and launch.kwargs["kwargs"]["z_row_stride"] == 8 + 2 * h * dv


def test_cuda_launches_update_both_states_in_place_and_read_z_in_place():  # (and with the norm inside the update)
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    for case in CASES:
        check_in_place(*case)
        print("checked", *case)
    check_in_place(2, 2, "bfloat16", gated=True)
    print("checked the update with the gated norm inside")
    check_in_place(2, 2, "bfloat16", gated=True, conv_fold=True)
    check_in_place(3, 1, "float32", gated=True, conv_fold=True)
    print("checked the post-conv path, the update and the gated norm in one kernel")
    check_gate_reads_z_in_place()
    print("ok")

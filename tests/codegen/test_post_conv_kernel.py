"""The generated post-conv kernel against its pure-torch reference, under the interpreter (and on CUDA)."""

from __future__ import annotations

import pytest
import torch

import braze.runtime.post_conv as rt
from braze.patterns.conv import ConvUpdate
from braze.patterns.gdn import Gating, L2Norm, PostConv, Segment, post_conv_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def spec_for(hk, hv, dk, dv, width, dtype, gating=True, beta_out="float32"):
    name = str(dtype).removeprefix("torch.")
    c = 2 * hk * dk + hv * dv
    segs = (Segment(0, hk, dk, L2Norm(1e-6, "float32")), Segment(hk * dk, hk, dk, L2Norm(1e-3, "float32")),
            Segment(2 * hk * dk, hv, dv, None))
    gate = Gating(hv, 20.0, "float32", beta_out) if gating else None
    return PostConv(ConvUpdate(c, width, width - 1, name, "float32", "silu", name), segs, gate)


def inputs_for(spec, t, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, k, hv = spec.conv.channels, spec.conv.width, spec.segments[-1].heads
    slots = t + 3
    idx = torch.randperm(slots, generator=g)[:t]
    state = torch.randn(slots, c, k - 1, generator=g).to(dtype)
    state[[s for s in range(slots) if s not in idx.tolist()]] = float("nan")
    x = torch.randn(t, c + 3, generator=g).to(dtype)[:, 3:]  # a strided view
    ins = [x, torch.randn(c, k, generator=g).to(dtype), idx]
    if spec.gating:
        ba = (8 * torch.randn(t, 2 * hv, generator=g)).to(dtype)  # softplus on both sides of its threshold
        ba[0, 0] = 30.0
        ins += [ba[:, :hv], ba[:, hv:], torch.randn(hv, generator=g), torch.randn(hv, generator=g)]
    return [i.to(device) for i in ins], state.to(device)


@pytest.mark.parametrize("shape", [(2, 4, 64, 64, 4), (1, 3, 9, 17, 3), (3, 3, 5, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_kernel_equals_reference_with_poisoned_outputs(shape, dtype, device, monkeypatch):
    hk, hv, dk, dv, width = shape
    spec = spec_for(hk, hv, dk, dv, width, dtype, beta_out=str(dtype).removeprefix("torch."))
    ins, state = inputs_for(spec, 5, dtype, device)
    make = rt._buffers
    monkeypatch.setattr(rt, "_buffers", lambda s, x: tuple(b.fill_(float("nan")) for b in make(s, x)))
    got_state, want_state = state.clone(), state.cpu().clone()  # the reference shifts a CPU copy in place
    got = rt.unpack(spec, torch.ops.braze.post_conv(ins, got_state, spec.to_json()), 5)
    want = post_conv_reference(spec, [i.cpu() for i in ins], want_state)
    assert not torch.equal(want_state.nan_to_num(), state.cpu().nan_to_num()), "the reference wrote no state row"
    for name, a, b in zip(["q", "k", "v", "g", "beta"], got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.cpu(), b, rtol=TOL[dtype], atol=TOL[dtype], msg=name)
    torch.testing.assert_close(got_state.cpu(), want_state, rtol=0, atol=0, equal_nan=True)  # NaN rows untouched


def test_bad_inputs_raise_clear_errors():
    spec = spec_for(1, 2, 4, 4, 4, torch.float32)
    ins, state = inputs_for(spec, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"state of shape \(5, 16, 2\)"):
        torch.ops.braze.post_conv(ins, state[:, :, :2].contiguous(), spec.to_json())
    with pytest.raises(ValueError, match="expected \\[T, 16\\]"):
        torch.ops.braze.post_conv([ins[0][:, :8], *ins[1:]], state, spec.to_json())


def test_reference_backend_gives_the_same_outputs():
    from braze.runtime.rowwise import set_cpu_backend

    spec = spec_for(2, 4, 8, 8, 4, torch.bfloat16, gating=False)
    ins, state = inputs_for(spec, 3, torch.bfloat16, "cpu")
    s1, s2 = state.clone(), state.clone()
    a = rt.unpack(spec, torch.ops.braze.post_conv(ins, s1, spec.to_json()), 3)
    old = set_cpu_backend("reference")
    try:
        b = rt.unpack(spec, torch.ops.braze.post_conv(ins, s2, spec.to_json()), 3)
    finally:
        set_cpu_backend(old)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s1, s2, equal_nan=True)

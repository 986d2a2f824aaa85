"""The RoPE recognizer: NeoX and GPT-J, partial rotary first or last, HF rotate-half; wildcard sizes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from braze.models.common import apply_rope
from braze.patterns.fx import Miss, aten, is_op
from braze.patterns.rope import RopeMatch, match_rope, rope_reference
from braze.testing import aten_graph


def ropes_in(gm) -> list:
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        m = match_rope(n)
        if isinstance(m, RopeMatch):
            found.append(m)
    # a partial rotation also matches at its inner node; keep the outermost
    return [m for m in found if not any(m.output in o.nodes and o is not m for o in found)]


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def hf_rope(q, cos, sin, rotary_dim):
    # transformers' apply_rotary_pos_emb with partial rotary (cos/sin of the full rotary width)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    out = (q_rot * cos) + (rotate_half(q_rot) * sin)
    return torch.cat([out, q_pass], dim=-1) if rotary_dim < q.shape[-1] else out


@given(style=st.sampled_from(["neox", "gptj"]), first=st.booleans(), heads=st.sampled_from([1, 3, 8]),
       head_dim=st.sampled_from([16, 64, 128]), partial=st.sampled_from([1.0, 0.5, 0.25]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), seed=st.integers(0, 99))
def test_braze_models_rope_any_style_and_partial(style, first, heads, head_dim, partial, dtype, seed):
    r = int(head_dim * partial)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, heads, head_dim, generator=gen).to(dtype)
    cos, sin = torch.randn(3, r // 2, generator=gen), torch.randn(3, r // 2, generator=gen)
    gm = aten_graph(lambda x, c, s: apply_rope(x, c, s, style=style, first=first), x, cos, sin)
    [m] = ropes_in(gm)
    assert (m.stage.style, m.stage.head_dim, m.stage.rotary_dim) == (style, head_dim, r)
    assert m.stage.offset == (0 if first else head_dim - r)
    assert m.x.op == "placeholder" and m.cos.op == "placeholder" or "view" in m.cos.name
    ref = rope_reference(x, cos, sin, m.stage).to(dtype)
    torch.testing.assert_close(ref, apply_rope(x, cos, sin, style=style, first=first), rtol=0, atol=0)


@given(rotary_fraction=st.sampled_from([1.0, 0.5]), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_hf_rotate_half_spelling(rotary_fraction, dtype):
    head_dim = 64
    r = int(head_dim * rotary_fraction)
    q = torch.randn(3, 4, head_dim).to(dtype)
    freqs = torch.randn(3, r // 2)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gm = aten_graph(lambda q, c, s: hf_rope(q, c, s, r), q, cos, sin)
    [m] = ropes_in(gm)
    assert (m.stage.style, m.stage.rotary_dim, m.stage.table, m.stage.offset) == ("neox", r, r, 0)
    ref = rope_reference(q, cos, sin, m.stage).to(dtype)
    torch.testing.assert_close(ref, hf_rope(q, cos, sin, r), rtol=0, atol=0)


def test_mixed_styles_are_a_miss():
    def fn(x, c, s):
        x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)  # GPT-J lanes, NeoX recombination

    gm = aten_graph(fn, torch.randn(2, 16), torch.randn(2, 8), torch.randn(2, 8))
    misses = [match_rope(n) for n in gm.graph.nodes if is_op(n, aten.cat)]
    assert any(isinstance(m, Miss) and "recombined" in m.reason for m in misses)


def test_swapped_sin_and_cos_roles_do_not_match():
    def fn(x, c, s):
        x1, x2 = x[..., :8].float(), x[..., 8:].float()
        return torch.cat([x1 * c - x2 * s, x2 * s + x1 * c], -1)  # the second half uses sin as cos

    gm = aten_graph(fn, torch.randn(2, 16), torch.randn(2, 8), torch.randn(2, 8))
    assert ropes_in(gm) == []

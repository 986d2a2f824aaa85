"""Gated DeltaNet (Qwen3-Next / Qwen 3.5 linear attention): pure-torch decode and prefill math.

Every function here is a reference: plain torch ops, no data-dependent Python
branching, so the decode pieces trace into one graph under
`torch.compile(fullgraph=True)`. The math follows MODELS.md §3(b), steps 4-8.

Layouts (per rank; Hk, Hv are the local key / value head counts):
  conv state       [slots, C, K-1]        model dtype, C = 2·Hk·dk + Hv·dv channels
  recurrent state  [slots, Hv, dk, dv]    fp32, S such that o = Sᵀq (as Hugging Face stores it)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# causal conv1d (depthwise, kernel K, no bias, SiLU)
# ----------------------------------------------------------------------------


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode step of the causal depthwise conv, shifting `conv_state` IN PLACE.

    x: [T, C] new inputs; conv_state: [slots, C, K-1] the last K-1 inputs of each
    sequence (oldest first); weight: [C, K]; state_indices: [T] int64 slot of each row.
    Per channel c: u = [state[c, 0:K-1], x[c]]; y = silu(Σᵢ W[c, i]·uᵢ); state ← u[1:K].
    Returns y: [T, C] in x's dtype. Only the rows `state_indices` of conv_state change.
    """
    window = torch.cat([conv_state[state_indices], x.unsqueeze(-1)], dim=-1)  # [T, C, K]
    conv_state.index_copy_(0, state_indices, window[:, :, 1:])
    y = (window.float() * weight.float()).sum(-1)  # [T, C] fp32
    return F.silu(y).to(x.dtype)


def causal_conv1d_prefill(
    x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal depthwise conv over a whole sequence.

    x: [S, C]; weight: [C, K]; initial_state: [C, K-1] (zeros for a fresh sequence).
    Returns (y [S, C] in x's dtype, final_state [C, K-1] = the last K-1 inputs).
    """
    C, K = weight.shape
    if initial_state is None:
        initial_state = x.new_zeros(C, K - 1)
    u = torch.cat([initial_state.to(x.dtype), x.t()], dim=-1)  # [C, K-1+S]
    y = F.conv1d(u.float().unsqueeze(0), weight.float().unsqueeze(1), groups=C)  # [1, C, S]
    y = F.silu(y[0].t()).to(x.dtype)  # [S, C]
    return y, u[:, u.shape[1] - (K - 1) :].contiguous()


# ----------------------------------------------------------------------------
# post-conv: L2 norm of q and k, the decay g and the write strength β
# ----------------------------------------------------------------------------


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(Σx² + eps) over the last dim, computed and returned in fp32."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gating(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = −exp(A_log)·softplus(a + dt_bias) (log-space decay, ≤ 0) and β = sigmoid(b), both fp32.

    a, b: [T, Hv]; A_log, dt_bias: [Hv]. softplus uses torch's default threshold 20.
    """
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    beta = torch.sigmoid(b.float())
    return g, beta


def expand_to_value_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """[..., Hk, d] → [..., Hv, d]: value head j reads key head ⌊j / (Hv/Hk)⌋ (repeat_interleave)."""
    num_k_heads = x.shape[-2]
    if num_v_heads % num_k_heads != 0:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    return x.repeat_interleave(num_v_heads // num_k_heads, dim=-2)


# ----------------------------------------------------------------------------
# the gated delta rule
# ----------------------------------------------------------------------------


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per row of the gated delta rule, updating `state` IN PLACE (fp32).

    q, k: [T, Hk, dk] already L2-normed; v: [T, Hv, dv]; g, beta: [T, Hv];
    state: [slots, Hv, dk, dv] fp32; state_indices: [T] int64.
    Per (t, value head): q ← q·dk^-½; S ← e^g·S; u = Sᵀk; δ = β(v − u); S ← S + k δᵀ; o = Sᵀq.
    Returns o: [T, Hv, dv] fp32.
    """
    num_v_heads, dk = v.shape[1], q.shape[-1]
    q = expand_to_value_heads(q.float(), num_v_heads) * dk**-0.5  # [T, Hv, dk]
    k = expand_to_value_heads(k.float(), num_v_heads)  # [T, Hv, dk]
    S = state[state_indices] * g.exp()[:, :, None, None]  # [T, Hv, dk, dv]
    u = (S * k.unsqueeze(-1)).sum(-2)  # [T, Hv, dv]
    delta = beta.unsqueeze(-1) * (v.float() - u)  # [T, Hv, dv]
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)
    state.index_copy_(0, state_indices, S)
    return (S * q.unsqueeze(-1)).sum(-2)  # [T, Hv, dv]


def gated_delta_rule_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule over a whole sequence, token by token (the recurrent definition).

    q, k: [S, Hk, dk] L2-normed; v: [S, Hv, dv]; g, beta: [S, Hv]; initial_state: [Hv, dk, dv].
    Returns (o [S, Hv, dv] fp32, final state [Hv, dk, dv] fp32).
    """
    S_len, num_v_heads, dv = v.shape
    dk = q.shape[-1]
    state = torch.zeros(1, num_v_heads, dk, dv, dtype=torch.float32, device=v.device)
    if initial_state is not None:
        state[0] = initial_state
    slot = torch.zeros(1, dtype=torch.long, device=v.device)
    out = []
    for t in range(S_len):
        row = slice(t, t + 1)
        out.append(gated_delta_rule_step(q[row], k[row], v[row], g[row], beta[row], state, slot))
    return torch.cat(out, dim=0), state[0]


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `gated_delta_rule_prefill`, a chunk of tokens at a time (for long prompts).

    Within a chunk, with γ_t = Σ_{s≤t} g_s and S₀ the state before it, the recurrence unrolls to
      δ_t = β_t (v_t − e^{γ_t} S₀ᵀk_t − Σ_{s<t} e^{γ_t−γ_s} (k_t·k_s) δ_s)   (a unit lower-triangular solve)
      o_t = e^{γ_t} S₀ᵀq_t + Σ_{s≤t} e^{γ_t−γ_s} (q_t·k_s) δ_s
      S_L = e^{γ_L} S₀ + Σ_s e^{γ_L−γ_s} k_s δ_sᵀ
    Every exponent is ≤ 0 (g ≤ 0), so nothing overflows.
    """
    S_len, num_v_heads, dv = v.shape
    dk = q.shape[-1]
    q = expand_to_value_heads(q.float(), num_v_heads).transpose(0, 1) * dk**-0.5  # [Hv, S, dk]
    k = expand_to_value_heads(k.float(), num_v_heads).transpose(0, 1)  # [Hv, S, dk]
    v, g, beta = v.float().transpose(0, 1), g.float().t(), beta.float().t()  # [Hv, S, dv], [Hv, S], [Hv, S]
    state = torch.zeros(num_v_heads, dk, dv, dtype=torch.float32, device=v.device)
    if initial_state is not None:
        state = state + initial_state
    out = []
    for start in range(0, S_len, chunk):
        sl = slice(start, start + chunk)
        qc, kc, vc, bc = q[:, sl], k[:, sl], v[:, sl], beta[:, sl]
        gamma = g[:, sl].cumsum(-1)  # [Hv, L]
        L = gamma.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool, device=v.device).tril()  # s ≤ t
        strict = causal.tril(-1)  # s < t
        decay = (gamma[:, :, None] - gamma[:, None, :]).masked_fill(~causal, float("-inf")).exp()  # [Hv, L, L]
        lower = (bc[:, :, None] * decay * (kc @ kc.transpose(-1, -2))).masked_fill(~strict, 0.0)  # A[t, s]
        rhs = bc[..., None] * (vc - gamma.exp()[..., None] * (kc @ state))  # [Hv, L, dv]
        eye = torch.eye(L, device=v.device)
        delta = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)  # [Hv, L, dv]
        out.append(gamma.exp()[..., None] * (qc @ state) + (decay * (qc @ kc.transpose(-1, -2))) @ delta)
        last = gamma[:, -1:]  # [Hv, 1]
        state = last.exp()[..., None] * state + (kc * (last - gamma).exp()[..., None]).transpose(-1, -2) @ delta
    return torch.cat(out, dim=1).transpose(0, 1), state  # [S, Hv, dv], [Hv, dk, dv]


# ----------------------------------------------------------------------------
# the gated RMSNorm on the linear-attention output
# ----------------------------------------------------------------------------


class RMSNormGated(nn.Module):
    """y = (x̂·w)·silu(z) over the last dim (one value head), w initialized to 1.

    Rounds like Hugging Face's `Qwen3_5MoeRMSNormGated`: x̂ in fp32, cast to x's dtype,
    times w, then times silu(z) in fp32, cast back to x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # x, z: [..., dv]
        xf = x.float()
        x_hat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = (self.weight * x_hat) * F.silu(z.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

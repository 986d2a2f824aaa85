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
    out = [gated_delta_rule_step(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], state, slot)
           for t in range(S_len)]
    return torch.cat(out, dim=0), state[0]


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

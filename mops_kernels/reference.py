"""Readable fp32 PyTorch versions of every op in SPEC §1-4.

These are the test oracle, the fallback when no compiled or Triton backend can run, and the
baseline of the benchmarks. They favour clarity over speed: `prefix_attention` here *does*
materialise the gathered prefixes, which the kernels never do. Every function computes in
float32 and returns float32 (or the integer types the SPEC names); autograd flows through all of
them, so their gradients are the oracle of the kernels' backward passes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .ops.quant_format import QuantizedWeight

__all__ = ["prefix_attention", "gate_topk", "int4_matmul", "rational", "iapt_generate",
           "RATIONAL_GELU_A", "RATIONAL_GELU_B", "ACTIVATIONS"]


# --------------------------------------------------------------------------------------------
# §1 prefix_attention
# --------------------------------------------------------------------------------------------
def _log_weight(w: torch.Tensor) -> torch.Tensor:
    """log w, with w == 0 -> -inf and a zero (not NaN) gradient there."""
    safe = torch.where(w > 0, w, torch.ones_like(w))
    return torch.where(w > 0, torch.log(safe), torch.full_like(w, -math.inf))


def prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight=None, *,
                     prefix_lens=None, attention_mask=None, causal=True, scale=None):
    """Gated prefix attention, SPEC §1.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; prefix_k, prefix_v [E, P, Hkv, D];
    prefix_index [B, kk] (-1 empty); prefix_weight [B, kk] or None; prefix_lens [E] or None;
    attention_mask [B, S] (1 real, 0 padding) or None. Returns fp32 [B, Hq, T, D].
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    E, P = prefix_k.shape[0], prefix_k.shape[1]
    kk = prefix_index.shape[1]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    dev = q.device

    # (a) the prefix keys of every selected slot, gathered: [B, Hkv, kk*P, D]
    idx = prefix_index.long()
    slot = idx.clamp(min=0)
    pk = prefix_k.float()[slot].permute(0, 3, 1, 2, 4).reshape(B, Hkv, kk * P, D)
    pv = prefix_v.float()[slot].permute(0, 3, 1, 2, 4).reshape(B, Hkv, kk * P, D)
    lens = torch.full((E,), P, device=dev) if prefix_lens is None else prefix_lens.to(dev).long()
    tok_ok = (torch.arange(P, device=dev) < lens[slot].unsqueeze(-1)) & (idx >= 0).unsqueeze(-1)
    w = torch.ones(B, kk, device=dev) if prefix_weight is None else prefix_weight.float()
    bias = _log_weight(w).unsqueeze(-1).expand(B, kk, P)                     # [B, kk, P]
    bias = torch.where(tok_ok, bias, torch.full_like(bias, -math.inf)).reshape(B, 1, 1, kk * P)

    # (b) the sequence keys: padding and (bottom-right) causal masks, [B, 1, T, S]
    seq_ok = torch.ones(B, 1, T, S, dtype=torch.bool, device=dev)
    if attention_mask is not None:
        seq_ok = seq_ok & attention_mask.bool().view(B, 1, 1, S)
    if causal:
        t = torch.arange(T, device=dev).view(T, 1)
        s = torch.arange(S, device=dev).view(1, S)
        seq_ok = seq_ok & (s <= S - T + t)

    qg = q.view(B, Hkv, group, T, D)
    lp = torch.einsum("bhgtd,bhpd->bhgtp", qg, pk).reshape(B, Hq, T, kk * P) * scale + bias
    ls = torch.einsum("bhgtd,bhsd->bhgts", qg, k).reshape(B, Hq, T, S) * scale
    ls = ls.masked_fill(~seq_ok, -math.inf)
    logits = torch.cat([lp, ls], dim=-1)
    values = torch.cat([pv, v], dim=2)                                        # [B, Hkv, kk*P+S, D]

    # One softmax over all keys; a row with no valid key gives 0 (never NaN).
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhgtn,bhnd->bhgtd", p.view(B, Hkv, group, T, -1), values)
    return out.reshape(B, Hq, T, D)


# --------------------------------------------------------------------------------------------
# §2 gate_topk
# --------------------------------------------------------------------------------------------
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def gate_scores(hidden, mask, w1, b1, w2, b2, *, activation="gelu"):
    """Masked mean pool then the two-layer MLP: scores s [B, E] in fp32."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    m = mask.float()
    z = (hidden.float() * m.unsqueeze(-1)).sum(1) / m.sum(1).clamp(min=1).unsqueeze(-1)
    h = ACTIVATIONS[activation](z @ w1.float().t() + b1.float())
    return h @ w2.float().t() + b2.float()


def gate_topk(hidden, mask, w1, b1, w2, b2, k, *, activation="gelu"):
    """MoPs smart gate, SPEC §2: returns (indices int32 [B, k], weights fp32 [B, k])."""
    s = gate_scores(hidden, mask, w1, b1, w2, b2, activation=activation)
    p = torch.softmax(s, dim=-1)
    # Stable descending sort keeps the lower index first among equal probabilities.
    order = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    top = p.gather(1, order)
    return order.to(torch.int32), top / top.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# §3 int4_matmul
# --------------------------------------------------------------------------------------------
def int4_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None):
    """y = x @ qw.dequantize().T (+ bias), in fp32. x [..., K] -> y [..., N]."""
    y = x.float() @ qw.dequantize(torch.float32).t()
    return y if bias is None else y + bias.float()


# --------------------------------------------------------------------------------------------
# §4 rational and the IAPT prompt generator
# --------------------------------------------------------------------------------------------
RATIONAL_GELU_A = (-4.2211e-4, 0.49999956, 0.40270535, 0.07366977, -0.01295479, -0.00374140)
RATIONAL_GELU_B = (4.9585e-5, 0.14729774, 1.1646e-5, -0.00748387)


def rational(x, a, b):
    """(a0 + a1 x + ... + a5 x^5) / (1 + |b1 x + b2 x^2 + b3 x^3 + b4 x^4|), in fp32."""
    x = x.float()
    a = a.float()
    b = b.float()
    num = a[5]
    for i in range(4, -1, -1):          # Horner
        num = num * x + a[i]
    den = b[3]
    for i in range(2, -1, -1):
        den = den * x + b[i]
    den = den * x                       # b1 x + b2 x^2 + b3 x^3 + b4 x^4
    return num / (1 + den.abs())


def iapt_generate(H, mask, w_down, w_sa, a, b, w_up):
    """IAPT soft tokens for one layer, SPEC §4.

    H [B, n, d] hidden states entering the layer, mask [B, n] (1 = instruction token),
    w_down [d, m], w_sa [m, 4], a [6], b [4], w_up [m, d]. Returns S [B, 4, d] in fp32.
    """
    Hp = H.float() @ w_down.float()                                   # [B, n, m]
    logits = Hp @ w_sa.float()                                        # [B, n, 4]
    keep = mask.bool().unsqueeze(-1)
    logits = logits.masked_fill(~keep, -1e30)
    A = torch.softmax(logits, dim=1) * keep.any(1, keepdim=True)      # all-masked rows -> 0
    pooled = A.transpose(1, 2) @ Hp                                   # [B, 4, m]
    return rational(pooled, a, b) @ w_up.float()                      # [B, 4, d]

"""Our attention inside transformers: the "mops" entry of AttentionInterface (SPEC §1, §5).

    register()                      adds "mops" to AttentionInterface and AttentionMaskInterface
                                    (mops_attention_forward, mops_attention_mask)
    use_mops_attention(model)       registers and switches the model to it

The attention function receives HF's tensors q [B, Hq, T, D], k/v [B, Hkv, S, D] (RoPE'd, KV cache
already appended) and what the "mops" mask entry (`mops_attention_mask`) built: a 2-D padding mask
[B, n] (1 real, 0 padding) over the keys that exist up to the last query, or None when that is all
S keys and nothing is padded. Every transformers cache fits one rule, the one its flash-attention
path uses: with n = min(mask length, S), the visible keys are k[:, :, :n] and the mask is the last n
columns. A dynamic cache passes exactly those keys (n = S); a StaticCache passes its whole
max_cache_len buffer, of which the first n = past + T positions are written (the rest are cut
off); a sliding-window cache passes the last S positions (the mask is right-aligned to them). The
queries are the last T of those n keys, so `prefix_attention(..., causal=True)` (bottom-right
aligned) is exactly HF's causal mask, prefix slots visible to every query.

Sliding window (Mistral's `sliding_window`, Qwen2's sliding layers: the `sliding_window` keyword
the attention modules pass): query t sees keys j with n - T + t - window < j <= n - T + t
(transformers' `kv_idx > q_idx - sliding_window`). With n <= window nothing is cut; decode (T = 1)
takes the last `window` keys; a longer prefill, which a per-request [B, S] mask cannot express,
runs the queries whose window starts inside the keys as request rows of their own over overlapping
`window`-long views of k/v (see `_windowed`). The prefix slots stay visible to every query.
Returns [B, T, Hq, D] plus None (no attention weights).

Prefix hook (for the MoPs integration): a forward/generate kwarg `mops_prefix` that reaches the
attention layers (transformers passes unknown **kwargs down to them) holding a `PrefixRouting`.
The object needs one method, `prefix(layer_idx, device)` -> `(prefix_k, prefix_v, index, weight,
lens)` (pool [E, P, Hkv, D] each, index [B, k] int32, weight [B, k] or None, lens [E] or None),
all None for a layer without prefixes: the protocol of integrations/hf.py's per-request state.
`PrefixRouting` is the plain version (one pool per layer, one index/weight for all layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

ATTN_NAME = "mops"


@dataclass
class PrefixRouting:
    """Per-request prefix slots for one forward/generate call (see the module docstring)."""
    prefix_k: Sequence[Optional[torch.Tensor]]     # per layer: [E, P, Hkv, D] or None
    prefix_v: Sequence[Optional[torch.Tensor]]
    index: torch.Tensor                            # [B, k] int32, -1 = empty
    weight: Optional[torch.Tensor] = None          # [B, k] float or None (= 1)
    lens: Optional[torch.Tensor] = None            # [E] int32 or None (= P)

    def prefix(self, layer_idx: int, device=None):
        if layer_idx >= len(self.prefix_k) or self.prefix_k[layer_idx] is None:
            return None, None, None, None, None
        return self.prefix_k[layer_idx], self.prefix_v[layer_idx], self.index, self.weight, self.lens


def _visible_keys(key, value, attention_mask):
    """Keys/values/mask cut to the keys that exist up to the last query (module docstring)."""
    S = key.shape[2]
    if attention_mask is None:
        return key, value, None
    n = min(attention_mask.shape[1], S)
    return key[:, :, :n], value[:, :, :n], attention_mask[:, attention_mask.shape[1] - n:]


def _windowed(query, key, value, mask, window, attend):
    """Bottom-right causal attention limited to the last `window` keys of each query (T > 1).

    Query t sees keys j in [n - T + t - window + 1, n - T + t]. The first t0 queries, whose window
    starts at or before key 0, are one ordinary causal call; each later query becomes a request row of
    its own (T = 1) over an overlapping view of exactly `window` keys (unfold: no copy), one call per
    batch row, with that row's prefix slots and padding mask."""
    B, Hq, T, D = query.shape
    n = key.shape[2]
    t0 = max(0, min(T, window - n + T))
    outs = []
    if t0:
        m = None if mask is None else mask[:, :n - T + t0]
        outs.append(attend(query[:, :, :t0], key[:, :, :n - T + t0], value[:, :, :n - T + t0], m, None))
    rest = T - t0
    if rest:
        first = n - T + t0 - window + 1                     # >= 1: first key of query t0's window
        rows = []
        for b in range(B):
            q = query[b, :, t0:].unsqueeze(2).transpose(0, 1)                      # [rest, Hq, 1, D]
            k = key[b, :, first:].unfold(1, window, 1).permute(1, 0, 3, 2)         # [rest, Hkv, W, D]
            v = value[b, :, first:].unfold(1, window, 1).permute(1, 0, 3, 2)
            m = None if mask is None else mask[b, first:].unfold(0, window, 1)     # [rest, W]
            rows.append(attend(q, k, v, m, b).transpose(0, 1).squeeze(2))         # [Hq, rest, D]
        outs.append(torch.stack(rows))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def mops_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, sliding_window: Optional[int] = None, **kwargs):
    """AttentionInterface function: q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, n <= S] or None."""
    from .. import prefix_attention

    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be the 2-D padding mask [B, S] (model built with "
                         f"attn_implementation={ATTN_NAME!r}), got shape {tuple(attention_mask.shape)}")
    if dropout:
        raise ValueError("mops attention is for a frozen backbone: attention dropout must be 0")
    routing = kwargs.get("mops_prefix")
    pk = pv = index = weight = lens = None
    if routing is not None:
        pk, pv, index, weight, lens = routing.prefix(module.layer_idx, query.device)

    def attend(q, k, v, mask, b):
        i, w = index, weight
        if b is not None and i is not None:          # request row b, repeated for each of its queries
            i = i[b:b + 1].expand(q.shape[0], -1)
            w = None if w is None else w[b:b + 1].expand(q.shape[0], -1)
        return prefix_attention(q, k, v, pk, pv, i, w, prefix_lens=lens, attention_mask=mask,
                                causal=True, scale=scaling)

    key, value, mask = _visible_keys(key, value, attention_mask)
    n, T = key.shape[2], query.shape[2]
    if sliding_window is None or n <= sliding_window:
        out = attend(query, key, value, mask, None)
    elif T == 1:
        cut = n - int(sliding_window)
        out = attend(query, key[:, :, cut:], value[:, :, cut:], None if mask is None else mask[:, cut:], None)
    else:
        out = _windowed(query, key, value, mask, int(sliding_window), attend)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def mops_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        mask_function=None, attention_mask: Optional[torch.Tensor] = None, device=None,
                        **kwargs) -> Optional[torch.Tensor]:
    """AttentionMaskInterface entry: the 2-D mask over the keys up to the last query (docstring).

    `attention_mask` is HF's 2-D padding mask, column i = absolute position i (or a mask this function
    already returned, right-aligned: generate() builds the masks of a StaticCache ahead of the
    forward, which builds them again). Columns after the last query are dropped; the last kv_length
    are kept (a sliding-window cache holds only those). None only when the mask would say nothing:
    all keys visible and their count equal to kv_length, so a static cache always gets its length.
    """
    seen = int(q_offset) + q_length            # keys up to and including the last query
    if attention_mask is None:
        if seen >= kv_length:
            return None
        return torch.ones(batch_size, seen, dtype=torch.bool, device=device)
    mask = attention_mask[:, :seen][:, -kv_length:]
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def register() -> None:
    """Make "mops" a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, mops_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, mops_attention_mask)


def use_mops_attention(model) -> None:
    register()
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={ATTN_NAME!r}")

"""Our attention inside transformers: the "mops" entry of AttentionInterface (SPEC §1, §5).

    register()                      adds "mops" to AttentionInterface and AttentionMaskInterface
    use_mops_attention(model)       registers and switches the model to it

The attention function receives HF's tensors q [B, Hq, T, D], k/v [B, Hkv, S, D] (RoPE'd, KV cache
already appended, so decode has T = 1 and a growing S) and the 2-D padding mask [B, S]
(1 real, 0 padding; None when nothing is padded): the "mops" mask entry reuses transformers'
flash-attention mask builder, which returns exactly that instead of a 4-D float mask. It calls
`mops_kernels.prefix_attention(...)` with causal=True (bottom-right aligned) and returns
[B, T, Hq, D] plus None (no attention weights).

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


def mops_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, **kwargs):
    """AttentionInterface function: q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, S] or None."""
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
    out = prefix_attention(query, key, value, pk, pv, index, weight, prefix_lens=lens,
                           attention_mask=attention_mask, causal=True, scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "mops" a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, mops_attention_forward)
    # flash_attention_mask hands the attention the 2-D [B, S] padding mask (None when unpadded).
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


def use_mops_attention(model) -> None:
    register()
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={ATTN_NAME!r}")

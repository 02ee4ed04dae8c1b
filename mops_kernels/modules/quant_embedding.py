"""QuantEmbedding: a token embedding stored block-quantized (Q8_0 or Q4_1 rows, SPEC §3).

    out[..., :] = dequantize(W[ids[...], :])        ids [...] int -> out [..., d] in `dtype`

Only the selected rows are dequantized (in fp32, as QuantizedWeight.dequantize does, then cast),
so the [V, d] table is never expanded to float. When the embedding is tied to the output head,
the head is an `Int4Linear` over the same tensors: `QuantEmbedding.tied(head)` reads the head's
buffers (no copy, no second set of buffers; moving the model moves them once).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.quant_format import QuantizedWeight
from .int4_linear import Int4Linear


class QuantEmbedding(nn.Module):
    def __init__(self, qw: Optional[QuantizedWeight] = None, *, padding_idx: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, tied_head: Optional[Int4Linear] = None):
        super().__init__()
        if (qw is None) == (tied_head is None):
            raise ValueError("give exactly one of qw (own storage) or tied_head (share an Int4Linear's)")
        if tied_head is not None:
            # A plain attribute, not a submodule: the head owns the buffers and is registered once
            # (as lm_head) in the model, so .to()/state_dict see one copy.
            object.__setattr__(self, "_head", tied_head)
            ref = tied_head
        else:
            object.__setattr__(self, "_head", None)
            self.register_buffer("qweight", qw.qweight)
            self.register_buffer("scale", qw.scale)
            self.register_buffer("min", qw.min)
            self.bits, self.group_size = qw.bits, qw.group_size
            ref = qw
        self.num_embeddings, self.embedding_dim = ref.out_features, ref.in_features
        self.padding_idx = padding_idx
        self.dtype = dtype

    @classmethod
    def tied(cls, head: Int4Linear, *, padding_idx: Optional[int] = None,
             dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        return cls(padding_idx=padding_idx, dtype=dtype, tied_head=head)

    def _storage(self):
        src = self._head if self._head is not None else self
        return src.qweight, src.scale, src.min, src.bits, src.group_size

    @property
    def qw(self) -> QuantizedWeight:
        q, s, m, bits, g = self._storage()
        return QuantizedWeight(q, s, m, (self.num_embeddings, self.embedding_dim), g, bits)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [V, d] table, for code that reads `.weight`; costs a full dequantize."""
        return self.qw.dequantize(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be an int32/int64 tensor, got {ids.dtype}")
        q, s, m, bits, g = self._storage()
        flat = ids.reshape(-1).to(torch.long)
        rows = QuantizedWeight(q[flat], s[flat], None if m is None else m[flat],
                               (flat.numel(), self.embedding_dim), g, bits)
        return rows.dequantize(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        _, _, _, bits, g = self._storage()
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={bits}, group_size={g}, "
                f"tied={self._head is not None}")

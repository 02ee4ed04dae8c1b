"""int4_matmul: y = x @ W^T for a block-quantized frozen weight W (SPEC §3).

    x [..., K] float  ->  y [..., N] in x's dtype,   W = qw.dequantize() [N, K]

Backends: torch (dequantize then matmul; the fallback). The weight is frozen: backward gives dx
only (dx = dy @ W).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .quant_format import QuantizedWeight


def _check(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (from int4_quantize), got {type(qw).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x must have shape (..., K={qw.in_features}), got {tuple(x.shape)}")
    if x.device != qw.device:
        raise ValueError(f"x is on {x.device} but the weight is on {qw.device}")
    if bias is not None and (bias.shape != (qw.out_features,) or bias.device != x.device):
        raise ValueError(f"bias must have shape ({qw.out_features},) on {x.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")


def _forward_torch(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return (x2 @ qw.dequantize(x2.dtype).t())


_FORWARD = {"torch": _forward_torch}


class Int4MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qw, backend):
        ctx.qw = qw
        return _FORWARD[backend](x, qw)

    @staticmethod
    def backward(ctx, dy):
        qw = ctx.qw
        return dy @ qw.dequantize(dy.dtype), None, None


def int4_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ qw.dequantize().T (+ bias). x [..., K] -> y [..., N], dtype of x."""
    _check(x, qw, bias)
    backend = _backend.pick("int4_matmul", x.device, _FORWARD.keys())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qw.in_features)
    y = Int4MatmulFunction.apply(x2, qw, backend)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, qw.out_features)

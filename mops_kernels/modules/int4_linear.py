"""Int4Linear: a frozen block-quantized nn.Linear (4-bit Q4_1 or 8-bit Q8_0, SPEC §3)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..ops.int4_matmul import int4_matmul
from ..ops.quant_format import QuantizedWeight, quantize


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored quantized; the weight is a buffer (frozen, no gradient).

    Build one from a QuantizedWeight (`Int4Linear(qw, bias)`) or from a dense layer
    (`Int4Linear.from_linear(linear, bits=4, group_size=32)`).
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.group_size, self.bits = qw.group_size, qw.bits
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("min", qw.min)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: Optional[int] = None) -> "Int4Linear":
        qw = quantize(linear.weight.detach(), bits=bits, group_size=group_size)
        return cls(qw, None if linear.bias is None else linear.bias.detach())

    @property
    def qw(self) -> QuantizedWeight:
        # Built (and validated) once per set of buffers, not per call: a decode step runs ~200
        # Int4Linears, and rebuilding cost ~20 us each. `.to()` / `load_state_dict` replacing a
        # buffer changes its identity, which rebuilds it.
        qw = self.__dict__.get("_qw")
        if qw is None or qw.qweight is not self.qweight or qw.scale is not self.scale or qw.min is not self.min:
            qw = QuantizedWeight(self.qweight, self.scale, self.min, (self.out_features, self.in_features),
                                 self.group_size, self.bits)
            self.__dict__["_qw"] = qw
        return qw

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for code that reads `.weight` (e.g. shape checks); costs a dequantize."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qw.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self.qw, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def replace_linears(model: nn.Module, bits: int = 4, group_size: Optional[int] = None,
                    should_replace: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Swap every nn.Linear (for which should_replace(name, module) is true) for an Int4Linear."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and (should_replace is None or should_replace(full, child)):
                setattr(mod, child_name, Int4Linear.from_linear(child, bits=bits, group_size=group_size))
    return model

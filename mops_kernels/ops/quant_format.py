"""Block-quantized weight formats of the frozen backbone (SPEC §3).

4-bit (GGUF Q4_1 semantics, asymmetric), per row n and group g of G columns:

    w[n, c] = q[n, c] * scale[n, c // G] + min[n, c // G]        q in 0..15

8-bit (GGUF Q8_0 semantics, symmetric, G = 32):

    w[n, c] = q[n, c] * scale[n, c // G]                          q in -127..127 (int8)

Storage (the layout every backend reads):

    bits=4: qweight uint8 [N, K // 2]   byte i of a row holds column 2i in its low nibble and
                                        column 2i + 1 in its high nibble
    bits=8: qweight int8  [N, K]
    scale:  float16 [N, K // G]
    min:    float16 [N, K // G]         (bits=4 only; None for bits=8)

`QuantizedWeight` is a plain holder of those tensors: it owns no kernels. `int4_matmul`
(ops/int4_matmul.py) multiplies by it; `Int4Linear` (modules) stores its tensors as buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

GROUP_SIZES_4BIT = (32, 64, 128)
GROUP_SIZE_8BIT = 32


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor          # bits=4: uint8 [N, K//2]; bits=8: int8 [N, K]
    scale: torch.Tensor            # fp16 [N, K//G]
    min: Optional[torch.Tensor]    # fp16 [N, K//G] (bits=4), None (bits=8)
    shape: tuple                   # (N, K) of the dense weight
    group_size: int
    bits: int = 4
    _packed: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        validate(self)

    def packed_for(self, layout: str, build: Callable[["QuantizedWeight"], tuple]) -> tuple:
        """`build(self)` (a kernel's own layout of these codes), computed once and cached under
        `layout`; rebuilt if qweight, scale or min were modified in place since (tensor versions)."""
        key = (self.qweight._version, self.scale._version, None if self.min is None else self.min._version)
        hit = self._packed.get(layout)
        if hit is None or hit[0] != key:
            hit = self._packed[layout] = (key, build(self))
        return hit[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.qweight.to(device), self.scale.to(device),
                               None if self.min is None else self.min.to(device),
                               self.shape, self.group_size, self.bits)

    def unpack(self) -> torch.Tensor:
        """Integer codes q as an int16 tensor [N, K] (0..15 for 4-bit, -127..127 for 8-bit)."""
        if self.bits == 8:
            return self.qweight.to(torch.int16)
        lo = (self.qweight & 0x0F).to(torch.int16)
        hi = (self.qweight >> 4).to(torch.int16)
        return torch.stack((lo, hi), dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K]. Computed in fp32 (q * scale + min), then cast to `dtype`."""
        N, K = self.shape
        G = self.group_size
        q = self.unpack().float().view(N, K // G, G)
        w = q * self.scale.float().unsqueeze(-1)
        if self.min is not None:
            w = w + self.min.float().unsqueeze(-1)
        return w.view(N, K).to(dtype)

    def nbytes(self) -> int:
        n = self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * 2
        return n + (0 if self.min is None else self.min.numel() * 2)


def validate(qw: QuantizedWeight) -> None:
    """Raise a ValueError naming the field that does not match the format above."""
    if qw.bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {qw.bits}")
    N, K = qw.shape
    G = qw.group_size
    if qw.bits == 4 and G not in GROUP_SIZES_4BIT:
        raise ValueError(f"group_size must be one of {GROUP_SIZES_4BIT} for 4-bit, got {G}")
    if qw.bits == 8 and G != GROUP_SIZE_8BIT:
        raise ValueError(f"group_size must be {GROUP_SIZE_8BIT} for 8-bit, got {G}")
    if K % G:
        raise ValueError(f"in_features K={K} must be a multiple of group_size {G}")
    want_q = (N, K // 2) if qw.bits == 4 else (N, K)
    want_dtype = torch.uint8 if qw.bits == 4 else torch.int8
    if tuple(qw.qweight.shape) != want_q or qw.qweight.dtype != want_dtype:
        raise ValueError(f"qweight must be {want_dtype} of shape {want_q}, got "
                         f"{qw.qweight.dtype} {tuple(qw.qweight.shape)}")
    if tuple(qw.scale.shape) != (N, K // G) or qw.scale.dtype != torch.float16:
        raise ValueError(f"scale must be float16 of shape {(N, K // G)}, got "
                         f"{qw.scale.dtype} {tuple(qw.scale.shape)}")
    if qw.bits == 4:
        if qw.min is None or tuple(qw.min.shape) != (N, K // G) or qw.min.dtype != torch.float16:
            got = None if qw.min is None else (qw.min.dtype, tuple(qw.min.shape))
            raise ValueError(f"min must be float16 of shape {(N, K // G)} for 4-bit, got {got}")
    elif qw.min is not None:
        raise ValueError("min must be None for 8-bit weights")
    devs = {qw.qweight.device, qw.scale.device} | ({qw.min.device} if qw.min is not None else set())
    if len(devs) != 1:
        raise ValueError(f"qweight, scale and min must be on one device, got {sorted(map(str, devs))}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 (any integer dtype) -> uint8 [N, K//2] in the layout above."""
    if q.shape[-1] % 2:
        raise ValueError(f"K must be even to pack 4-bit codes, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _check_finite_weight(wg: torch.Tensor, op: str) -> None:
    if not bool(torch.isfinite(wg).all()):
        n, g = (int(i) for i in (~torch.isfinite(wg)).any(-1).nonzero()[0])
        raise ValueError(f"{op}: w has non-finite values (NaN/inf), first in row {n}, group {g}")


def _check_fp16_fields(op: str, *fields) -> None:
    """fp16 scale/min that overflow (|value| > 65504) would dequantize to inf/NaN: refuse them."""
    for what, half, exact in fields:
        if not bool(torch.isfinite(half).all()):
            worst = float(exact.abs().max())
            raise ValueError(f"{op}: the fp16 {what} overflows for this weight (needs {worst:.4g}, fp16 holds "
                             f"<= 65504); scale the weight down or keep this layer in float")


def int4_quantize(w: torch.Tensor, group_size: int = 32) -> QuantizedWeight:
    """Round-to-nearest asymmetric 4-bit quantization of w [N, K] (GGUF Q4_1 rules).

    Per group: scale = (max - min) / 15 and min are rounded to fp16 first, then
    q = clamp(round((w - min16) / scale16), 0, 15), so dequantize() reproduces what was rounded.
    A non-finite w, or a group whose scale or min does not fit fp16, is a ValueError.
    """
    if w.dim() != 2:
        raise ValueError(f"w must have shape (N, K), got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a float tensor, got {w.dtype}")
    if group_size not in GROUP_SIZES_4BIT:
        raise ValueError(f"group_size must be one of {GROUP_SIZES_4BIT}, got {group_size}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features K={K} must be a multiple of group_size {group_size}")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    _check_finite_weight(wg, "int4_quantize")
    lo = wg.amin(-1)
    hi = wg.amax(-1)
    scale16 = ((hi - lo) / 15).half()
    min16 = lo.half()
    _check_fp16_fields("int4_quantize", ("scale = (max - min) / 15", scale16, (hi - lo) / 15),
                       ("min", min16, lo))
    s = scale16.float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = torch.round((wg - min16.float().unsqueeze(-1)) * inv).clamp_(0, 15)
    return QuantizedWeight(pack_int4(q.view(N, K)), scale16, min16, (N, K), group_size, 4)


def int8_quantize(w: torch.Tensor, group_size: int = GROUP_SIZE_8BIT) -> QuantizedWeight:
    """Round-to-nearest symmetric 8-bit quantization of w [N, K] (GGUF Q8_0 rules: d = amax/127).
    A non-finite w, or a d that does not fit fp16, is a ValueError."""
    if w.dim() != 2:
        raise ValueError(f"w must have shape (N, K), got {tuple(w.shape)}")
    if group_size != GROUP_SIZE_8BIT:
        raise ValueError(f"group_size must be {GROUP_SIZE_8BIT} for 8-bit, got {group_size}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features K={K} must be a multiple of group_size {group_size}")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    _check_finite_weight(wg, "int8_quantize")
    d16 = (wg.abs().amax(-1) / 127).half()
    _check_fp16_fields("int8_quantize", ("scale = amax / 127", d16, wg.abs().amax(-1) / 127))
    d = d16.float().unsqueeze(-1)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(wg * inv).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(q.view(N, K).contiguous(), d16, None, (N, K), group_size, 8)


def quantize(w: torch.Tensor, bits: int = 4, group_size: Optional[int] = None) -> QuantizedWeight:
    if bits == 4:
        return int4_quantize(w, 32 if group_size is None else group_size)
    if bits == 8:
        return int8_quantize(w, GROUP_SIZE_8BIT if group_size is None else group_size)
    raise ValueError(f"bits must be 4 or 8, got {bits}")

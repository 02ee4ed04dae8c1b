"""rational: the learnable activation of IAPT (SPEC §4); the IAPT generator is ops/iapt_generate.py.

    rational(x, a, b) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1 x + b2 x^2 + b3 x^3 + b4 x^4|)
        x any shape, a [6], b [4] (b[0] is b1); fp32 inside, output in x's dtype.
    With N(x) the numerator, P(x) the polynomial inside |.|, Q = 1 + |P|, g = dL/dy:
        dx    = g * (N'(x) / Q - N sgn(P) P'(x) / Q^2)
        da_i  = sum g x^i / Q                (i = 0..5, over every element)
        db_j  = -sum g N sgn(P) x^(j+1) / Q^2 (j = 0..3)
    The a/b sums are reduced per program into a [programs, 10] fp32 buffer, then summed by torch
    (deterministic, no atomics).

Backends (`_backend.register` at the end of the file): triton (the kernels below), torch (the
reference). The Triton helpers `_rational_value`, `_rational_grad` and `_store_coef_partials` are
shared with ops/iapt_generate.py.
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from ._triton import tl, triton


@triton.jit
def _rational_terms(x, a_ptr, b_ptr):
    """N(x), P(x) (Horner, fp32) and the six a / four b coefficients."""
    a0 = tl.load(a_ptr + 0).to(tl.float32)
    a1 = tl.load(a_ptr + 1).to(tl.float32)
    a2 = tl.load(a_ptr + 2).to(tl.float32)
    a3 = tl.load(a_ptr + 3).to(tl.float32)
    a4 = tl.load(a_ptr + 4).to(tl.float32)
    a5 = tl.load(a_ptr + 5).to(tl.float32)
    b1 = tl.load(b_ptr + 0).to(tl.float32)
    b2 = tl.load(b_ptr + 1).to(tl.float32)
    b3 = tl.load(b_ptr + 2).to(tl.float32)
    b4 = tl.load(b_ptr + 3).to(tl.float32)
    num = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
    pol = (((b4 * x + b3) * x + b2) * x + b1) * x
    dnum = (((5.0 * a5 * x + 4.0 * a4) * x + 3.0 * a3) * x + 2.0 * a2) * x + a1
    dpol = ((4.0 * b4 * x + 3.0 * b3) * x + 2.0 * b2) * x + b1
    return num, pol, dnum, dpol


@triton.jit
def _rational_value(x, a_ptr, b_ptr):
    num, pol, _dn, _dp = _rational_terms(x, a_ptr, b_ptr)
    return num / (1.0 + tl.abs(pol))


@triton.jit
def _rational_grad(x, g, a_ptr, b_ptr):
    """(dx, ga, gb): dx = dL/dx; ga = g / Q (times x^i gives da_i); gb = -g N sgn(P) / Q^2."""
    num, pol, dnum, dpol = _rational_terms(x, a_ptr, b_ptr)
    inv_q = 1.0 / (1.0 + tl.abs(pol))
    sgn = tl.where(pol > 0, 1.0, tl.where(pol < 0, -1.0, 0.0))   # d|P|/dP = 0 at 0, as torch
    ga = g * inv_q
    gb = -ga * num * sgn * inv_q
    return ga * dnum + gb * dpol, ga, gb


@triton.jit
def _store_coef_partials(part_ptr, x, ga, gb):
    """part[0:6] = sum ga x^i, part[6:10] = sum gb x^(j+1), over every element of the 1-D block."""
    xi = ga
    for i in tl.static_range(6):
        tl.store(part_ptr + i, tl.sum(xi, axis=0))
        xi = xi * x
    xj = gb * x
    for j in tl.static_range(4):
        tl.store(part_ptr + 6 + j, tl.sum(xj, axis=0))
        xj = xj * x


@triton.jit
def _rational_fwd_kernel(x_ptr, a_ptr, b_ptr, y_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = _rational_value(x, a_ptr, b_ptr)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rational_bwd_kernel(x_ptr, g_ptr, a_ptr, b_ptr, dx_ptr, part_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)   # g = 0 outside: no a/b share
    dx, ga, gb = _rational_grad(x, g, a_ptr, b_ptr)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    _store_coef_partials(part_ptr + pid * 10, x, ga, gb)

def _rational_block() -> int:
    return 1024

def _rational_fwd(x, a, b):
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    blk = _rational_block()
    _rational_fwd_kernel[(triton.cdiv(n, blk),)](xc, a.contiguous(), b.contiguous(), y, n, BLOCK=blk)
    return y


def _rational_bwd(x, g, a, b):
    xc, gc = x.contiguous(), g.contiguous()
    n = xc.numel()
    blk = _rational_block()
    grid = triton.cdiv(n, blk)
    dx = torch.empty_like(xc)
    part = torch.empty(grid, 10, device=x.device, dtype=torch.float32)
    _rational_bwd_kernel[(grid,)](xc, gc, a.contiguous(), b.contiguous(), dx, part, n, BLOCK=blk)
    coef = part.sum(0)
    return dx, coef[:6], coef[6:]


class RationalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        return _rational_fwd(x, a, b)

    @staticmethod
    def backward(ctx, dy):
        x, a, b = ctx.saved_tensors
        dx, da, db = _rational_bwd(x, dy, a, b)
        return dx, da.to(a.dtype), db.to(b.dtype)

def _check_coeffs(a, b, device):
    if a.shape != (6,):
        raise ValueError(f"a must have shape (6,), got {tuple(a.shape)}")
    if b.shape != (4,):
        raise ValueError(f"b must have shape (4,), got {tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")

def rational(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a0 + a1 x + ... + a5 x^5) / (1 + |b1 x + ... + b4 x^4|) elementwise; x any shape, a [6],
    b [4]. fp32 inside, output in x's dtype; differentiable in x, a and b."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    _check_coeffs(a, b, x.device)
    return _backend.dispatch("rational", x.device).fn(x, a, b)


def _rational_triton(x, a, b):
    if x.numel() == 0:                             # (an empty grid is not launchable)
        return _rational_torch(x, a, b)
    return RationalFunction.apply(x, a, b)


def _rational_torch(x, a, b):
    return reference.rational(x, a, b).to(x.dtype)


_backend.register("rational", "triton", _rational_triton)
_backend.register("rational", "torch", _rational_torch)

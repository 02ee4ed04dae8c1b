"""rational (the learnable activation of IAPT) and the IAPT prompt generator (SPEC §4).

    rational(x, a, b) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1 x + b2 x^2 + b3 x^3 + b4 x^4|)
        x any shape, a [6], b [4] (b[0] is b1); fp32 inside, output in x's dtype.
    With N(x) the numerator, P(x) the polynomial inside |.|, Q = 1 + |P|, g = dL/dy:
        dx    = g * (N'(x) / Q - N sgn(P) P'(x) / Q^2)
        da_i  = sum g x^i / Q                (i = 0..5, over every element)
        db_j  = -sum g N sgn(P) x^(j+1) / Q^2 (j = 0..3)
    The a/b sums are reduced per program into a [programs, 10] fp32 buffer, then summed by torch
    (deterministic, no atomics).

    iapt_generate(H, mask, w_down, w_sa, a, b, w_up):
        H [B, n, d], mask [B, n] (nonzero = instruction token), w_down [d, m], w_sa [m, 4],
        a [6], b [4], w_up [m, d]  ->  S [B, 4, d] in H's dtype
        H' = H w_down                                   plain matmul            [B, n, m]
        A  = softmax over n of (H' w_sa), masked        (all-masked row: A = 0)  [B, n, 4]
        S  = rational(A^T H') w_up                      plain matmul after the fused part
    The middle (logits, masked online softmax over n, A^T H', rational) is one Triton kernel, one
    program per request, streaming H' in tiles of n; it saves the pooled [B, 4, m] and the
    log-sum-exp [B, 4] for its backward, which recomputes A tile by tile:
        dP = dR * rational'(P);  dA[n,c] = dP[c]·H'[n];  delta_c = dP[c]·P[c] (= sum_n A dA)
        dlogit = A (dA - delta);  dH' = A dP + dlogit w_sa^T;  dw_sa = H'^T dlogit
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .. import reference


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


@triton.jit
def _iapt_load_wsa(wsa_ptr, M, s_wm, s_wc, BLOCK_M: tl.constexpr):
    """Offsets over m and the 4 pooling heads, and w_sa [BLOCK_M, 4] in fp32 (zero past m)."""
    mm = tl.arange(0, BLOCK_M)
    cc = tl.arange(0, 4)
    m_ok = mm < M
    wsa = tl.load(wsa_ptr + mm[:, None] * s_wm + cc[None, :] * s_wc, mask=m_ok[:, None],
                  other=0.0).to(tl.float32)
    return mm, cc, m_ok, wsa


@triton.jit
def _iapt_pool_logits(hp_ptr, m_ptr, wsa, pid, n0, N, M, s_hb, s_hn, s_hm, s_mb, s_mn,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One tile of n: H' [BLOCK_N, BLOCK_M] fp32, valid [BLOCK_N], logits [BLOCK_N, 4] (-inf off)."""
    nn = n0 + tl.arange(0, BLOCK_N)
    mm = tl.arange(0, BLOCK_M)
    n_ok = nn < N
    mk = tl.load(m_ptr + pid * s_mb + nn * s_mn, mask=n_ok, other=0)
    valid = n_ok & (mk != 0)
    hp = tl.load(hp_ptr + pid * s_hb + nn[:, None] * s_hn + mm[None, :] * s_hm,
                 mask=n_ok[:, None] & (mm < M)[None, :], other=0.0).to(tl.float32)
    # 4 columns are too narrow for tl.dot (>= 16): a broadcast product and a sum over m.
    logit = tl.sum(hp[:, :, None] * wsa[None, :, :], axis=1)
    return nn, hp, valid, tl.where(valid[:, None], logit, float("-inf"))


@triton.jit
def _iapt_pool_fwd_kernel(
    hp_ptr, m_ptr, wsa_ptr, a_ptr, b_ptr,     # H' [B, n, m], mask [B, n], w_sa [m, 4], a, b
    pooled_ptr, r_ptr, lse_ptr,               # out: pooled [B, 4, m] fp32, r [B, 4, m], lse [B, 4]
    N, M, s_hb, s_hn, s_hm, s_mb, s_mn, s_wm, s_wc,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    mm, cc, m_ok, wsa = _iapt_load_wsa(wsa_ptr, M, s_wm, s_wc, BLOCK_M)
    run_max = tl.full([4], float("-inf"), tl.float32)
    run_sum = tl.zeros([4], dtype=tl.float32)
    acc = tl.zeros([4, BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn, hp, valid, logit = _iapt_pool_logits(hp_ptr, m_ptr, wsa, pid, n0, N, M, s_hb, s_hn, s_hm,
                                                 s_mb, s_mn, BLOCK_N, BLOCK_M)
        new_max = tl.maximum(run_max, tl.max(logit, axis=0))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)   # no (-inf) - (-inf) = NaN
        alpha = tl.exp(run_max - base)
        p = tl.exp(logit - base[None, :])                          # masked tokens: exp(-inf) = 0
        run_sum = run_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * hp[:, None, :], axis=0)
        run_max = new_max
    has = run_sum > 0                                              # all-masked row: A = 0
    pooled = acc / tl.where(has, run_sum, 1.0)[:, None]
    lse = tl.where(has, run_max + tl.log(tl.where(has, run_sum, 1.0)), 0.0)
    out = pid * 4 * M + cc[:, None] * M + mm[None, :]
    tl.store(pooled_ptr + out, pooled, mask=m_ok[None, :])
    tl.store(r_ptr + out, _rational_value(pooled, a_ptr, b_ptr).to(r_ptr.dtype.element_ty),
             mask=m_ok[None, :])
    tl.store(lse_ptr + pid * 4 + cc, lse)


@triton.jit
def _iapt_pool_bwd_kernel(
    hp_ptr, m_ptr, wsa_ptr, a_ptr, b_ptr, pooled_ptr, lse_ptr, dr_ptr,
    dhp_ptr, dwsa_part_ptr, coef_part_ptr,    # out: dH' [B, n, m], [B, m, 4] fp32, [B, 10] fp32
    N, M, s_hb, s_hn, s_hm, s_mb, s_mn, s_wm, s_wc,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    mm, cc, m_ok, wsa = _iapt_load_wsa(wsa_ptr, M, s_wm, s_wc, BLOCK_M)
    offs = pid * 4 * M + cc[:, None] * M + mm[None, :]
    pooled = tl.load(pooled_ptr + offs, mask=m_ok[None, :], other=0.0)
    dr = tl.load(dr_ptr + offs, mask=m_ok[None, :], other=0.0).to(tl.float32)
    dpooled, ga, gb = _rational_grad(pooled, dr, a_ptr, b_ptr)
    _store_coef_partials(coef_part_ptr + pid * 10, tl.reshape(pooled, [4 * BLOCK_M]),
                         tl.reshape(ga, [4 * BLOCK_M]), tl.reshape(gb, [4 * BLOCK_M]))
    delta = tl.sum(dpooled * pooled, axis=1)                       # [4] = sum_n A dA
    lse = tl.load(lse_ptr + pid * 4 + cc)
    dwsa = tl.zeros([BLOCK_M, 4], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn, hp, valid, logit = _iapt_pool_logits(hp_ptr, m_ptr, wsa, pid, n0, N, M, s_hb, s_hn, s_hm,
                                                 s_mb, s_mn, BLOCK_N, BLOCK_M)
        att = tl.where(valid[:, None], tl.exp(logit - lse[None, :]), 0.0)          # A [BN, 4]
        d_att = tl.sum(hp[:, None, :] * dpooled[None, :, :], axis=2)               # [BN, 4]
        dlogit = att * (d_att - delta[None, :])
        dhp = (tl.sum(att[:, :, None] * dpooled[None, :, :], axis=1)
               + tl.sum(dlogit[:, None, :] * wsa[None, :, :], axis=2))            # [BN, BM]
        tl.store(dhp_ptr + pid * N * M + nn[:, None] * M + mm[None, :],
                 dhp.to(dhp_ptr.dtype.element_ty), mask=(nn < N)[:, None] & m_ok[None, :])
        dwsa += tl.sum(hp[:, :, None] * dlogit[:, None, :], axis=0)               # [BM, 4]
    tl.store(dwsa_part_ptr + pid * M * 4 + mm[:, None] * 4 + cc[None, :], dwsa, mask=m_ok[:, None])


def _rational_block() -> int:
    return 1024


def _iapt_blocks(M: int):
    """(BLOCK_N, BLOCK_M): all of m per program; n tiles sized to keep [BN, BM, 4] near 8K values."""
    bm = triton.next_power_of_2(M)
    return max(1, min(64, 2048 // bm)), bm


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


def _iapt_pool_fwd(hp, mask, w_sa, a, b):
    B, N, M = hp.shape
    pooled = torch.empty(B, 4, M, device=hp.device, dtype=torch.float32)
    r = torch.empty(B, 4, M, device=hp.device, dtype=hp.dtype)
    lse = torch.empty(B, 4, device=hp.device, dtype=torch.float32)
    BN, BM = _iapt_blocks(M)
    _iapt_pool_fwd_kernel[(B,)](hp, mask, w_sa, a.contiguous(), b.contiguous(), pooled, r, lse,
                                N, M, hp.stride(0), hp.stride(1), hp.stride(2), mask.stride(0),
                                mask.stride(1), w_sa.stride(0), w_sa.stride(1),
                                BLOCK_N=BN, BLOCK_M=BM)
    return r, pooled, lse


class IaptPoolFunction(torch.autograd.Function):
    """r = rational(softmax_n(H' w_sa, masked)^T H') : [B, n, m] -> [B, 4, m], fused."""

    @staticmethod
    def forward(ctx, hp, mask, w_sa, a, b):
        r, pooled, lse = _iapt_pool_fwd(hp, mask, w_sa, a, b)
        ctx.save_for_backward(hp, mask, w_sa, a, b, pooled, lse)
        return r

    @staticmethod
    def backward(ctx, dr):
        hp, mask, w_sa, a, b, pooled, lse = ctx.saved_tensors
        B, N, M = hp.shape
        dhp = torch.empty(B, N, M, device=hp.device, dtype=hp.dtype)
        dwsa = torch.empty(B, M, 4, device=hp.device, dtype=torch.float32)
        coef = torch.empty(B, 10, device=hp.device, dtype=torch.float32)
        BN, BM = _iapt_blocks(M)
        _iapt_pool_bwd_kernel[(B,)](hp, mask, w_sa, a.contiguous(), b.contiguous(), pooled, lse,
                                    dr.contiguous(), dhp, dwsa, coef,
                                    N, M, hp.stride(0), hp.stride(1), hp.stride(2), mask.stride(0),
                                    mask.stride(1), w_sa.stride(0), w_sa.stride(1),
                                    BLOCK_N=BN, BLOCK_M=BM)
        coef = coef.sum(0)
        return dhp, None, dwsa.sum(0).to(w_sa.dtype), coef[:6].to(a.dtype), coef[6:].to(b.dtype)


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
    backend = _backend.pick("rational", x.device, ("triton", "torch"))
    if backend == "torch" or x.numel() == 0:       # (an empty grid is not launchable)
        return reference.rational(x, a, b).to(x.dtype)
    return RationalFunction.apply(x, a, b)


def iapt_generate(H: torch.Tensor, mask: torch.Tensor, w_down: torch.Tensor, w_sa: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """IAPT soft tokens for one layer (SPEC §4): H [B, n, d], mask [B, n], w_down [d, m],
    w_sa [m, 4], a [6], b [4], w_up [m, d] -> S [B, 4, d] in H's dtype."""
    if H.dim() != 3 or not H.is_floating_point():
        raise ValueError(f"H must be a float tensor of shape (B, n, d), got {tuple(H.shape)} {H.dtype}")
    B, N, d = H.shape
    if mask.shape != (B, N):
        raise ValueError(f"mask must have shape (B, n) = ({B}, {N}), got {tuple(mask.shape)}")
    if w_down.dim() != 2 or w_down.shape[0] != d:
        raise ValueError(f"w_down must have shape (d={d}, m), got {tuple(w_down.shape)}")
    m = w_down.shape[1]
    if w_sa.shape != (m, 4):
        raise ValueError(f"w_sa must have shape (m, 4) = ({m}, 4), got {tuple(w_sa.shape)}")
    if w_up.shape != (m, d):
        raise ValueError(f"w_up must have shape (m, d) = ({m}, {d}), got {tuple(w_up.shape)}")
    _check_coeffs(a, b, H.device)
    for name, t in (("mask", mask), ("w_down", w_down), ("w_sa", w_sa), ("w_up", w_up)):
        if t.device != H.device:
            raise ValueError(f"{name} is on {t.device} but H is on {H.device}")
    backend = _backend.pick("iapt_generate", H.device, ("triton", "torch"))
    if backend == "torch" or B == 0:
        return reference.iapt_generate(H, mask, w_down, w_sa, a, b, w_up).to(H.dtype)
    hp = H @ w_down.to(H.dtype)
    r = IaptPoolFunction.apply(hp, mask.to(torch.float32), w_sa, a, b)
    return r @ w_up.to(H.dtype)

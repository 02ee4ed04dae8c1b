"""iapt_generate: the IAPT prompt generator (SPEC §4), one layer's 4 soft tokens per request.

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

Backends (`_backend.register` at the end of the file): triton (the fused pool below, built on
rational's Triton helpers), torch (the reference).
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from ._triton import tl, triton
from .rational import _check_coeffs, _rational_grad, _rational_value, _store_coef_partials


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

def _iapt_blocks(M: int):
    """(BLOCK_N, BLOCK_M): all of m per program; n tiles sized to keep [BN, BM, 4] near 8K values."""
    bm = triton.next_power_of_2(M)
    return max(1, min(64, 2048 // bm)), bm

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
    return _backend.dispatch("iapt_generate", H.device).fn(H, mask, w_down, w_sa, a, b, w_up)


def _iapt_generate_triton(H, mask, w_down, w_sa, a, b, w_up):
    if H.shape[0] == 0:                            # (an empty grid is not launchable)
        return _iapt_generate_torch(H, mask, w_down, w_sa, a, b, w_up)
    hp = H @ w_down.to(H.dtype)
    r = IaptPoolFunction.apply(hp, mask.to(torch.float32), w_sa, a, b)
    return r @ w_up.to(H.dtype)


def _iapt_generate_torch(H, mask, w_down, w_sa, a, b, w_up):
    return reference.iapt_generate(H, mask, w_down, w_sa, a, b, w_up).to(H.dtype)


_backend.register("iapt_generate", "triton", _iapt_generate_triton)
_backend.register("iapt_generate", "torch", _iapt_generate_torch)

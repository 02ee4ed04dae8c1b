"""gate_topk: the MoPs smart gate, fused (SPEC §2).

    hidden [B, T, d], mask [B, T] (1 = token counts), w1 [h, d], b1 [h], w2 [E, h], b2 [E], k <= E

    z = sum_t mask * hidden / max(1, sum_t mask)       masked mean pool, fp32 accumulate   [B, d]
    s = w2 @ act(w1 @ z + b1) + b2                      scores                               [B, E]
    p = softmax(s); keep the k largest (ties: lower index first)
    weights = p_topk / sum(p_topk)                      [B, k] fp32, sorted descending
    indices                                             [B, k] int32

Forward (Triton): one program per BLOCK_B requests. Pass 1 pools z tile by tile over d (and over T
inside each d tile) and writes it to a small fp32 scratch [B, d] (it is also what the backward
needs); pass 2 runs the MLP in tiles over h, each h tile reduced over d tiles of z and w1 and
folded at once into the [BLOCK_B, E] scores, so neither [B, h] nor w1 is ever whole in registers;
then softmax, an iterative arg-max top-k and the renormalisation, all in registers.

Backward (Triton). The kept weights equal softmax(s) restricted to the kept slots (p_i / sum_kept
p_j = exp(s_i) / sum_kept exp(s_j)), so only the kept scores carry gradient:
    ds_i = wt_i (dwt_i - sum_j wt_j dwt_j) on kept slot i, 0 elsewhere              [B, E]
    a = act(pre), pre = w1 @ z + b1 (recomputed from the saved z)                  [B, h]
    dpre = (ds @ w2) * act'(pre)                                                   [B, h]
    dz = dpre @ w1;  d hidden[b, t] = dz[b] * mask[b, t] / max(1, sum_t mask[b])   [B, T, d]
    dw2 = ds^T a, db2 = sum_b ds, dw1 = dpre^T z, db1 = sum_b dpre
`_gate_topk_bwd_kernel` (one program per BLOCK_B requests, as the forward) scatters ds, recomputes
pre tile by tile over h, writes the per-request pieces ds, a, dpre (fp32 [B, E], [B, h], [B, h]),
then per d tile reduces dz over h and broadcasts it over the masked tokens straight into d hidden
(dz is never stored). `_gate_topk_bwd_param_kernel` then reduces the per-request pieces over B:
dW = X^T Y, db = colsum(X), one program per [BLOCK_M, BLOCK_N] tile of dW looping over B. Why not
per-block partials of dW or atomics: partials would write (B / BLOCK_B) copies of w1's shape and
atomics make dW depend on the order of programs; the reduction reads only the [B, h] + [B, d]
pieces, once per output tile, and is deterministic.
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from ._triton import tl, triton

ACTIVATION_IDS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "tanh": 4}


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at +-inf (e^{2x} overflows to inf -> 1, underflows -> -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:    # gelu (erf)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 1:  # gelu, tanh approximation
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 2:  # relu
        y = tl.maximum(x, 0.0)
    elif ACT == 3:  # silu
        y = x / (1.0 + tl.exp(-x))
    else:           # tanh
        y = _tanh(x)
    return y


@triton.jit
def _activation_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) for the backward."""
    if ACT == 0:    # gelu (erf): Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        y = x * cdf
        dy = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 1:  # gelu, tanh approximation
        th = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        y = 0.5 * x * (1.0 + th)
        dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 \
            * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 2:  # relu (gradient 0 at 0, as torch)
        y = tl.maximum(x, 0.0)
        dy = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 3:  # silu
        sg = 1.0 / (1.0 + tl.exp(-x))
        y = x * sg
        dy = sg * (1.0 + x * (1.0 - sg))
    else:           # tanh
        y = _tanh(x)
        dy = 1.0 - y * y
    return y, dy


@triton.jit
def _inv_count(m_ptr, rows, row_ok, T, s_mb, s_mt, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """1 / max(1, sum_t mask) per request [BLOCK_B]."""
    toks = tl.arange(0, BLOCK_T)
    cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + toks
        mk = tl.load(m_ptr + rows[:, None] * s_mb + t[None, :] * s_mt,
                     mask=row_ok[:, None] & (t[None, :] < T), other=0.0).to(tl.float32)
        cnt += tl.sum(mk, axis=1)
    return 1.0 / tl.maximum(cnt, 1.0)


@triton.jit
def _rows_matmul(x_ptr, s_xr, w_ptr, s_wk, s_wn, rows, row_ok, cols, col_ok, KDIM,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """x[rows, :] @ w[:, cols] [BLOCK_B, BLOCK_N] in fp32, reduced over KDIM in BLOCK_K tiles
    (x: an fp32 scratch with unit column stride; w[k, n] at w_ptr + k * s_wk + n * s_wn)."""
    kcol = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + kcol
        k_ok = kk < KDIM
        xt = tl.load(x_ptr + rows[:, None] * s_xr + kk[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * s_wk + cols[None, :] * s_wn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        # ieee: tf32 would move scores enough to flip near-tied experts against the reference.
        acc += tl.dot(xt, wt, input_precision="ieee")
    return acc


@triton.jit
def _pre_tile(z_ptr, w1_ptr, b1_ptr, rows, row_ok, hh, h_ok, D, s_w1h, s_w1d,
              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """pre = z @ w1[hh]^T + b1[hh] [BLOCK_B, BLOCK_H] from the fp32 z [B, D]."""
    pre = _rows_matmul(z_ptr, D, w1_ptr, s_w1d, s_w1h, rows, row_ok, hh, h_ok, D,
                       BLOCK_B, BLOCK_D, BLOCK_H)
    return pre + tl.load(b1_ptr + hh, mask=h_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gate_topk_fwd_kernel(
    h_ptr, m_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,     # inputs
    z_ptr, idx_ptr, wt_ptr,                           # outputs: z [B, d] fp32, idx [B, K], wt [B, K]
    B, T, D, H, E, K,
    s_hb, s_ht, s_hd, s_mb, s_mt, s_w1h, s_w1d, s_w2e, s_w2h,
    ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    toks = tl.arange(0, BLOCK_T)
    dcol = tl.arange(0, BLOCK_D)

    inv = _inv_count(m_ptr, rows, row_ok, T, s_mb, s_mt, BLOCK_B, BLOCK_T)

    # ---- pass 1: z = masked mean of hidden, tile by tile over d, to the fp32 scratch
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dcol
        d_ok = dd < D
        zt = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + toks
            t_ok = t < T
            mk = tl.load(m_ptr + rows[:, None] * s_mb + t[None, :] * s_mt,
                         mask=row_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(h_ptr + rows[:, None, None] * s_hb + t[None, :, None] * s_ht
                        + dd[None, None, :] * s_hd,
                        mask=row_ok[:, None, None] & t_ok[None, :, None] & d_ok[None, None, :],
                        other=0.0).to(tl.float32)
            zt += tl.sum(x * mk[:, :, None], axis=1)
        zt = zt * inv[:, None]
        tl.store(z_ptr + rows[:, None] * D + dd[None, :], zt, mask=row_ok[:, None] & d_ok[None, :])
    # Pass 2 reads z back across the program's threads: make pass 1's stores visible first.
    tl.debug_barrier()

    # ---- pass 2: s = w2 @ act(w1 @ z + b1) + b2, in tiles over h (each reduced over d tiles)
    ecol = tl.arange(0, BLOCK_E)
    e_ok = ecol < E
    s = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        pre = _pre_tile(z_ptr, w1_ptr, b1_ptr, rows, row_ok, hh, h_ok, D, s_w1h, s_w1d,
                        BLOCK_B, BLOCK_D, BLOCK_H)
        act = tl.where(h_ok[None, :], _activation(pre, ACT), 0.0)
        w2t = tl.load(w2_ptr + hh[:, None] * s_w2h + ecol[None, :] * s_w2e,
                      mask=h_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        s += tl.dot(act, w2t, input_precision="ieee")
    s += tl.load(b2_ptr + ecol, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.where(e_ok[None, :], s, float("-inf"))

    # ---- softmax, top-k by repeated arg-max (lowest index among equals), renormalise
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    avail = tl.where(e_ok[None, :], p, -1.0)            # p >= 0, so -1 marks "not a candidate"
    rank = tl.full([BLOCK_B, BLOCK_E], -1, tl.int32)
    for j in range(0, K):
        best = tl.max(avail, axis=1)
        first = tl.min(tl.where(avail == best[:, None], ecol[None, :], BLOCK_E), axis=1)
        take = ecol[None, :] == first[:, None]
        rank = tl.where(take, j, rank)
        avail = tl.where(take, -1.0, avail)
    keep = rank >= 0
    total = tl.sum(tl.where(keep, p, 0.0), axis=1)
    out = rows[:, None] * K + rank
    ok = keep & row_ok[:, None]
    tl.store(idx_ptr + out, (ecol[None, :] + rank * 0).to(tl.int32), mask=ok)   # ids, as [BB, BE]
    tl.store(wt_ptr + out, p / total[:, None], mask=ok)


@triton.jit
def _gate_topk_bwd_kernel(
    z_ptr, m_ptr, w1_ptr, b1_ptr, w2_ptr, idx_ptr, wt_ptr, dwt_ptr,   # saved inputs, d weights
    ds_ptr, a_ptr, dpre_ptr, dh_ptr,       # outputs: ds [B, E], a, dpre [B, h] fp32; dh [B, T, d]
    B, T, D, H, E, K,
    s_mb, s_mt, s_w1h, s_w1d, s_w2e, s_w2h, s_dhb, s_dht, s_dhd,
    ACT: tl.constexpr, NEED_DH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    ecol = tl.arange(0, BLOCK_E)
    e_ok = ecol < E

    # ---- ds [BLOCK_B, BLOCK_E]: softmax over the kept slots, scattered to their expert columns
    wdot = tl.zeros([BLOCK_B], dtype=tl.float32)
    for j in range(0, K):
        wt = tl.load(wt_ptr + rows * K + j, mask=row_ok, other=0.0)
        g = tl.load(dwt_ptr + rows * K + j, mask=row_ok, other=0.0)
        wdot += wt * g
    ds = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
    for j in range(0, K):
        wt = tl.load(wt_ptr + rows * K + j, mask=row_ok, other=0.0)
        g = tl.load(dwt_ptr + rows * K + j, mask=row_ok, other=0.0)
        e = tl.load(idx_ptr + rows * K + j, mask=row_ok, other=-1)
        ds += tl.where(ecol[None, :] == e[:, None], (wt * (g - wdot))[:, None], 0.0)
    tl.store(ds_ptr + rows[:, None] * E + ecol[None, :], ds, mask=row_ok[:, None] & e_ok[None, :])

    # ---- per h tile: a = act(pre), dpre = (ds @ w2[:, hh]) * act'(pre)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        pre = _pre_tile(z_ptr, w1_ptr, b1_ptr, rows, row_ok, hh, h_ok, D, s_w1h, s_w1d,
                        BLOCK_B, BLOCK_D, BLOCK_H)
        act, dact = _activation_grad(pre, ACT)
        w2t = tl.load(w2_ptr + ecol[:, None] * s_w2e + hh[None, :] * s_w2h,
                      mask=e_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        dpre = tl.dot(ds, w2t, input_precision="ieee") * dact
        out = rows[:, None] * H + hh[None, :]
        ok = row_ok[:, None] & h_ok[None, :]
        tl.store(a_ptr + out, act, mask=ok)
        tl.store(dpre_ptr + out, dpre, mask=ok)

    # ---- d hidden = (dpre @ w1) * mask / count, per d tile, broadcast over the tokens
    if NEED_DH:
        # dpre is read back across the program's threads: make the stores above visible first.
        tl.debug_barrier()
        inv = _inv_count(m_ptr, rows, row_ok, T, s_mb, s_mt, BLOCK_B, BLOCK_T)
        toks = tl.arange(0, BLOCK_T)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            dz = _rows_matmul(dpre_ptr, H, w1_ptr, s_w1h, s_w1d, rows, row_ok, dd, d_ok, H,
                              BLOCK_B, BLOCK_H, BLOCK_D)
            dz = dz * inv[:, None]
            for t0 in range(0, T, BLOCK_T):
                t = t0 + toks
                t_ok = t < T
                mk = tl.load(m_ptr + rows[:, None] * s_mb + t[None, :] * s_mt,
                             mask=row_ok[:, None] & t_ok[None, :], other=0.0)
                tl.store(dh_ptr + rows[:, None, None] * s_dhb + t[None, :, None] * s_dht
                         + dd[None, None, :] * s_dhd,
                         (dz[:, None, :] * mk[:, :, None]).to(dh_ptr.dtype.element_ty),
                         mask=row_ok[:, None, None] & t_ok[None, :, None] & d_ok[None, None, :])


@triton.jit
def _gate_topk_bwd_param_kernel(x_ptr, y_ptr, dw_ptr, db_ptr, B, M, N,
                                BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr):
    """dW = X^T Y [M, N] and db = sum_b X [M] for per-request pieces X [B, M], Y [B, N] (fp32,
    contiguous): one program per [BLOCK_M, BLOCK_N] tile of dW, reducing over B in order."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = mm < M
    n_ok = nn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    colsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, B, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_ok = r < B
        x = tl.load(x_ptr + r[:, None] * M + mm[None, :], mask=r_ok[:, None] & m_ok[None, :],
                    other=0.0)
        y = tl.load(y_ptr + r[:, None] * N + nn[None, :], mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc += tl.dot(tl.trans(x), y, input_precision="ieee")
        colsum += tl.sum(x, axis=0)
    tl.store(dw_ptr + mm[:, None] * N + nn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
    if pid_n == 0:
        tl.store(db_ptr + mm, colsum, mask=m_ok)


def _block_sizes(T: int, d: int, h: int, E: int):
    """(BLOCK_B, BLOCK_T, BLOCK_D, BLOCK_H, BLOCK_E). tl.dot needs every dim >= 16; the pooling
    tile [BLOCK_B, BLOCK_T, BLOCK_D] is kept at 8K values (64 fp32 registers a thread, 4 warps)."""
    return (16, min(8, triton.next_power_of_2(max(T, 1))), min(64, max(16, triton.next_power_of_2(d))),
            min(64, max(16, triton.next_power_of_2(h))), max(16, triton.next_power_of_2(E)))


def _param_block_sizes(M: int, N: int):
    """(BLOCK_R, BLOCK_M, BLOCK_N) of the parameter-gradient reduction: tl.dot needs >= 16."""
    return 16, min(64, max(16, triton.next_power_of_2(M))), min(64, max(16, triton.next_power_of_2(N)))


def _forward_triton(hidden, mask, w1, b1, w2, b2, k, activation):
    B, T, d = hidden.shape
    h, E = w1.shape[0], w2.shape[0]
    mask = mask.to(torch.float32)
    z = torch.empty(B, d, device=hidden.device, dtype=torch.float32)
    idx = torch.empty(B, k, device=hidden.device, dtype=torch.int32)
    wt = torch.empty(B, k, device=hidden.device, dtype=torch.float32)
    BB, BT, BD, BH, BE = _block_sizes(T, d, h, E)
    b1c, b2c = b1.contiguous(), b2.contiguous()
    _gate_topk_fwd_kernel[(triton.cdiv(B, BB),)](
        hidden, mask, w1, b1c, w2, b2c, z, idx, wt,
        B, T, d, h, E, k,
        hidden.stride(0), hidden.stride(1), hidden.stride(2), mask.stride(0), mask.stride(1),
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        ACT=ACTIVATION_IDS[activation], BLOCK_B=BB, BLOCK_T=BT, BLOCK_D=BD, BLOCK_H=BH, BLOCK_E=BE,
        num_warps=4,
    )
    return idx, wt, z, mask


def _param_grads(x, y):
    """(X^T Y, colsum X) of per-request pieces X [B, M], Y [B, N] (fp32, contiguous)."""
    B, M = x.shape
    N = y.shape[1]
    dw = torch.empty(M, N, device=x.device, dtype=torch.float32)
    db = torch.empty(M, device=x.device, dtype=torch.float32)
    BR, BM, BN = _param_block_sizes(M, N)
    _gate_topk_bwd_param_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, y, dw, db, B, M, N, BLOCK_R=BR, BLOCK_M=BM, BLOCK_N=BN, num_warps=4)
    return dw, db


def _backward_triton(dwt, z, maskf, w1, b1, w2, idx, wt, activation, hidden_dtype, need_dh,
                     need_params):
    """d hidden [B, T, d] (hidden's dtype, None unless need_dh) and fp32 (dw1, db1, dw2, db2)
    (None unless need_params) from d weights [B, k]."""
    B, d = z.shape
    T = maskf.shape[1]
    h, E, k = w1.shape[0], w2.shape[0], idx.shape[1]
    dwt = dwt.to(torch.float32).contiguous()
    ds = torch.empty(B, E, device=z.device, dtype=torch.float32)
    a = torch.empty(B, h, device=z.device, dtype=torch.float32)
    dpre = torch.empty(B, h, device=z.device, dtype=torch.float32)
    # The interpreter's bf16 cast truncates instead of rounding: there d hidden is written in fp32
    # and rounded by torch (compiled kernels on a GPU write hidden's dtype directly).
    dh_dtype = torch.float32 if (hidden_dtype == torch.bfloat16 and z.device.type != "cuda") \
        else hidden_dtype
    dh = torch.empty(B, T, d, device=z.device, dtype=dh_dtype) if need_dh else ds
    BB, BT, BD, BH, BE = _block_sizes(T, d, h, E)
    _gate_topk_bwd_kernel[(triton.cdiv(B, BB),)](
        z, maskf, w1, b1, w2, idx, wt, dwt, ds, a, dpre, dh,
        B, T, d, h, E, k,
        maskf.stride(0), maskf.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        *(dh.stride() if need_dh else (0, 0, 0)),
        ACT=ACTIVATION_IDS[activation], NEED_DH=need_dh,
        BLOCK_B=BB, BLOCK_T=BT, BLOCK_D=BD, BLOCK_H=BH, BLOCK_E=BE, num_warps=4,
    )
    params = None
    if need_params:
        dw1, db1 = _param_grads(dpre, z)
        dw2, db2 = _param_grads(ds, a)
        params = (dw1, db1, dw2, db2)
    return (dh.to(hidden_dtype) if need_dh else None), params


class GateTopkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, w1, b1, w2, b2, k, activation):
        idx, wt, z, maskf = _forward_triton(hidden, mask, w1, b1, w2, b2, k, activation)
        ctx.save_for_backward(z, maskf, w1, b1, w2, idx, wt)
        ctx.activation = activation
        ctx.hidden_dtype = hidden.dtype
        ctx.param_dtypes = (w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        ctx.mark_non_differentiable(idx)
        return idx, wt

    @staticmethod
    def backward(ctx, _didx, dwt):
        z, maskf, w1, b1, w2, idx, wt = ctx.saved_tensors
        need = ctx.needs_input_grad
        dhidden, grads = _backward_triton(dwt, z, maskf, w1, b1.contiguous(), w2, idx, wt,
                                          ctx.activation, ctx.hidden_dtype, need[0], any(need[2:6]))
        dparams = [None] * 4
        if grads is not None:
            dparams = [g.to(dt) if n else None
                       for g, dt, n in zip(grads, ctx.param_dtypes, need[2:6])]
        return (dhidden, None, *dparams, None, None)


def _check(hidden, mask, w1, b1, w2, b2, k, activation):
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_IDS)}, got {activation!r}")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float tensor of shape (B, T, d), got {tuple(hidden.shape)} "
                         f"{hidden.dtype}")
    B, T, d = hidden.shape
    if mask.shape != (B, T):
        raise ValueError(f"mask must have shape (B, T) = ({B}, {T}), got {tuple(mask.shape)}")
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"w1 must have shape (h, d={d}), got {tuple(w1.shape)}")
    h = w1.shape[0]
    if b1.shape != (h,):
        raise ValueError(f"b1 must have shape (h,) = ({h},), got {tuple(b1.shape)}")
    if w2.dim() != 2 or w2.shape[1] != h:
        raise ValueError(f"w2 must have shape (E, h={h}), got {tuple(w2.shape)}")
    E = w2.shape[0]
    if b2.shape != (E,):
        raise ValueError(f"b2 must have shape (E,) = ({E},), got {tuple(b2.shape)}")
    if not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in 1..E={E}, got {k!r}")
    for name, t in (("mask", mask), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    # A NaN/inf hidden state or gate parameter makes NaN scores: top-k of NaN is no routing. One
    # host read for all five (this runs once per request, at prefill).
    named = (("hidden", hidden), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))
    ok = torch.stack([torch.isfinite(t).all() for _, t in named])
    if not bool(ok.all()):
        bad = [name for (name, _), good in zip(named, ok.tolist()) if not good]
        raise ValueError(f"gate_topk: {', '.join(bad)} has non-finite values (NaN/inf); the gate cannot "
                         f"rank experts")


def gate_topk(hidden: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor, k: int, *, activation: str = "gelu"):
    """MoPs gate (SPEC §2): (indices int32 [B, k], weights fp32 [B, k]), sorted by weight descending.

    hidden [B, T, d], mask [B, T], w1 [h, d], b1 [h], w2 [E, h], b2 [E]; activation in
    gelu | gelu_tanh | relu | silu | tanh. Differentiable through the weights.
    """
    _check(hidden, mask, w1, b1, w2, b2, k, activation)
    return _backend.dispatch("gate_topk", hidden.device).fn(hidden, mask, w1, b1, w2, b2, k, activation)


def _gate_topk_triton(hidden, mask, w1, b1, w2, b2, k, activation):
    if hidden.shape[0] == 0:                       # (an empty grid is not launchable)
        return _gate_topk_torch(hidden, mask, w1, b1, w2, b2, k, activation)
    return GateTopkFunction.apply(hidden, mask, w1, b1, w2, b2, k, activation)


def _gate_topk_torch(hidden, mask, w1, b1, w2, b2, k, activation):
    return reference.gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=activation)


_backend.register("gate_topk", "triton", _gate_topk_triton)
_backend.register("gate_topk", "torch", _gate_topk_torch)

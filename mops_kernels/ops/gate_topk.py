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

Backward: the kept weights equal softmax(s) restricted to the kept slots (p_i / sum_kept p_j =
exp(s_i) / sum_kept exp(s_j)), so only the kept scores carry gradient. The backward recomputes the
small MLP from the saved z in PyTorch (three [B, *] GEMMs and their transposes, which cuBLAS runs
well; a Triton version would save only those launches) and broadcasts dz over the masked tokens
for d hidden. Not measured against a Triton backward: this is the simple choice, not a proven one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .. import reference

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

    # ---- tokens per request: max(1, sum_t mask)
    cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + toks
        mk = tl.load(m_ptr + rows[:, None] * s_mb + t[None, :] * s_mt,
                     mask=row_ok[:, None] & (t[None, :] < T), other=0.0).to(tl.float32)
        cnt += tl.sum(mk, axis=1)
    inv = 1.0 / tl.maximum(cnt, 1.0)

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
        pre = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dcol
            d_ok = dd < D
            zt = tl.load(z_ptr + rows[:, None] * D + dd[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w1t = tl.load(w1_ptr + dd[:, None] * s_w1d + hh[None, :] * s_w1h,
                          mask=d_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            # ieee: tf32 would move scores enough to flip near-tied experts against the reference.
            pre += tl.dot(zt, w1t, input_precision="ieee")
        pre += tl.load(b1_ptr + hh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
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


def _block_sizes(T: int, d: int, h: int, E: int):
    """(BLOCK_B, BLOCK_T, BLOCK_D, BLOCK_H, BLOCK_E). tl.dot needs every dim >= 16; the pooling
    tile [BLOCK_B, BLOCK_T, BLOCK_D] is kept at 8K values (64 fp32 registers a thread, 4 warps)."""
    return (16, min(8, triton.next_power_of_2(max(T, 1))), min(64, max(16, triton.next_power_of_2(d))),
            min(64, max(16, triton.next_power_of_2(h))), max(16, triton.next_power_of_2(E)))


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


class GateTopkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, w1, b1, w2, b2, k, activation):
        idx, wt, z, maskf = _forward_triton(hidden, mask, w1, b1, w2, b2, k, activation)
        ctx.save_for_backward(z, maskf, w1, b1, w2, b2, idx)
        ctx.activation = activation
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(idx)
        return idx, wt

    @staticmethod
    def backward(ctx, _didx, dwt):
        z, maskf, w1, b1, w2, b2, idx = ctx.saved_tensors
        params = [w1, b1, w2, b2]
        with torch.enable_grad():
            zr = z.detach().requires_grad_(ctx.needs_input_grad[0])
            leaves = [p.detach().requires_grad_(True) for p in params]
            s = reference.gate_scores(zr.unsqueeze(1), maskf.new_ones(z.shape[0], 1), *leaves,
                                      activation=ctx.activation)
            wt = torch.softmax(s.gather(1, idx.long()), dim=-1)   # == the kept, renormalised p
            wanted = ([zr] if ctx.needs_input_grad[0] else []) + leaves
            grads = torch.autograd.grad(wt, wanted, dwt.float())
        dhidden = None
        if ctx.needs_input_grad[0]:
            dz, grads = grads[0], grads[1:]
            scale = maskf / maskf.sum(1, keepdim=True).clamp(min=1)          # [B, T]
            dhidden = (scale.unsqueeze(-1) * dz.unsqueeze(1)).to(ctx.hidden_dtype)
        dw1, db1, dw2, db2 = (g.to(p.dtype) if need else None for g, p, need in
                              zip(grads, params, ctx.needs_input_grad[2:6]))
        return dhidden, None, dw1, db1, dw2, db2, None, None


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


def gate_topk(hidden: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor, k: int, *, activation: str = "gelu"):
    """MoPs gate (SPEC §2): (indices int32 [B, k], weights fp32 [B, k]), sorted by weight descending.

    hidden [B, T, d], mask [B, T], w1 [h, d], b1 [h], w2 [E, h], b2 [E]; activation in
    gelu | gelu_tanh | relu | silu | tanh. Differentiable through the weights.
    """
    _check(hidden, mask, w1, b1, w2, b2, k, activation)
    backend = _backend.pick("gate_topk", hidden.device, ("triton", "torch"))
    if backend == "torch" or hidden.shape[0] == 0:   # (an empty grid is not launchable)
        return reference.gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=activation)
    return GateTopkFunction.apply(hidden, mask, w1, b1, w2, b2, k, activation)

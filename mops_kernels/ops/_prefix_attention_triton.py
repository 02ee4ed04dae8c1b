"""Triton kernels of `prefix_attention` (SPEC §1): fused forward and backward.

Rows. One program owns a tile of BLOCK_M query rows of one (request b, kv head hkv): the G = Hq/Hkv
query heads sharing that kv head and their T tokens, flattened as row r = g*T + t (head
h = hkv*G + g). GQA thus costs nothing (every K/V tile is loaded once for all G heads) and decode
(T = 1) still fills a tile with the G heads.

Forward (online softmax, base-2 logits c2 = log2(e) * scale * q·k):
    1. the prefix, packed into one tile: the selections j < kk with slot = prefix_index[b, j] >= 0
       and w > 0 contribute their tokens p < prefix_lens[slot] back to back (`_packed_slots`: a
       cumsum over kk; token n belongs to the j with start[j] <= n < end[j]), so kk = 4 slots of
       P = 16 tokens are ONE 64-wide tile whatever the holes; keys/values are read IN PLACE from
       the pool prefix_k/v[slot, p, hkv, :] with the per-token bias log2 w[b, j];
    2. the sequence: first the interior tiles, whose keys every row of the tile sees (below the
       causal diagonal of the tile's smallest t, inside S): loads without bounds, no [M, N]
       select (padding, if any, is a [N] -inf bias); then the diagonal / boundary tiles
       s < min(S, S - T + t_max + 1) with the full masks.
    Prefill (T > 1): one program does both and writes out and lse; its launch configuration
    (BLOCK_M 64 or 128, BLOCK_N, warps, stages) is the first of PREFILL_CONFIGS that
    prefill_config_fits keeps. Decode (T = 1): flash-decoding; program id 2 picks a split: split 0
    is the prefix tile, split i >= 1 the sequence chunk [(i-1)*chunk, i*chunk); each writes
    (acc, m, l) and `_prefix_attention_reduce_kernel` merges.
    No tensor of shape [B, kk*P, ...] is ever materialised: the kernels receive the pool itself
    (tests/test_prefix_attention.py checks the launch arguments).
    lse (base 2) is +inf on a row with no valid key, so the backward's p = exp2(c2 - lse) is 0 there.

Roofline (sm_90 SASS of the interior loop, fp16, D = 128: tests/test_sass_budget_attention.py;
H100: 4 warp-instructions per clock per SM, 4096 dense bf16 FLOP per clock per SM, 3.35 TB/s):
    prefill  FLOPs 4 * BLOCK_M * BLOCK_N * D per iteration; tensor-bound below 1 warp-instruction
             per 1024 FLOP. 128 x 64 tiles, 8 warps: 0.92 (254 registers: one CTA of 8 warps per
             SM); 64 x 64: 1.73 (190 registers), issue-bound; the old all-masked loop: 2.68.
    decode   bytes: K/V of each (b, kv head) once for its G query heads (one tensor-core tile of
             16 rows), the packed prefix rows once, fp32 partials; ~24 instructions per lane-16 B
             of K/V at G = 1 and 4 against the ~145 an SM can issue at full HBM bandwidth
             (164 registers, 4 warps: 3 CTAs per SM).

Backward (FlashAttention-2 style, delta = rowsum(dO * O)), with ds = p * (dO·v - delta):
    _prefix_attention_bwd_dq_kernel   dq = scale * sum ds k over slots and sequence; per program
                                      partial sums of ds over each slot's tokens (d log w)
    _prefix_attention_bwd_dkv_kernel  dk = scale * sum ds q, dv = sum p dO for the sequence keys
                                      (plain stores) and for the prefix slots (fp32 atomics into
                                      d pool [E, P, Hkv, D]: a slot picked twice gets both sums).
                                      Causal skipping: a sequence key tile runs only the row tiles
                                      with some t >= s_first - (S - T) (its first unpadded key),
                                      about half the (key, row) tile pairs at T = S; key tiles of
                                      pure padding and prefix tiles of excluded slots run none.
                                      Prefix keys have no causal rule: every row tile sees them.
    d w = d log w / w, and 0 where w == 0 (the slot is excluded there).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (bf16 under TRITON_INTERPRET only) multiplies in fp32, because the
    interpreter's bf16 dot is wrong (triton 3.9 returns garbage); compiled kernels never set it."""
    if UPCAST:   # one return: Triton's code generator types every return of a jit function
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c


@triton.jit
def _as(x, dtype, UPCAST: tl.constexpr):
    """x cast to the dot's operand dtype (kept fp32 under UPCAST: the interpreter's bf16 cast
    truncates instead of rounding)."""
    if UPCAST:
        y = x
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _online_update(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of base-2 logits s [M, N] (-inf = masked) and values v [N, D] into (acc, m, l)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: no NaN from -inf - -inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_as(p, v.dtype, UPCAST), v, DOT_PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _slot_info(IDX, W, LENS, b, j, sib, sij, swb, swj, P,
               HAS_W: tl.constexpr, HAS_LENS: tl.constexpr):
    """(slot >= 0, number of valid tokens (0 when excluded), base-2 bias log2 w) of selection j."""
    slot = tl.load(IDX + b * sib + j * sij).to(tl.int64)
    n_tok = P
    if HAS_LENS:
        n_tok = tl.load(LENS + tl.maximum(slot, 0)).to(tl.int32)
    bias = 0.0
    if HAS_W:
        w = tl.load(W + b * swb + j * swj).to(tl.float32)
        n_tok = tl.where(w > 0, n_tok, 0)
        bias = tl.log2(tl.where(w > 0, w, 1.0))
    n_tok = tl.where(slot >= 0, n_tok, 0)
    return tl.maximum(slot, 0), n_tok, bias


@triton.jit
def _load_rows(Q, sqb, sqh, sqt, sqd, pid_bh, r0, Hkv, G, T,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The row tile r0.. of (b, hkv): rows r = g*T + t of heads h = hkv*G + g, and q [M, D]."""
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < G * T
    t = rows % T
    h = hkv * G + rows // T
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    return b, hkv, rows, row_ok, t, h, q


@triton.jit
def _seq_hi(pid_m, T, S, R, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the sequence keys any row of tile pid_m sees (bottom-right causal)."""
    hi = S
    if CAUSAL:
        r0 = pid_m * BLOCK_M
        r1 = tl.minimum(r0 + BLOCK_M, R) - 1
        t_max = tl.where(r0 // T == r1 // T, r1 % T, T - 1)   # the tile may span two heads
        hi = tl.maximum(tl.minimum(S, S - T + t_max + 1), 0)
    return hi


@triton.jit
def _seq_keys(k_base, v_base, MASK, b, smb, sms, sks, skd, svs, svd, offs_s, hi, t, T, S,
              BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Sequence keys offs_s: k^T [D, N], v [N, D], visible [M, N] (padding + causal)."""
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_s < hi
    kt = tl.load(k_base + offs_s[None, :] * sks + offs_d[:, None] * skd,
                 mask=key_ok[None, :], other=0.0)
    vv = tl.load(v_base + offs_s[:, None] * svs + offs_d[None, :] * svd,
                 mask=key_ok[:, None], other=0.0)
    if HAS_MASK:
        am = tl.load(MASK + b * smb + offs_s * sms, mask=key_ok, other=0)
        key_ok = key_ok & (am != 0)
    ok = key_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_s[None, :] <= (S - T + t)[:, None])
    return kt, vv, ok


@triton.jit
def _prefix_keys(PK, PV, slot, hkv, offs_p, n_tok, spkp, spkh, spkd, spvp, spvh, spvd,
                 spke, spve, BLOCK_D: tl.constexpr):
    """Tokens offs_p of pool slot `slot`, read in place: k^T [D, N], v [N, D], valid [N]."""
    offs_d = tl.arange(0, BLOCK_D)
    tok_ok = offs_p < n_tok
    kt = tl.load(PK + slot * spke + offs_p[None, :] * spkp + hkv * spkh + offs_d[:, None] * spkd,
                 mask=tok_ok[None, :], other=0.0)
    vv = tl.load(PV + slot * spve + offs_p[:, None] * spvp + hkv * spvh + offs_d[None, :] * spvd,
                 mask=tok_ok[:, None], other=0.0)
    return kt, vv, tok_ok


@triton.jit
def _packed_slots(IDX, W, LENS, b, sib, sij, swb, swj, KK, P,
                  KK_PAD: tl.constexpr, HAS_W: tl.constexpr, HAS_LENS: tl.constexpr):
    """The packed prefix tile of request b: per selection j < KK (padded to KK_PAD) its slot, base-2
    bias log2 w and token range [start, end) in the packed order; holes, w == 0 and p >= lens
    take no room. Returns (slot, bias, start, end, total)."""
    jj = tl.arange(0, KK_PAD)
    j_ok = jj < KK
    slot = tl.load(IDX + b * sib + jj * sij, mask=j_ok, other=-1).to(tl.int64)
    on = slot >= 0
    cnt = tl.where(on, P, 0)
    if HAS_LENS:
        cnt = tl.where(on, tl.load(LENS + tl.maximum(slot, 0), mask=j_ok, other=0).to(tl.int32), 0)
    bias = tl.zeros([KK_PAD], dtype=tl.float32)
    if HAS_W:
        w = tl.load(W + b * swb + jj * swj, mask=j_ok, other=0.0).to(tl.float32)
        cnt = tl.where(w > 0, cnt, 0)
        bias = tl.log2(tl.where(w > 0, w, 1.0))
    end = tl.cumsum(cnt, 0)
    return tl.maximum(slot, 0), bias, end - cnt, end, tl.sum(cnt, 0)


@triton.jit
def _packed_keys(PK, PV, slot, bias, start, end, total, hkv, offs_n, spkp, spkh, spkd, spvp, spvh,
                 spvd, spke, spve, KK_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Packed tokens offs_n [N] of the prefix tile, read in place from the pool: k^T [D, N],
    v [N, D], valid [N], bias [N]. Token n belongs to selection j = #{j : end[j] <= n}."""
    offs_d = tl.arange(0, BLOCK_D)
    jn = tl.sum((end[None, :] <= offs_n[:, None]).to(tl.int32), 1)
    pick = jn[:, None] == tl.arange(0, KK_PAD)[None, :]                    # one-hot [N, KK_PAD]
    slot_n = tl.sum(tl.where(pick, slot[None, :], 0), 1)
    p = offs_n - tl.sum(tl.where(pick, start[None, :], 0), 1)
    bias_n = tl.sum(tl.where(pick, bias[None, :], 0.0), 1)
    tok_ok = offs_n < total
    kt = tl.load(PK + slot_n[None, :] * spke + p[None, :] * spkp + hkv * spkh + offs_d[:, None] * spkd,
                 mask=tok_ok[None, :], other=0.0)
    vv = tl.load(PV + slot_n[:, None] * spve + p[:, None] * spvp + hkv * spvh + offs_d[None, :] * spvd,
                 mask=tok_ok[:, None], other=0.0)
    return kt, vv, tok_ok, bias_n


@triton.jit
def _seq_full_end(pid_m, T, S, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the interior sequence tiles of row tile pid_m: whole BLOCK_N tiles of keys that every
    row of the tile sees (s < S, and s <= S - T + t for its smallest t under causal)."""
    end = S
    if CAUSAL:
        r0 = pid_m * BLOCK_M
        r1 = tl.minimum(r0 + BLOCK_M, R) - 1
        t_min = tl.where(r0 // T == r1 // T, r0 % T, 0)      # a tile spanning two heads has t = 0
        end = tl.maximum(tl.minimum(S, S - T + t_min + 1), 0)
    return (end // BLOCK_N) * BLOCK_N


@triton.jit
def _prefix_attention_fwd_kernel(
        Q, K, V, PK, PV, IDX, W, LENS, MASK, O, LSE, ACC_P, M_P, L_P,
        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
        spke, spkp, spkh, spkd, spve, spvp, spvh, spvd, sib, sij, swb, swj, smb, sms,
        sob, soh, sot, sod,
        Hkv, G, T, S, P, KK, qk_scale, chunk, n_split,
        HAS_PREFIX: tl.constexpr, HAS_W: tl.constexpr, HAS_LENS: tl.constexpr,
        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KK_PAD: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    R = G * T
    b, hkv, rows, row_ok, t, h, q = _load_rows(Q, sqb, sqh, sqt, sqd, pid_bh, pid_m * BLOCK_M,
                                               Hkv, G, T, BLOCK_M, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- (1) the prefix: the request's selected slots packed into one tile -----------------
    if HAS_PREFIX:
        slot, bias, start, end, total = _packed_slots(IDX, W, LENS, b, sib, sij, swb, swj, KK, P,
                                                      KK_PAD, HAS_W, HAS_LENS)
        if SPLIT:
            total = tl.where(pid_s == 0, total, 0)   # split 0 is the prefix segment
        for n0 in range(0, total, BLOCK_N):           # one tile while kk*P <= BLOCK_N
            kt, vv, tok_ok, bias_n = _packed_keys(PK, PV, slot, bias, start, end, total, hkv,
                                                  n0 + offs_n, spkp, spkh, spkd, spvp, spvh, spvd,
                                                  spke, spve, KK_PAD, BLOCK_D)
            s = _dot(q, kt, DOT_PREC, UPCAST) * qk_scale + bias_n[None, :]
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vv, DOT_PREC, UPCAST)

    # ---- (2) the sequence: interior tiles without masks, then the diagonal/boundary tiles ----
    hi = _seq_hi(pid_m, T, S, R, BLOCK_M, CAUSAL)
    lo = 0
    if SPLIT:
        lo = (pid_s - 1) * chunk
        hi = tl.where(pid_s == 0, 0, tl.minimum(hi, lo + chunk))
        lo = tl.maximum(lo, 0)
    mid = tl.minimum(tl.maximum(_seq_full_end(pid_m, T, S, R, BLOCK_M, BLOCK_N, CAUSAL), lo), hi)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for s0 in range(lo, mid, BLOCK_N):                # every row sees every key: no bounds, no causal
        offs_s = s0 + offs_n
        kt = tl.load(k_base + offs_s[None, :] * sks + offs_d[:, None] * skd)
        vv = tl.load(v_base + offs_s[:, None] * svs + offs_d[None, :] * svd)
        s = _dot(q, kt, DOT_PREC, UPCAST) * qk_scale
        if HAS_MASK:                                  # padding: a [N] bias, not a [M, N] select
            am = tl.load(MASK + b * smb + offs_s * sms)
            s = s + tl.where(am != 0, 0.0, float("-inf"))[None, :]
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vv, DOT_PREC, UPCAST)
    for s0 in range(mid, hi, BLOCK_N):
        kt, vv, ok = _seq_keys(k_base, v_base, MASK, b, smb, sms, sks, skd, svs, svd,
                               s0 + offs_n, hi, t, T, S, BLOCK_D, HAS_MASK, CAUSAL)
        s = _dot(q, kt, DOT_PREC, UPCAST) * qk_scale
        s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vv, DOT_PREC, UPCAST)

    if SPLIT:
        # partials [B*Hkv, n_split, R(, D)], merged by the reduce kernel
        base = (pid_bh * n_split + pid_s) * R
        tl.store(ACC_P + (base + rows[:, None]) * BLOCK_D + offs_d[None, :], acc,
                 mask=row_ok[:, None])
        tl.store(M_P + base + rows, m_i, mask=row_ok)
        tl.store(L_P + base + rows, l_i, mask=row_ok)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + b * sob + h[:, None] * soh + t[:, None] * sot + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("inf"))
        tl.store(LSE + pid_bh * R + rows, lse, mask=row_ok)


@triton.jit
def _prefix_attention_reduce_kernel(ACC_P, M_P, L_P, O, LSE, Hkv, G, T, n_split,
                                    sob, soh, sot, sod,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the flash-decoding splits of one (b, hkv) row tile: out = sum 2^(m_i-M) acc_i / l."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    R = G * T
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, n_split):
        base = (pid_bh * n_split + i) * R
        m_s = tl.load(M_P + base + rows, mask=row_ok, other=float("-inf"))
        l_s = tl.load(L_P + base + rows, mask=row_ok, other=0.0)
        a_s = tl.load(ACC_P + (base + rows[:, None]) * BLOCK_D + offs_d[None, :],
                      mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        l = l * alpha + l_s * beta
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    t = rows % T
    h = hkv * G + rows // T
    tl.store(O + b * sob + h[:, None] * soh + t[:, None] * sot + offs_d[None, :] * sod,
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh * R + rows, tl.where(l > 0, m + tl.log2(l_safe), float("inf")),
             mask=row_ok)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, kt, vt, s_ok, bias, qk_scale,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the dq pass: returns (dq, ds) with ds = p (dO.v - delta), 0 where masked."""
    s = _dot(q, kt, DOT_PREC, UPCAST) * qk_scale + bias
    p = tl.where(s_ok, tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, vt, DOT_PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    dq += _dot(_as(ds, kt.dtype, UPCAST), tl.trans(kt), DOT_PREC, UPCAST)
    return dq, ds


@triton.jit
def _prefix_attention_bwd_dq_kernel(
        Q, K, V, PK, PV, IDX, W, LENS, MASK, DO, LSE, DELTA, DQ, DLOGW,
        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
        spke, spkp, spkh, spkd, spve, spvp, spvh, spvd, sib, sij, swb, swj, smb, sms,
        Hkv, G, T, S, P, KK, qk_scale, sm_scale,
        HAS_PREFIX: tl.constexpr, HAS_W: tl.constexpr, HAS_LENS: tl.constexpr,
        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    R = G * T
    b, hkv, rows, row_ok, t, h, q = _load_rows(Q, sqb, sqh, sqt, sqd, pid_bh, pid_m * BLOCK_M,
                                               Hkv, G, T, BLOCK_M, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    # dO, lse, delta are contiguous [B, Hq, T(, D)]: row (b, hkv, r) sits at pid_bh * R + r
    do = tl.load(DO + (pid_bh * R + rows[:, None]) * BLOCK_D + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * R + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * R + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:
        n_mblk = tl.cdiv(R, BLOCK_M)
        for j in range(0, KK):
            slot, n_tok, bias = _slot_info(IDX, W, LENS, b, j, sib, sij, swb, swj, P,
                                           HAS_W, HAS_LENS)
            dlogw = tl.zeros([BLOCK_M], dtype=tl.float32)
            for p0 in range(0, n_tok, BLOCK_N):
                kt, vv, tok_ok = _prefix_keys(PK, PV, slot, hkv, p0 + offs_n, n_tok, spkp, spkh,
                                              spkd, spvp, spvh, spvd, spke, spve, BLOCK_D)
                dq, ds = _bwd_dq_tile(dq, q, do, lse, delta, kt, tl.trans(vv), tok_ok[None, :], bias,
                                      qk_scale, DOT_PREC, UPCAST)
                dlogw += tl.sum(ds, 1)
            # one partial per (b, hkv, row tile, j): summed on the host, deterministic
            tl.store(DLOGW + (pid_bh * n_mblk + pid_m) * KK + j, tl.sum(dlogw, 0))

    hi = _seq_hi(pid_m, T, S, R, BLOCK_M, CAUSAL)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for s0 in range(0, hi, BLOCK_N):
        kt, vv, ok = _seq_keys(k_base, v_base, MASK, b, smb, sms, sks, skd, svs, svd,
                               s0 + offs_n, hi, t, T, S, BLOCK_D, HAS_MASK, CAUSAL)
        dq, ds = _bwd_dq_tile(dq, q, do, lse, delta, kt, tl.trans(vv), ok, 0.0, qk_scale, DOT_PREC, UPCAST)
    tl.store(DQ + (pid_bh * R + rows[:, None]) * BLOCK_D + offs_d[None, :], dq * sm_scale,
             mask=row_ok[:, None])


@triton.jit
def _bwd_kv_tile(Q, DO, LSE, DELTA, sqb, sqh, sqt, sqd, pid_bh, Hkv, G, T, S,
                 k, v, key_pos, key_ok, bias, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv [N, D] of one key tile (k, v [N, D]) against the query rows of (b, hkv) that see it.

    Row r = g*T + t sees key s iff t >= t_lo = s - (S - T) under causal, so the tile's first valid
    key bounds the rows: per head g only the row tiles holding some t >= t_lo run (t_lo = T, no
    row tile at all, when every key of the tile is padding or outside the slot). Row tiles stay
    aligned to BLOCK_M over the flattened rows (no extra tile when T < BLOCK_M); a tile spanning
    two heads runs once, in the loop of the first (its row g*T - 1 has t = T - 1 >= t_lo)."""
    R = G * T
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    first = tl.min(tl.where(key_ok, key_pos, 1 << 30), 0)      # 2^30: no valid key in the tile
    t_lo = tl.where(first == 1 << 30, T, 0)
    if CAUSAL:
        t_lo = tl.minimum(tl.maximum(first - (S - T), 0), T)
    for g in range(0, G):
        r_start = tl.maximum(((g * T + t_lo) // BLOCK_M) * BLOCK_M,
                             ((g * T + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        r_end = tl.where(t_lo < T, (g + 1) * T, 0)            # no visible row: no tile
        for r0 in range(r_start, r_end, BLOCK_M):
            b, hkv, rows, row_ok, t, h, q = _load_rows(Q, sqb, sqh, sqt, sqd, pid_bh, r0, Hkv, G,
                                                       T, BLOCK_M, BLOCK_D)
            do = tl.load(DO + (pid_bh * R + rows[:, None]) * BLOCK_D + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + pid_bh * R + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + pid_bh * R + rows, mask=row_ok, other=0.0)
            st = _dot(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale + bias   # [N, M]
            ok = key_ok[:, None]
            if CAUSAL:
                ok = ok & (key_pos[:, None] <= (S - T + t)[None, :])
            pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
            dv += _dot(_as(pt, do.dtype, UPCAST), do, DOT_PREC, UPCAST)
            dpt = _dot(v, tl.trans(do), DOT_PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(_as(dst, q.dtype, UPCAST), q, DOT_PREC, UPCAST)
    return dk * sm_scale, dv


@triton.jit
def _prefix_attention_bwd_dkv_kernel(
        Q, K, V, PK, PV, IDX, W, LENS, MASK, DO, LSE, DELTA, DK, DV, DPK, DPV,
        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
        spke, spkp, spkh, spkd, spve, spvp, spvh, spvd, sib, sij, swb, swj, smb, sms,
        Hkv, G, T, S, P, KK, qk_scale, sm_scale,
        HAS_W: tl.constexpr, HAS_LENS: tl.constexpr, HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (n, b*Hkv): n < cdiv(S, BLOCK_N) is a sequence key tile, the rest (slot j, p tile)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    n_sblk = tl.cdiv(S, BLOCK_N)
    if pid_n < n_sblk:
        offs_s = pid_n * BLOCK_N + offs_n
        key_ok = offs_s < S
        k = tl.load(K + b * skb + hkv * skh + offs_s[:, None] * sks + offs_d[None, :] * skd,
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + hkv * svh + offs_s[:, None] * svs + offs_d[None, :] * svd,
                    mask=key_ok[:, None], other=0.0)
        in_s = key_ok
        if HAS_MASK:
            am = tl.load(MASK + b * smb + offs_s * sms, mask=key_ok, other=0)
            key_ok = key_ok & (am != 0)
        dk, dv = _bwd_kv_tile(Q, DO, LSE, DELTA, sqb, sqh, sqt, sqd, pid_bh, Hkv, G, T, S,
                              k, v, offs_s, key_ok, 0.0, qk_scale, sm_scale, CAUSAL,
                              BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
        # DK, DV: contiguous fp32 [B, Hkv, S, D]
        out = (pid_bh * S + offs_s[:, None]) * BLOCK_D + offs_d[None, :]
        tl.store(DK + out, dk, mask=in_s[:, None])
        tl.store(DV + out, dv, mask=in_s[:, None])
    else:
        n_pblk = tl.cdiv(P, BLOCK_N)
        j = (pid_n - n_sblk) // n_pblk
        offs_p = ((pid_n - n_sblk) % n_pblk) * BLOCK_N + offs_n
        slot, n_tok, bias = _slot_info(IDX, W, LENS, b, j, sib, sij, swb, swj, P, HAS_W, HAS_LENS)
        tok_ok = offs_p < n_tok
        k = tl.load(PK + slot * spke + offs_p[:, None] * spkp + hkv * spkh + offs_d[None, :] * spkd,
                    mask=tok_ok[:, None], other=0.0)
        v = tl.load(PV + slot * spve + offs_p[:, None] * spvp + hkv * spvh + offs_d[None, :] * spvd,
                    mask=tok_ok[:, None], other=0.0)
        dk, dv = _bwd_kv_tile(Q, DO, LSE, DELTA, sqb, sqh, sqt, sqd, pid_bh, Hkv, G, T, S,
                              k, v, offs_p, tok_ok, bias, qk_scale, sm_scale, False,
                              BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
        # DPK, DPV: contiguous fp32 [E, P, Hkv, D]; atomics because slots repeat across (b, j)
        out = ((slot * P + offs_p[:, None]) * Hkv + hkv) * BLOCK_D + offs_d[None, :]
        tl.atomic_add(DPK + out, dk, mask=tok_ok[:, None])
        tl.atomic_add(DPV + out, dv, mask=tok_ok[:, None])


# --------------------------------------------------------------------------------------------
# Launch functions
# --------------------------------------------------------------------------------------------
def _block_sizes(R, D, dtype):
    """(BLOCK_M, BLOCK_N, num_warps) of decode and of the backward. tl.dot needs >= 16 on every
    side; 64x64 tiles keep fp32 D=128 within the register file; decode rows (R = G heads) get a
    16-row tile."""
    block_m = max(16, min(64, triton.next_power_of_2(R)))
    block_n = 64 if (D <= 64 or dtype != torch.float32) else 32
    return block_m, block_n, 8 if (D == 128 and block_m == 64) else 4   # D=128 tiles: more warps


class PrefillConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The prefill forward's launch configurations, best first (the first that `prefill_config_fits`
# keeps runs). Until the GPU sweep ranks them (benchmarks/bench_prefix_attention.py
# --sweep-configs), the order comes from the SASS of the interior loop (sm_90, fp16, D = 128;
# tests/test_sass_budget_attention.py): H100 issues 4 warp-instructions per clock per SM against
# 4096 dense bf16 FLOP, so a loop is tensor-bound only below 1 warp-instruction per 1024 FLOP.
# 128 x 64 tiles (8 warps) issue ~0.9 per 1024 FLOP, 64 x 64 tiles ~1.7 (issue-bound at ~0.6x
# the tensor peak): 128-row tiles first wherever a (b, kv head) has >= 128 query rows. (128 x 32
# was dropped: 1.3 per 1024 FLOP.)
PREFILL_CONFIGS = (
    PrefillConfig(128, 64, 8, 2),
    PrefillConfig(128, 64, 8, 3),
    PrefillConfig(128, 128, 8, 2),
    PrefillConfig(64, 64, 4, 2),
    PrefillConfig(64, 64, 8, 2),
    PrefillConfig(64, 32, 8, 2),      # fp32 at D = 128 (ieee dots: no tensor-core tiles)
)


def prefill_config_fits(cfg: PrefillConfig, R: int, D: int, dtype: torch.dtype) -> bool:
    """The configurations worth running for R rows per (b, kv head) at head dim D."""
    if cfg.block_m == 128 and R < 128:
        return False                  # most rows of a 128-row tile would be padding
    if cfg.block_m == 128 and cfg.num_warps != 8:
        return False                  # 128 rows: two warpgroups (4 warps per 64 rows)
    if cfg.block_m == 64 and cfg.num_warps != (8 if D == 128 else 4):
        return False                  # 64x128 fp32 accumulator: 8 warps at D=128, 4 below
    if cfg.block_n == 128 and D > 64:
        return False                  # K and V tiles of 128 x 128 leave no registers for P
    if dtype == torch.float32:        # ieee fp32 dots (no tensor cores): 64 x 64 x 64 at most
        return cfg.block_m == 64 and cfg.block_n * D <= 64 * 64
    return cfg.block_n >= 64   # 16-bit: 32-wide key tiles issue 2.4 per 1024 FLOP (the SASS test)


def prefill_configs(R: int, D: int, dtype: torch.dtype) -> list:
    """PREFILL_CONFIGS pruned by prefill_config_fits, in order. Fewer than 64 rows per (b, kv
    head): the 16/32-row tile of _block_sizes alone (a 64-row tile would be mostly padding)."""
    if R <= 32:
        return [PrefillConfig(*_block_sizes(R, D, dtype), 2)]
    fit = [c for c in PREFILL_CONFIGS if prefill_config_fits(c, R, D, dtype)]
    return fit or [PrefillConfig(*_block_sizes(R, D, dtype), 2)]


def _decode_chunk(S, block_n):
    """Sequence chunk per flash-decoding split: 4 tiles, so S=2048 gives 8 splits (+1 prefix)."""
    return 4 * block_n


def _dot_prec(dtype):
    # fp32 inputs: IEEE dots so fp32 meets the SPEC's 1e-4 (tf32 would give ~5e-3)
    return "ieee" if dtype == torch.float32 else None


def _upcast(q):
    # the interpreter's bf16 tl.dot is wrong: multiply bf16 in fp32 there (see _dot)
    return q.dtype == torch.bfloat16 and q.device.type != "cuda"


def _prep(q, prefix_k, prefix_index, prefix_weight, prefix_lens, attention_mask):
    """Small host-side arguments: int32 index, fp32 weights, int32 lens, int8 mask, dummies."""
    has_prefix = prefix_index is not None
    idx = prefix_index.to(torch.int32) if has_prefix else None
    w = prefix_weight.float() if prefix_weight is not None else None
    lens = prefix_lens.to(torch.int32) if prefix_lens is not None else None
    mask = (attention_mask != 0).to(torch.int8) if attention_mask is not None else None
    return idx, w, lens, mask


def _common_args(q, k, v, prefix_k, prefix_v, idx, w, mask):
    pk = prefix_k if prefix_k is not None else k
    pv = prefix_v if prefix_v is not None else v
    i_st = idx.stride() if idx is not None else (0, 0)
    w_st = w.stride() if w is not None else (0, 0)
    m_st = mask.stride() if mask is not None else (0, 0)
    strides = (*q.stride(), *k.stride(), *v.stride(),
               *(prefix_k.stride() if prefix_k is not None else (0, 0, 0, 0)),
               *(prefix_v.stride() if prefix_v is not None else (0, 0, 0, 0)),
               *i_st, *w_st, *m_st)
    return pk, pv, strides


def _dims(q, k, prefix_k, idx):
    """(B, Hq, T, D, Hkv, S, G, R = G*T rows per (b, kv head), kk, P, has_prefix)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    has_prefix = idx is not None
    KK = idx.shape[1] if has_prefix else 0
    P = prefix_k.shape[1] if has_prefix else 0
    return B, Hq, T, D, Hkv, S, Hq // Hkv, (Hq // Hkv) * T, KK, P, has_prefix


def _forward(q, k, v, prefix_k, prefix_v, idx, w, lens, mask, causal, scale, cfg=None):
    """Launch the forward; cfg (a PrefillConfig) overrides the prefill tile choice (T > 1)."""
    B, Hq, T, D, Hkv, S, G, R, KK, P, has_prefix = _dims(q, k, prefix_k, idx)
    split = T == 1
    if split:
        BM, BN, nw = _block_sizes(R, D, q.dtype)
        stages = None
    else:
        BM, BN, nw, stages = cfg if cfg is not None else prefill_configs(R, D, q.dtype)[0]
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    pk, pv, strides = _common_args(q, k, v, prefix_k, prefix_v, idx, w, mask)
    dummy = lse
    chunk = _decode_chunk(S, BN)
    n_split = 1 + triton.cdiv(S, chunk) if split else 1
    n_mblk = triton.cdiv(R, BM)
    if split:
        acc_p = torch.empty(B * Hkv, n_split, R, D, device=q.device, dtype=torch.float32)
        m_p = torch.empty(B * Hkv, n_split, R, device=q.device, dtype=torch.float32)
        l_p = torch.empty_like(m_p)
    else:
        acc_p = m_p = l_p = dummy
    opts = dict(num_warps=nw) if stages is None else dict(num_warps=nw, num_stages=stages)
    _KERNELS["fwd"][(n_mblk, B * Hkv, n_split)](
        q, k, v, pk, pv, idx if has_prefix else dummy, w if w is not None else dummy,
        lens if lens is not None else dummy, mask if mask is not None else dummy,
        out, lse, acc_p, m_p, l_p, *strides, *out.stride(),
        Hkv, G, T, S, P, KK, scale * LOG2E, chunk, n_split,
        HAS_PREFIX=has_prefix, HAS_W=w is not None, HAS_LENS=lens is not None,
        HAS_MASK=mask is not None, CAUSAL=bool(causal), SPLIT=split,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=D, KK_PAD=triton.next_power_of_2(max(KK, 1)),
        DOT_PREC=_dot_prec(q.dtype), UPCAST=_upcast(q), **opts)
    if split:
        _KERNELS["reduce"][(n_mblk, B * Hkv)](acc_p, m_p, l_p, out, lse, Hkv, G, T, n_split,
                                              *out.stride(), BLOCK_M=BM, BLOCK_D=D, num_warps=nw)
    return out, lse


def _backward(do, q, k, v, prefix_k, prefix_v, idx, w, lens, mask, out, lse, causal, scale,
              need_pool):
    B, Hq, T, D, Hkv, S, G, R, KK, P, has_prefix = _dims(q, k, prefix_k, idx)
    BM, BN, nw = _block_sizes(R, D, q.dtype)
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()                 # [B, Hq, T]
    pk, pv, strides = _common_args(q, k, v, prefix_k, prefix_v, idx, w, mask)
    dummy = lse
    n_mblk = triton.cdiv(R, BM)
    dq = torch.empty(B, Hq, T, D, device=q.device, dtype=torch.float32)
    dlogw = torch.empty(B * Hkv, n_mblk, KK, device=q.device, dtype=torch.float32)
    args = (q, k, v, pk, pv, idx if has_prefix else dummy, w if w is not None else dummy,
            lens if lens is not None else dummy, mask if mask is not None else dummy)
    consts = dict(HAS_W=w is not None, HAS_LENS=lens is not None, HAS_MASK=mask is not None,
                  CAUSAL=bool(causal), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=D,
                  DOT_PREC=_dot_prec(q.dtype), UPCAST=_upcast(q), num_warps=nw)
    _KERNELS["bwd_dq"][(n_mblk, B * Hkv)](
        *args, do, lse, delta, dq, dlogw, *strides, Hkv, G, T, S, P, KK, scale * LOG2E, scale,
        HAS_PREFIX=has_prefix, **consts)
    dk = torch.empty(B, Hkv, S, D, device=q.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    n_sblk = triton.cdiv(S, BN)
    n_pblk = triton.cdiv(P, BN) if (has_prefix and need_pool) else 0
    if has_prefix and need_pool:
        dpk = torch.zeros(prefix_k.shape, device=q.device, dtype=torch.float32)
        dpv = torch.zeros_like(dpk)
    else:
        dpk = dpv = dummy
    _KERNELS["bwd_dkv"][(n_sblk + KK * n_pblk, B * Hkv)](
        *args, do, lse, delta, dk, dv, dpk, dpv, *strides, Hkv, G, T, S, P, KK, scale * LOG2E,
        scale, **consts)
    dw = None
    if has_prefix and w is not None:
        dlw = dlogw.view(B, Hkv * n_mblk, KK).sum(1)
        dw = torch.where(w > 0, dlw / torch.where(w > 0, w, torch.ones_like(w)),
                         torch.zeros_like(dlw))                               # 0 where w == 0
    if not (has_prefix and need_pool):
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, dw


# The kernels as launched (tests swap in a recorder to prove what the launch receives).
_KERNELS = {"fwd": _prefix_attention_fwd_kernel, "reduce": _prefix_attention_reduce_kernel,
            "bwd_dq": _prefix_attention_bwd_dq_kernel, "bwd_dkv": _prefix_attention_bwd_dkv_kernel}


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
class PrefixAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
                attention_mask, causal, scale):
        idx, w, lens, mask = _prep(q, prefix_k, prefix_index, prefix_weight, prefix_lens,
                                   attention_mask)
        out, lse = _forward(q, k, v, prefix_k, prefix_v, idx, w, lens, mask, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, idx, w, lens, mask, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.w_dtype = prefix_weight.dtype if prefix_weight is not None else None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, idx, w, lens, mask, out, lse = ctx.saved_tensors
        need_pool = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dq, dk, dv, dpk, dpv, dw = _backward(dout, q, k, v, prefix_k, prefix_v, idx, w, lens,
                                             mask, out, lse, ctx.causal, ctx.scale, need_pool)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dpk.to(prefix_k.dtype) if dpk is not None and ctx.needs_input_grad[3] else None,
                dpv.to(prefix_v.dtype) if dpv is not None and ctx.needs_input_grad[4] else None,
                None, dw.to(ctx.w_dtype) if dw is not None and ctx.needs_input_grad[6] else None,
                None, None, None, None)


def prefix_attention_triton(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight,
                            prefix_lens, attention_mask, causal, scale):
    """Arguments already checked by `prefix_attention`; prefix_* are None when there is none."""
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight,
                                         prefix_lens, attention_mask, causal, scale)

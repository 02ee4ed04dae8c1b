"""int4_matmul: y = x @ W^T for a block-quantized frozen weight W (SPEC §3).

    x [..., K] float  ->  y [..., N] in x's dtype,   W = qw.dequantize() [N, K]

    4-bit (Q4_1): W[n, c] = q[n, c] * scale[n, c // G] + min[n, c // G]    G in {32, 64, 128}
    8-bit (Q8_0): W[n, c] = q[n, c] * scale[n, c // G]                      G = 32
    (layouts: quant_format.py; 4-bit byte i of a row = column 2i low nibble, 2i + 1 high nibble)

The kernels never build the dense W: they load packed bytes, decode them in registers, and
accumulate in fp32.

Backends (registered with `_backend.register` below the launch functions), and which one serves
which M (rows of x) on a GPU, from the SASS of each kernel's main loop compiled for sm_90
(tests/test_sass_budget.py; instructions per 16 B of weights per lane, H100 ceiling at full HBM
bandwidth = 145, see csrc/int4_matmul_kernel.cuh):
    cuda    M = 1: csrc/int4_matmul_cuda.cu, the decode GEMV: bit-trick dequant to fp32, Sx once per
            column block for 4 rows per warp, 4 x 16-byte loads in flight. 129 instr/16 B (4-bit),
            70.5 (8-bit): the fastest M = 1 kernel we have. It also takes M <= 4 (called directly),
            but its fp32 FMAs grow with M (287 at M = 4, issue-bound at ~50% of HBM), while the
            tensor-core kernel pays the same for any M <= 16: so the registry gives the cuda
            backend M = 1 only, and M >= 2 goes to triton.
    triton  every M: `_int4_matmul_tc_kernel` on tensor cores. The weights are repacked once
            (`qw.packed_for("tc", _tc_pack)`: steps of 128 columns contiguous per tile, scale/min
            transposed so that a group's are one BN vector, loaded once), decoded in registers to
            fp32 by the 1 + q/16 exponent trick, one FFMA per code for q s + mn (rounded once to
            the dot dtype, as plain PyTorch rounds W), fp32 accumulation, split-K so that every SM
            has work, fp32 atomic reduction. 230.5 instr/16 B with the M <= 16 launch (BLOCK_N 64 x
            4 warps; 173 with 128 x 2 warps, 211 at M = 64). Measured on an H200 (2026-11-26,
            benchmarks/results/): neither instruction count decides its speed: 4096 x 4096 at
            M = 1 streams 526 GB/s with 128 x 2 warps and 706 GB/s with 64 x 4 warps (the sweep),
            far below the issue ceiling either way: too few bytes in flight, not too many
            instructions. The CUDA GEMV streamed 947-1076 GB/s at M = 1 in the same session
            (spec6 rows). It replaced a Triton GEMV (877 instr/16 B at M = 1, 6520 at M = 16)
            and a 64 x 64 GEMM (590; scale/min gathered per element, no split-K).
            M = 1 runs here only on a GPU without the CUDA extension.
    cpu     csrc/int4_matmul_cpu.cpp: AVX2 GEMV for M <= 16 (4-bit: <= 64, in passes; M = 1 takes 8
            weight rows per step), dequantized tiles + BLAS above; on an AVX-512 CPU (128-column
            layout) dot products from dequantized 12-row fp32 panels for M = 2..11 where a panel fits
            in 32 KiB (K <= 682; 8-bit from M = 4), and a register-blocked GEMM on those panels from
            M = 12; on an AVX-512 VNNI CPU, M = 1 (4-bit, G dividing 128) on integer dot products
            (x as 23-bit fixed point per 8 columns, `vpdpbusd`; int4_matmul_cpu_kernel.h). A 2-D CPU
            call without bias or autograd goes straight to the kernel once the dispatcher has picked
            it (`_CPU_FAST`, `_C.int4_matmul_cpu_fast`: no pybind11 dispatcher); the kernel checks
            every argument, and what it refuses takes the checked path here.
    torch   dequantize then matmul (the fallback)

Backward: the weight is frozen, so only dx = dy @ W [M, K]: a Triton kernel (`_int4_matmul_bwd_kernel`,
reading W's even/odd columns through `_load_w_pair`) on triton/cuda, dequantized tiles + BLAS on cpu,
dequantize + matmul on torch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .quant_format import QuantizedWeight

try:
    import triton
    import triton.language as tl
except Exception:  # triton missing: the triton backend reports itself unavailable
    triton = None

_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_GEMV_M = 1        # rows of x the op gives the CUDA GEMV (it takes up to kMaxM = 4)

if triton is not None:

    @triton.jit
    def _load_w_pair(qw_ptr, s_ptr, mn_ptr, offs_n, offs_kh, N, K, stride_qn, stride_sn,
                     G: tl.constexpr, BITS: tl.constexpr):
        """Dequantized W[offs_n, 2 * offs_kh] and W[offs_n, 2 * offs_kh + 1], fp32 [BN, BKH] each."""
        mask = (offs_n[:, None] < N) & (offs_kh[None, :] < K // 2)
        rows = offs_n.to(tl.int64)[:, None]
        g = (2 * offs_kh[None, :]) // G        # an even/odd pair never straddles a group (G even)
        s = tl.load(s_ptr + rows * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        if BITS == 4:
            b = tl.load(qw_ptr + rows * stride_qn + offs_kh[None, :], mask=mask, other=0)
            mn = tl.load(mn_ptr + rows * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
            w_even = (b & 0x0F).to(tl.float32) * s + mn
            w_odd = (b >> 4).to(tl.float32) * s + mn
        else:
            ptr = qw_ptr + rows * stride_qn + 2 * offs_kh[None, :]
            w_even = tl.load(ptr, mask=mask, other=0).to(tl.float32) * s
            w_odd = tl.load(ptr + 1, mask=mask, other=0).to(tl.float32) * s
        return w_even, w_odd

    @triton.jit
    def _tc_field(words, p: tl.constexpr, a, b, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """W of field p of every word [BN, 16]: the code moved under the exponent of 1.0 gives the
        exact float f = 1 + q/16 (4-bit: nibble p to bits 19..22) or 1 + u/256 (8-bit: byte p to
        bits 15..22); W = f a + b with the group's a, b, in fp32, rounded once to the dot dtype."""
        if BITS == 4:
            shift: tl.constexpr = 19 - 4 * p
            mask: tl.constexpr = 0x00780000
        else:
            shift: tl.constexpr = 15 - 8 * p
            mask: tl.constexpr = 0x007F8000
        if shift >= 0:
            bits = ((words << shift) & mask) | 0x3F800000
        else:   # an arithmetic shift: the sign bits land above the mask
            bits = ((words >> -shift) & mask) | 0x3F800000
        return (bits.to(tl.float32, bitcast=True) * a + b).to(DOT_DTYPE)

    @triton.jit
    def _int4_matmul_tc_kernel(x_ptr, qt_ptr, st_ptr, mt_ptr, y_ptr, M, N, K, stride_xm, steps_per_split,
                               G: tl.constexpr, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr,
                               ATOMIC: tl.constexpr):
        """y[BM, BN] (+)= x[BM, k] @ W[BN, k]^T over this program's K steps, on tensor cores.

        Reads the "tc" layout (`_tc_pack`): K in steps of STEP columns (128 for 4-bit, 64 for 8-bit);
        a step of one row is 16 int32 words, contiguous for a tile of BN rows; field p of word i
        (nibble p for 4-bit, byte p for 8-bit) is column FIELDS i + p of the step (the GGUF byte
        order read as little-endian words). Each field decodes to a [BN, 16] tile in registers;
        the 8 (4) tiles interleave back into W [BN, STEP] with tl.join + reshape (register-local:
        a thread holds its words' fields). W is the LEFT operand (acc is y^T [BN, BM]), x^T
        [STEP, BM] the right one: M >= 2 pads to 16, the mma's n, not to 64.
        Scale/min come from [K/G, N] arrays: one BN vector per group (G >= STEP), or one value per
        word (G < STEP: G / FIELDS words share it), loaded once per step.
        grid = (N tiles, K splits, M tiles); ATOMIC: split-K partial sums added into fp32 y."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        FIELDS: tl.constexpr = 8 if BITS == 4 else 4
        STEP: tl.constexpr = 16 * FIELDS
        GPS: tl.constexpr = STEP // G if STEP > G else 1          # groups per step
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_i = tl.arange(0, 16)
        offs_c = tl.arange(0, STEP)
        n_mask = offs_n < N
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        t0 = pid_k.to(tl.int64) * steps_per_split
        n_steps = tl.minimum(steps_per_split, tl.cdiv(K, STEP) - t0)
        w_ptrs = qt_ptr + (t0 * N + offs_n.to(tl.int64)[:, None]) * 16 + offs_i[None, :]   # [BN, 16]
        if G >= STEP:
            s_ptrs = st_ptr + (t0 * STEP // G) * N + offs_n                               # [BN]
            m_ptrs = mt_ptr + (t0 * STEP // G) * N + offs_n
        else:        # word i of the step is in group i // (G / FIELDS) of the step
            s_ptrs = st_ptr + t0 * GPS * N + offs_n[:, None] + (offs_i // (G // FIELDS))[None, :] * N
            m_ptrs = mt_ptr + t0 * GPS * N + offs_n[:, None] + (offs_i // (G // FIELDS))[None, :] * N
        col = t0 * STEP
        x_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (col + offs_c)[:, None]  # [STEP, BM]
        for _ in range(0, n_steps):
            words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
            smask = n_mask if G >= STEP else n_mask[:, None]
            s = tl.load(s_ptrs, mask=smask, other=0.0).to(tl.float32)
            if BITS == 4:       # f = 1 + q/16:  W = q s + mn = 16 s f + (mn - 16 s)
                mn = tl.load(m_ptrs, mask=smask, other=0.0).to(tl.float32)
                a = 16.0 * s
                b = mn - a
            else:               # f = 1 + u/256, u = q + 128:  W = q s = 256 s f - 384 s
                a = 256.0 * s
                b = -384.0 * s
            if G >= STEP:
                a = a[:, None]
                b = b[:, None]
            w0 = _tc_field(words, 0, a, b, BITS, DOT_DTYPE)
            w1 = _tc_field(words, 1, a, b, BITS, DOT_DTYPE)
            w2 = _tc_field(words, 2, a, b, BITS, DOT_DTYPE)
            w3 = _tc_field(words, 3, a, b, BITS, DOT_DTYPE)
            if BITS == 4:       # [BN, 16, e3, e2, e1] with p = 4 e3 + 2 e2 + e1: column 8 i + p
                w4 = _tc_field(words, 4, a, b, BITS, DOT_DTYPE)
                w5 = _tc_field(words, 5, a, b, BITS, DOT_DTYPE)
                w6 = _tc_field(words, 6, a, b, BITS, DOT_DTYPE)
                w7 = _tc_field(words, 7, a, b, BITS, DOT_DTYPE)
                w = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)),
                            tl.join(tl.join(w1, w5), tl.join(w3, w7)))
            else:               # [BN, 16, e2, e1] with p = 2 e2 + e1: column 4 i + p
                w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
            w = tl.reshape(w, (BLOCK_N, STEP))
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=m_mask[None, :] & ((col + offs_c)[:, None] < K), other=0.0)
            acc = tl.dot(w, xt.to(DOT_DTYPE), acc, input_precision="ieee")
            w_ptrs += N * 16
            s_ptrs += GPS * N
            m_ptrs += GPS * N
            x_ptrs += STEP
            col += STEP
        out = y_ptr + offs_m[None, :] * N + offs_n[:, None]
        mask = m_mask[None, :] & n_mask[:, None]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask, sem="relaxed")
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _int4_matmul_bwd_kernel(dy_ptr, qw_ptr, s_ptr, mn_ptr, dx_ptr, M, N, K,
                                stride_dym, stride_qn, stride_sn, stride_dxm,
                                G: tl.constexpr, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
        """dx[BM, 2 BKH] tile = dy[BM, :] @ W[:, cols]: the same weight tiles, reduced over N."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_kh = pid_k * BLOCK_KH + tl.arange(0, BLOCK_KH)
        acc_even = tl.zeros((BLOCK_M, BLOCK_KH), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, BLOCK_KH), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            w_even, w_odd = _load_w_pair(qw_ptr, s_ptr, mn_ptr, offs_n, offs_kh, N, K, stride_qn,
                                         stride_sn, G, BITS)
            dmask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=dmask,
                         other=0.0).to(DOT_DTYPE)
            acc_even = tl.dot(dy, w_even.to(DOT_DTYPE), acc_even, input_precision="ieee")
            acc_odd = tl.dot(dy, w_odd.to(DOT_DTYPE), acc_odd, input_precision="ieee")
        mask = (offs_m[:, None] < M) & (offs_kh[None, :] < K // 2)
        out = dx_ptr + offs_m[:, None] * stride_dxm + 2 * offs_kh[None, :]
        tl.store(out, acc_even.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(out + 1, acc_odd.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launch functions ------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tc_launch_defaults(M: int) -> dict:
    """The tensor-core kernel's launch for M rows when nothing overrides it (see _tc_blocks)."""
    if M <= 16:
        return dict(BLOCK_N=64, per_sm=4, warps=4, stages=3)
    return dict(BLOCK_N=128, per_sm=2, warps=4, stages=3)


def _tc_blocks(M: int, N: int, K: int, bits: int, device: torch.device, block_n: Optional[int] = None,
               per_sm: Optional[int] = None, warps: Optional[int] = None, stages: int = 3):
    """(BLOCK_M, BLOCK_N, SPLIT_K, steps per split, num_warps, num_stages) of the tensor-core kernel.

    BLOCK_M (the mma's n, since W is the left operand): the smallest of 16, 32, 64 >= M.
    BLOCK_M = 16 (M <= 16, decode): BLOCK_N = 64 rows, 4 warps, split-K for 4 programs per SM. The
    sweep on an H200 (benchmarks/sweep_int4_tc.py, 4096 x 4096 4-bit G=128, cold weights,
    2026-11-26; rows in benchmarks/results/int4_tc_sweep-nvidia-h200.jsonl) put this at 706 / 716
    GB/s for M = 1 / 16 against 526 / 515 for the launch before it (BLOCK_N = 128, 2 warps, 2
    programs per SM), the best of 24 launches: more programs and loads in flight, not fewer
    instructions per byte (it issues more of them), is what the decode GEMM lacks. Other shapes and
    group sizes were not swept.
    BLOCK_M >= 32: BLOCK_N = 128 rows, 4 warps, split-K for 2 programs per SM (not swept).
    E.g. 4096 x 4096 4-bit, M <= 16: 64 N tiles x 32 steps of 128 columns -> 8 splits of 4.
    num_stages = 3: the loads of the next two steps are in flight (cp.async) during a step's math.
    The interpreter takes 2 splits whenever it can (the atomic reduction is tested on the CPU).
    block_n / per_sm / warps / stages override the choice (benchmarks/sweep_int4_tc.py)."""
    block_m = min(64, max(16, _next_pow2(M)))
    d = _tc_launch_defaults(M)
    block_n, per_sm, warps = block_n or d["BLOCK_N"], per_sm or d["per_sm"], warps or d["warps"]
    steps = triton.cdiv(K, 128 if bits == 4 else 64)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = max(1, min(steps, triton.cdiv(per_sm * sms, tiles)))
    else:
        split = min(2, steps)
    per = triton.cdiv(steps, split)
    return block_m, block_n, triton.cdiv(steps, per), per, warps, stages


def _gemm_blocks(device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_KH) of the prefill GEMM and of the backward."""
    return (64, 64, 32) if device.type == "cuda" else (32, 32, 32)


def _dot_dtype(dtype: torch.dtype, device: torch.device):
    """Operand dtype of tl.dot: x's dtype on a GPU; fp32 in the interpreter (its bf16/fp16 dots
    are wrong), where the result still rounds to x's dtype only at the store."""
    if device.type != "cuda" or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _weight_args(qw: QuantizedWeight):
    mn = qw.min if qw.min is not None else qw.scale   # 8-bit: never read (BITS == 8)
    return qw.qweight, qw.scale, mn, qw.qweight.stride(0), qw.scale.stride(0)


def _forward_triton(x2: torch.Tensor, qw: QuantizedWeight, **launch) -> torch.Tensor:
    """launch: _tc_blocks' overrides (block_n, per_sm, warps, stages), for launch sweeps."""
    M, K = x2.shape
    N, G = qw.out_features, qw.group_size
    qt, st, mt = qw.packed_for("tc", _tc_pack)
    bm, bn, split, per, warps, stages = _tc_blocks(M, N, K, qw.bits, x2.device, **launch)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    atomic = split > 1
    y = _tc_output(M, N, atomic, x2)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _int4_matmul_tc_kernel[grid](x2, qt, st, mt, y, M, N, K, x2.stride(0), per, G=G, BITS=qw.bits,
                                 DOT_DTYPE=_dot_dtype(x2.dtype, x2.device), BLOCK_M=bm, BLOCK_N=bn,
                                 EVEN_K=K % (128 if qw.bits == 4 else 64) == 0, ATOMIC=atomic,
                                 num_warps=warps, num_stages=stages)
    return y.to(x2.dtype) if atomic else y


def _tc_output(M: int, N: int, atomic: bool, x2: torch.Tensor) -> torch.Tensor:
    """y of the tensor-core kernel: fp32 zeros that the split-K programs add into, or x's dtype
    (one split: every element stored once; tests poison this buffer)."""
    if atomic:
        return torch.zeros((M, N), device=x2.device, dtype=torch.float32)
    return torch.empty((M, N), device=x2.device, dtype=x2.dtype)


def _tc_pack(qw: QuantizedWeight):
    """The layout `_int4_matmul_tc_kernel` reads, built once per weight (cached by packed_for).

    The codes keep their GGUF order (little-endian words: field p of word i = column
    FIELDS i + p); rows are cut into steps (STEP = 128 columns for 4-bit, 64 for 8-bit), K padded
    to whole steps with zero codes and zero scale/min (padded columns weigh exactly 0), and the
    steps moved outermost so that a [BN, 16 words] tile is contiguous:
        qt [K_pad/STEP, N, 16] int32   (8-bit: bytes u = q + 128, the kernel's exact decode)
        st, mt [K_pad/G, N] fp16       scale and min, transposed (mt = st for 8-bit, unread)"""
    N, K = qw.shape
    G = qw.group_size
    step = 128 if qw.bits == 4 else 64
    k_pad = -(-K // step) * step
    row_bytes = k_pad // 2 if qw.bits == 4 else k_pad
    raw = qw.qweight.view(torch.uint8)
    if qw.bits == 8:
        raw = raw ^ 0x80                                   # int8 q -> u = q + 128
    b = torch.zeros((N, row_bytes), dtype=torch.uint8, device=qw.device)
    b[:, : raw.shape[1]] = raw
    qt = b.view(torch.int32).view(N, k_pad // step, 16).transpose(0, 1).contiguous()
    pad = (0, (k_pad - K) // G)
    st = torch.nn.functional.pad(qw.scale, pad).t().contiguous()
    mt = st if qw.min is None else torch.nn.functional.pad(qw.min, pad).t().contiguous()
    return qt, st, mt


def _backward_triton(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    dy = dy.contiguous()
    M, N = dy.shape
    K = qw.in_features
    q, s, mn, sq, ss = _weight_args(qw)
    bm, bn, bkh = _gemm_blocks(dy.device)
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    grid = (triton.cdiv(M, bm), triton.cdiv(K // 2, bkh))
    _int4_matmul_bwd_kernel[grid](dy, q, s, mn, dx, M, N, K, dy.stride(0), sq, ss, dx.stride(0),
                                  G=qw.group_size, BITS=qw.bits, DOT_DTYPE=_dot_dtype(dy.dtype, dy.device),
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=bkh)
    return dx


def _forward_cpu(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return _backend.extension().int4_matmul_cpu(x2, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits)


def _backward_cpu(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return _backend.extension().int4_matmul_backward_cpu(dy, qw.qweight, qw.scale, qw.min,
                                                         qw.group_size, qw.bits)


def _cuda_gemv_ksplit(N: int, bits: int) -> int:
    """Warps that split one row group's K in the CUDA GEMV (1, 2 or 4; csrc/int4_matmul_kernel.cuh's KS).

    The H200 sweep (benchmarks/sweep_int4_tc.py --gemv, M = 1, 4-bit G = 128, weights past the L2,
    2026-11-26; rows in benchmarks/results/int4_gemv_sweep-nvidia-h200.jsonl, the 8192-row figures in
    gpu-logs-2026-11-26b/call4-8192x28672.log): 2 for 4096 rows (4096x4096: 1150 GB/s against 996 at
    1, 1070 at 4; 4096x11008: 1381 against 1106, 1335), 1 for 8192 rows (8192x28672: 2099 against 1642
    at 2, 1900 at 4), where the rows alone give every SM enough warps. Row counts between were not
    timed (they keep 1), nor 8-bit weights, nor M > 1 (M = 4 on 4096x4096: 878 / 819 / 705)."""
    return 2 if bits == 4 and N <= 4096 else 1


def _forward_cuda(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return _backend.extension().int4_matmul_cuda(x2, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits,
                                                 _cuda_gemv_ksplit(qw.out_features, qw.bits))


def _forward_torch(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return x2 @ qw.dequantize(x2.dtype).t()


def _backward_torch(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return dy @ qw.dequantize(dy.dtype)


def _backward_cuda(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    # the CUDA extension has no backward kernel: the Triton one when Triton is there
    return _backward_triton(dy, qw) if triton is not None else _backward_torch(dy, qw)


def _compiled_dtype(x2: torch.Tensor, qw: QuantizedWeight) -> bool:
    return x2.dtype in _COMPILED_DTYPES


def _cuda_case(x2: torch.Tensor, qw: QuantizedWeight) -> bool:
    # M = 1 only (the module docstring: M >= 2 is faster on the tensor-core kernel); the CUDA
    # GEMV reads 16-byte vectors of weight rows and of x: aligned pointers and rows
    return (x2.dtype in _COMPILED_DTYPES and x2.shape[0] == _CUDA_GEMV_M
            and qw.qweight.data_ptr() % 16 == 0 and x2.data_ptr() % 16 == 0
            and (x2.stride(0) * x2.element_size()) % 16 == 0)


_backend.register("int4_matmul", "cuda", _forward_cuda, supports=_cuda_case, backward=_backward_cuda)
_backend.register("int4_matmul", "triton", _forward_triton, supports=_compiled_dtype, backward=_backward_triton)
_backend.register("int4_matmul", "cpu", _forward_cpu, supports=_compiled_dtype, backward=_backward_cpu)
_backend.register("int4_matmul", "torch", _forward_torch, backward=_backward_torch)


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


class Int4MatmulFunction(torch.autograd.Function):
    """y = x2 @ W^T for x2 [M, K]; backward gives dx only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, qw, impl):
        ctx.qw = qw
        ctx.impl = impl
        return impl.fn(x, qw)

    @staticmethod
    def backward(ctx, dy):
        return ctx.impl.backward(dy, ctx.qw), None, None


# MOPS_BACKEND / TRITON_INTERPRET values (_backend._dispatch_env) under which the dispatcher has picked
# the CPU extension kernel for a CPU call: its function, for int4_matmul's fast path.
_CPU_FAST = {}
# the dispatch environment read inline on the fast path (_backend._dispatch_env without its call)
_ENV_STORE = _backend._ENV_STORE if _backend._ENV_KEYS is not None else None
_ENV_K0, _ENV_K1 = _backend._ENV_KEYS or (None, None)


def int4_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ qw.dequantize().T (+ bias). x [..., K] -> y [..., N], dtype of x."""
    # Fast path, a 2-D CPU x without bias or autograd once the dispatcher picked the CPU kernel under
    # this environment: straight to the kernel, which checks every argument itself (the checks and
    # the dispatch below cost ~1.5 us, a third of a 192x576 GEMV). Anything it refuses goes the
    # checked way below, which says what is wrong in the op's own words.
    # (x.is_cpu, not x.device.type == "cpu": building the device object costs 0.2 us)
    if bias is None and type(qw) is QuantizedWeight and x.is_cpu and x.dim() == 2 and not (
            x.requires_grad and torch.is_grad_enabled()):
        fast = _CPU_FAST.get((_ENV_STORE.get(_ENV_K0), _ENV_STORE.get(_ENV_K1)) if _ENV_STORE is not None
                             else _backend._dispatch_env())
        if fast is not None:
            try:
                return fast(x, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits)
            except RuntimeError:
                pass
    _check(x, qw, bias)
    flat = x.dim() == 2                       # decode/prefill rows already [M, K]: no reshapes
    x2 = x if flat else x.reshape(-1, qw.in_features)
    if x2.shape[0] == 0:
        y = x2.new_zeros((0, qw.out_features)) + (0 if bias is None else bias.to(x.dtype))
        return y if flat else y.reshape(*x.shape[:-1], qw.out_features)
    if x2.stride(-1) != 1:  # every kernel reads rows of x as unit-stride vectors
        x2 = x2.contiguous()
    impl = _backend.dispatch("int4_matmul", x.device, x2, qw)
    if impl.fn is _forward_cpu and x.device.type == "cpu":
        ext = _backend.extension()    # the kernel without pybind11's dispatcher where the build has it
        _CPU_FAST[_backend._dispatch_env()] = getattr(ext, "int4_matmul_cpu_fast", ext.int4_matmul_cpu)
    if torch.is_grad_enabled() and x2.requires_grad:
        y = Int4MatmulFunction.apply(x2, qw, impl)
    else:  # inference (decode): skip the autograd.Function's ~10 us per call
        y = impl.fn(x2, qw)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if flat else y.reshape(*x.shape[:-1], qw.out_features)

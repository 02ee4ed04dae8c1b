"""int4_matmul: y = x @ W^T for a block-quantized frozen weight W (SPEC §3).

    x [..., K] float  ->  y [..., N] in x's dtype,   W = qw.dequantize() [N, K]

    4-bit (Q4_1): W[n, c] = q[n, c] * scale[n, c // G] + min[n, c // G]    G in {32, 64, 128}
    8-bit (Q8_0): W[n, c] = q[n, c] * scale[n, c // G]                      G = 32
    (layouts: quant_format.py; 4-bit byte i of a row = column 2i low nibble, 2i + 1 high nibble)

The kernels never build the dense W: they load packed bytes, decode them in registers, and
accumulate in fp32. Every Triton kernel reads a weight tile as two halves, the even columns
(low nibbles) and the odd columns (high nibbles), and meets them with x's even and odd columns, so
4-bit and 8-bit share one code path (`_load_w_pair`).

Backends (registered with `_backend.register` below the launch functions):
    cuda    csrc/int4_matmul_cuda.cu: decode GEMV (M <= 16 rows of x), 16-byte weight loads
    triton  M <= 16: split-K GEMV (`_int4_matmul_gemv_kernel`, partial sums reduced in fp32);
            M > 16: tiled GEMM on tl.dot (`_int4_matmul_fwd_kernel`)
    cpu     csrc/int4_matmul_cpu.cpp: AVX2 GEMV for M <= 16, dequantized tiles + BLAS above
    torch   dequantize then matmul (the fallback)

Backward: the weight is frozen, so only dx = dy @ W [M, K]: a Triton kernel (`_int4_matmul_bwd_kernel`)
on triton/cuda, dequantized tiles + BLAS on cpu, dequantize + matmul on torch.
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
_GEMV_MAX_M = 16        # decode: up to 16 tokens per call take the GEMV kernels
_CUDA_GEMV_MAX_M = 4    # csrc/int4_matmul_kernel.cuh kMaxM

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
    def _int4_matmul_gemv_kernel(x_ptr, qw_ptr, s_ptr, mn_ptr, part_ptr, M, N, K,
                                 stride_xm, stride_xk, stride_qn, stride_sn, kh_per_split,
                                 G: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
        """part[pid_k, m, n] = sum over this split's columns of x[m, c] W[n, c]; all M rows at once."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        kh_start = pid_k * kh_per_split
        for kh0 in range(kh_start, tl.minimum(kh_start + kh_per_split, K // 2), BLOCK_KH):
            offs_kh = kh0 + tl.arange(0, BLOCK_KH)
            w_even, w_odd = _load_w_pair(qw_ptr, s_ptr, mn_ptr, offs_n, offs_kh, N, K, stride_qn,
                                         stride_sn, G, BITS)
            xmask = (offs_m[:, None] < M) & (offs_kh[None, :] < K // 2)
            xp = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_kh[None, :]) * stride_xk
            x_even = tl.load(xp, mask=xmask, other=0.0).to(tl.float32)
            x_odd = tl.load(xp + stride_xk, mask=xmask, other=0.0).to(tl.float32)
            # [BM, 1, BKH] * [1, BN, BKH] summed over the columns: a GEMV for every row of x
            acc += tl.sum(x_even[:, None, :] * w_even[None, :, :], axis=2)
            acc += tl.sum(x_odd[:, None, :] * w_odd[None, :, :], axis=2)
        out = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _int4_matmul_fwd_kernel(x_ptr, qw_ptr, s_ptr, mn_ptr, y_ptr, M, N, K,
                                stride_xm, stride_xk, stride_qn, stride_sn, stride_ym,
                                G: tl.constexpr, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
        """y[BM, BN] tile = x[BM, :] @ W[BN, :]^T on tl.dot (prefill, M large)."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kh0 in range(0, K // 2, BLOCK_KH):
            offs_kh = kh0 + tl.arange(0, BLOCK_KH)
            w_even, w_odd = _load_w_pair(qw_ptr, s_ptr, mn_ptr, offs_n, offs_kh, N, K, stride_qn,
                                         stride_sn, G, BITS)
            xmask = (offs_m[:, None] < M) & (offs_kh[None, :] < K // 2)
            xp = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_kh[None, :]) * stride_xk
            x_even = tl.load(xp, mask=xmask, other=0.0).to(DOT_DTYPE)
            x_odd = tl.load(xp + stride_xk, mask=xmask, other=0.0).to(DOT_DTYPE)
            # operands in DOT_DTYPE (fp32 dots are ieee, no tf32), accumulated in fp32
            acc = tl.dot(x_even, tl.trans(w_even.to(DOT_DTYPE)), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_odd.to(DOT_DTYPE)), acc, input_precision="ieee")
        out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

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


def _gemv_blocks(M: int, N: int, K: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_KH, SPLIT_K) of the decode GEMV."""
    block_m = _next_pow2(M)
    block_kh = 64 if block_m <= 2 else 32
    # the [BM, BN, BKH] broadcast product lives in registers: keep it near 4-8K elements
    block_n = min(128, max(16, 4096 // (block_m * block_kh)))
    n_blocks = triton.cdiv(N, block_n)
    kh_blocks = triton.cdiv(K // 2, block_kh)
    if device.type == "cuda":   # enough programs to fill every SM twice
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = max(1, min(kh_blocks, triton.cdiv(2 * sms, n_blocks)))
    else:                       # the interpreter: still exercise the split-K reduction
        split = min(2, kh_blocks)
    return block_m, block_n, block_kh, split


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


def _forward_triton(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    M, K = x2.shape
    N = qw.out_features
    q, s, mn, sq, ss = _weight_args(qw)
    if M <= _GEMV_MAX_M:
        bm, bn, bkh, split = _gemv_blocks(M, N, K, x2.device)
        kh_blocks = triton.cdiv(K // 2, bkh)
        kh_per_split = triton.cdiv(kh_blocks, split) * bkh
        split = triton.cdiv(K // 2, kh_per_split)
        part = torch.empty((split, M, N), device=x2.device, dtype=torch.float32)
        grid = (triton.cdiv(N, bn), split)
        _int4_matmul_gemv_kernel[grid](x2, q, s, mn, part, M, N, K, x2.stride(0), x2.stride(1), sq, ss,
                                       kh_per_split, G=qw.group_size, BITS=qw.bits, BLOCK_M=bm,
                                       BLOCK_N=bn, BLOCK_KH=bkh)
        return (part[0] if split == 1 else part.sum(0)).to(x2.dtype)
    bm, bn, bkh = _gemm_blocks(x2.device)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _int4_matmul_fwd_kernel[grid](x2, q, s, mn, y, M, N, K, x2.stride(0), x2.stride(1), sq, ss,
                                  y.stride(0), G=qw.group_size, BITS=qw.bits,
                                  DOT_DTYPE=_dot_dtype(x2.dtype, x2.device), BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_KH=bkh)
    return y


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


def _forward_cuda(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return _backend.extension().int4_matmul_cuda(x2, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits)


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
    # the CUDA GEMV reads 16-byte vectors of weight rows and of x: aligned pointers and rows
    return (x2.dtype in _COMPILED_DTYPES and x2.shape[0] <= _CUDA_GEMV_MAX_M
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


def int4_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ qw.dequantize().T (+ bias). x [..., K] -> y [..., N], dtype of x."""
    _check(x, qw, bias)
    flat = x.dim() == 2                       # decode/prefill rows already [M, K]: no reshapes
    x2 = x if flat else x.reshape(-1, qw.in_features)
    if x2.shape[0] == 0:
        y = x2.new_zeros((0, qw.out_features)) + (0 if bias is None else bias.to(x.dtype))
        return y if flat else y.reshape(*x.shape[:-1], qw.out_features)
    if x2.stride(-1) != 1:  # every kernel reads rows of x as unit-stride vectors
        x2 = x2.contiguous()
    impl = _backend.dispatch("int4_matmul", x.device, x2, qw)
    if torch.is_grad_enabled() and x2.requires_grad:
        y = Int4MatmulFunction.apply(x2, qw, impl)
    else:  # inference (decode): skip the autograd.Function's ~10 us per call
        y = impl.fn(x2, qw)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if flat else y.reshape(*x.shape[:-1], qw.out_features)

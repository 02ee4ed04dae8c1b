"""int4_matmul: ours vs dequantize+matmul, a dense float matmul and torch's own int4 kernel.

    python benchmarks/bench_int4_matmul.py            # GPU if there is one, else CPU
    python benchmarks/bench_int4_matmul.py --quick    # CPU, < 1 min
    python benchmarks/bench_int4_matmul.py --decode   # CPU, M = 1 on every SmolLM2 matrix, < 1 min
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_int4_matmul.py --decode   # as our programs run

On the CPU each row's note names OMP_WAIT_POLICY: unset (OpenMP's default, a drop-in import), our
kernels split a call over OpenMP's threads, and only from 131k multiply-adds; PASSIVE (which our
programs set), over the package's own spinning helpers, from 65k.

Shapes are N x K (y = x @ W^T, x [M, K]); M (tokens) is swept over 1, 2, 4, 8, 16.
CPU: `--ms 32,64` (any M >= 12) adds ours/cpu-kernel-no-gemm (the kernel with its AVX-512 GEMM off,
MOPS_INT4_CPU_GEMM_MIN_M=1000000: the GEMV passes) and, for 16 < M <= 64, ours/cpu-kernel-tiles
(dequantized tiles + BLAS, MOPS_INT4_CPU_GEMV_MAX_M=16) beside what it runs by default.
CPU: SmolLM2-135M's matrices: 1536x576 (MLP up/gate), 576x1536 (MLP down), 49152x576 (the
Q8_0 tied embedding / output head). GPU: 4096x4096 and 4096x11008 (Llama-7B-like), 4-bit G=128
(the group size torch's int4 kernel is usually run with) plus the SmolLM2 head in 8-bit.
GB/s counts the bytes of the quantized weight + x + y for every provider, so the column compares
providers on the same work (a dense matmul really reads more).
Weights hot and cold: with `copies=1` every call reads the same weight, which a cache may hold
(a GPU's L2 is 50 MB on an H100; SmolLM2's 1536x576 is 3.5 MB in fp32 on a CPU); in a decode step
each matrix is read once per token, after the other layers' matrices went through the cache. So
each shape also runs with `copies=C`: C distinct copies of the weight (both formats), used in
turn, C sized from the QUANTIZED bytes so that the int4 copies alone exceed 3x the cache (L2 on a
GPU, the last-level cache on a CPU; at most 256 copies). (Sizing from the dense bytes would leave
the int4 copies inside L2 and make "% of HBM" read L2.) The counts come from harness.rotation.
On a GPU each sample is a CUDA-graph replay of many calls (harness.time_calls).
Providers: reference (mops_kernels.reference: dequantize then matmul), float matmul (fp32 on the
CPU, bf16 cuBLAS on a GPU, with the dense weight already materialised), torch int4pack
(torch._weight_int4pack_mm, CUDA, 4-bit only), ours (the public op with its default dispatch:
what a model gets), and on a GPU each of our kernels forced: ours/cuda-gemv (the CUDA GEMV,
M <= 4, called through the extension) and ours/triton-tc (the tensor-core kernel, every M); on the
CPU ours/cpu-kernel: the compiled kernel called directly, as the serving Engine does (no Python
dispatch).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, rotation  # noqa: E402

from mops_kernels import _backend, reference  # noqa: E402
from mops_kernels.ops.int4_matmul import _tc_pack, int4_matmul  # noqa: E402
from mops_kernels.ops.quant_format import QuantizedWeight, quantize  # noqa: E402

CPU_SHAPES = [(1536, 576, 4, 32), (576, 1536, 4, 32), (49152, 576, 8, 32)]    # N, K, bits, G
# --decode: every matrix of a SmolLM2-135M decode step, batch 1 (q/o, k/v, gate/up, down, head)
DECODE_SHAPES = [(576, 576, 4, 32), (192, 576, 4, 32), (1536, 576, 4, 32), (576, 1536, 4, 32),
                 (49152, 576, 8, 32)]
GPU_SHAPES = [(4096, 4096, 4, 128), (4096, 11008, 4, 128), (49152, 576, 8, 32)]
_ELEM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def torch_int4pack(qws, x):
    """A closure running torch._weight_int4pack_mm on the same codes (cycling over the copies
    in `qws`), or a string saying why not.

    torch's format: w = (q - 8) * scale + zero per group, so zero = min + 8 * scale (Q4_1 -> torch).
    """
    qw = qws[0]
    if qw.bits != 4 or x.device.type != "cuda":
        return "4-bit weights on CUDA only"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs compute capability >= 8.0"
    try:
        def pack(q_w):
            q = q_w.unpack().to(torch.int32)                                  # [N, K]
            scale = q_w.scale.float()
            zero = q_w.min.float() + 8 * scale
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
            try:   # torch >= 2.5: uint8 [N, K/2], even column in the high nibble
                packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
            except Exception:  # older torch: int32 codes [N, K]
                packed = torch._convert_weight_to_int4pack(q, 8)
            return packed, sz
        packs = [pack(q) for q in qws]
        turn = itertools.cycle(range(len(packs)))
        xb = x.to(torch.bfloat16)
        first = torch._weight_int4pack_mm(xb, packs[0][0], qw.group_size, packs[0][1])
        want = reference.int4_matmul(xb, qw)
        err = (first.float() - want).norm() / want.norm()
        if err > 2e-2:
            return f"its result does not match the reference (rel. err {err:.2e}): packing differs"

        def fn():
            p, sz = packs[next(turn)]
            return torch._weight_int4pack_mm(xb, p, qw.group_size, sz)
        return fn
    except Exception as e:  # op missing in this build, unsupported device, ...
        return f"unavailable: {e!r}"


def copies_of(qw: QuantizedWeight, n: int):
    """n QuantizedWeights with the same codes in distinct memory (the first is qw itself)."""
    out = [qw]
    for _ in range(n - 1):
        out.append(QuantizedWeight(qw.qweight.clone(), qw.scale.clone(),
                                   None if qw.min is None else qw.min.clone(), qw.shape,
                                   qw.group_size, qw.bits))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small CPU run (< 1 min)")
    ap.add_argument("--decode", action="store_true",
                    help="M = 1 only, on all SmolLM2 decode shapes (q/o, k/v, gate/up, down, head)")
    ap.add_argument("--ms", default="1,2,4,8,16", help="token counts M to sweep")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    ms = [int(m) for m in args.ms.split(",")]
    if args.quick:
        ms = [1, 4, 16]
    if args.decode:
        ms = [1]
    reps = args.reps or (20 if args.quick else 50)
    shapes = GPU_SHAPES if cuda else (DECODE_SHAPES if args.decode else CPU_SHAPES)
    dtype = torch.bfloat16 if cuda else torch.float32
    dname = DTYPE_NAME[dtype]
    ours = [b for b in (("cuda", "triton") if cuda else ("cpu",))
            if _backend.why_not(b, dev, _backend.BACKENDS) is None]
    if not cuda:
        print("ours/triton is not timed on the CPU (the interpreter proves it correct, not fast)")
    bench = Bench("int4_matmul", args.device)
    torch.manual_seed(0)
    for N, K, bits, G in shapes:
        qw = quantize(torch.randn(N, K, device=dev) * 0.02, bits=bits, group_size=G)
        # sized from the bytes our kernel reads (codes + scales), not the dense weight's: the int4
        # copies alone must exceed 3x the L2 / LLC, or "% of HBM" would read the cache
        cold = max(2, rotation(qw.nbytes(), args.device))
        for n_copies, M in itertools.product((1, cold), ms):
            qws = copies_of(qw, n_copies)
            # the dense copies rotate on their own: enough to exceed 3x the cache as well
            n_dense = max(1, min(n_copies, rotation(N * K * _ELEM[dtype], args.device)))
            denses = [q.dequantize(dtype) for q in qws[:n_dense]]
            turn = itertools.cycle(range(n_copies))
            dturn = itertools.cycle(range(n_dense))
            x = torch.randn(M, K, device=dev, dtype=dtype)
            shp = dict(M=M, N=N, K=K, bits=bits, G=G, copies=n_copies)
            nbytes = qw.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
            flops = 2 * M * N * K
            common = dict(shapes=shp, dtype=dname, bytes=nbytes, flops=flops, reps=reps, copies=n_copies)
            if not cuda:  # a shared CPU: the row says how busy it was (and how ours/cpu threads)
                common["note"] = (f"loadavg {os.getloadavg()[0]:.2f}; MOPS_INT4_CPU_HELPERS="
                                  f"{os.environ.get('MOPS_INT4_CPU_HELPERS', 'auto')}; OMP_WAIT_POLICY="
                                  f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
            # the reference dequantizes the whole weight every call: fewer repetitions of it
            bench.run("reference", lambda: reference.int4_matmul(x, qw), **{**common, "reps": 5, "copies": 1})
            bench.run("float matmul", lambda: torch.matmul(x, denses[next(dturn)].t()), **{**common, "copies": n_dense})
            if cuda:
                fn = torch_int4pack(qws, x)
                if callable(fn):
                    bench.run("torch int4pack", fn, **common)
                else:
                    print(f"torch int4pack skipped for {shp}: {fn}")
            if cuda and "triton" in ours:    # the tensor-core layout is built once, at load: not timed
                for w in qws:
                    w.packed_for("tc", _tc_pack)
            bench.run("ours" if cuda else "ours/cpu", lambda: int4_matmul(x, qws[next(turn)]), **common)
            if cuda and "cuda" in ours and M <= 4:   # the CUDA GEMV itself (the op gives it M = 1)
                gemv = _backend.extension().int4_matmul_cuda
                bench.run("ours/cuda-gemv", lambda: (lambda w: gemv(x, w.qweight, w.scale, w.min, w.group_size,
                                                                    w.bits))(qws[next(turn)]), **common)
            if cuda and "triton" in ours:            # the tensor-core kernel, forced
                os.environ["MOPS_BACKEND"] = "int4_matmul:triton"
                try:
                    bench.run("ours/triton-tc", lambda: int4_matmul(x, qws[next(turn)]), **common)
                finally:
                    del os.environ["MOPS_BACKEND"]
            if "cpu" in ours:   # the compiled kernel alone, as the Engine calls it: no Python dispatch
                kern = _backend.extension().int4_matmul_cpu
                call = lambda: (lambda w: kern(x, w.qweight, w.scale, w.min, w.group_size, w.bits))(qws[next(turn)])
                bench.run("ours/cpu-kernel", call, **common)
                if M >= 12:   # the paths the AVX-512 GEMM replaced there: GEMV (passes), dequantized tiles + BLAS
                    os.environ["MOPS_INT4_CPU_GEMM_MIN_M"] = "1000000"
                    try:
                        bench.run("ours/cpu-kernel-no-gemm", call, **common)
                        if 16 < M <= 64:
                            os.environ["MOPS_INT4_CPU_GEMV_MAX_M"] = "16"
                            bench.run("ours/cpu-kernel-tiles", call, **common)
                    finally:
                        os.environ.pop("MOPS_INT4_CPU_GEMV_MAX_M", None)
                        del os.environ["MOPS_INT4_CPU_GEMM_MIN_M"]
    bench.summary(baseline="float matmul")


if __name__ == "__main__":
    main()

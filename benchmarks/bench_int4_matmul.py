"""int4_matmul: ours vs dequantize+matmul, a dense float matmul and torch's own int4 kernel.

    python benchmarks/bench_int4_matmul.py            # GPU if there is one, else CPU
    python benchmarks/bench_int4_matmul.py --quick    # CPU, < 1 min

Shapes are N x K (y = x @ W^T, x [M, K]); M (tokens) is swept over 1, 2, 4, 8, 16.
CPU: SmolLM2-135M's matrices: 1536x576 (MLP up/gate), 576x1536 (MLP down), 49152x576 (the
Q8_0 tied embedding / output head). GPU: 4096x4096 and 4096x11008 (Llama-7B-like), 4-bit G=128
(the group size torch's int4 kernel is usually run with) plus the SmolLM2 head in 8-bit.
GB/s counts the bytes of the quantized weight + x + y for every provider, so the column compares
providers on the same work (a dense matmul really reads more).
Providers: reference (mops_kernels.reference: dequantize then matmul), float matmul (fp32 on the
CPU, bf16 cuBLAS on a GPU, with the dense weight already materialised), torch int4pack
(torch._weight_int4pack_mm, CUDA, 4-bit only), ours/<backend> for every backend that runs here.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

from mops_kernels import _backend, reference  # noqa: E402
from mops_kernels.ops.int4_matmul import int4_matmul  # noqa: E402
from mops_kernels.ops.quant_format import quantize  # noqa: E402

CPU_SHAPES = [(1536, 576, 4, 32), (576, 1536, 4, 32), (49152, 576, 8, 32)]    # N, K, bits, G
GPU_SHAPES = [(4096, 4096, 4, 128), (4096, 11008, 4, 128), (49152, 576, 8, 32)]
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def torch_int4pack(qw, x):
    """A closure running torch._weight_int4pack_mm on the same codes, or a string saying why not.

    torch's format: w = (q - 8) * scale + zero per group, so zero = min + 8 * scale (Q4_1 -> torch).
    """
    if qw.bits != 4 or x.device.type != "cuda":
        return "4-bit weights on CUDA only"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs compute capability >= 8.0"
    try:
        q = qw.unpack().to(torch.int32)                                   # [N, K]
        N, K = qw.shape
        scale = qw.scale.float()
        zero = qw.min.float() + 8 * scale
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
        try:   # torch >= 2.5: uint8 [N, K/2], even column in the high nibble
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        except Exception:  # older torch: int32 codes [N, K]
            packed = torch._convert_weight_to_int4pack(q, 8)
        xb = x.to(torch.bfloat16)
        fn = lambda: torch._weight_int4pack_mm(xb, packed, qw.group_size, sz)  # noqa: E731
        err = (fn().float() - reference.int4_matmul(xb, qw)).norm() / reference.int4_matmul(xb, qw).norm()
        if err > 2e-2:
            return f"its result does not match the reference (rel. err {err:.2e}): packing differs"
        return fn
    except Exception as e:  # op missing in this build, unsupported device, ...
        return f"unavailable: {e!r}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small CPU run (< 1 min)")
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
    reps = args.reps or (20 if args.quick else 50)
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
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
        w_dense = qw.dequantize(dtype)
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            shp = dict(M=M, N=N, K=K, bits=bits, G=G)
            nbytes = qw.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
            flops = 2 * M * N * K
            common = dict(shapes=shp, dtype=dname, bytes=nbytes, flops=flops, reps=reps)
            # the reference dequantizes the whole weight every call: fewer repetitions of it
            bench.run("reference", lambda: reference.int4_matmul(x, qw), **{**common, "reps": 5})
            bench.run("float matmul", lambda: torch.matmul(x, w_dense.t()), **common)
            if cuda:
                fn = torch_int4pack(qw, x)
                if callable(fn):
                    bench.run("torch int4pack", fn, **common)
                else:
                    print(f"torch int4pack skipped for {shp}: {fn}")
            for b in ours:
                if b == "cuda" and M > 16:
                    continue
                os.environ["MOPS_BACKEND"] = b
                try:
                    bench.run(f"ours/{b}", lambda: int4_matmul(x, qw), **common)
                finally:
                    del os.environ["MOPS_BACKEND"]
    bench.summary(baseline="float matmul")


if __name__ == "__main__":
    main()

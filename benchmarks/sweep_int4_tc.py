"""Sweep the Triton tensor-core int4 kernel's launch choices on one GPU: where does it stream best?

    python benchmarks/sweep_int4_tc.py                    # 4096x4096 4-bit G=128, M = 1 and 16, cold weights
    python benchmarks/sweep_int4_tc.py --ms 1,4,16 --shape 4096x11008
    python benchmarks/sweep_int4_tc.py --gemv                # the CUDA GEMV's K split (KS = 1, 2, 4), M = 1

ops/int4_matmul.py's `_tc_launch_defaults` is the op's own launch (at M <= 16: BLOCK_N = 64, split-K
for 4 programs per SM, 4 warps, 3 stages; above: 128, 2, 4, 3). This runs the same kernel (`_int4_matmul_tc_kernel`) with every
combination of BLOCK_N, programs per SM (split-K), num_warps and num_stages below, each output checked
against the default launch first, timed by the harness (CUDA-graph replays over weight copies that
exceed 3x the L2, so every call reads HBM), one row per configuration in
benchmarks/results/int4_tc_sweep-<device>.jsonl, and prints the best configurations per M with GB/s
and % of the device-copy bandwidth measured in the same run. GPU only.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, rotation  # noqa: E402
from bench_int4_matmul import copies_of  # noqa: E402

from mops_kernels.ops import int4_matmul as I  # noqa: E402
from mops_kernels.ops.quant_format import quantize  # noqa: E402


def launch(x2, qw, bn, per_sm, warps, stages):
    """The op's Triton forward (ops/int4_matmul._forward_triton) with the launch choices given."""
    return I._forward_triton(x2, qw, block_n=bn, per_sm=per_sm, warps=warps, stages=stages)


def copy_gbs(dev) -> float:
    """Device-to-device copy bandwidth (read + write) of 1 GiB, GB/s."""
    a = torch.empty(2**28, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 10 / (s.elapsed_time(e) * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="N x K")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--bn", default="64,128")
    ap.add_argument("--per-sm", default="2,4,8", help="split-K target: programs per SM")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--stages", default="3,5")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gemv", action="store_true",
                    help="time the CUDA GEMV (the extension's int4_matmul_cuda) at ksplit 1, 2, 4 instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_int4_tc: needs a CUDA GPU")
    dev = "cuda"
    ints = lambda s: [int(v) for v in s.split(",")]
    N, K = ints(args.shape.replace("x", ","))
    peak = copy_gbs(dev)
    print(f"device copy: {peak:.0f} GB/s (read + write)")
    torch.manual_seed(0)
    qw = quantize(torch.randn(N, K, device=dev) * 0.02, bits=args.bits, group_size=args.group_size)
    n_copies = max(2, rotation(qw.nbytes(), dev))
    qws = copies_of(qw, n_copies)
    for q in qws:   # the kernel's layout, built before timing (never inside a graph capture)
        q.packed_for("tc", I._tc_pack)
    if args.gemv:
        return sweep_gemv(args, qw, qws, n_copies, peak, dev)
    bench = Bench("int4_tc_sweep", dev)
    best = {}
    for M in ints(args.ms):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        want = I._forward_triton(x, qw).float()
        nbytes = qw.nbytes() + x.numel() * 2 + M * N * 2
        for bn, per_sm, warps, stages in itertools.product(ints(args.bn), ints(args.per_sm), ints(args.warps),
                                                           ints(args.stages)):
            cfg = dict(BLOCK_N=bn, per_sm=per_sm, warps=warps, stages=stages)
            try:
                got = launch(x, qw, bn, per_sm, warps, stages).float()
            except Exception as e:  # a configuration the compiler refuses (shared memory, registers)
                print(f"M={M} {cfg}: not run ({type(e).__name__}: {str(e)[:120]})")
                continue
            err = ((got - want).norm() / want.norm()).item()
            if not err <= 1e-2:
                print(f"M={M} {cfg}: WRONG (rel. err {err:.3g} against the default launch)")
                continue
            turn = itertools.cycle(qws)
            row = bench.run("triton-tc", lambda: launch(x, next(turn), bn, per_sm, warps, stages),
                            shapes=dict(M=M, N=N, K=K, bits=args.bits, G=args.group_size, copies=n_copies, **cfg),
                            dtype="bf16", bytes=nbytes, reps=args.reps, copies=n_copies,
                            note=f"device copy {peak:.0f} GB/s")
            gbs = nbytes / (row["median_ms"] * 1e-3) / 1e9
            best.setdefault(M, []).append((gbs, cfg, row["median_ms"]))
    print(f"\nbest launch per M ({N}x{K}, {args.bits}-bit G={args.group_size}; copy {peak:.0f} GB/s):")
    for M, rows in best.items():
        rows.sort(key=lambda r: -r[0])
        for gbs, cfg, ms in rows[:5]:
            print(f"  M={M:3d} {gbs:7.0f} GB/s = {100 * gbs / peak:5.1f}% of copy  {ms * 1e3:8.1f} us  {cfg}")
        default = [r for r in rows if r[1] == I._tc_launch_defaults(M)]
        if default:
            print(f"  M={M:3d} the op's own launch {I._tc_launch_defaults(M)}: {default[0][0]:.0f} GB/s")


def sweep_gemv(args, qw, qws, n_copies, peak, dev):
    """The CUDA GEMV at ksplit 1, 2, 4 (warps per row group splitting K), M in --ms (<= 4), checked
    against ksplit 1 first; rows in benchmarks/results/int4_gemv_sweep-<device>.jsonl."""
    from mops_kernels import _backend
    if not _backend.extension_has_cuda():
        sys.exit("sweep_int4_tc --gemv: the extension has no CUDA kernels (build it first)")
    gemv = _backend.extension().int4_matmul_cuda
    N, K = qw.shape
    bench = Bench("int4_gemv_sweep", dev)
    print(f"\nCUDA GEMV ({N}x{K}, {args.bits}-bit G={args.group_size}; copy {peak:.0f} GB/s):")
    for M in [m for m in (int(v) for v in args.ms.split(",")) if m <= 4]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        want = gemv(x, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits, 1).float()
        nbytes = qw.nbytes() + x.numel() * 2 + M * N * 2
        for ks in (1, 2, 4):
            got = gemv(x, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits, ks).float()
            err = ((got - want).norm() / want.norm()).item()
            if not err <= 1e-5:
                print(f"  M={M} ksplit={ks}: WRONG (rel. err {err:.3g} against ksplit 1)")
                continue
            turn = itertools.cycle(qws)

            def fn(ks=ks):
                q = next(turn)
                return gemv(x, q.qweight, q.scale, q.min, q.group_size, q.bits, ks)
            row = bench.run("cuda-gemv", fn, shapes=dict(M=M, N=N, K=K, bits=args.bits, G=args.group_size,
                                                          copies=n_copies, ksplit=ks),
                            dtype="bf16", bytes=nbytes, reps=args.reps, copies=n_copies,
                            note=f"device copy {peak:.0f} GB/s")
            gbs = nbytes / (row["median_ms"] * 1e-3) / 1e9
            print(f"  M={M} ksplit={ks}: {gbs:7.0f} GB/s = {100 * gbs / peak:5.1f}% of copy  "
                  f"{row['median_ms'] * 1e3:8.1f} us")


if __name__ == "__main__":
    main()

"""prefix_attention: ours vs gathering the prefixes (index_select + cat) then SDPA, vs the reference.

    python benchmarks/bench_prefix_attention.py            # GPU: SPEC §6 decode and prefill sweeps
    python benchmarks/bench_prefix_attention.py --quick    # CPU: the SmolLM2-like decode shape

Providers
    reference          mops_kernels.reference.prefix_attention (fp32 einsum, gathers the prefixes)
    torch_gather_sdpa  the materialising baseline: index_select + cat of the selected slots per
                       request, then one SDPA call with a float mask (log w, padding, causal)
    triton             our fused Triton kernels (GPU; on the CPU only with --triton, interpreted)
    cuda               our CUDA decode kernel (T = 1)
    cpu                our C++ decode kernel (T = 1)
    sdpa_no_prefix     SDPA (flash on the GPU) on the same tokens without prefixes: the TFLOP/s target
    torch_sdpa_no_prefix, cpu_no_prefix   (CPU decode) a bare model's attention, no prefixes: the
                       two paths prefix_attention's CPU dispatch chooses between

FLOPs (forward): 4 * B * Hq * T * (S_eff + kk*P) * D, where S_eff is the mean number of sequence
keys a query row sees: S for T = 1, S - T + (T + 1) / 2 with bottom-right causal masking.
Bytes (decode roofline): q + k + v + the selected prefix rows (k and v) + out.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def flops(B, Hq, T, S, kP, D, causal=True):
    s_eff = S - T + (T + 1) / 2 if causal else S
    return int(4 * B * Hq * T * (s_eff + kP) * D)


def decode_bytes(B, Hq, Hkv, S, kk, P, D, elt):
    return (B * Hq * D                      # q
            + 2 * B * Hkv * S * D           # k, v
            + 2 * B * kk * P * Hkv * D      # the selected prefix rows of k and v
            + B * Hq * D) * elt             # out


def inputs(B, Hq, Hkv, T, S, D, E, P, kk, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = r(B, Hq, T, D), r(B, Hkv, S, D), r(B, Hkv, S, D)
    pk, pv = r(E, P, Hkv, D), r(E, P, Hkv, D)
    idx = torch.randint(0, E, (B, kk), generator=g, dtype=torch.int32).to(device)
    w = torch.rand(B, kk, generator=g).to(device) + 0.1
    am = torch.ones(B, S, dtype=torch.int64, device=device)
    am[: B // 2, : S // 8] = 0                                     # left padding on half the batch
    return q, k, v, pk, pv, idx, w, am


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU run (< 1 minute)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--triton", action="store_true", help="on the CPU: also time the interpreted kernels")
    args = ap.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.device == "cpu" and args.triton:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # read when the kernels are defined
    sys.path[:0] = [HERE, os.path.dirname(HERE)]
    from harness import Bench
    from mops_kernels import _backend, reference
    from mops_kernels.ops import prefix_attention as PA

    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda:
        decode = [dict(B=B, Hq=32, Hkv=8, S=S, D=128, E=16, P=16, kk=4)
                  for B, S in ((64, 2048), (8, 2048), (64, 512), (64, 8192), (1, 2048))]
        prefill = [dict(B=B, Hq=32, Hkv=8, S=S, D=128, E=16, P=16, kk=4)
                   for B, S in ((4, 2048), (1, 2048), (8, 512))]
        dtypes = [torch.bfloat16]
    else:  # the SmolLM2-135M decode shape of the demo, and a small prefill
        decode = [dict(B=8, Hq=9, Hkv=3, S=200, D=64, E=4, P=16, kk=2),
                  dict(B=1, Hq=9, Hkv=3, S=200, D=64, E=4, P=16, kk=2)]
        prefill = [dict(B=2, Hq=9, Hkv=3, S=64, D=64, E=4, P=16, kk=2)] if args.triton else []
        dtypes = [torch.float32]
    reps = 20 if cuda else 10

    for phase, shapes in (("decode", decode), ("prefill", prefill)):
        if not shapes:
            continue
        bench = Bench(f"prefix_attention_{phase}", dev)
        for dtype in dtypes:
            dt = str(dtype).replace("torch.", "")
            for sh in shapes:
                B, Hq, Hkv, S, D, E, P, kk = (sh[x] for x in ("B", "Hq", "Hkv", "S", "D", "E", "P", "kk"))
                T = 1 if phase == "decode" else S
                q, k, v, pk, pv, idx, w, am = inputs(B, Hq, Hkv, T, S, D, E, P, kk, dtype, dev)
                scale = D ** -0.5
                shp = dict(B=B, Hq=Hq, Hkv=Hkv, T=T, S=S, kP=kk * P, D=D)
                fl = flops(B, Hq, T, S, kk * P, D)
                by = decode_bytes(B, Hq, Hkv, S, kk, P, D, q.element_size()) if T == 1 else None
                run = lambda name, fn: bench.run(name, fn, shapes=shp, dtype=dt, bytes=by,  # noqa: E731
                                                 flops=fl, reps=reps)
                with torch.no_grad():
                    if not cuda or S <= 2048:   # the fp32 einsum reference is slow at long S
                        run("reference", lambda: reference.prefix_attention(
                            q, k, v, pk, pv, idx, w, attention_mask=am))
                    run("torch_gather_sdpa", lambda: PA._torch_forward(
                        q, k, v, pk, pv, idx, w, None, am, True, scale))
                    if cuda or args.triton:
                        from mops_kernels.ops._prefix_attention_triton import prefix_attention_triton
                        run("triton", lambda: prefix_attention_triton(
                            q, k, v, pk, pv, idx, w, None, am, True, scale))
                    op = "prefix_attention_cuda" if cuda else "prefix_attention_cpu"
                    if T == 1 and _backend.ext_has(op):
                        fn = getattr(_backend.extension(), op)
                        run("cuda" if cuda else "cpu",
                            lambda: fn(q, k, v, pk, pv, idx, w, None, am, True, scale))
                        if not cuda:   # a bare model's decode attention: what the CPU dispatcher picks between
                            run("torch_sdpa_no_prefix", lambda: PA._torch_forward(
                                q, k, v, None, None, None, None, None, am, True, scale))
                            run("cpu_no_prefix", lambda: fn(q, k, v, None, None, None, None, None, am, True, scale))
                    if cuda and T > 1:
                        run("sdpa_no_prefix", lambda: torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True, enable_gqa=True))
        bench.summary(baseline="torch_gather_sdpa")


if __name__ == "__main__":
    main()

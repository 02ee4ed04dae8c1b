"""prefix_attention: ours vs gathering the prefixes (index_select + cat) then SDPA, vs the reference.

    python benchmarks/bench_prefix_attention.py            # GPU: SPEC §6 decode and prefill sweeps
    python benchmarks/bench_prefix_attention.py --quick    # CPU: the SmolLM2-like decode shape
    python benchmarks/bench_prefix_attention.py --sweep-configs   # GPU: every Triton prefill
                       # config (PREFILL_CONFIGS pruned by prefill_config_fits), to rank them

Providers
    reference          mops_kernels.reference.prefix_attention (fp32 einsum, gathers the prefixes)
    torch_gather_sdpa  the materialising baseline: index_select + cat of the selected slots per
                       request, then one SDPA call with a float mask (log w, padding, causal)
    triton             our fused Triton kernels (GPU; on the CPU only with --triton, interpreted)
    cuda               our CUDA decode kernel (T = 1)
    cpu                our C++ decode kernel (T = 1)
    sdpa_no_prefix     SDPA pinned to the flash backend (torch.nn.attention.sdpa_kernel) on the same
                       tokens without prefixes: the TFLOP/s target of SPEC §6. Credited with its own
                       FLOPs only (kP = 0 in the formula below): it does no prefix work.
    triton[BMxBN,wW,sS]  (--sweep-configs) our Triton prefill forward with one launch configuration
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
    ap.add_argument("--sweep-configs", action="store_true",
                    help="GPU prefill: time every Triton launch configuration (to order PREFILL_CONFIGS)")
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
                s_eff = "S" if T == 1 else "S-T+(T+1)/2"
                note = (f"flops=4*B*Hq*T*({s_eff}+kP)*D, kP={kk * P}"
                        + (", bytes=elt*(2*B*Hq*D+2*B*Hkv*S*D+2*B*kk*P*Hkv*D)" if by else ""))

                def run(name, fn, fl=fl, note=note):
                    bench.run(name, fn, shapes=shp, dtype=dt, bytes=by, flops=fl, reps=reps, note=note)
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
                        from torch.nn.attention import SDPBackend, sdpa_kernel
                        # kv heads expanded outside the timed call (flash kernels differ in GQA support)
                        kx, vx = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)

                        def flash():
                            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):   # pinned: an error, not a fallback
                                return torch.nn.functional.scaled_dot_product_attention(
                                    q, kx, vx, is_causal=True)
                        run("sdpa_no_prefix", flash, fl=flops(B, Hq, T, S, 0, D),
                            note=f"flops=4*B*Hq*T*({s_eff}+kP)*D, kP=0 (no prefix work), flash backend")
                    if cuda and T > 1 and args.sweep_configs:
                        from mops_kernels.ops import _prefix_attention_triton as TR
                        i32, wf, _, m8 = TR._prep(q, pk, idx, w, None, am)
                        for cfg in TR.prefill_configs(Hq // Hkv * T, D, dtype):
                            tag = f"triton[{cfg.block_m}x{cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}]"
                            run(tag, lambda cfg=cfg: TR._forward(q, k, v, pk, pv, i32, wf, None, m8, True,
                                                                  scale, cfg=cfg))
        bench.summary(baseline="torch_gather_sdpa")


if __name__ == "__main__":
    main()

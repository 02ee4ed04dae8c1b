"""gate_topk: the fused Triton gate vs the same steps as separate torch ops (the reference).

    python benchmarks/bench_gate_topk.py            # GPU sweep: B = 1..256, d = 4096, E = 8..64
    python benchmarks/bench_gate_topk.py --quick    # small CPU set (Triton under TRITON_INTERPRET=1)

Bytes moved (the roofline for a memory-bound op): hidden B*T*d*elt + mask + w1, w2 in fp32 + the
[B, k] outputs. Forward rows by default; --backward adds forward+backward rows (training the gate).
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def setup(doc: str, extra_flags=()):
    """Parse --quick/--device (+ extra store_true flags); pick the device; make the Triton kernels
    the ones timed (the interpreter on the CPU, set before any kernel is defined)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--quick", action="store_true", help="small shapes on the CPU")
    ap.add_argument("--device", default=None)
    for flag, helptext in extra_flags:
        ap.add_argument(flag, action="store_true", help=helptext)
    args = ap.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # read at kernel decoration: before the import
    os.environ["MOPS_BACKEND"] = "triton"                # "ours" must be the kernel, never a fallback
    sys.path[:0] = [HERE, os.path.dirname(HERE)]         # the harness, and the package from a checkout
    return args


def main():
    args = setup(__doc__, [("--backward", "also time forward + backward")])
    from harness import Bench
    from mops_kernels import reference
    from mops_kernels.ops.gate_topk import gate_topk

    device = args.device
    if args.quick:
        Bs, Es, T, d, h, k, dtype = (1, 16), (8, 64), 16, 96, 32, 2, torch.float32
    else:
        Bs, Es, T, d, h, k, dtype = (1, 4, 16, 64, 256), (8, 16, 64), 128, 4096, 256, 2, torch.bfloat16
    reps = 5 if args.quick else 50
    providers = {"torch (reference)": reference.gate_topk, "ours (triton)": gate_topk}
    bench = Bench("gate_topk", device)
    dt = str(dtype).replace("torch.", "")
    for E in Es:
        for B in Bs:
            hidden = torch.randn(B, T, d, device=device, dtype=dtype)
            mask = (torch.rand(B, T, device=device) < 0.8).float()
            params = [torch.randn(h, d, device=device) * d ** -0.5, torch.zeros(h, device=device),
                      torch.randn(E, h, device=device) * h ** -0.5, torch.zeros(E, device=device)]
            for p in params:
                p.requires_grad_()
            nbytes = hidden.numel() * hidden.element_size() + mask.numel() * 4 + (h * d + E * h) * 4 + B * k * 8
            shapes = dict(B=B, T=T, d=d, h=h, E=E, k=k)
            g = torch.randn(B, k, device=device)
            for name, fn in providers.items():
                with torch.no_grad():
                    bench.run(name, lambda: fn(hidden, mask, *params, k), shapes={**shapes, "run": "fwd"},
                              dtype=dt, bytes=nbytes, reps=reps)
                if args.backward:
                    bench.run(name, lambda: torch.autograd.grad((fn(hidden, mask, *params, k)[1] * g).sum(),
                                                                params),
                              shapes={**shapes, "run": "fwd+bwd"}, dtype=dt, reps=reps)
    bench.summary(baseline="torch (reference)")


if __name__ == "__main__":
    main()

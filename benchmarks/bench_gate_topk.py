"""gate_topk: the fused Triton gate vs the same steps as separate torch ops (the reference).

    python benchmarks/bench_gate_topk.py            # GPU sweep: B = 1..256, d = 4096, E = 8..64
    python benchmarks/bench_gate_topk.py --quick    # small CPU set (Triton under TRITON_INTERPRET=1)

Bytes moved (the roofline for a memory-bound op): hidden B*T*d*elt + mask + w1, w2 in fp32 + the
[B, k] outputs. Forward rows by default; --backward adds forward+backward rows (training the gate:
ours is the Triton forward + the Triton backward, d hidden and d w1, b1, w2, b2).
Every shape is first checked once against the reference (indices, weights, and the gradients with
--backward). On the CPU the Triton kernels run in the interpreter, so they are checked but not
timed there: CPU rows are the torch reference only.
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


def check(ours, ref, hidden, mask, params, k, g, backward, shapes):
    """One untimed run of ours against the reference: same indices, weights and gradients (of
    the params, and of hidden in fp32) within 1e-4, else raise."""
    hid = hidden.float().requires_grad_(backward)
    (idx, w), (ridx, rw) = ours(hid, mask, *params, k), ref(hid, mask, *params, k)
    errs = {"weights": ((w - rw).norm() / rw.norm()).item()}
    if not torch.equal(idx, ridx):
        raise AssertionError(f"gate_topk {shapes}: indices differ from the reference")
    if backward:
        leaves = [hid, *params]
        for name, a, b in zip(("hidden", "w1", "b1", "w2", "b2"),
                              torch.autograd.grad((w * g).sum(), leaves),
                              torch.autograd.grad((rw * g).sum(), leaves)):
            errs[name] = ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
    if max(errs.values()) > 1e-4:
        raise AssertionError(f"gate_topk {shapes}: rel. errors vs the reference {errs}")
    print(f"checked {shapes}: max rel. error {max(errs.values()):.2e} ({', '.join(errs)})")


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
    providers = {"torch (reference)": reference.gate_topk}
    if device != "cpu":
        providers["ours (triton)"] = gate_topk
    else:
        print("CPU: the Triton kernels run under TRITON_INTERPRET=1 here: checked, not timed")
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
            check(gate_topk, reference.gate_topk, hidden, mask, params, k, g, args.backward, shapes)
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

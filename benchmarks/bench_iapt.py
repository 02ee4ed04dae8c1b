"""iapt_generate: the IAPT prompt generator (matmuls + one fused pooling/rational kernel) vs the
same steps as separate torch ops (the reference).

    python benchmarks/bench_iapt.py                 # GPU sweep: B = 1..128, n = 128, d = 4096, m = 64
    python benchmarks/bench_iapt.py --quick         # small CPU set (Triton under TRITON_INTERPRET=1)

FLOPs (both providers do the same math): 2*B*n*d*m (down) + 2*B*n*m*4 (logits) + 2*B*4*n*m
(pooling) + 2*B*4*m*d (up); forward+backward counted as 3x. Rows for forward and forward+backward.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gate_topk import setup  # noqa: E402


def main():
    args = setup(__doc__)
    from harness import Bench
    from mops_kernels import reference
    from mops_kernels.ops.iapt_generate import iapt_generate

    device = args.device
    if args.quick:
        Bs, n, d, m, dtype = (1, 8), 37, 96, 16, torch.float32
    else:
        Bs, n, d, m, dtype = (1, 8, 32, 128), 128, 4096, 64, torch.bfloat16
    reps = 5 if args.quick else 50
    providers = {"torch (reference)": reference.iapt_generate, "ours (triton)": iapt_generate}
    bench = Bench("iapt_generate", device)
    dt = str(dtype).replace("torch.", "")
    for B in Bs:
        H = torch.randn(B, n, d, device=device, dtype=dtype)
        mask = (torch.rand(B, n, device=device) < 0.8).float()
        params = [torch.randn(d, m, device=device) * d ** -0.5, torch.randn(m, 4, device=device),
                  torch.tensor(reference.RATIONAL_GELU_A, device=device),
                  torch.tensor(reference.RATIONAL_GELU_B, device=device),
                  torch.randn(m, d, device=device) * 0.02]
        for p in params:
            p.requires_grad_()
        flops = 2 * B * n * d * m + 2 * B * n * m * 4 * 2 + 2 * B * 4 * m * d
        shapes = dict(B=B, n=n, d=d, m=m)
        g = torch.randn(B, 4, d, device=device)
        for name, fn in providers.items():
            with torch.no_grad():
                bench.run(name, lambda: fn(H, mask, *params), shapes={**shapes, "run": "fwd"},
                          dtype=dt, flops=flops, reps=reps)
            bench.run(name, lambda: torch.autograd.grad((fn(H, mask, *params).float() * g).sum(), params),
                      shapes={**shapes, "run": "fwd+bwd"}, dtype=dt, flops=3 * flops, reps=reps)
    bench.summary(baseline="torch (reference)")


if __name__ == "__main__":
    main()

"""pytest-benchmark suites of the CPU ops on SmolLM2-135M decode shapes, providers side by side.

    pytest benchmarks/ --benchmark-only                       # time, print one table per group
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # + save .benchmarks/<machine>/NNNN_<commit>.json
    pytest benchmarks/ --benchmark-only --benchmark-compare   # + compare with the last saved run
    pytest benchmarks/ --benchmark-disable                    # each case once, untimed (what CI runs)

Groups (`benchmark.group`: one table per group, its providers timed in the same run):
  int4_matmul N x K M=m   y = x @ W^T, x [m, K] fp32, W of SmolLM2's decode matrices (q/o 576x576,
                          k/v 192x576, gate/up 1536x576, down 576x1536: 4-bit G=32; the tied head
                          49152x576: 8-bit Q8_0), m = 1 and 8 tokens.
                          ours             the public op `int4_matmul` (registry dispatch + checks)
                          ours/cpu-kernel  the compiled kernel called as the serving Engine calls it
                                           (serving/decode.py FusedProj: `_C.int4_matmul_cpu`)
                          fp32 matmul      torch.matmul with the dense fp32 weight already built
                          One weight per case: it stays in the cache between calls when it fits
                          (benchmarks/bench_int4_matmul.py also times copies rotated past the cache).
  prefix_attention decode B=b   q [b, 9, 1, 64], k/v [b, 3, 200, 64], 4 experts of P=16 tokens,
                          top-2 per request, half the batch left-padded (bench_prefix_attention.inputs).
                          ours             the public op `prefix_attention` (picks the C++ kernel)
                          ours/cpu-kernel  the registry's pick called directly, as the Engine does
                          gather+sdpa      the op's torch backend: index_select + cat of the slots,
                                           one SDPA call (the baseline of bench_prefix_attention)
  gate_topk               B=8, T=37, d=576, h=256, E=8, k=2, fp32, on the torch backend.

Before timing, every case checks its output once against mops_kernels.reference (an assert on the
values; nothing here asserts a time). Each row's extra_info holds the device, versions, shapes,
dtype, the backend that ran, the load average when the case started, and bytes / FLOPs per call
with GB/s and GFLOP/s over the median. A shared machine's timings are noise: read the load average.
On a busy machine torch's and the kernels' OpenMP threads wait on descheduled siblings and the medians
jump to multiples of the scheduler's time slice (16 or 32 ms for a 60 us call, seen at load 7 on 2
cores); OMP_NUM_THREADS=1 gives per-call figures there (torch_threads and OMP_* are in extra_info).
"""
import os

import pytest
import torch

from bench_prefix_attention import decode_bytes, flops as attn_flops, inputs as attn_inputs
from mops_kernels import _backend, reference
from mops_kernels.ops.gate_topk import gate_topk
from mops_kernels.ops.int4_matmul import int4_matmul
from mops_kernels.ops.prefix_attention import prefix_attention
from mops_kernels.ops.quant_format import quantize

# Small fixed settings, so that the whole suite stays under ~2 minutes on an idle 2-core machine:
# ~0.25 s of rounds per case (at least 5), after 2 warm-up calls. The mark overrides the matching
# --benchmark-* flags (pytest-benchmark's rule): change them here.
pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.25, warmup=True, warmup_iterations=2)

CPU = torch.device("cpu")
HAS_CPU_KERNELS = _backend.why_not("cpu", CPU, _backend.BACKENDS) is None
needs_extension = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the compiled extension (_C) is not built")

# --------------------------------------------------------------------------------------------
# int4_matmul
# --------------------------------------------------------------------------------------------
INT4_SHAPES = [(576, 576, 4), (192, 576, 4), (1536, 576, 4), (576, 1536, 4), (49152, 576, 8)]  # N, K, bits
GROUP = 32
INT4_TOL = dict(rtol=1e-4, atol=1e-4)   # fp32 accumulation in another order than the reference's


@pytest.fixture(scope="module", params=INT4_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-q{s[2]}")
def int4_case(request):
    """(qw, dense fp32 W, shape) for one decode matrix, built once for all its benchmarks."""
    N, K, bits = request.param
    g = torch.Generator().manual_seed(N * 7 + K)
    qw = quantize(torch.randn(N, K, generator=g) * 0.02, bits=bits, group_size=GROUP)
    return qw, qw.dequantize(torch.float32), (N, K, bits)


def _int4_providers(qw, dense):
    """provider -> (fn(x), backend that runs it). The cpu kernel only where it is built."""
    out = {"ours": (lambda x: int4_matmul(x, qw), None),
           "fp32 matmul": (lambda x: torch.matmul(x, dense.t()), "torch.matmul")}
    if HAS_CPU_KERNELS:
        kern = _backend.extension().int4_matmul_cpu
        q, s, mn, G, bits = qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits
        out["ours/cpu-kernel"] = (lambda x: kern(x, q, s, mn, G, bits), "cpu (direct)")
    return out


@pytest.mark.parametrize("provider", [
    "ours", pytest.param("ours/cpu-kernel", marks=needs_extension), "fp32 matmul"])
@pytest.mark.parametrize("M", [1, 8], ids=lambda m: f"M{m}")
def test_int4_matmul(record, int4_case, M, provider):
    qw, dense, (N, K, bits) = int4_case
    fn, backend = _int4_providers(qw, dense)[provider]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    if backend is None:   # the public op: what its registry picks for this call
        backend = _backend.dispatch("int4_matmul", CPU, x, qw).backend
    with torch.no_grad():
        torch.testing.assert_close(fn(x), reference.int4_matmul(x, qw), **INT4_TOL)
        # bytes of the quantized weight + x + y for every provider: the same work (the fp32
        # matmul really reads 4 bytes per weight, so its GB/s is an effective figure)
        bench = record(f"int4_matmul {N}x{K} M={M}", provider,
                       dict(M=M, N=N, K=K, bits=bits, G=GROUP), "fp32",
                       bytes=qw.nbytes() + 4 * (M * K + M * N), flops=2 * M * N * K, backend=backend)
        bench(fn, x)


# --------------------------------------------------------------------------------------------
# prefix_attention, CPU decode (T = 1)
# --------------------------------------------------------------------------------------------
ATTN = dict(Hq=9, Hkv=3, S=200, D=64, E=4, P=16, kk=2)
ATTN_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("provider", [
    "ours", pytest.param("ours/cpu-kernel", marks=needs_extension), "gather+sdpa"])
@pytest.mark.parametrize("B", [1, 8], ids=lambda b: f"B{b}")
def test_prefix_attention_decode(record, B, provider):
    Hq, Hkv, S, D, E, P, kk = (ATTN[n] for n in ("Hq", "Hkv", "S", "D", "E", "P", "kk"))
    q, k, v, pk, pv, idx, w, am = attn_inputs(B, Hq, Hkv, 1, S, D, E, P, kk, torch.float32, "cpu")
    scale = D ** -0.5
    if provider == "ours":
        backend = _backend.dispatch("prefix_attention", CPU, q, True, False).backend
        fn = lambda: prefix_attention(q, k, v, pk, pv, idx, w, attention_mask=am)  # noqa: E731
    else:
        # the registered backend called directly (prefix_lens=None, causal=True): for ours/cpu-kernel
        # the registry's own pick for this call, as serving/decode.py binds it once per layer
        impl = (_backend.dispatch("prefix_attention", CPU, q, True, False) if provider == "ours/cpu-kernel"
                else _backend.registered("prefix_attention")["torch"])
        backend = impl.backend
        fn = lambda: impl.fn(q, k, v, pk, pv, idx, w, None, am, True, scale)  # noqa: E731
    if provider == "ours/cpu-kernel":
        assert backend == "cpu", f"the registry picks {backend!r} for the CPU decode, not the C++ kernel"
    with torch.no_grad():
        torch.testing.assert_close(fn(), reference.prefix_attention(q, k, v, pk, pv, idx, w, attention_mask=am),
                                   **ATTN_TOL)
        bench = record(f"prefix_attention decode B={B}", provider, dict(B=B, T=1, **ATTN), "fp32",
                       bytes=decode_bytes(B, Hq, Hkv, S, kk, P, D, 4), flops=attn_flops(B, Hq, 1, S, kk * P, D),
                       backend=backend)
        bench(fn)


# --------------------------------------------------------------------------------------------
# gate_topk on the torch backend
# --------------------------------------------------------------------------------------------
def test_gate_topk_torch(record, monkeypatch):
    B, T, d, h, E, k = 8, 37, 576, 256, 8, 2
    monkeypatch.setenv("MOPS_BACKEND", "gate_topk:torch")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, d, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1                                          # every row has a token
    w1, b1 = torch.randn(h, d, generator=g) * d ** -0.5, torch.randn(h, generator=g) * 0.1
    w2, b2 = torch.randn(E, h, generator=g) * h ** -0.5, torch.randn(E, generator=g) * 0.1
    backend = _backend.dispatch("gate_topk", CPU).backend
    assert backend == "torch", backend
    with torch.no_grad():
        idx, wt = gate_topk(hidden, mask, w1, b1, w2, b2, k)
        ridx, rwt = reference.gate_topk(hidden, mask, w1, b1, w2, b2, k)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(wt, rwt, rtol=1e-5, atol=1e-6)
        bench = record("gate_topk", "ours (torch backend)", dict(B=B, T=T, d=d, h=h, E=E, k=k), "fp32",
                       bytes=4 * (B * T * d + B * T + h * d + h + E * h + E) + 8 * B * k,
                       flops=2 * B * T * d + 2 * B * d * h + 2 * B * h * E, backend=backend)  # masked sum + MLP
        bench(gate_topk, hidden, mask, w1, b1, w2, b2, k)

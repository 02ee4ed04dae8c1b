"""int4_matmul (SPEC §3) on every backend against x @ qw.dequantize().T in fp64.

Backends here: cpu (the C++ extension), triton (through the interpreter), torch; cuda under
requires_cuda. Weight configs: 4-bit groups 32/64/128 and 8-bit (Q8_0), K = 576 (640 for G = 128,
since 576 is not a multiple of 128), M = 1, 3 (decode GEMV) and 37 (prefill GEMM / tiled path).
"""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import available_backends, requires_cuda
from utils import rel_err, tol_ok

from mops_kernels import _backend, reference
from mops_kernels.ops.int4_matmul import int4_matmul
from mops_kernels.ops.quant_format import QuantizedWeight, int4_quantize, int8_quantize, quantize

CPU_BACKENDS = [b for b in ("cpu", "triton", "torch") if b in available_backends("cpu")]
WEIGHTS = [(4, 32, 576), (4, 64, 576), (4, 128, 640), (8, 32, 576)]     # (bits, group, K)
DTYPES = [(torch.float32, 1e-4), (torch.bfloat16, None), (torch.float16, None)]  # (dtype, fp32 tol)


def _grid(backend, Ms, dtypes):
    """(backend, bits, G, K, M, dtype, tol) rows; the interpreted Triton backend gets every weight
    config in fp32 and the low-precision dtypes on two configs (its dtype handling is shared)."""
    rows = []
    for bits, G, K in WEIGHTS:
        for M in Ms:
            for dtype, tol in dtypes:
                if backend == "triton" and dtype != torch.float32 and (G != 32 or M == 3):
                    continue
                rows.append(pytest.param(backend, bits, G, K, M, dtype, tol,
                                         id=f"{backend}-q{bits}g{G}-K{K}-M{M}-{str(dtype)[6:]}"))
    return rows


def _n_for(backend):
    return 160 if backend == "triton" else 1536   # the interpreter is slow: fewer output rows


def _case(bits, G, K, N, device="cpu"):
    w = torch.randn(N, K, device=device) * 0.05 + 0.01 * torch.randn(N, 1, device=device)
    return quantize(w, bits=bits, group_size=G)


def _check_close(out, x, qw, dtype, bias=None):
    """out vs the fp64 product; low precision within 2x plain PyTorch in that dtype + 1e-5."""
    W = qw.dequantize(torch.float64)
    ref = x.double() @ W.t() + (0 if bias is None else bias.double())
    plain = x @ qw.dequantize(dtype).t() + (0 if bias is None else bias)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    assert tol_ok(out, ref, plain, dtype), (rel_err(out, ref), rel_err(plain, ref))


@pytest.mark.parametrize("backend,bits,G,K,M,dtype,_tol",
                         [r for b in CPU_BACKENDS for r in _grid(b, [1, 3, 37], DTYPES)])
def test_forward(force_backend, backend, bits, G, K, M, dtype, _tol):
    force_backend(backend)
    qw = _case(bits, G, K, _n_for(backend))
    x = torch.randn(M, K).to(dtype)
    _check_close(int4_matmul(x, qw), x, qw, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits,G,K,M", [(4, 64, 576, 3), (8, 32, 576, 37)])
def test_bias_noncontiguous_3d(force_backend, backend, bits, G, K, M):
    force_backend(backend)
    N = _n_for(backend)
    qw = _case(bits, G, K, N)
    bias = torch.randn(N)
    # [2, M, K] view with a last-dim stride of 2 (every other column of a wider tensor)
    x = torch.randn(2, M, 2 * K)[..., ::2]
    assert not x.is_contiguous()
    out = int4_matmul(x, qw, bias)
    assert out.shape == (2, M, N)
    _check_close(out.reshape(-1, N), x.reshape(-1, K), qw, torch.float32, bias)
    # a transposed x (rows strided, columns contiguous) as well
    xt = torch.randn(K, M).t()
    _check_close(int4_matmul(xt, qw, bias), xt, qw, torch.float32, bias)


@pytest.mark.parametrize("backend,bits,G,K,M,dtype,_tol",
                         [r for b in CPU_BACKENDS for r in _grid(b, [1, 37], DTYPES[:2])])
def test_backward_dx(force_backend, backend, bits, G, K, M, dtype, _tol):
    force_backend(backend)
    N = _n_for(backend)
    qw = _case(bits, G, K, N)
    x = torch.randn(M, K).to(dtype).requires_grad_()
    dy = torch.randn(M, N).to(dtype)
    int4_matmul(x, qw).backward(dy)
    # the reference's autograd, in fp64 through the fp32 oracle's math
    x64 = x.detach().double().requires_grad_()
    (x64 @ qw.dequantize(torch.float64).t()).backward(dy.double())
    xr = x.detach().float().requires_grad_()
    reference.int4_matmul(xr, qw).backward(dy.float())
    assert rel_err(xr.grad, x64.grad) <= 1e-5           # the oracle agrees with fp64
    plain = dy @ qw.dequantize(dtype)
    assert x.grad.dtype == dtype
    assert tol_ok(x.grad, x64.grad, plain, dtype), (rel_err(x.grad, x64.grad), rel_err(plain, x64.grad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 5])
def test_k_not_a_multiple_of_64(force_backend, backend, bits, M):
    """K = 608 = 19 * 32: a trailing 32-column block after the 64-column chunks."""
    force_backend(backend)
    qw = _case(bits, 32, 608, 96)
    x = torch.randn(M, 608)
    _check_close(int4_matmul(x, qw), x, qw, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_are_independent(force_backend, backend):
    """A NaN in one row of x poisons that output row and no other (catches mixed-up rows)."""
    force_backend(backend)
    qw = _case(4, 32, 576, _n_for(backend))
    for M in (3, 37):
        x = torch.randn(M, 576)
        x[1, 100] = float("nan")
        out = int4_matmul(x, qw)
        assert torch.isnan(out[1]).all()
        assert not torch.isnan(out[torch.arange(M) != 1]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise(force_backend, backend):
    force_backend(backend)
    qw = _case(4, 32, 576, 64)
    with pytest.raises(ValueError, match="K=576"):
        int4_matmul(torch.randn(2, 512), qw)
    with pytest.raises(ValueError, match="float"):
        int4_matmul(torch.randint(0, 3, (2, 576)), qw)
    with pytest.raises(ValueError, match="weight is on meta"):
        int4_matmul(torch.randn(2, 576), qw.to("meta"))
    with pytest.raises(ValueError, match="bias"):
        int4_matmul(torch.randn(2, 576), qw, torch.randn(63))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        int4_matmul(torch.randn(2, 576), qw.dequantize())


def test_forced_backend_that_cannot_run_raises(force_backend):
    force_backend("cuda")
    qw = _case(4, 32, 576, 64)
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        int4_matmul(torch.randn(2, 576), qw)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the compiled extension")
def test_cpu_glue_checks_arguments():
    ext = _backend.extension()
    qw = _case(4, 32, 576, 64)
    x = torch.randn(2, 576)
    with pytest.raises(RuntimeError, match="scale must be"):
        ext.int4_matmul_cpu(x, qw.qweight, qw.scale.float(), qw.min, 32, 4)
    with pytest.raises(RuntimeError, match="min is required"):
        ext.int4_matmul_cpu(x, qw.qweight, qw.scale, None, 32, 4)
    with pytest.raises(RuntimeError, match="x must have shape"):
        ext.int4_matmul_cpu(torch.randn(2, 570), qw.qweight, qw.scale, qw.min, 32, 4)
    with pytest.raises(RuntimeError, match="int8"):
        ext.int4_matmul_cpu(x, qw.qweight, qw.scale, None, 32, 8)


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_quantize_round_trip(G):
    w = torch.randn(48, 640) * torch.rand(48, 1)
    qw = int4_quantize(w, G)
    q = qw.unpack()
    assert q.min() >= 0 and q.max() <= 15
    assert set(q.unique().tolist()) == set(range(16))        # every code is used
    err = (qw.dequantize() - w).abs().view(48, -1, G)
    half_step = qw.scale.float().unsqueeze(-1) / 2
    # <= scale/2 per element, up to the fp16 rounding of scale and min (a few ulps of |w|)
    assert (err <= half_step * (1 + 2e-3) + 1e-3 * w.abs().view(48, -1, G).amax(-1, keepdim=True)).all()
    assert err.mean() < half_step.mean()


def test_int8_quantize_round_trip():
    w = torch.randn(48, 576)
    qw = int8_quantize(w)
    q = qw.unpack()
    assert q.min() >= -127 and q.max() <= 127 and (q.abs() == 127).any()
    err = (qw.dequantize() - w).abs().view(48, -1, 32)
    assert (err <= qw.scale.float().unsqueeze(-1) / 2 * (1 + 2e-3) + 1e-6).all()


def test_int4_linear_matches_linear(force_backend):
    from mops_kernels.modules.int4_linear import Int4Linear
    lin = torch.nn.Linear(576, 96)
    mod = Int4Linear.from_linear(lin, bits=4, group_size=64)
    x = torch.randn(2, 5, 576)
    ref = x.double() @ mod.dequantize(torch.float64).t() + lin.bias.double()
    assert rel_err(mod(x), ref) <= 1e-5
    assert mod.dequantize().shape == (96, 576)


# ---- CUDA (run on the GPU machine) -------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bits,G,K", WEIGHTS)
@pytest.mark.parametrize("M", [1, 2, 4, 16, 37])
@pytest.mark.parametrize("dtype,_tol", DTYPES)
def test_forward_cuda(force_backend, backend, bits, G, K, M, dtype, _tol):
    if backend == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    force_backend(backend)
    qw = _case(bits, G, K, 1537, device="cuda")      # odd N: a partial last warp / tile
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(1537, device="cuda").to(dtype)
    if backend == "cuda" and M > 1:   # the op gives the CUDA GEMV M = 1; the kernel takes M <= 4
        with pytest.raises(_backend.BackendUnavailable):
            int4_matmul(x, qw)
        gemv = _backend.extension().int4_matmul_cuda
        if M > 4:
            with pytest.raises(RuntimeError, match="M <= 4"):
                gemv(x, qw.qweight, qw.scale, qw.min, G, bits)
            return
        _check_close(gemv(x, qw.qweight, qw.scale, qw.min, G, bits), x, qw, dtype)
    else:
        _check_close(int4_matmul(x, qw, bias), x, qw, dtype, bias)
    if backend == "cuda" and M <= 4:    # the K-split launches (KS warps per row group), called directly
        gemv = _backend.extension().int4_matmul_cuda
        for ks in (2, 4):
            _check_close(gemv(x, qw.qweight, qw.scale, qw.min, G, bits, ks), x, qw, dtype)
        with pytest.raises(RuntimeError, match="ksplit"):
            gemv(x, qw.qweight, qw.scale, qw.min, G, bits, 3)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bits,G,K", [(4, 32, 576), (8, 32, 576)])
def test_backward_dx_cuda(force_backend, backend, bits, G, K):
    if backend == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    force_backend(backend)
    M = 1 if backend == "cuda" else 3        # the CUDA backend's forward is the M = 1 GEMV
    qw = _case(bits, G, K, 1536, device="cuda")
    x = torch.randn(M, K, device="cuda", requires_grad=True)
    dy = torch.randn(M, 1536, device="cuda")
    int4_matmul(x, qw).backward(dy)
    ref = dy.double() @ qw.dequantize(torch.float64)
    assert rel_err(x.grad, ref) <= 1e-4


@requires_cuda
def test_weight_on_other_device_raises_cuda():
    qw = _case(4, 32, 576, 64, device="cuda")
    with pytest.raises(ValueError, match="weight is on cuda"):
        int4_matmul(torch.randn(2, 576), qw)


def test_quantized_weight_is_validated():
    qw = _case(4, 32, 576, 64)
    with pytest.raises(ValueError, match="scale must be"):
        QuantizedWeight(qw.qweight, qw.scale.float(), qw.min, qw.shape, 32, 4)


# ---- the C++ CPU kernels' own paths: odd shapes, K = 1536, helpers on / off ------------------------
CPU_ODD = [(4, 32, 576), (4, 32, 1536), (4, 64, 1536), (4, 128, 1536), (4, 32, 608), (8, 32, 576),
           (8, 32, 1536)]                                                  # (bits, G, K)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("bits,G,K", CPU_ODD)
@pytest.mark.parametrize("N", [1, 7, 195])       # not multiples of the M = 1 kernel's 4-row step
@pytest.mark.parametrize("M", [1, 3, 17, 65])     # 4-row GEMV, tiled GEMV, then the AVX-512 GEMM (else GEMV passes, tiles + BLAS)
@pytest.mark.parametrize("dtype,_tol", DTYPES[:1])
def test_cpu_odd_shapes(force_backend, bits, G, K, N, M, dtype, _tol):
    force_backend("cpu")
    qw = _case(bits, G, K, N)
    x = torch.randn(M, K).to(dtype)
    x_before = x.clone()
    _check_close(int4_matmul(x, qw), x, qw, dtype)
    assert torch.equal(x, x_before)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("bits,G,K,N", [(4, 32, 576, 1539), (4, 64, 1536, 579), (8, 32, 576, 3001)])
@pytest.mark.parametrize("M", [1, 5, 40])       # 40: the AVX-512 GEMM's panels on a CPU that has it
@pytest.mark.parametrize("helpers", ["1", "auto"])
def test_cpu_helper_threads_change_nothing(force_backend, monkeypatch, bits, G, K, N, M, helpers):
    """Chunks of output rows go to other threads: our helpers (MOPS_INT4_CPU_HELPERS=1 forces them
    even on a loaded machine) or, unset, the pool's own choice (OpenMP's threads under OpenMP's
    default wait policy, as CI runs): every row is computed by the same code either way, so the bits
    are equal, and repeated calls (threads racing the caller for chunks) give the same result."""
    force_backend("cpu")
    qw = _case(bits, G, K, N)
    x = torch.randn(M, K)
    monkeypatch.setenv("MOPS_INT4_CPU_HELPERS", "0")
    alone = int4_matmul(x, qw)
    _check_close(alone, x, qw, torch.float32)
    if helpers == "auto":
        monkeypatch.delenv("MOPS_INT4_CPU_HELPERS")
    else:
        monkeypatch.setenv("MOPS_INT4_CPU_HELPERS", helpers)
    prev = torch.get_num_threads()
    torch.set_num_threads(max(prev, 2))
    try:
        for _ in range(20):
            assert torch.equal(int4_matmul(x, qw), alone)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS or not hasattr(__import__("os"), "fork"),
                    reason="needs the compiled extension and os.fork")
@pytest.mark.parametrize("helpers", ["1", "auto"])
def test_cpu_helpers_after_fork(force_backend, monkeypatch, helpers):
    """A child forked after the helpers started has none of them: it must still compute every
    row (alone) and not wait for a helper that does not exist. "auto": the pool's own choice, which
    under OpenMP's default (spinning) wait policy is OpenMP's threads (cpu_pool.cpp)."""
    import os
    import time
    force_backend("cpu")
    if helpers == "auto":
        monkeypatch.delenv("MOPS_INT4_CPU_HELPERS", raising=False)
    else:
        monkeypatch.setenv("MOPS_INT4_CPU_HELPERS", helpers)
    qw = _case(4, 32, 576, 1539)
    x = torch.randn(1, 576)
    want = int4_matmul(x, qw)            # starts the helpers in this process
    pid = os.fork()
    if pid == 0:                          # child: exit code 0 only if the result is right
        ok = False
        try:
            ok = all(torch.equal(int4_matmul(x, qw), want) for _ in range(5))
        finally:
            os._exit(0 if ok else 1)
    deadline = time.time() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in int4_matmul")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# ---- the CUDA GEMV's arithmetic, on the host ----------------------------------------------------
# csrc/int4_matmul_kernel.cuh keeps its bit tricks and per-group sums in MOPS_HD helpers that g++
# builds too: tests/int4_gemv_host.cpp runs them (and the kernel's lane/row loop) on the CPU.
_HOST_SRC = Path(__file__).with_name("int4_gemv_host.cpp")
requires_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (the host build)")


@pytest.fixture(scope="module")
def gemv_host(tmp_path_factory):
    exe = tmp_path_factory.mktemp("gemv_host") / "int4_gemv_host"
    root = _HOST_SRC.parent.parent
    run = subprocess.run(["g++", "-O2", "-std=c++17", f"-I{root / 'csrc'}", str(_HOST_SRC), "-o", str(exe)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return exe


@requires_gxx
def test_gemv_dequant_every_code(gemv_host):
    """decode_q4_word / decode_q8_word on every byte value at every byte position of a word:
    4-bit gives 1 + q/16 (q = the nibble of each column, zeros elsewhere), 8-bit gives int8 q."""
    out = subprocess.run([str(gemv_host), "codes"], capture_output=True, text=True, check=True).stdout
    rows = torch.tensor([[float(v) for v in ln.split()] for ln in out.splitlines()], dtype=torch.float64)
    assert rows.shape == (4 * 256, 2 + 8 + 4)
    pos, byte = rows[:, 0].long(), rows[:, 1].long()
    want4 = torch.ones(len(rows), 8, dtype=torch.float64)
    want4[torch.arange(len(rows)), 2 * pos] += (byte & 15) / 16        # low nibble: column 2 pos
    want4[torch.arange(len(rows)), 2 * pos + 1] += (byte >> 4) / 16    # high nibble: 2 pos + 1
    want8 = torch.zeros(len(rows), 4, dtype=torch.float64)
    want8[torch.arange(len(rows)), pos] = torch.where(byte > 127, byte - 256, byte).double()
    assert torch.equal(rows[:, 2:10], want4)      # exact: every code, both nibbles, every byte
    assert torch.equal(rows[:, 10:], want8)


@requires_gxx
@pytest.mark.parametrize("bits,G,groups", [(4, 32, 37), (4, 64, 9), (4, 128, 5), (8, 32, 37)])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("KS", [1, 4])
def test_gemv_host_matches_reference(gemv_host, tmp_path, bits, G, groups, M, KS):
    """The kernel's whole loop (lanes, 4 rows per warp, Sx trick, butterfly; KS warps splitting a row
    group's K, their partials summed in order) in fp32 against the fp64 product: fp32 level (SPEC §6:
    <= 1e-4), odd N (a partial last warp) and odd K / G; scales, mins and x random with a common
    offset (Sx and the min term do not cancel out)."""
    torch.manual_seed(M * 100 + G + bits)
    N, K = 37, G * groups
    w = torch.randn(N, K) * 0.05 + 0.02 * torch.randn(N, 1)
    qw = quantize(w, bits=bits, group_size=G)
    x = torch.randn(M, K) + 0.3
    x.numpy().tofile(tmp_path / "x.f32")
    qw.qweight.numpy().tofile(tmp_path / "q.u8")
    qw.scale.float().numpy().tofile(tmp_path / "s.f32")
    (qw.min if qw.min is not None else qw.scale).float().numpy().tofile(tmp_path / "mn.f32")
    subprocess.run([str(gemv_host), "gemv", str(tmp_path), str(M), str(N), str(K), str(G), str(bits), str(KS)],
                   check=True, timeout=120)
    y = torch.from_numpy(np.fromfile(tmp_path / "y.f32", dtype=np.float32)).view(M, N)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    assert rel_err(y, ref) <= 1e-5, rel_err(y, ref)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max() * K ** 0.5


# ---- the tensor-core kernel (M >= 2 on a GPU), through the interpreter --------------------------
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton (interpreter)")
@pytest.mark.parametrize("bits,G,groups", [(4, 32, 3), (4, 32, 37), (4, 64, 9), (4, 128, 5), (8, 32, 3),
                                           (8, 32, 37)])
@pytest.mark.parametrize("M", [2, 3, 17, 33, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tc_kernel(force_backend, monkeypatch, bits, G, groups, M, dtype):
    """`_int4_matmul_tc_kernel` against the fp64 product: odd N (a partial second tile) and K an
    odd multiple of the group (padded steps; K <= one step stores directly into a NaN-poisoned y,
    longer K takes the split-K atomic path); 4/8-bit, G 32/64/128, M across the 16/32/64 tiles."""
    import mops_kernels.ops.int4_matmul as IM
    force_backend("triton")
    made = []
    def poisoned(M_, N_, atomic, x2):
        y = IM.__dict__["_tc_output_orig"](M_, N_, atomic, x2)
        made.append(atomic)
        return y if atomic else y.fill_(float("nan"))
    monkeypatch.setitem(IM.__dict__, "_tc_output_orig", IM._tc_output)
    monkeypatch.setattr(IM, "_tc_output", poisoned)
    torch.manual_seed(bits * 1000 + G * 10 + M)
    K, N = G * groups, 150
    qw = _case(bits, G, K, N)
    x = torch.randn(M, K).to(dtype)
    with torch.no_grad():
        out = int4_matmul(x, qw)
    assert made == [K > (128 if bits == 4 else 64)], made     # the path the case meant to take
    _check_close(out, x, qw, dtype)


def test_tc_pack_is_cached_and_follows_in_place_changes():
    """qw.packed_for builds the tensor-core layout once, and again after an in-place change."""
    import mops_kernels.ops.int4_matmul as IM
    qw = _case(4, 32, 96, 5)
    first = qw.packed_for("tc", IM._tc_pack)
    assert qw.packed_for("tc", IM._tc_pack) is first
    qw.scale.mul_(2)
    again = qw.packed_for("tc", IM._tc_pack)
    assert again is not first and torch.equal(again[1][: 96 // 32], qw.scale.t())


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the compiled extension")
def test_cpu_fast_path_same_bits_and_the_ops_own_errors(monkeypatch):
    """Once the dispatcher has picked the CPU kernel under an environment, a 2-D CPU call without
    bias or autograd goes straight to the kernel: the same bits as the checked path; input the kernel
    refuses still gets the op's own error (or its backend: float64 runs on torch); autograd, bias,
    another MOPS_BACKEND take the checked path."""
    from mops_kernels.ops import int4_matmul as mod
    monkeypatch.delenv("MOPS_BACKEND", raising=False)
    mod._CPU_FAST.clear()
    qw = _case(4, 32, 576, 195)
    x = torch.randn(1, 576)
    first = int4_matmul(x, qw)                       # checked path: dispatches, enables the fast one
    _check_close(first, x, qw, torch.float32)
    env = _backend._dispatch_env()
    real = mod._CPU_FAST[env]
    calls = []
    monkeypatch.setitem(mod._CPU_FAST, env, lambda *a: (calls.append(1), real(*a))[1])
    assert torch.equal(int4_matmul(x, qw), first) and len(calls) == 1
    x3 = torch.randn(3, 576)                         # another M, same kernel
    assert torch.equal(int4_matmul(x3, qw), real(x3, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits))
    with pytest.raises(ValueError, match=r"K=576"):
        int4_matmul(torch.randn(1, 575), qw)
    with pytest.raises(ValueError, match="float tensor"):
        int4_matmul(torch.ones(1, 576, dtype=torch.int64), qw)
    y64 = int4_matmul(x.double(), qw)                # the kernel refuses float64: the torch backend runs it
    assert y64.dtype == torch.float64 and rel_err(y64, first.double()) < 1e-5
    n = len(calls)
    xg = x.clone().requires_grad_()
    int4_matmul(xg, qw).sum().backward()             # autograd: the checked path, with a gradient
    assert xg.grad is not None and xg.grad.shape == x.shape and len(calls) == n
    bias = torch.randn(195)
    assert torch.allclose(int4_matmul(x, qw, bias), first + bias) and len(calls) == n
    monkeypatch.setenv("MOPS_BACKEND", "torch")      # another environment: not this entry
    assert rel_err(int4_matmul(x, qw), first) < 1e-5 and len(calls) == n

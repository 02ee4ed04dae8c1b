"""The C++ CPU int4 kernels' two layouts (csrc/int4_matmul_cpu_kernel.h): 128-column AVX-512 chunks
(the avx512 copy, on a CPU with AVX-512 F/BW/VL, when G divides 128) and the 8-lane AVX2 chunks, each
against the fp64 product, on the K that split into every mix of 128-, 64- and 32-column pieces, and
equal to each other within fp32 rounding. MOPS_INT4_CPU_AVX512=0 keeps the 8-lane layout (read per
call). Also the fused-input entry point of the decode step (int4_matmul_cpu_pre)."""
import pytest
import torch
from conftest import available_backends
from utils import rel_err

from mops_kernels import _backend
from mops_kernels.ops.quant_format import quantize

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs the compiled extension")


def _kernel(x, qw):
    return _backend.extension().int4_matmul_cpu(x, qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits)


# K: 576 = 4 x 128 + 64, 608 = 4 x 128 + 64 + 32, 640 = 5 x 128, 1536 = 12 x 128, 96 = 64 + 32, 64
@pytest.mark.parametrize("G,K", [(32, 576), (32, 608), (64, 576), (64, 1536), (128, 640), (32, 96), (32, 64)])
@pytest.mark.parametrize("N", [1, 7, 195])        # 4-row steps and the rows left over
@pytest.mark.parametrize("M", [1, 3, 8, 16])      # the M = 1 kernel, then the tiled GEMV
def test_both_layouts_match_fp64(monkeypatch, G, K, N, M):
    monkeypatch.setenv("MOPS_INT4_CPU_GEMM_MIN_M", "1000000")  # the GEMV kernels, not the GEMM
    monkeypatch.setenv("MOPS_INT4_CPU_PANEL_MIN_M", "1000000")  # nor the panels
    w = torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1)
    qw = quantize(w, bits=4, group_size=G)
    x = torch.randn(M, K)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    outs = {}
    for wide in ("0", "1"):
        monkeypatch.setenv("MOPS_INT4_CPU_AVX512", wide)
        outs[wide] = _kernel(x, qw)
        assert outs[wide].shape == (M, N) and not torch.isnan(outs[wide]).any()
        assert rel_err(outs[wide], ref) <= 1e-5, (wide, rel_err(outs[wide], ref))
    # the same dot products summed in another order: fp32 rounding apart, never more
    torch.testing.assert_close(outs["0"], outs["1"], rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bits,G,K,N", [(4, 32, 576, 195), (4, 64, 1536, 37), (8, 32, 576, 33)])
@pytest.mark.parametrize("M", [17, 33, 64])
def test_gemv_passes_and_dequantized_tiles_agree(monkeypatch, bits, G, K, N, M):
    """4-bit 17 <= M <= 64 runs the GEMV kernels in passes over each chunk of weight rows (at most
    8 passes: K = 1536 stops at 32);
    MOPS_INT4_CPU_GEMV_MAX_M=16 sends the same call to the dequantized tiles + BLAS (what larger M,
    and 8-bit M > 16, run). Both equal the fp64 product, and each other within fp32 rounding. (On an
    AVX-512 CPU these M run the GEMM kernels: moved out of the way here, tested below.)"""
    monkeypatch.setenv("MOPS_INT4_CPU_GEMM_MIN_M", "1000000")
    qw = quantize(torch.randn(N, K) * 0.05, bits=bits, group_size=G)
    x = torch.randn(M, K)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    outs = {}
    for bound in ("64", "16"):
        monkeypatch.setenv("MOPS_INT4_CPU_GEMV_MAX_M", bound)
        outs[bound] = _kernel(x, qw)
        assert outs[bound].shape == (M, N) and not torch.isnan(outs[bound]).any()
        assert rel_err(outs[bound], ref) <= 1e-5, (bound, rel_err(outs[bound], ref))
    torch.testing.assert_close(outs["64"], outs["16"], rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= set(_cpu_flags()),
                    reason="the CPU has no AVX-512 F/BW/VL")
def test_an_avx512_cpu_takes_the_wide_layout(monkeypatch):
    """On an AVX-512 CPU (with the avx2 copy active) the 128-column kernels run: their sums are
    ordered differently, so the bits differ from the 8-lane layout's."""
    if _backend.extension().cpu_isa() != "avx2":
        pytest.skip("the avx2 kernels are not the active ones")
    qw = quantize(torch.randn(64, 1536), bits=4, group_size=32)
    x = torch.randn(1, 1536)
    monkeypatch.setenv("MOPS_INT4_CPU_AVX512", "0")
    narrow = _kernel(x, qw)
    monkeypatch.setenv("MOPS_INT4_CPU_AVX512", "1")
    assert not torch.equal(_kernel(x, qw), narrow)


def test_the_fast_binding_equals_the_pybind11_one_and_refuses_with_runtime_error():
    """int4_matmul_cpu_fast (plain CPython, the op's CPU fast path) returns what int4_matmul_cpu
    returns, 4- and 8-bit (min None), and answers anything else with RuntimeError (the op's fast path
    then takes its checked path, whose errors name the op)."""
    ext = _backend.extension()
    for bits in (4, 8):
        qw = quantize(torch.randn(37, 576) * 0.05, bits=bits, group_size=32)
        for m in (1, 3):
            x = torch.randn(m, 576)
            assert torch.equal(ext.int4_matmul_cpu_fast(x, qw.qweight, qw.scale, qw.min, 32, bits), _kernel(x, qw))
    qw = quantize(torch.randn(37, 576) * 0.05, bits=4, group_size=32)
    x = torch.randn(1, 576)
    for bad in [(x,), (x.numpy(), qw.qweight, qw.scale, qw.min, 32, 4), (x, qw.qweight, qw.scale, 0, 32, 4),
                (x, qw.qweight, qw.scale, qw.min, 32.0, 4), (x, qw.qweight, qw.scale, qw.min, 2 ** 70, 4),
                (x, qw.qweight, qw.scale, None, 32, 4), (torch.randn(1, 575), qw.qweight, qw.scale, qw.min, 32, 4)]:
        with pytest.raises(RuntimeError):
            ext.int4_matmul_cpu_fast(*bad)
    from mops_kernels.ops.int4_matmul import int4_matmul
    with pytest.raises(ValueError):   # through the op: its own checked error
        int4_matmul(torch.randn(1, 575), qw)


_VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


def _vnni_active():
    return _VNNI <= set(_cpu_flags()) and _backend.extension().cpu_isa() == "avx2"


def _fp32_and_vnni(monkeypatch, x, qw):
    monkeypatch.setenv("MOPS_INT4_CPU_VNNI", "0")
    fp32 = _kernel(x, qw)
    monkeypatch.setenv("MOPS_INT4_CPU_VNNI", "1")
    return fp32, _kernel(x, qw)


# K: 576 = 4 x 128 + 64, 608 = 4 x 128 + 64 + 32 (the fp32 tail), 640 = 5 x 128, 1536 (48 groups:
# three 16-group steps of min terms), 128, 4160 = 32 x 128 + 64 (130 groups), 11008 (Llama-7B's MLP,
# 86 groups of 128); N: 8-, 4- and 1-row steps and what they leave
@pytest.mark.skipif(not _VNNI <= set(_cpu_flags()), reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("G,K", [(32, 576), (32, 608), (64, 576), (64, 1536), (128, 640), (32, 128), (128, 128),
                                 (32, 4160), (128, 11008)])
@pytest.mark.parametrize("N", [1, 5, 13, 195])
@pytest.mark.parametrize("outlier", [False, True])
def test_vnni_kernel_matches_fp64_and_the_fp32_kernel(monkeypatch, G, K, N, outlier):
    """One token on an AVX-512 VNNI CPU: integer dot products of the codes with x as 23-bit fixed
    point per 8 columns (int4_matmul_cpu_kernel.h), with a group of zeros. Against the fp64 product,
    per value and relative to the size of its terms (the sum's condition): within twice the fp32
    kernel's error; beside an outlier 200x its neighbours (which then keep 2^-22 of it), within
    1e-5 (the fp32 kernel: ~1.4e-6; SPEC's bound: 1e-4 relative)."""
    if not _vnni_active():
        pytest.skip("the avx2 kernels are not the active ones")
    qw = quantize(torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1), bits=4, group_size=G)
    x = torch.randn(1, K)
    if outlier:
        x[0, 3] = 200.0
    x[0, G:2 * G] = 0.0      # a group of zeros
    ref = x.double() @ qw.dequantize(torch.float64).t()
    fp32, vnni = _fp32_and_vnni(monkeypatch, x, qw)
    assert vnni.shape == (1, N) and vnni.dtype == torch.float32
    assert rel_err(vnni, ref) <= 1e-5, rel_err(vnni, ref)
    scale = x.double().abs() @ qw.dequantize(torch.float64).abs().t()
    pv, p32 = (((y.double() - ref).abs() / scale).max().item() for y in (vnni, fp32))
    assert pv <= (1e-5 if outlier else 2 * p32 + 1e-7), (pv, p32)


@pytest.mark.skipif(not _VNNI <= set(_cpu_flags()), reason="the CPU has no AVX-512 VNNI")
def test_vnni_kernel_is_the_default_and_its_bits_do_not_depend_on_rows_or_threads(monkeypatch):
    """The default on such a CPU (its bits differ from the fp32 kernel's); a row's value is the same
    bits whether it ran in an 8-, 4- or 1-row step, on one thread or two (our helpers or not)."""
    if not _vnni_active():
        pytest.skip("the avx2 kernels are not the active ones")
    qw = quantize(torch.randn(203, 576) * 0.05, bits=4, group_size=32)
    x = torch.randn(1, 576)
    monkeypatch.delenv("MOPS_INT4_CPU_VNNI", raising=False)
    default = _kernel(x, qw)
    monkeypatch.setenv("MOPS_INT4_CPU_VNNI", "0")
    assert not torch.equal(default, _kernel(x, qw))
    monkeypatch.delenv("MOPS_INT4_CPU_VNNI")
    rows = torch.cat([_kernel(x, quantize_rows(qw, i, i + 1)) for i in range(203)], dim=1)
    assert torch.equal(rows, default)
    threads = torch.get_num_threads()
    try:
        for t, helpers in ((1, "0"), (2, "1"), (2, "0")):
            torch.set_num_threads(t)
            monkeypatch.setenv("MOPS_INT4_CPU_HELPERS", helpers)
            assert torch.equal(_kernel(x, qw), default), (t, helpers)
    finally:
        torch.set_num_threads(threads)


def quantize_rows(qw, a, b):
    """Rows a..b-1 of a 4-bit QuantizedWeight (the same codes, scales and mins)."""
    from mops_kernels.ops.quant_format import QuantizedWeight
    return QuantizedWeight(qw.qweight[a:b].contiguous(), qw.scale[a:b].contiguous(), qw.min[a:b].contiguous(),
                           (b - a, qw.shape[1]), qw.group_size, qw.bits)


@pytest.mark.skipif(not _VNNI <= set(_cpu_flags()), reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("case", ["nan", "inf", "tiny", "subnormal", "bf16", "strided"])
def test_vnni_kernel_hands_back_what_its_fixed_point_cannot_carry(monkeypatch, case):
    """x with a NaN or an infinity, or 8 columns below 2^-64 that are not zero (their scale would be
    an fp32 subnormal): the fp32 kernel runs instead, so the result is its bits (NaN where it has
    NaN). bf16 and strided x are converted to contiguous fp32 first and take the integer kernel."""
    if not _vnni_active():
        pytest.skip("the avx2 kernels are not the active ones")
    qw = quantize(torch.randn(37, 576) * 0.05, bits=4, group_size=32)
    x = torch.randn(1, 576)
    if case == "nan":
        x[0, 100] = float("nan")
    elif case == "inf":
        x[0, 7] = float("-inf")
    elif case == "tiny":
        x[0, 64:96] = 1e-25
    elif case == "subnormal":
        x[0, 0:32] = 1e-40
    elif case == "bf16":
        x = x.bfloat16()
    else:
        x = torch.randn(576, 2)[:, :1].t()
        assert not x.is_contiguous()
    fp32, vnni = _fp32_and_vnni(monkeypatch, x, qw)
    if case in ("nan", "inf", "tiny", "subnormal"):
        assert torch.equal(vnni.isnan(), fp32.isnan()) and torch.equal(vnni.nan_to_num(), fp32.nan_to_num())
        if case == "nan":
            assert vnni.isnan().all()
    else:
        assert vnni.dtype == x.dtype
        ref = x.double() @ qw.dequantize(torch.float64).t()
        assert not torch.equal(vnni, fp32) or case == "bf16"
        assert rel_err(vnni, ref) <= (1e-2 if case == "bf16" else 1e-6)


def _on_and_off_match_fp64(monkeypatch, var, on, bits, G, K, N, M):
    """A path switched on (var=on) and off (var=1000000): each equals the fp64 product, and they equal
    each other within fp32 rounding."""
    qw = quantize(torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1), bits=bits, group_size=G)
    x = torch.randn(M, K)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    outs = {}
    for bound in (on, "1000000"):
        monkeypatch.setenv(var, bound)
        outs[bound] = y = _kernel(x, qw)
        assert y.shape == (M, N) and not torch.isnan(y).any()
        assert rel_err(y, ref) <= 1e-5, (var, bound, rel_err(y, ref))
    torch.testing.assert_close(outs[on], outs["1000000"], rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= set(_cpu_flags()),
                    reason="the CPU has no AVX-512 F/BW/VL: no GEMM kernels")
@pytest.mark.parametrize("bits,G,K,N", [(4, 32, 576, 195), (4, 64, 1536, 37), (4, 128, 640, 7),
                                        (4, 32, 96, 12), (8, 32, 576, 33), (8, 32, 64, 1)])
@pytest.mark.parametrize("M", [1, 5, 12, 16, 17, 33, 37, 64, 100])
def test_gemm_matches_fp64_and_the_other_paths(monkeypatch, bits, G, K, N, M):
    """The AVX-512 GEMM kernels (panels of 12 dequantized weight rows against blocks of 32 or 16
    transposed rows of x): N that leaves a part panel (7, 37, 195), M that leaves part blocks of x
    (5, 17, 37, 100) or exactly fills them, every group size, 8-bit. MOPS_INT4_CPU_GEMM_MIN_M=1 sends
    every M there; they equal the fp64 product, and the GEMV / tile paths within fp32 rounding."""
    if _backend.extension().cpu_isa() != "avx2":
        pytest.skip("the avx2 kernels are not the active ones")
    _on_and_off_match_fp64(monkeypatch, "MOPS_INT4_CPU_GEMM_MIN_M", "1", bits, G, K, N, M)


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= set(_cpu_flags()),
                    reason="the CPU has no AVX-512 F/BW/VL: no GEMM kernels")
def test_gemm_error_does_not_grow_with_k(monkeypatch):
    """All-positive x and W (every partial sum grows): one fp32 chain over K = 16384 would be off by
    ~8e-6 relative; the GEMM sums blocks of 256 columns and adds the blocks, so it stays near the
    other paths' error."""
    if _backend.extension().cpu_isa() != "avx2":
        pytest.skip("the avx2 kernels are not the active ones")
    K = 16384
    qw = quantize(torch.rand(13, K) + 0.5, bits=4, group_size=32)
    x = torch.rand(17, K) + 1.0
    ref = x.double() @ qw.dequantize(torch.float64).t()
    monkeypatch.setenv("MOPS_INT4_CPU_GEMM_MIN_M", "1")
    y = _kernel(x, qw)
    assert ((y.double() - ref).abs() / ref.abs()).max().item() < 2e-6


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= set(_cpu_flags()),
                    reason="the CPU has no AVX-512 F/BW/VL: no GEMM kernels")
def test_an_avx512_cpu_runs_many_rows_on_the_gemm(monkeypatch):
    """By default 12 rows and more take the GEMM kernels (its sums are ordered differently, so its
    bits differ from the GEMV passes'), 11 rows the GEMV; bf16 x takes it too."""
    if _backend.extension().cpu_isa() != "avx2":
        pytest.skip("the avx2 kernels are not the active ones")
    qw = quantize(torch.randn(64, 1536), bits=4, group_size=32)
    for m, gemm in ((12, True), (40, True), (11, False)):
        x = torch.randn(m, 1536)
        monkeypatch.delenv("MOPS_INT4_CPU_GEMM_MIN_M", raising=False)
        default = _kernel(x, qw)
        monkeypatch.setenv("MOPS_INT4_CPU_GEMM_MIN_M", "1000000")
        assert torch.equal(default, _kernel(x, qw)) != gemm, m
        monkeypatch.setenv("MOPS_INT4_CPU_GEMM_MIN_M", "1")
        assert torch.equal(default, _kernel(x, qw)) == gemm, m
    monkeypatch.delenv("MOPS_INT4_CPU_GEMM_MIN_M")
    xb = torch.randn(20, 1536).bfloat16()
    yb = _kernel(xb, qw)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, _kernel(xb.float(), qw).bfloat16())



@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= set(_cpu_flags()),
                    reason="the CPU has no AVX-512 F/BW/VL: no panel kernels")
@pytest.mark.parametrize("bits,G,K,N", [(4, 32, 576, 195), (4, 64, 576, 7), (4, 128, 640, 13),
                                        (4, 32, 96, 12), (4, 32, 64, 1), (8, 32, 576, 33)])
@pytest.mark.parametrize("M", [2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
@pytest.mark.parametrize("helpers", ["0", "1"])
def test_panels_match_fp64_and_the_gemv(monkeypatch, bits, G, K, N, M, helpers):
    """2 <= M <= 11 on an AVX-512 CPU: 12 dequantized weight rows at a time against every row of x
    (each M has its own register blocking), N leaving a part panel (7, 13, 195, 33, 1), every group
    size, 8-bit from 4 rows; on one thread and with a helper. Equal to the fp64 product, and to the
    GEMV passes (MOPS_INT4_CPU_PANEL_MIN_M=1000000) within fp32 rounding."""
    if _backend.extension().cpu_isa() != "avx2":
        pytest.skip("the avx2 kernels are not the active ones")
    monkeypatch.setenv("MOPS_INT4_CPU_HELPERS", helpers)
    _on_and_off_match_fp64(monkeypatch, "MOPS_INT4_CPU_PANEL_MIN_M", "2", bits, G, K, N, M)


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= set(_cpu_flags()),
                    reason="the CPU has no AVX-512 F/BW/VL: no panel kernels")
def test_an_avx512_cpu_runs_few_rows_on_panels_where_they_fit(monkeypatch):
    """By default 2-11 rows take the panels when 12 fp32 weight rows fit in 32 KiB (K <= 682) and,
    for 8-bit weights, from 4 rows; K = 1536 and 8-bit 2-3 rows stay on the GEMV (bits tell which
    path ran: the two sum in different orders)."""
    if _backend.extension().cpu_isa() != "avx2":
        pytest.skip("the avx2 kernels are not the active ones")
    monkeypatch.delenv("MOPS_INT4_CPU_GEMM_MIN_M", raising=False)
    for bits, K, m, panel in ((4, 576, 2, True), (4, 576, 8, True), (4, 576, 11, True), (4, 1536, 8, False),
                              (8, 576, 3, False), (8, 576, 4, True), (4, 576, 1, False)):
        qw = quantize(torch.randn(96, K), bits=bits, group_size=32)
        x = torch.randn(m, K)
        monkeypatch.delenv("MOPS_INT4_CPU_PANEL_MIN_M", raising=False)
        default = _kernel(x, qw)
        monkeypatch.setenv("MOPS_INT4_CPU_PANEL_MIN_M", "1000000")
        assert torch.equal(default, _kernel(x, qw)) != panel, (bits, K, m)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("bits,G,K,N", [(4, 32, 576, 195), (4, 64, 1536, 7), (8, 32, 576, 33)])
@pytest.mark.parametrize("M", [1, 3, 17, 65])      # 17: GEMV passes, 65: the dequantized-tiles path
def test_pre_rmsnorm_and_silu_mul_equal_the_separate_ops(bits, G, K, N, M):
    """int4_matmul_cpu_pre (the decode step's norm / SiLU * up inside the matmul call) gives what the
    aten ops followed by the kernel give, within fp32 rounding."""
    ext = _backend.extension()
    qw = quantize(torch.randn(N, K) * 0.05, bits=bits, group_size=G)
    args = (qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits)
    x, w = torch.randn(M, K) * 3, torch.rand(K) + 0.5
    want = ext.int4_matmul_cpu(_rms(x, w, 1e-5), *args)
    torch.testing.assert_close(ext.int4_matmul_cpu_pre(x, *args, 1, w, 1e-5), want, rtol=1e-5, atol=1e-5)
    gu = torch.randn(M, 2 * K) * 4
    want = ext.int4_matmul_cpu(torch.nn.functional.silu(gu[:, :K]) * gu[:, K:], *args)
    torch.testing.assert_close(ext.int4_matmul_cpu_pre(gu, *args, 2, None, 0.0), want, rtol=1e-5, atol=1e-5)
    # pre = 0 and the residual sum: the kernel's own result plus the residual, bit for bit (one
    # rounding, as the aten add); reading another weight ahead changes nothing
    res = torch.randn(M, N)
    other = quantize(torch.randn(64, 96) * 0.05, bits=4, group_size=32)
    got = ext.int4_matmul_cpu_pre(x, *args, 0, None, 0.0, res, other.qweight, other.scale, other.min)
    assert torch.equal(got, res + ext.int4_matmul_cpu(x, *args))
    got = ext.int4_matmul_cpu_pre(gu, *args, 2, None, 0.0, res)
    assert torch.equal(got, res + ext.int4_matmul_cpu_pre(gu, *args, 2, None, 0.0))


def test_pre_checks_its_arguments():
    ext = _backend.extension()
    qw = quantize(torch.randn(8, 64), bits=4, group_size=32)
    args = (qw.qweight, qw.scale, qw.min, 32, 4)
    x, w = torch.randn(2, 64), torch.ones(64)
    with pytest.raises(RuntimeError, match=r"pre must be 0 \(none\), 1 \(RMSNorm\) or 2"):
        ext.int4_matmul_cpu_pre(x, *args, 3, w, 1e-5)
    with pytest.raises(RuntimeError, match=r"residual must be a contiguous float32 CPU tensor \(2, 8\)"):
        ext.int4_matmul_cpu_pre(x, *args, 0, None, 0.0, torch.zeros(2, 7))
    with pytest.raises(RuntimeError, match=r"x must have shape \(M, 128\)"):
        ext.int4_matmul_cpu_pre(x, *args, 2, None, 0.0)
    with pytest.raises(RuntimeError, match="norm_weight must be"):
        ext.int4_matmul_cpu_pre(x, *args, 1, None, 1e-5)
    with pytest.raises(RuntimeError, match="norm_weight must be"):
        ext.int4_matmul_cpu_pre(x, *args, 1, torch.ones(63), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        ext.int4_matmul_cpu_pre(x.double(), *args, 1, w, 1e-5)


def test_engine_decode_step_folds_norms_and_silu_into_the_kernel_calls():
    """On the CPU kernel the lean step binds the fused-input calls (and the Engine's tokens still equal
    generate(): tests/test_serving.py)."""
    from _hf_doubles import tiny_model
    from mops_kernels.modules.int4_linear import replace_linears
    from mops_kernels.serving import Engine
    model = tiny_model(layers=2)
    replace_linears(model.model)
    eng = Engine(model, None, max_batch=2, max_len=16)
    for ly in eng.decoder.lean:
        assert ly.qkv.pre is not None and ly.down.pre is not None and ly.act is None
    # each call reads ahead the weight multiplied next: q/k/v -> o -> gate/up -> down -> next layer's
    # q/k/v ... (the head here is a plain Linear: the last down projection wraps to the first q/k/v)
    dec = eng.decoder
    assert dec.head.qw is None
    chain = [p for ly in dec.lean for p in (ly.qkv, ly.o, ly.gate_up, ly.down)]
    for p, nxt in zip(chain, chain[1:] + chain[:1]):
        assert p.next_weight[0] is nxt.qw.qweight and p.next_weight[2] is nxt.qw.min


def test_engine_decode_attention_block_is_one_call_equal_to_the_python_block():
    """On the CPU (fp32, C++ attention kernel) each layer's rotary + KV-cache write + attention is one
    compiled call (decode_attention_cpu); with a Mixture of Prompts attached, mixed prompt lengths and a
    freed slot, its tokens, KV caches and logits equal the Python block's bit for bit."""
    from _hf_doubles import tiny_model
    import mops_kernels
    from mops_kernels.modules.int4_linear import replace_linears
    from mops_kernels.serving import Engine
    if not _backend.ext_has("decode_attention_cpu"):
        pytest.skip("needs the compiled extension")
    model = tiny_model(layers=3)
    replace_linears(model.model)
    torch.manual_seed(0)
    mops = mops_kernels.MixtureOfPrompts.for_model(model, num_experts=4, prompt_len=3, top_k=2, gate_layer=0,
                                                   inject_from=1)
    runs = []
    for fused in (True, False):
        eng = Engine(model, mops, max_batch=3, max_len=40, eos_token_id=[])
        assert all(ly.fused_attn is not None for ly in eng.decoder.lean)
        if not fused:
            for ly in eng.decoder.lean:
                ly.fused_attn = None
        g = torch.Generator().manual_seed(3)
        reqs = [eng.submit(torch.randint(1, 97, (t,), generator=g), max_new_tokens=m)
                for t, m in ((5, 9), (11, 3), (2, 12))]
        while not all(r.done for r in reqs):
            eng.step()
        late = eng.submit(torch.randint(1, 97, (7,), generator=g), max_new_tokens=6)   # into the freed slot
        while not late.done:
            eng.step()
        with torch.no_grad():
            logits = eng.decoder(3, 30)
        runs.append(([r.tokens for r in reqs + [late]], [k.clone() for k in eng.cache.K + eng.cache.V], logits))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert torch.equal(runs[0][2], runs[1][2])


def test_decode_attention_cpu_checks_its_arguments():
    ext = _backend.extension()
    if not _backend.ext_has("decode_attention_cpu"):
        pytest.skip("needs the compiled extension")
    B, Hkv, L, D, Hq = 2, 2, 8, 16, 6
    K, V = torch.zeros(B, Hkv, L, D), torch.zeros(B, Hkv, L, D)
    y = torch.randn(2, (Hq + 2 * Hkv) * D)
    cs = torch.ones(2, D)
    mask = torch.ones(B, L, dtype=torch.long)
    ok = dict(y=y, cos=cs, sin_s=cs, K=K, V=V, pos=torch.tensor([0, 3]))

    pool = torch.randn(4, 3, Hkv, D)

    def call(**kw):
        a = {**ok, **kw}
        return ext.decode_attention_cpu(a["y"], a["cos"], a["sin_s"], a["K"], a["V"], a["pos"], a.get("pk"),
                                        a.get("pv"), a.get("idx"), a.get("w"), a.get("lens"), mask, kw.get("S", 4),
                                        Hq, 0.25)
    assert call().shape == (2, Hq * D)
    assert call(pk=pool, pv=pool, idx=torch.tensor([[0, -1], [3, 2]], dtype=torch.int32)).shape == (2, Hq * D)
    with pytest.raises(RuntimeError, match=r"prefix_index values must lie in \[-1, E\)"):
        call(pk=pool, pv=pool, idx=torch.tensor([[0, 4], [1, 2]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"prefix_lens values must lie in \[0, P\]"):
        call(pk=pool, pv=pool, idx=torch.tensor([[0, 1], [1, 2]], dtype=torch.int32),
             lens=torch.tensor([3, 4, 0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"prefix_k/prefix_v must have shape \(E, P, Hkv, D\)"):
        call(pk=pool[:, :, :1], pv=pool[:, :, :1], idx=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="prefix_k/prefix_v must have q's dtype"):
        call(pk=pool.double(), pv=pool.double(), idx=torch.zeros(2, 1, dtype=torch.int32))
    # a refused call writes nothing into the caches
    K0, V0 = K.clone(), V.clone()
    with pytest.raises(RuntimeError, match="prefix_index values"):
        call(pk=pool, pv=pool, idx=torch.full((2, 1), 7, dtype=torch.int32), pos=torch.tensor([1, 2]))
    assert torch.equal(K, K0) and torch.equal(V, V0)
    with pytest.raises(RuntimeError, match=r"pos\[1\] = 4 must lie in \[0, S = 4\)"):
        call(pos=torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="S must lie in"):
        call(S=9)
    with pytest.raises(RuntimeError, match="y must be a contiguous float32"):
        call(y=y[:, :-1])
    with pytest.raises(RuntimeError, match="K and V must be contiguous float32"):
        call(K=K.double())
    with pytest.raises(RuntimeError, match="pos must be a contiguous int64"):
        call(pos=torch.tensor([0, 3], dtype=torch.int32))

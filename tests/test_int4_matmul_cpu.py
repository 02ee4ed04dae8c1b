"""The C++ CPU int4 kernels' two layouts (csrc/int4_matmul_cpu_kernel.h): 128-column AVX-512 chunks
(where the build has AVX-512 and G divides 128) and the 8-lane AVX2 chunks, each against the fp64
product, on the K that split into every mix of 128-, 64- and 32-column pieces, and equal to each other
within fp32 rounding. MOPS_INT4_CPU_AVX512=0 keeps the 8-lane layout (read per call)."""
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


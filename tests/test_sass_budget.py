"""SASS instruction budgets of the int4 kernels' main loops: the speed proxy without a GPU.

A memory-bound kernel reaches the HBM roofline only if its SM can issue the loop's instructions as
fast as the bytes arrive. H100 (3.35 TB/s, 132 SMs, 4 schedulers issuing 1 warp-instruction/clk at
~1.8 GHz): an SM receives 14.1 B/clk, so per 16 bytes of weights read by one lane it can issue
145 instructions of that lane (one warp-instruction covers 32 lanes x 16 B = 512 B every 36.3 clk,
x 4 schedulers). Each budget below is the kernel's count today plus ~5%, with the roofline analysis
in the kernel's docstring (csrc/int4_matmul_kernel.cuh, ops/int4_matmul.py). The counts come from
compiling for sm_90 (nvcc for CUDA, Triton's own compiler for Triton) and disassembling with
nvdisasm (tests/utils.py: sass_of, count_loop_instructions). Skipped only when nvcc or nvdisasm is
absent (a capability).
"""
import re
import subprocess
from pathlib import Path

import pytest
from utils import count_loop_instructions, nvcc_path, nvdisasm_path, sass_of

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "int4_matmul_kernel.cuh"
requires_sass = pytest.mark.skipif(nvcc_path() is None or nvdisasm_path() is None,
                                   reason="needs nvcc and nvdisasm (pip nvidia-cuda-nvdisasm)")

# (x dtype, bits, M): budget in SASS instructions per 16 B of weights per lane (the 145 ceiling and
# today's counts: the table in csrc/int4_matmul_kernel.cuh)
GEMV_BUDGETS = {("__nv_bfloat16", 4, 1): 135, ("__nv_bfloat16", 4, 4): 300,
                ("__nv_bfloat16", 8, 1): 75, ("__nv_bfloat16", 8, 4): 155}


def _header_const(name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+);", HEADER.read_text())
    assert m, f"{name} not found in {HEADER}"
    return int(m.group(1))


@pytest.fixture(scope="module")
def gemv_cubins(tmp_path_factory):
    """The GEMV instantiations of GEMV_BUDGETS compiled for sm_90 and sm_80: {arch: cubin path}."""
    d = tmp_path_factory.mktemp("gemv_sass")
    src = d / "gemv.cu"
    inst = "".join(
        f"template __global__ void mops::int4cuda::int4_gemv_kernel<{t}, {b}, {m}>(const {t}*, const uint8_t*, "
        f"const __half*, const __half*, {t}*, int, int, int, int64_t);\n" for t, b, m in GEMV_BUDGETS)
    src.write_text(f'#include "int4_matmul_kernel.cuh"\n{inst}')
    out = {}
    for arch in ("sm_90", "sm_80"):
        cubin = d / f"gemv_{arch}.cubin"
        run = subprocess.run([nvcc_path(), "-cubin", f"-arch={arch}", "-O3", "-std=c++17",
                              f"-I{HEADER.parent}", str(src), "-o", str(cubin)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        out[arch] = cubin
    return out


def _mangled(t: str, bits: int, m: int) -> str:
    tm = {"__nv_bfloat16": "13__nv_bfloat16", "__half": "6__half", "float": "f"}[t]
    return f"int4_gemv_kernelI{tm}Li{bits}ELi{m}E"


@requires_sass
@pytest.mark.parametrize("key", list(GEMV_BUDGETS), ids=lambda k: f"q{k[1]}-M{k[2]}")
def test_cuda_gemv_loop_budget(gemv_cubins, key):
    """One loop iteration reads kRowsPerWarp 16-byte vectors per lane: count / R <= budget."""
    sass = sass_of(gemv_cubins["sm_90"])
    per16 = count_loop_instructions(sass, _mangled(*key)) / _header_const("kRowsPerWarp")
    print(f"int4_gemv {key}: {per16:.1f} SASS instructions per 16 B (budget {GEMV_BUDGETS[key]})")
    assert per16 <= GEMV_BUDGETS[key], (key, per16)
    assert per16 >= 0.5 * GEMV_BUDGETS[key], ("the loop found is not the main loop", key, per16)


@requires_sass
def test_cuda_gemv_compiles_for_sm80(gemv_cubins):
    """The same kernels build for Ampere (sm_80): every instantiation is in the cubin."""
    sass = sass_of(gemv_cubins["sm_80"])
    for key in GEMV_BUDGETS:
        assert _mangled(*key) in sass, key


# ---- the Triton tensor-core kernel (M >= 2 on a GPU) --------------------------------------------
# (bits, G, M): budget per 16 B of weights per thread, with the block sizes `_tc_blocks` picks for
# that M. One loop iteration is one K step: BLOCK_N rows x 64 bytes (128 4-bit or 64 8-bit codes).
# M = 16 launches BLOCK_N = 64 x 4 warps since the H200 sweep (ops/int4_matmul._tc_blocks): more
# instructions per 16 B (230.5 for 4-bit G=128 against 173 with 128 x 2 warps) and yet 1.34x the
# bandwidth, so these counts guard against regressions of the chosen launch, not a roofline.
TC_BUDGETS = {(4, 128, 16): 242, (4, 32, 16): 256, (8, 32, 16): 157, (4, 128, 64): 222}


@pytest.fixture(scope="module")
def tc_counts(tmp_path_factory):
    """{(bits, G, M): SASS instructions per 16 B} of `_int4_matmul_tc_kernel` built for sm_90."""
    import torch
    import triton.language as tl
    from mops_kernels.ops import int4_matmul as IM
    from utils import HAS_NVIDIA_BACKEND, compile_specs_for_sm90, sm90_spec
    if not HAS_NVIDIA_BACKEND:
        pytest.skip("needs Triton's NVIDIA backend (ptxas)")
    d = tmp_path_factory.mktemp("tc_sass")
    sig = {"x_ptr": "*bf16", "qt_ptr": "*i32", "st_ptr": "*fp16", "mt_ptr": "*fp16", "y_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "steps_per_split": "i32",
           **{c: "constexpr" for c in ("G", "BITS", "DOT_DTYPE", "BLOCK_M", "BLOCK_N", "EVEN_K", "ATOMIC")}}
    div16 = {a: "D" for a in ("x_ptr", "qt_ptr", "st_ptr", "mt_ptr", "y_ptr", "N", "K", "stride_xm")}
    specs, per_iter = [], {}
    for bits, G, M in TC_BUDGETS:
        bm, bn, _, _, warps, stages = IM._tc_blocks(M, 4096, 4096, bits, torch.device("cpu"))
        spec = sm90_spec(IM._int4_matmul_tc_kernel, sig,
                         dict(G=G, BITS=bits, DOT_DTYPE=tl.bfloat16, BLOCK_M=bm, BLOCK_N=bn, EVEN_K=True,
                              ATOMIC=True), div16, {"num_warps": warps, "num_stages": stages})
        spec["cubin_path"] = str(d / f"tc_{bits}_{G}_{M}.cubin")
        specs.append(spec)
        per_iter[(bits, G, M)] = bn * 64 / (32 * warps) / 16      # 16-byte units per thread per step
    res = compile_specs_for_sm90(specs)
    assert all(r["ok"] for r in res), [r["error"] for r in res if not r["ok"]]
    return {k: count_loop_instructions(sass_of(s["cubin_path"]), "_int4_matmul_tc_kernel") / per_iter[k]
            for k, s in zip(TC_BUDGETS, specs)}


@requires_sass
@pytest.mark.parametrize("key", list(TC_BUDGETS), ids=lambda k: f"q{k[0]}-G{k[1]}-M{k[2]}")
def test_triton_tc_loop_budget(tc_counts, key):
    per16 = tc_counts[key]
    print(f"_int4_matmul_tc_kernel {key}: {per16:.1f} SASS instructions per 16 B (budget {TC_BUDGETS[key]})")
    assert per16 <= TC_BUDGETS[key], (key, per16)
    assert per16 >= 0.5 * TC_BUDGETS[key], ("the loop found is not the main loop", key, per16)

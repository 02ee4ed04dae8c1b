"""SASS instruction budgets of the attention kernels' main loops (sm_90): the speed proxy without a GPU.

Each kernel is compiled for sm_90, disassembled (tests/utils.py: nvdisasm), and the instructions of
its main loop are counted between the loop head and its back-edge branch (a static count of the
loop body, NOPs excluded); loops are told apart by what they load or multiply.

  CUDA decode (csrc/prefix_attention_kernel.cuh, decode_split_kernel<T, D, GT>): the sequence loop
      (the loop with the mask byte loads and 2*kUnroll 16-byte K/V loads), counted per 16 B of K/V
      one lane reads per iteration. Budget per heads-per-CTA GT, from the roofline in the kernel's
      docstring: at full HBM bandwidth an SM may issue 145 (H100) / 111 (H200) warp-instructions per
      lane-16 B. GT <= 4 must stay below the H200 bound with room for stalls; GT = 8 (16 fp32 FMAs
      per bf16 element pair and 8 shuffle trees per key) is issue-bound, and its budget only
      guards against regressions.
  Triton prefill (_prefix_attention_fwd_kernel): the interior sequence loop (the shortest loop
      with wgmma/mma: no masks), counted per warp, times the warps, per 1024 FLOP of the tile
      (4 * BLOCK_M * BLOCK_N * D per iteration). H100 issues 4 warp-instructions per clock per SM
      against 4096 dense bf16 FLOP per clock: <= 1 per 1024 FLOP keeps the loop tensor-bound.
      128-row tiles must meet it; 64-row tiles (issue-bound by design, the fallback for few rows)
      must stay within 2x.
  Triton decode (the same kernel, SPLIT): the interior sequence loop per lane-16 B of K/V, against
      the CUDA decode's roofline: budget 32 (measured ~24 at GQA 1 and 4: tensor-core dots for the
      whole group). This comparison orders DECODE_ORDER_CUDA until a GPU measures both.

Skipped only when nvcc, nvdisasm or Triton's NVIDIA backend is absent (a capability).
"""
import collections
import os
import subprocess

import pytest
import torch

from utils import (HAS_NVIDIA_BACKEND, compile_specs_for_sm90, nvcc_path, nvdisasm_path, sass_functions,
                   sass_loops, sass_of)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC, NVDISASM = nvcc_path(), nvdisasm_path()
needs_nvdisasm = pytest.mark.skipif(NVDISASM is None, reason="needs nvdisasm (Triton's NVIDIA backend or pip)")


def kernels(sass: str) -> dict:
    """{kernel name: [its loop bodies (instruction texts)]} of an nvdisasm listing."""
    return {name: [lp[3] for lp in sass_loops(lines, bodies=True)] for name, lines in sass_functions(sass).items()}


def opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


# ---- CUDA decode ------------------------------------------------------------------------------
K_UNROLL = 2                                   # pamath::kUnroll: K and V vectors per lane per key
DECODE_BUDGET = {1: 40, 2: 56, 4: 96, 8: 176}  # SASS instructions per lane-16 B of K/V, by GT
DECODE_CASES = [(t, d, gt) for t, d in (("__half", 128), ("__nv_bfloat16", 128), ("__half", 64))
                for gt in (1, 2, 4, 8)]


@pytest.fixture(scope="module")
def decode_sass(tmp_path_factory):
    if NVCC is None or NVDISASM is None:
        pytest.skip("needs nvcc and nvdisasm")
    d = tmp_path_factory.mktemp("sass")
    src = d / "inst.cu"
    src.write_text('#include "prefix_attention_kernel.cuh"\n' + "".join(
        f"template __global__ void mops::pacuda::decode_split_kernel<{t}, {dd}, {gt}>"
        f"(mops::pacuda::DecodeArgs<{t}>);\n" for t, dd, gt in DECODE_CASES))
    cubin = d / "inst.cubin"
    # the flags setup.py builds the extension with (-O3 --use_fast_math), for sm_90
    subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-O3", "--use_fast_math", "-std=c++17",
                    "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(cubin)], check=True,
                   capture_output=True, text=True)
    return kernels(sass_of(str(cubin)))


def _mangled(t, d, gt):
    tn = {"__half": "6__half", "__nv_bfloat16": "13__nv_bfloat16", "float": "f"}[t]
    return f"decode_split_kernelI{tn}Li{d}ELi{gt}E"


@pytest.mark.parametrize("t,d,gt", DECODE_CASES, ids=[f"{c[0].strip('_')}-D{c[1]}-GT{c[2]}" for c in DECODE_CASES])
def test_cuda_decode_loop_within_budget(decode_sass, t, d, gt):
    name = next(n for n in decode_sass if _mangled(t, d, gt) in n)
    main = [body for body in decode_sass[name]
            if any(opcode(x).startswith("LDG.E.U8") for x in body)
            and sum(opcode(x).startswith("LDG.E.128") for x in body) == 2 * K_UNROLL]
    assert len(main) == 1, f"{name}: expected one sequence loop, found {len(main)}"
    per16 = len(main[0]) / (2 * K_UNROLL)
    print(f"\nCUDA decode {t} D={d} GT={gt}: {len(main[0])} SASS / iteration, {per16:.1f} per 16 B of K/V "
          f"(budget {DECODE_BUDGET[gt]})")
    assert per16 <= DECODE_BUDGET[gt], (name, per16)


# ---- Triton prefill ---------------------------------------------------------------------------
def _recorded_fwd_spec(TR, args, cfg, cubin_path):
    """The sm90_spec of one forward launch (recorded, not run), typed as the GPU launcher types it."""
    from test_triton_sm90 import launch_spec
    rec = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: rec.append((a, kw))

    q, k, v, pk, pv, idx, w, lens, am = args
    i, ww, ll, mm = TR._prep(q, pk, idx, w, lens, am)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TR._KERNELS, "fwd", Recorder())
        mp.setitem(TR._KERNELS, "reduce", Recorder())
        TR._forward(q, k, v, pk, pv, i, ww, ll, mm, True, q.shape[-1] ** -0.5, cfg=cfg)
    spec = launch_spec(TR._prefix_attention_fwd_kernel, *rec[0])
    spec["cubin_path"] = cubin_path
    return spec


def _interior_loop(cubin_path):
    """The shortest loop with tensor-core instructions: the unmasked sequence loop."""
    (bodies,) = kernels(sass_of(cubin_path)).values()
    interior = min((b for b in bodies if any("MMA" in opcode(x) for x in b)), key=len)
    assert not any(opcode(x).startswith("LDG.E.U8") for x in interior), "per-element masks in the interior loop"
    return interior


@needs_nvdisasm
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton's NVIDIA backend (ptxas)")
@pytest.mark.parametrize("G", [1, 4])
def test_triton_decode_interior_loop_within_budget(tmp_path, G):
    from mops_kernels.ops import _prefix_attention_triton as TR
    from test_prefix_attention import make
    D = 128
    args = make(2, 2, G, 1, 2048, D, 4, 16, 4, dtype=torch.float16, noncontig=False)
    spec = _recorded_fwd_spec(TR, args, None, str(tmp_path / "dec.cubin"))
    (res,) = compile_specs_for_sm90([spec])
    assert res["ok"], res["error"]
    interior = _interior_loop(spec["cubin_path"])
    _, BN, nw = TR._block_sizes(G, D, torch.float16)
    lane16 = 2 * BN * D * 2 / (nw * 32 * 16)       # K and V bytes per iteration per lane, in 16 B
    per16 = len(interior) / lane16
    print(f"\nTriton decode G={G}: {len(interior)} SASS / iteration, {per16:.1f} per 16 B of K/V (budget 32)")
    assert per16 <= 32, per16


def _prefill_launch_specs(tmp_path):
    """The sm90_spec of the prefill forward for every fitting config (fp16, D = 128, 4 x 256 rows)."""
    from mops_kernels.ops import _prefix_attention_triton as TR
    from test_prefix_attention import make
    args = make(1, 1, 4, 256, 256, 128, 4, 16, 4, dtype=torch.float16, noncontig=False)
    return [(cfg, _recorded_fwd_spec(TR, args, cfg, str(tmp_path / f"fwd_{'_'.join(map(str, cfg))}.cubin")))
            for cfg in TR.prefill_configs(4 * 256, 128, torch.float16)]


@needs_nvdisasm
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton's NVIDIA backend (ptxas)")
def test_triton_prefill_interior_loop_within_budget(tmp_path):
    jobs = _prefill_launch_specs(tmp_path)
    assert any(cfg.block_m == 128 for cfg, _ in jobs)
    results = compile_specs_for_sm90([spec for _, spec in jobs])
    for (cfg, spec), res in zip(jobs, results):
        assert res["ok"], res["error"]
        interior = _interior_loop(spec["cubin_path"])
        ops = collections.Counter(opcode(x) for x in interior)
        flop = 4 * cfg.block_m * cfg.block_n * 128
        per_kflop = len(interior) * cfg.num_warps * 1024 / flop
        budget = 1.0 if cfg.block_m == 128 else 2.0
        print(f"\nTriton prefill {tuple(cfg)}: {len(interior)} SASS / warp / iteration, "
              f"{per_kflop:.2f} warp-instructions per 1024 FLOP (budget {budget}), "
              f"{sum(v for o, v in ops.items() if 'MMA' in o)} MMA")
        assert per_kflop <= budget, (cfg, per_kflop)

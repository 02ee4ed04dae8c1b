"""Every Triton kernel compiles for a real GPU (sm_90) with the launch configurations the ops use.

No GPU here: the kernels run under TRITON_INTERPRET=1, which accepts code a GPU compile rejects
(and never sees the GPU's block sizes). So each public op runs once on small odd CPU inputs with
every kernel launch recorded: per kernel, the runtime arguments' Triton types and divisibility
marks (Triton's own `native_specialize_impl`, as the GPU launcher computes them: ints equal to 1
become constexprs, ints and pointers divisible by 16 get tt.divisibility), the constexpr values
and num_warps/num_stages. The ops run twice:

  interpreter   the configurations the CPU tests run (kernels executed);
  gpu           the same calls with the device-dependent launch choices made for a CUDA tensor
                (kernels not executed, only recorded): int4_matmul `_gemm_blocks` 64x64x32 (CPU
                32x32x32, the backward) and `_dot_dtype` bf16/fp16 dots (CPU fp32; the
                tensor-core kernel's `_tc_blocks` differs only in the split count, whose ATOMIC
                both values are launched); prefix attention
                `_upcast` False (CPU True for bf16); gate_topk writes d hidden in hidden's dtype
                (CPU: fp32 for bf16, rounded by torch). `_gemv_blocks` differs on a GPU only in
                the split count, a runtime argument.

Every distinct (kernel, signature, constexprs, options) of the gpu pass is compiled for
GPUTarget("cuda", 90, 32) in one child process, and a cubin must come out. The interpreter pass is
not compiled: its own configurations never reach a GPU (and UPCAST=True does not compile:
`_as` returns fp32 on one branch and bf16 after it, which Triton's code generator rejects as
mismatched return types; the interpreter accepts it).
"""
import importlib
import inspect
import json
from types import SimpleNamespace

import pytest
import torch

from mops_kernels.ops import _prefix_attention_triton as TR
from mops_kernels.ops import gate_topk as GT
from mops_kernels.ops import int4_matmul as IM
from mops_kernels.ops.prefix_attention import prefix_attention
from mops_kernels.ops.iapt_generate import iapt_generate
from mops_kernels.ops.rational import rational
from test_gate_topk import _inputs as gate_inputs
from test_int4_matmul import _case as int4_weight
from test_prefix_attention import make as attention_inputs
from test_rational_iapt import _coeffs, _iapt_inputs
from utils import HAS_NVIDIA_BACKEND, compile_specs_for_sm90, sm90_spec

MODULES = ("mops_kernels.ops.int4_matmul", "mops_kernels.ops._prefix_attention_triton",
           "mops_kernels.ops.gate_topk", "mops_kernels.ops.rational", "mops_kernels.ops.iapt_generate")
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def jit_kernels() -> dict:
    """{name: kernel} of the @triton.jit objects named *_kernel in MODULES."""
    from triton.runtime.jit import KernelInterface
    out = {}
    for m in MODULES:
        for name, obj in vars(importlib.import_module(m)).items():
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                out[name] = obj
    return out


def _is_constexpr(p: inspect.Parameter) -> bool:
    ann = p.annotation   # a string under `from __future__ import annotations`
    return getattr(ann, "__name__", str(ann)).split(".")[-1] == "constexpr"


def launch_spec(kernel, args, kwargs) -> dict:
    """The sm90_spec of one launch `kernel[grid](*args, **kwargs)`, typed as the GPU launcher
    would type it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    params = inspect.signature(kernel.fn).parameters
    bound = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    bound.update(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    sig, consts, attrs = {}, {}, {}
    for name, p in params.items():
        if _is_constexpr(p):
            sig[name], consts[name] = "constexpr", bound[name]
            continue
        ty, attr = native_specialize_impl(BaseBackend, bound[name], False, True, True)
        sig[name] = ty
        if ty == "constexpr":       # ints equal to 1 and None: specialised to constants
            consts[name] = attr
        elif attr:
            attrs[name] = attr
    return sm90_spec(kernel, sig, consts, attrs,
                     {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs})


def _run_ops(case_dtype: dict):
    """Every public op once, forward and backward, on small odd CPU inputs."""
    bf16, fp32, fp16 = torch.bfloat16, torch.float32, torch.float16
    # int4_matmul: decode GEMV (M = 1), tensor-core kernel (M = 3: 16-row tiles on 2 warps; M = 17:
    # 32-row tiles on 4 warps, split-K atomics; K = 576 4-bit pads its last step) + backward,
    # Q4_1 G=32/128, Q8_0 in bf16; fp32 (ieee dots) on Q4_1 G=32 only, to keep the compile under
    # CI's time budget; one step of K (K = 128) stores without atomics
    for bits, G, K in ((4, 32, 576), (4, 128, 640), (8, 32, 576)):
        qw = int4_weight(bits, G, K, 37)
        for dtype in ((bf16, fp32) if (bits, G) == (4, 32) else (bf16,)):
            case_dtype["v"] = dtype
            with torch.no_grad():
                IM.int4_matmul(torch.randn(1, K, dtype=dtype), qw)
                IM.int4_matmul(torch.randn(3, K, dtype=dtype), qw)
            x = torch.randn(17, K, dtype=dtype, requires_grad=True)
            IM.int4_matmul(x, qw).float().sum().backward()
    case_dtype["v"] = bf16
    with torch.no_grad():
        IM.int4_matmul(torch.randn(3, 128, dtype=bf16), int4_weight(4, 128, 128, 37))
    # prefix attention (B, Hkv, G, T, S, D, E, P, kk): prefill + backward, split decode
    for case, dtype, grad in (((2, 1, 3, 37, 37, 128, 3, 7, 2), bf16, True),     # R=111: 64x64, 8 warps
                              ((2, 2, 3, 1, 111, 128, 4, 16, 4), bf16, False),   # decode + reduce
                              ((1, 1, 3, 37, 45, 64, 3, 5, 3), fp32, True),      # ieee dots
                              ((3, 1, 3, 1, 37, 64, 5, 16, 1), fp16, False)):
        case_dtype["v"] = dtype
        q, k, v, pk, pv, idx, w, lens, am = attention_inputs(*case, dtype=dtype)
        for t in (q, k, v, pk, pv, w):
            t.requires_grad_(grad)
        out = prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)
        if grad:
            out.float().sum().backward()
    with torch.no_grad():   # no prefix at all (HAS_PREFIX=False)
        q, k, v = attention_inputs(1, 1, 3, 37, 37, 128, 3, 7, 2, dtype=bf16)[:3]
        prefix_attention(q, k, v, None, None, None)
    # gate_topk: forward, backward to hidden (d hidden) and to every parameter
    for dtype in (bf16, fp32):
        case_dtype["v"] = dtype
        hidden, mask, w1, b1, w2, b2 = gate_inputs(3, 37, 40, 19, 6, dtype=dtype)
        for t in (hidden, w1, b1, w2, b2):
            t.requires_grad_()
        _, wt = GT.gate_topk(hidden, mask, w1, b1, w2, b2, 3)
        (wt * torch.randn_like(wt)).sum().backward()
    # rational and iapt_generate (the fused pool): forward and backward
    case_dtype["v"] = bf16
    x = (torch.randn(3, 37, 19) * 3).to(bf16).requires_grad_()
    a, b = _coeffs()
    rational(x, a, b).float().sum().backward()
    H, mask, w_down, w_sa, a, b, w_up = _iapt_inputs(3, 37, 40, 19, dtype=bf16)
    for t in (H, w_sa, a, b):
        t.requires_grad_()
    iapt_generate(H, mask, w_down, w_sa, a, b, w_up).float().sum().backward()


def _capture(gpu: bool) -> list:
    """[(kernel name, sm90_spec)] of every launch of _run_ops, in order."""
    records, case_dtype = [], {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOPS_BACKEND", "triton")
        for name, kern in jit_kernels().items():
            def run(*args, grid, warmup, _kern=kern, _name=name, _orig=kern.run, **kwargs):
                spec = launch_spec(_kern, args, kwargs)
                if gpu and _name == "_gate_topk_bwd_kernel" and spec["signature"]["dh_ptr"] \
                        == "*fp32" and case_dtype["v"] != torch.float32:
                    spec["signature"]["dh_ptr"] = "*" + {torch.bfloat16: "bf16",
                                                         torch.float16: "fp16"}[case_dtype["v"]]
                records.append((_name, spec))
                if not gpu:
                    return _orig(*args, grid=grid, warmup=warmup, **kwargs)
            mp.setattr(kern, "run", run)
        if gpu:
            cuda = torch.device("cuda")
            gemm, dot, upcast = IM._gemm_blocks, IM._dot_dtype, TR._upcast
            mp.setattr(IM, "_gemm_blocks", lambda device: gemm(cuda))
            mp.setattr(IM, "_dot_dtype", lambda dtype, device: dot(dtype, cuda))
            mp.setattr(TR, "_upcast", lambda q: upcast(SimpleNamespace(dtype=q.dtype, device=cuda)))
        torch.manual_seed(0)
        _run_ops(case_dtype)
    return records


@pytest.fixture(scope="module")
def captured():
    return {"interpreter": _capture(gpu=False), "gpu": _capture(gpu=True)}


@pytest.mark.parametrize("mode", ["interpreter", "gpu"])
def test_every_kernel_is_launched(captured, mode):
    """A new *_kernel in the op modules cannot escape the compile check."""
    names = {n for n, _ in captured[mode]}
    assert names == set(jit_kernels()), sorted(set(jit_kernels()) ^ names)


def _const(spec, name):
    names = list(spec["signature"])
    return dict(spec["constexprs"])[names.index(name)]


def test_gpu_pass_uses_the_gpu_launch_choices(captured):
    """The gpu pass really has the CUDA block sizes, bf16 dots, no upcast and a bf16 d hidden."""
    for mode, (bm, dot, upcast, dh) in (("interpreter", (32, "fp32", True, "*fp32")),
                                        ("gpu", (64, "bf16", False, "*bf16"))):
        specs = {}
        for name, spec in captured[mode]:
            specs.setdefault(name, []).append(spec)
        tc = specs["_int4_matmul_tc_kernel"][0]         # the first M = 3: bf16 x
        assert _const(tc, "BLOCK_M") == 16 and _const(tc, "DOT_DTYPE") == {"dtype": dot}
        assert tc["options"]["num_warps"] == 4 and _const(tc, "BLOCK_N") == 64   # the M <= 16 launch
        assert {_const(t, "ATOMIC") for t in specs["_int4_matmul_tc_kernel"]} == {True, False}
        bwd4 = specs["_int4_matmul_bwd_kernel"][0]
        assert _const(bwd4, "BLOCK_M") == bm
        attn = specs["_prefix_attention_fwd_kernel"][0]  # bf16, D=128, R=111
        assert _const(attn, "UPCAST") is upcast and _const(attn, "BLOCK_M") == 64
        assert attn["options"]["num_warps"] == 8
        bwd = specs["_gate_topk_bwd_kernel"][0]        # bf16 hidden
        assert bwd["signature"]["dh_ptr"] == dh


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton's NVIDIA backend (ptxas)")
def test_every_launch_config_compiles_for_sm90(captured):
    distinct = {}
    for name, spec in captured["gpu"]:
        distinct.setdefault(json.dumps(spec, sort_keys=True), (name, spec))
    jobs = list(distinct.values())
    results = compile_specs_for_sm90([spec for _, spec in jobs])
    failed = [f"{name} {json.dumps(spec)}\n{res['error']}"
              for (name, spec), res in zip(jobs, results) if not res["ok"]]
    assert not failed, f"{len(failed)}/{len(jobs)} configs failed:\n" + "\n".join(failed)
    assert {name for name, _ in jobs} == set(jit_kernels())


def _prefill_config_specs():
    """The prefill forward's launch (recorded, not run) under every configuration the GPU sweep may
    pick: prefill_configs for bf16 at D = 128 and 64 and fp32 at D = 128, R = 4 x 64 rows, typed
    as on a GPU (no upcast). fp16 at D = 128 compiles in tests/test_sass_budget_attention.py."""
    rec, specs = [], []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: rec.append((a, kw))

    cuda = torch.device("cuda")
    upcast = TR._upcast
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TR._KERNELS, "fwd", Recorder())
        mp.setattr(TR, "_upcast", lambda q: upcast(SimpleNamespace(dtype=q.dtype, device=cuda)))
        for dtype, D in ((torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float32, 128)):
            q, k, v, pk, pv, idx, w, lens, am = attention_inputs(1, 1, 4, 64, 64, D, 4, 16, 4, dtype=dtype,
                                                                 noncontig=False)
            i, ww, ll, mm = TR._prep(q, pk, idx, w, lens, am)
            for cfg in TR.prefill_configs(4 * 64, D, dtype):
                rec.clear()
                TR._forward(q, k, v, pk, pv, i, ww, ll, mm, True, D ** -0.5, cfg=cfg)
                specs.append((cfg, launch_spec(TR._prefix_attention_fwd_kernel, *rec[0])))
    return specs


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton's NVIDIA backend (ptxas)")
def test_every_prefill_config_compiles_for_sm90():
    jobs = _prefill_config_specs()
    assert {cfg.block_m for cfg, _ in jobs} == {64, 128}
    results = compile_specs_for_sm90([spec for _, spec in jobs])
    failed = [f"{tuple(cfg)}\n{res['error']}" for (cfg, _), res in zip(jobs, results) if not res["ok"]]
    assert not failed, "\n".join(failed)

"""prefix_attention (SPEC §1) on every backend this machine has, against mops_kernels.reference.

Triton runs through TRITON_INTERPRET=1 (conftest), so shapes stay small but odd: T, S in
{1, 37, 111}, P in {1, 7, 16}, GQA 3, head dim 16/64, -1 holes, repeated slots, w = 0,
prefix_lens < P, left padding and all-masked rows.
"""
import logging
import math
import os

import pytest
import torch

from conftest import available_backends, requires_cuda
from utils import HAS_NVIDIA_BACKEND, compile_for_sm90, rel_err, tol_ok

from mops_kernels import _backend
from mops_kernels import reference as R
from mops_kernels.ops import prefix_attention as PA
from mops_kernels.ops.prefix_attention import prefix_attention

# (B, Hkv, G, T, S, D, E, P, kk)
CASES = [
    (2, 1, 3, 37, 37, 64, 3, 7, 2),     # prefill, T == S
    (2, 2, 3, 1, 111, 16, 4, 16, 4),    # decode (flash-decoding splits)
    (1, 1, 3, 37, 111, 16, 2, 1, 3),    # T < S (cache), P = 1
    (3, 1, 3, 1, 37, 64, 5, 16, 1),     # decode, D = 64, one slot
    (1, 1, 3, 111, 111, 16, 3, 16, 2),  # long prefill: several row and key tiles
    (2, 1, 3, 111, 37, 16, 4, 7, 3),    # T > S: the first rows see only the prefix
]
DTYPES = [(torch.float32, 1e-4), (torch.float16, None), (torch.bfloat16, None)]


def make(B, Hkv, G, T, S, D, E, P, kk, dtype=torch.float32, device="cpu", noncontig=True):
    """Fresh random inputs with every hard case: holes, repeats, w = 0, short slots, padding."""
    Hq = Hkv * G
    if noncontig:  # what HF passes: [B, T, H, D] transposed to [B, H, T, D]
        q = torch.randn(B, T, Hq, D, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, device=device).to(dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, device=device).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, T, D, device=device).to(dtype)
        k = torch.randn(B, Hkv, S, D, device=device).to(dtype)
        v = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    pk = torch.randn(E, P, Hkv, D, device=device).to(dtype)
    pv = torch.randn(E, P, Hkv, D, device=device).to(dtype)
    idx = torch.randint(0, E, (B, kk), dtype=torch.int32, device=device)
    if kk > 1:
        idx[0, 1] = -1                      # a hole
        idx[-1, -1] = idx[-1, 0]            # one request picks a slot twice
    if B > 1:
        idx[1, 0] = idx[0, 0]               # two requests share a slot
    w = torch.rand(B, kk, device=device) + 0.1
    if kk > 2:
        w[-1, 1] = 0.0                      # an excluded slot
    lens = torch.randint(1, P + 1, (E,), dtype=torch.int32, device=device)
    lens[0] = max(P - 3, 0)                 # a short slot (0 when P is small: an empty slot)
    am = torch.ones(B, S, dtype=torch.int64, device=device)
    am[0, : S // 3] = 0                     # left padding
    return q, k, v, pk, pv, idx, w, lens, am


def _backends(device="cpu"):
    have = available_backends(device)
    ops = {"cpu": "prefix_attention_cpu", "cuda": "prefix_attention_cuda"}
    return [b for b in ("triton", "cpu", "torch", "cuda")
            if b in have and (b not in ops or _backend.ext_has(ops[b]))]


def _ref(q, k, v, pk, pv, idx, w, lens, am, causal=True):
    return R.prefix_attention(q.float(), k.float(), v.float(), pk.float(), pv.float(), idx, w,
                              prefix_lens=lens, attention_mask=am, causal=causal)


def _plain(q, k, v, pk, pv, idx, w, lens, am, causal=True):
    """The same computation done by plain PyTorch in the inputs' dtype (SPEC §6 yardstick)."""
    return PA._torch_forward(q, k, v, pk, pv, idx, w.to(q.dtype), lens, am, causal,
                             q.shape[-1] ** -0.5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[3]}S{c[4]}D{c[5]}P{c[7]}k{c[8]}" for c in CASES])
def test_forward_matches_reference(backend, dtype, tol, case, force_backend):
    if backend == "cpu" and case[3] != 1:
        pytest.skip("the C++ cpu backend is decode-only (T == 1): capability")
    force_backend(backend)
    args = make(*case, dtype=dtype)
    out = prefix_attention(*args[:7], prefix_lens=args[7], attention_mask=args[8])
    ref = _ref(*args)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    if dtype == torch.float32:
        assert rel_err(out, ref) <= tol, rel_err(out, ref)
    else:
        plain = _plain(*args)
        assert tol_ok(out, ref, plain, dtype), (rel_err(out, ref), rel_err(plain, ref))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("T,S", [(1, 37), (37, 37)])
def test_all_masked_rows_are_zero(backend, T, S, force_backend):
    """Rows with no valid key give 0, not NaN: a fully padded request, and excluded slots."""
    if backend == "cpu" and T != 1:
        pytest.skip("decode-only backend")
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, am = make(2, 1, 3, T, S, 16, 3, 7, 2)
    am[0] = 0                               # request 0: every sequence key is padding
    w[0] = 0.0                              # ... and both its slots are excluded
    out = prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)
    assert not torch.isnan(out).any()
    assert out[0].abs().max() == 0
    assert rel_err(out[1], _ref(q, k, v, pk, pv, idx, w, lens, am)[1]) <= 1e-4
    # no prefixes at all, causal with T > S - ... : padded rows only
    out = prefix_attention(q, k, v, None, None, None, attention_mask=am)
    assert not torch.isnan(out).any() and out[0].abs().max() == 0


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("T,S", [(1, 37), (37, 111)])
@pytest.mark.parametrize("empty", ["none", "k0"])
def test_no_prefix_path(backend, T, S, empty, force_backend):
    """prefix_k/v/index all None, or an index with kk = 0: plain causal + padded attention."""
    if backend == "cpu" and T != 1:
        pytest.skip("decode-only backend")
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, am = make(2, 1, 3, T, S, 16, 2, 7, 1)
    idx0 = idx[:, :0]
    ref = R.prefix_attention(q, k, v, pk, pv, idx0, None, attention_mask=am)
    if empty == "none":
        out = prefix_attention(q, k, v, None, None, None, attention_mask=am)
    else:
        out = prefix_attention(q, k, v, pk, pv, idx0, attention_mask=am)
    assert rel_err(out, ref) <= 1e-4


def test_no_prefix_cpu_default_is_sdpa(monkeypatch):
    """Unforced CPU calls with no prefixes take the SDPA route (the HF per-layer hot path)."""
    monkeypatch.delenv("MOPS_BACKEND", raising=False)
    calls = []
    real = PA._sdpa
    monkeypatch.setattr(PA, "_sdpa", lambda *a: calls.append(1) or real(*a))
    q, k, v, *_ , am = make(2, 1, 3, 5, 9, 16, 2, 7, 1)
    out = prefix_attention(q, k, v, None, None, None, attention_mask=am.bool())
    assert calls and rel_err(out, R.prefix_attention(q, k, v, torch.zeros(1, 1, 1, 16),
                                                     torch.zeros(1, 1, 1, 16),
                                                     torch.zeros(2, 0, dtype=torch.int32),
                                                     attention_mask=am)) <= 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_not_causal_and_scale(backend, force_backend):
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, am = make(1, 1, 3, 1, 37, 16, 3, 7, 2)
    out = prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am,
                           causal=False, scale=0.3)
    ref = R.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am,
                             causal=False, scale=0.3)
    assert rel_err(out, ref) <= 1e-4


# ---- gradients --------------------------------------------------------------------------
def test_reference_gradcheck_float64():
    """The oracle's own gradients (q, k, v, pool, weights) by finite differences."""
    q, k, v, pk, pv, idx, w, lens, am = make(2, 1, 2, 3, 4, 4, 3, 2, 2)
    w = w + 0.2                             # keep w away from 0, where log w is not smooth
    ts = [t.double().detach().requires_grad_(True) for t in (q, k, v, pk, pv, w)]

    def f(q, k, v, pk, pv, w):
        return R.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)
    # the reference works in fp32 internally: compare with fp32-sized steps and tolerances
    assert torch.autograd.gradcheck(f, ts, eps=1e-3, atol=5e-3, rtol=5e-3)


GRAD_CASES = [
    (2, 1, 3, 37, 37, 16, 3, 7, 3),
    (2, 2, 3, 1, 37, 16, 3, 16, 4),
    (1, 1, 3, 7, 111, 64, 2, 1, 2),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"T{c[3]}S{c[4]}P{c[7]}k{c[8]}" for c in GRAD_CASES])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_matches_reference(backend, case, force_backend):
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, am = make(*case)
    if case[8] > 2:
        w[0, 0] = 0.0                       # an excluded slot: d w defined as 0 there
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv, w)]
    out = prefix_attention(*leaves[:5], idx, leaves[5], prefix_lens=lens, attention_mask=am)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    rleaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv, w)]
    ref = R.prefix_attention(*rleaves[:5], idx, rleaves[5], prefix_lens=lens, attention_mask=am)
    want = torch.autograd.grad(ref, rleaves, g)
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dweight"), got, want):
        assert not torch.isnan(a).any(), name
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))
    if case[8] > 2:
        assert got[5][0, 0] == 0


# (B, Hkv, G, T, S, D, E, P, kk): T != S both ways (T > S: the first T - S rows see only the
# prefix under causal), GQA 3, holes / repeated slots / w = 0 from make()
SKIP_CASES = [
    (2, 1, 3, 37, 111, 16, 4, 7, 3),
    (1, 1, 3, 111, 37, 16, 3, 16, 2),
    (2, 1, 3, 111, 111, 16, 3, 7, 3),
]


def _grads_vs_reference(case, causal, am=None):
    q, k, v, pk, pv, idx, w, lens, am0 = make(*case)
    am = am0 if am is None else am
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv, w)]
    out = prefix_attention(*leaves[:5], idx, leaves[5], prefix_lens=lens, attention_mask=am,
                           causal=causal)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    rleaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv, w)]
    ref = R.prefix_attention(*rleaves[:5], idx, rleaves[5], prefix_lens=lens, attention_mask=am,
                             causal=causal)
    want = torch.autograd.grad(ref, rleaves, g)
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dweight"), got, want):
        assert not torch.isnan(a).any(), name
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", SKIP_CASES, ids=[f"T{c[3]}S{c[4]}k{c[8]}" for c in SKIP_CASES])
def test_triton_backward_t_ne_s_causal_and_not(force_backend, case, causal):
    """The dk/dv pass with causal skipping (and without causal): every gradient, pool included."""
    force_backend("triton")
    _grads_vs_reference(case, causal)


def _minimal_row_tiles(T, S, G, BM, BN, am, causal):
    """(b, key tile) -> how many BLOCK_M row tiles hold a row that sees a valid key of the tile."""
    need = 0
    for b in range(am.shape[0]):
        for s0 in range(0, S, BN):
            keys = [s for s in range(s0, min(s0 + BN, S)) if am[b, s]]
            tiles = {r // BM for r in range(G * T)
                     if any(not causal or s <= S - T + r % T for s in keys)}
            need += len(tiles)
    return need


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="counts the kernel's row-tile loads, which needs the interpreter")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,S,G", [(111, 111, 1), (37, 111, 3), (111, 37, 3), (5, 9, 3)])
def test_triton_dkv_pass_skips_row_tiles_it_cannot_see(force_backend, monkeypatch, T, S, G,
                                                       causal):
    """The dk/dv pass runs exactly the row tiles that can see the key tile (bottom-right causal,
    whole-padding key tiles skipped): counted through the kernel's row-tile loader."""
    from mops_kernels.ops import _prefix_attention_triton as TR
    force_backend("triton")
    B, Hkv, D = 2, 1, 16
    q, k, v, pk, pv, idx, w, lens, am = make(B, Hkv, G, T, S, D, 3, 7, 2)
    am[1, : min(S, 70)] = 0                 # request 1: its first key tile is all padding
    BM, BN, _ = TR._block_sizes(G * T, D, q.dtype)
    loads, in_dkv = [], []
    load_rows = TR._load_rows

    def counting_load_rows(*args, **kw):
        if in_dkv:
            loads.append(1)
        return load_rows(*args, **kw)

    class DkvFlag:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                in_dkv.append(1)
                try:
                    return TR._prefix_attention_bwd_dkv_kernel[grid](*args, **kw)
                finally:
                    in_dkv.clear()
            return launch

    monkeypatch.setattr(TR, "_load_rows", counting_load_rows)
    monkeypatch.setitem(TR._KERNELS, "bwd_dkv", DkvFlag())
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, idx, w, prefix_lens=lens, attention_mask=am, causal=causal)
    out.sum().backward()
    # the sequence key tiles do the minimal work; every non-empty prefix tile sees every row tile
    n_prefix = sum(1 for b in range(B) for j in range(idx.shape[1])
                   if idx[b, j] >= 0 and w[b, j] > 0 and lens[idx[b, j]] > 0) \
        * triton_cdiv(7, BN) * triton_cdiv(G * T, BM)
    assert len(loads) == _minimal_row_tiles(T, S, G, BM, BN, am, causal) + n_prefix


def triton_cdiv(a, b):
    return -(-a // b)


def test_triton_backward_low_precision(force_backend):
    force_backend("triton")
    case = (2, 1, 3, 37, 37, 16, 3, 7, 2)
    q, k, v, pk, pv, idx, w, lens, am = make(*case, dtype=torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, idx, w, prefix_lens=lens, attention_mask=am)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    rl = [t.detach().float().requires_grad_(True) for t in (q, k, v, pk, pv)]
    want = torch.autograd.grad(R.prefix_attention(*rl, idx, w, prefix_lens=lens,
                                                  attention_mask=am), rl, g.float())
    pl = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    plain = torch.autograd.grad(PA._torch_forward(*pl, idx, w.bfloat16(), lens, am, True,
                                                  16 ** -0.5), pl, g)
    for a, b, c in zip(got, want, plain):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, b) <= 2 * rel_err(c, b) + 1e-5, (rel_err(a, b), rel_err(c, b))


# ---- no materialisation -------------------------------------------------------------------
def test_kernels_read_the_pool_in_place(force_backend, monkeypatch):
    """Every launch gets the pool tensor itself and no tensor with a kk*P-long axis."""
    from mops_kernels.ops import _prefix_attention_triton as TR
    force_backend("triton")
    B, Hkv, G, T, S, D, E, P, kk = 2, 1, 3, 5, 9, 16, 4, 7, 3
    q, k, v, pk, pv, idx, w, lens, am = make(B, Hkv, G, T, S, D, E, P, kk)
    seen = []

    class Recorder:
        def __init__(self, name, kern):
            self.name, self.kern = name, kern

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((self.name, args))
                return self.kern[grid](*args, **kw)
            return launch

    for name, kern in list(TR._KERNELS.items()):
        monkeypatch.setitem(TR._KERNELS, name, Recorder(name, kern))
    pkl, pvl = pk.clone().requires_grad_(True), pv.clone().requires_grad_(True)
    for T_ in (T, 1):
        out = prefix_attention(q[:, :, :T_], k, v, pkl, pvl, idx, w, prefix_lens=lens,
                               attention_mask=am)
        out.sum().backward()
    names = {n for n, _ in seen}
    assert {"fwd", "reduce", "bwd_dq", "bwd_dkv"} <= names
    for name, args in seen:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name != "reduce":
            assert any(a is pkl for a in tensors) and any(a is pvl for a in tensors), name
        for a in tensors:
            assert kk * P not in a.shape, (name, tuple(a.shape))


@requires_cuda
def test_cuda_peak_memory_does_not_scale_with_gathered_prefix():
    """On a GPU: the forward allocates no [B, kk*P, ...] tensor (peak ~ output + partials)."""
    B, Hkv, G, S, D, E, P, kk = 64, 2, 4, 64, 128, 8, 512, 4
    q, k, v, pk, pv, idx, w, lens, am = make(B, Hkv, G, 1, S, D, E, P, kk, dtype=torch.float16,
                                             device="cuda")
    gathered = B * Hkv * kk * P * D * 2      # bytes of one gathered prefix tensor (k or v)
    for backend in [b for b in ("triton", "cuda") if b in _backends("cuda")]:
        import os
        os.environ["MOPS_BACKEND"] = backend
        try:
            prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - base < gathered / 4, backend
        finally:
            del os.environ["MOPS_BACKEND"]


@requires_cuda
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_decode_and_prefill(backend, dtype, tol, D, force_backend):
    if backend not in _backends("cuda"):
        pytest.skip(f"{backend} backend not built/available")
    force_backend(backend)
    for T, S in ((1, 1), (1, 37), (1, 1111)) + (((37, 111), (111, 111)) if backend == "triton" else ()):
        args = make(5, 2, 4, T, S, D, 6, 16, 3, dtype=dtype, device="cuda")
        out = prefix_attention(*args[:7], prefix_lens=args[7], attention_mask=args[8])
        ref = _ref(*args)
        if dtype == torch.float32:
            assert rel_err(out, ref) <= tol, (T, S, rel_err(out, ref))
        else:
            assert tol_ok(out, ref, _plain(*args), dtype), (T, S, rel_err(out, ref))


# ---- Triton prefill: launch configurations, the packed prefix tile, unmasked interior tiles -----
@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64)],
                         ids=["fp16D64", "bf16D128", "fp32D64"])
def test_triton_every_prefill_config_matches_reference(force_backend, dtype, D):
    """Every configuration prefill_configs keeps (BM = 128 ones included) gives the reference's
    answer: the GPU sweep may pick any of them."""
    from mops_kernels.ops import _prefix_attention_triton as TR
    force_backend("triton")
    B, Hkv, G, T, S = 2, 1, 4, 37, 45        # R = 148 rows: one full 128-row tile and a ragged one
    args = make(B, Hkv, G, T, S, D, 4, 7, 3, dtype=dtype)
    q, k, v, pk, pv, idx, w, lens, am = args
    ref = _ref(*args)
    cfgs = TR.prefill_configs(G * T, D, dtype)
    assert len(cfgs) >= (1 if dtype == torch.float32 else 3)
    assert dtype == torch.float32 or any(c.block_m == 128 for c in cfgs)
    pidx, pw, plens, pmask = TR._prep(q, pk, idx, w, lens, am)
    for cfg in cfgs:
        out, _ = TR._forward(q, k, v, pk, pv, pidx, pw, plens, pmask, True, D ** -0.5, cfg=cfg)
        if dtype == torch.float32:
            assert rel_err(out, ref) <= 1e-4, cfg
        else:
            assert tol_ok(out, ref, _plain(*args), dtype), (cfg, rel_err(out, ref))


def test_prefill_config_predicate_prunes():
    from mops_kernels.ops import _prefix_attention_triton as TR
    assert all(c.block_m <= 64 for c in TR.prefill_configs(40, 128, torch.bfloat16))   # few rows
    assert TR.prefill_configs(5, 64, torch.bfloat16)[0].block_m == 16                   # decode-like
    many = TR.prefill_configs(4 * 2048, 128, torch.bfloat16)
    assert {c.block_m for c in many} == {64, 128} and all(c.num_warps == 8 for c in many)
    assert all(c.block_n <= 64 for c in many)                  # no 128 x 128 K/V tiles at D = 128
    assert all(c.block_m == 64 and c.block_n * 128 <= 4096 for c in TR.prefill_configs(4096, 128, torch.float32))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="counts the kernel's tile loads, which needs the interpreter")
@pytest.mark.parametrize("T,S,causal", [(111, 111, True), (37, 111, True), (111, 37, True), (37, 111, False), (1, 200, True)])
def test_triton_forward_packs_the_prefix_and_masks_only_boundary_tiles(force_backend, monkeypatch, T, S,
                                                                      causal):
    """Per program: the selected slots take cdiv(packed tokens, BLOCK_N) tiles (one here: kk*P <=
    BLOCK_N, holes / w = 0 / short slots packed out), and only the diagonal / boundary sequence
    tiles go through the masked loader; the interior ones are read with no mask."""
    from mops_kernels.ops import _prefix_attention_triton as TR
    force_backend("triton")
    B, Hkv, G, D = 2, 1, 1, 16
    q, k, v, pk, pv, idx, w, lens, am = make(B, Hkv, G, T, S, D, 5, 16, 4)
    calls = {"packed": 0, "masked": 0}
    real_packed, real_seq = TR._packed_keys, TR._seq_keys

    def packed(*a, **kw):
        calls["packed"] += 1
        return real_packed(*a, **kw)

    def seq(*a, **kw):
        calls["masked"] += 1
        return real_seq(*a, **kw)

    monkeypatch.setattr(TR, "_packed_keys", packed)
    monkeypatch.setattr(TR, "_seq_keys", seq)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am, causal=causal)
    assert rel_err(out, _ref(q, k, v, pk, pv, idx, w, lens, am, causal=causal)) <= 1e-4
    R = G * T
    if T == 1:
        BM, BN, _ = TR._block_sizes(R, D, q.dtype)
        chunk = TR._decode_chunk(S, BN)
        n_prog_prefix = 1                                     # split 0 only, per (b, kv head)
        masked = sum(1 for c0 in range(0, S, chunk) if min(c0 + chunk, S) % BN)  # ragged last tile
    else:
        BM, BN = TR.prefill_configs(R, D, q.dtype)[0][:2]
        n_prog_prefix = triton_cdiv(R, BM)
        masked = 0
        for r0 in range(0, R, BM):
            r1 = min(r0 + BM, R) - 1
            t_min = r0 % T if r0 // T == r1 // T else 0
            t_max = r1 % T if r0 // T == r1 // T else T - 1
            hi = max(min(S, S - T + t_max + 1), 0) if causal else S
            full = (max(min(S, S - T + t_min + 1), 0) if causal else S) // BN * BN
            masked += triton_cdiv(max(hi - min(full, hi), 0), BN)
    tiles = [triton_cdiv(sum(int(lens[idx[b, j]]) for j in range(idx.shape[1])
                             if idx[b, j] >= 0 and w[b, j] > 0), BN) for b in range(B)]
    assert max(tiles) == 1                                    # 4 slots x 16 tokens in one 64-wide tile
    assert calls["packed"] == n_prog_prefix * Hkv * sum(tiles)
    assert calls["masked"] == B * Hkv * masked


def test_decode_order_table_decides_between_cuda_and_triton(monkeypatch):
    """GPU decode: DECODE_ORDER_CUDA alone picks between the two fused kernels (the registry's
    supports() predicates, pure host logic, on a stand-in q that says "cuda"); a forced backend,
    a prefill or too many slots for the CUDA kernel bypass it."""
    from types import SimpleNamespace
    monkeypatch.delenv("MOPS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "ext_has", lambda name: True)
    monkeypatch.setattr(_backend, "why_not", lambda b, device, supported: None if b in supported else "no")
    q = SimpleNamespace(shape=(4, 8, 1, 128), device=torch.device("cuda"), dtype=torch.bfloat16)

    def offered(q, kk):
        return {b for b, impl in _backend.registered("prefix_attention").items()
                if impl.supports is None or impl.supports(q, True, False, kk)} & {"cuda", "triton"}

    assert offered(q, 4) == {PA.DECODE_ORDER_CUDA[0]}
    monkeypatch.setattr(PA, "DECODE_ORDER_CUDA", ("triton", "cuda"))
    assert offered(q, 4) == {"triton"}
    monkeypatch.setattr(PA, "DECODE_ORDER_CUDA", ("cuda", "triton"))
    assert offered(q, 4) == {"cuda"}
    assert offered(q, 65) == {"triton"}                              # kk > 64: no cuda kernel
    prefill = SimpleNamespace(shape=(4, 8, 7, 128), device=torch.device("cuda"), dtype=torch.bfloat16)
    assert offered(prefill, 4) == {"triton"}
    monkeypatch.setenv("MOPS_BACKEND", "triton")
    assert offered(q, 4) == {"cuda", "triton"}


# ---- the CUDA decode kernel's decomposition, on the host --------------------------------------
# No GPU here: the extension's prefix_attention_cuda_emulate runs the CUDA kernel's own structure
# (launch plan, splits, packed prefix tile in passes, key groups with tiles of 2 keys and one
# rescale per tile, warp butterfly + CTA + split merges) with the kernel's __host__ __device__
# helpers (csrc/prefix_attention_decode_math.h). The cases reach every branch of that structure:
# heads per CTA 1/4/8 (G = 1, 3, 5 padded to 8, 9 = two head chunks), D 64/128 (2 or 4 key groups
# per warp in fp16/bf16, 1 or 2 in fp32), one split or many (num_sms), a prefix tile of several
# passes (kk * P > 256), keys past the chunk end, holes / repeats / w = 0 / short and empty slots.
requires_emulate = pytest.mark.skipif(not _backend.ext_has("prefix_attention_cuda_emulate"),
                                      reason="needs the C++ extension")
# (B, Hkv, G, T, S, D, E, P, kk, num_sms)
EMU_CASES = [
    (2, 2, 3, 1, 111, 64, 4, 16, 4, 132),    # GQA 3 -> 4 heads per CTA, several splits
    (3, 1, 1, 1, 37, 128, 5, 16, 1, 1),      # G = 1, one split
    (2, 1, 5, 1, 300, 64, 3, 7, 3, 132),     # G = 5: 8 heads per CTA, 3 of them padding
    (1, 1, 9, 1, 1111, 128, 4, 16, 2, 132),  # G = 9: two head chunks; 1111 keys in many splits
    (2, 1, 3, 1, 45, 128, 4, 100, 4, 7),     # 300 packed prefix tokens (full slots): two passes of 256
]


def _emulate(args, num_sms, scale=None):
    q, k, v, pk, pv, idx, w, lens, am = args
    return _backend.extension().prefix_attention_cuda_emulate(
        q, k, v, pk, pv, idx, None if w is None else w.float(), lens, am, True,
        q.shape[-1] ** -0.5 if scale is None else scale, num_sms)


@requires_emulate
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", EMU_CASES, ids=[f"G{c[2]}S{c[4]}D{c[5]}P{c[7]}k{c[8]}sm{c[9]}" for c in EMU_CASES])
def test_cuda_decode_decomposition_matches_reference(case, dtype, tol):
    args = make(*case[:9], dtype=dtype)
    if case[7] * case[8] > 256:              # pamath::kPackTile: full slots, so the packed tile
        args[7].fill_(case[7])               # really takes two passes (3 valid slots x 100 tokens)
    out = _emulate(args, case[9])
    ref = _ref(*args)
    assert out.dtype == dtype and not torch.isnan(out).any()
    if dtype == torch.float32:
        assert rel_err(out, ref) <= tol, rel_err(out, ref)
    else:
        assert tol_ok(out, ref, _plain(*args), dtype), (rel_err(out, ref), rel_err(_plain(*args), ref))


@requires_emulate
def test_cuda_decode_decomposition_edge_rows():
    """Rows with no valid key give 0 (all padding + every slot excluded); no prefix at all; no
    weights (w = 1, bias 0) and no lens (P tokens); every split count gives the same answer."""
    args = list(make(3, 1, 3, 1, 300, 64, 4, 16, 3))
    args[8][0] = 0                          # request 0: every sequence key is padding ...
    args[6][0] = 0.0                        # ... and every slot is excluded
    out = _emulate(args, 132)
    assert out[0].abs().max() == 0 and not torch.isnan(out).any()
    assert rel_err(out, _ref(*args)) <= 1e-4
    q, k, v, pk, pv, idx, w, lens, am = make(2, 2, 3, 1, 77, 128, 4, 16, 2)
    ext = _backend.extension()
    none = ext.prefix_attention_cuda_emulate(q, k, v, None, None, None, None, None, am, True, 128 ** -0.5, 132)
    assert rel_err(none, R.prefix_attention(q, k, v, pk, pv, idx[:, :0], attention_mask=am)) <= 1e-4
    plain = ext.prefix_attention_cuda_emulate(q, k, v, pk, pv, idx, None, None, None, True, 128 ** -0.5, 5)
    assert rel_err(plain, R.prefix_attention(q, k, v, pk, pv, idx)) <= 1e-4
    args = make(2, 2, 3, 1, 1111, 64, 4, 16, 2)
    outs = [_emulate(args, sms) for sms in (1, 16, 132, 100000)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) <= 1e-5


@requires_emulate
def test_cuda_decode_rejects_too_many_slots():
    q, k, v, pk, pv, idx, w, lens, am = make(1, 1, 3, 1, 9, 64, 4, 2, 65)
    with pytest.raises(RuntimeError, match="at most 64 slots"):
        _emulate((q, k, v, pk, pv, idx, w, lens, am), 132)


@requires_emulate
@pytest.mark.parametrize("B,Hq,Hkv,D,elt", [(8192, 9, 3, 64, 2), (4096, 32, 8, 128, 2), (70000, 1, 1, 128, 4)])
def test_cuda_decode_launch_grid_at_scoring_batches(B, Hq, Hkv, D, elt):
    """B*Hq > 65,535 (scoring-sized batches): the (b, head) products go on grid.x (limit 2^31 - 1),
    only the splits on grid.y (<= 65,535); a pure-host computation of the kernel's launch plan."""
    assert B * Hq > 65535
    plan = _backend.extension().prefix_attention_cuda_plan(B, Hq, Hkv, 2048, D, elt, True, 132)
    gt = plan["heads_per_cta"]
    assert plan["ok"] and gt >= min(Hq // Hkv, 8)
    assert plan["grid1"] == (B * Hkv * -(-(Hq // Hkv) // gt), plan["n_split"])
    assert plan["grid1"][0] <= 2**31 - 1 and plan["grid1"][1] <= 65535 and plan["grid2"] == B * Hq
    assert plan["n_split"] == 1 + -(-2048 // plan["chunk"]) and plan["chunk"] % plan["tile"] == 0
    # S so long that one split per tile would overflow grid.y: the chunk grows instead
    huge = _backend.extension().prefix_attention_cuda_plan(1, Hq, Hkv, 70000 * 64, D, elt, False, 100000)
    assert huge["ok"] and huge["grid1"][1] <= 65535


# ---- boundaries -----------------------------------------------------------------------------
def _bad(**change):
    q, k, v, pk, pv, idx, w, lens, am = make(2, 2, 3, 5, 9, 16, 3, 7, 2, noncontig=False)
    a = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, prefix_index=idx, prefix_weight=w,
             prefix_lens=lens, attention_mask=am)
    a.update({n: f(a) for n, f in change.items()})
    return a


BAD = [  # (id, the message must start with, change)
    ("index_high", "prefix_index", dict(prefix_index=lambda a: a["prefix_index"].fill_(3))),
    ("index_low", "prefix_index", dict(prefix_index=lambda a: a["prefix_index"].fill_(-2))),
    ("gqa", "Hq", dict(q=lambda a: torch.randn(2, 5, 5, 16))),
    ("pool_dtype", "prefix_k", dict(prefix_k=lambda a: a["prefix_k"].half())),
    ("pool_shape", "prefix_v", dict(prefix_v=lambda a: a["prefix_v"][:, :3])),
    ("neg_weight", "prefix_weight", dict(prefix_weight=lambda a: -a["prefix_weight"])),
    ("mask_shape", "attention_mask", dict(attention_mask=lambda a: a["attention_mask"][:, :4])),
    ("lens", "prefix_lens", dict(prefix_lens=lambda a: a["prefix_lens"] + 8)),
    ("k_headdim", "k ", dict(k=lambda a: a["k"][..., :8])),
    ("v_dtype", "v ", dict(v=lambda a: a["v"].double())),
    ("q_rank", "q ", dict(q=lambda a: a["q"][0])),
]


@pytest.mark.parametrize("match,change", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(match, change):
    a = _bad(**change)
    with pytest.raises(ValueError, match="^" + match):
        prefix_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("prefix_k"), a.pop("prefix_v"),
                         a.pop("prefix_index"), a.pop("prefix_weight"), **a)


def test_unsupported_head_dim_falls_back_once(monkeypatch, caplog):
    """D = 24 is not a power of two: triton is not offered, the pick says so once and falls back."""
    monkeypatch.delenv("MOPS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_announced", set())
    monkeypatch.setattr(_backend, "_picked", {})          # forget earlier tests' memoised picks
    q, k, v, pk, pv, idx, w, lens, am = make(1, 1, 3, 5, 9, 24, 3, 7, 2)
    assert not PA._triton_case(q, True, False)
    with caplog.at_level(logging.INFO, logger="mops_kernels"):
        for _ in range(2):
            out = prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)
    msgs = [r.getMessage() for r in caplog.records if "prefix_attention" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert rel_err(out, _ref(q, k, v, pk, pv, idx, w, lens, am)) <= 1e-4
    monkeypatch.setenv("MOPS_BACKEND", "triton")
    with pytest.raises(_backend.BackendUnavailable, match="triton"):
        prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=am)


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton's NVIDIA backend (ptxas)")
def test_dkv_kernel_with_causal_skipping_compiles_for_sm90():
    """The dk/dv pass (nested loops with data-dependent bounds) is valid for a real GPU."""
    from mops_kernels.ops import _prefix_attention_triton as TR

    def arg_type(n):
        if n in ("Q", "K", "V", "PK", "PV", "DO"):
            return "*fp16"
        if n in ("IDX", "LENS", "MASK"):
            return "*i32" if n != "MASK" else "*i8"
        if n in ("W", "LSE", "DELTA", "DK", "DV", "DPK", "DPV"):
            return "*fp32"
        return "fp32" if n in ("qk_scale", "sm_scale") else "i32"
    compile_for_sm90(TR._prefix_attention_bwd_dkv_kernel, arg_type,
                     dict(HAS_W=True, HAS_LENS=True, HAS_MASK=True, CAUSAL=True, BLOCK_M=64,
                          BLOCK_N=64, BLOCK_D=64, DOT_PREC=None, UPCAST=False))


@pytest.mark.skipif(not _backend.ext_has("prefix_attention_cpu"), reason="needs the C++ extension")
def test_cpu_no_prefix_decode_runs_the_cpp_kernel_and_prefill_sdpa(monkeypatch):
    """A bare model's attention on the CPU: decode (T = 1) through the C++ kernel (faster there),
    prefill through SDPA; both equal the reference (left padding included)."""
    monkeypatch.delenv("MOPS_BACKEND", raising=False)
    calls = []
    real = PA._torch_forward
    monkeypatch.setattr(PA, "_torch_forward", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    for T, S in ((1, 37), (37, 37)):
        q = torch.randn(3, 6, T, 64)
        k, v = torch.randn(3, 2, S, 64), torch.randn(3, 2, S, 64)
        am = torch.ones(3, S, dtype=torch.long)
        am[1, :5] = 0
        with torch.no_grad():
            out = prefix_attention(q, k, v, None, None, None, attention_mask=am)
        pool = torch.randn(1, 1, 2, 64)                 # the reference's "no prefix": kk = 0
        ref = R.prefix_attention(q, k, v, pool, pool, torch.zeros(3, 0, dtype=torch.int32),
                                 attention_mask=am)
        assert rel_err(out, ref) <= 1e-4, T
    assert calls == [37]          # only the prefill went to SDPA


@pytest.mark.skipif(not _backend.ext_has("prefix_attention_cpu"), reason="needs the C++ extension")
@pytest.mark.parametrize("D", [16, 20, 64, 72, 128])
def test_cpu_decode_both_isa_copies(D, monkeypatch):
    """The C++ decode kernel's baseline copy and its AVX2 copy (8-key score blocks, vectorised exp,
    64-column value blocks, scalar tails for D % 8 and key counts % 8) both equal the reference:
    odd key counts, D not a multiple of 8, logits spread wide enough that many probabilities
    underflow, and a batch large enough to run on several threads."""
    ext = _backend.extension()
    monkeypatch.setenv("MOPS_BACKEND", "prefix_attention:cpu")
    cases = [make(2, 2, 3, 1, 37, D, 4, 7, 3), make(11, 3, 3, 1, 111, D, 5, 16, 2)]
    q, *rest = make(1, 1, 3, 1, 13, D, 3, 5, 2)
    cases.append((q * 30, *rest))                # sharp softmax: most keys' p underflow to 0
    isas = ["base"] + (["avx2"] if ext.cpu_isa("auto") == "avx2" else [])
    try:
        for isa in isas:
            assert ext.cpu_isa(isa) == isa
            for args in cases:
                outs = []
                for helpers in ("1", "0"):   # the CPU kernels' helper pool forced on / off
                    monkeypatch.setenv("MOPS_INT4_CPU_HELPERS", helpers)
                    outs.append(prefix_attention(*args[:7], prefix_lens=args[7], attention_mask=args[8]))
                ref = _ref(*args)
                assert not torch.isnan(outs[0]).any()
                assert rel_err(outs[0], ref) <= 1e-4, (isa, D, args[0].shape, rel_err(outs[0], ref))
                assert torch.equal(outs[0], outs[1])     # each (b, kv head) is one thread's work
    finally:
        ext.cpu_isa("auto")

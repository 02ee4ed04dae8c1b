"""Gated prefix attention (SPEC §1): one softmax over the selected prefix slots and the sequence.

    out = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight=None, *,
                           prefix_lens=None, attention_mask=None, causal=True, scale=None)

    q              [B, Hq, T, D]     (any strides)
    k, v           [B, Hkv, S, D]    (any strides; Hq % Hkv == 0, kv head of h = h // (Hq/Hkv))
    prefix_k/v     [E, P, Hkv, D]    the pool of prefix slots of one layer, read in place
    prefix_index   [B, kk] int       slot per request, -1 = empty (kk may be 0; None = no prefixes)
    prefix_weight  [B, kk] float     gate weights w >= 0 (None = 1); w == 0 excludes the slot
    prefix_lens    [E] int           valid tokens of each slot (<= P; None = P)
    attention_mask [B, S]            1 real / 0 padding, any int/bool/float dtype
    out            [B, Hq, T, D]     in q's dtype

For row t of (b, h), with c = scale * q·k:
    logit(slot j, token p) = c + log w[b, j]        for index[b, j] >= 0, p < prefix_lens[slot], w > 0
    logit(sequence key s)  = c                      for mask[b, s] == 1 and (not causal or s <= S-T+t)
    out = softmax(logits) @ values, and 0 for a row with no valid key (never NaN).

Gradients: dq, dk, dv, the pool (summed into each selected slot: a slot picked by two requests, or
twice by one, gets both contributions) and prefix_weight. d out / d w at w == 0 is defined as 0:
the slot is excluded, so the loss does not depend on it there.

Backends (registered with `_backend.register` above `prefix_attention`):
    triton  `_prefix_attention_triton`: fused forward (online softmax over the slots read from the
            pool through prefix_index, then the sequence tiles; decode splits S flash-decoding
            style with the prefix segment as one more split) and fused backward. No tensor of
            shape [B, kk*P, ...] is ever materialised: the kernels receive the pool itself.
    cuda    T == 1 forward (split-K decode kernel in csrc/prefix_attention_cuda.cu): one CTA per
            (b, kv head, split) for the whole GQA group, the selected slots packed into one
            split; D in {64, 128}, fp32/fp16/bf16, kk <= 64. Between cuda and triton for decode,
            DECODE_ORDER_CUDA decides (awaiting the GPU measurement).
    cpu     T == 1 forward, C++ (csrc/prefix_attention_cpu.cpp), threaded over B*Hkv.
    torch   plain PyTorch: the selected slots gathered (index_select) and one SDPA call with a
            float mask carrying log w; with no prefixes, SDPA with a boolean mask. This backend
            does materialise the gathered prefixes; it is the fallback and the baseline.

Argument checks. Shapes, dtypes and devices are checked on every call (metadata: free). The VALUES
(prefix_index in [-1, E), prefix_weight >= 0, prefix_lens in [0, P]) are checked where the data
enters, once: `attach`/`generate` (`expert_index`, `expert_weight`: integrations/hf.py), the
Engine's `submit`, PromptBank's construction, `set_slot` and `load`, and the gate, whose outputs are
in range by construction. Reading them back here on a GPU would cost a device sync per read (five
per layer, ~100 per decode step of a 7B model) and raise under CUDA-graph capture. So this op reads
values on the host (`check_prefix_values`, ValueError naming the argument) only when that is legal
and cheap beside the call: autograd enabled (training, a direct user call) and no graph capture.
Otherwise (no_grad / inference_mode, the serving paths, or capturing) nothing is read back and the
values are made harmless on the device instead, so a bad value can never read out of bounds:
  - cpu backend: the C++ glue re-checks index and lens ranges itself (no sync on a CPU);
  - other backends: on a CPU, torch._assert_async raises a RuntimeError naming the argument; on a
    GPU, two tiny graph-capturable kernels map an index >= E to -1 (an empty slot) and clamp lens to
    [0, P]. A weight < 0 is treated as 0 (slot excluded) by every backend.
The serving Engine's decode step goes further and calls the registered backend itself (values
validated at submit, pools at construction): no check and no extra kernel per layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend

__all__ = ["prefix_attention", "check_prefix_values"]

_OP = "prefix_attention"


# --------------------------------------------------------------------------------------------
# Boundary checks
# --------------------------------------------------------------------------------------------
def _check(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
           attention_mask):
    """Validate shapes/dtypes/devices; every error names the argument and its expected shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, Hkv, S, D={D}), got {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if v.shape != k.shape:
        raise ValueError(f"v must have shape (B, Hkv, S, D) = {tuple(k.shape)} like k, got {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}, from q) must be a multiple of Hkv ({Hkv}, from k)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have shape (B, S) = ({B}, {S}), "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask must be on q's device {q.device}, got {attention_mask.device}")
    if prefix_k is None and prefix_v is None and prefix_index is None:
        if prefix_weight is not None:
            raise ValueError("prefix_weight given without prefix_k/prefix_v/prefix_index")
        return
    if prefix_k is None or prefix_v is None or prefix_index is None:
        raise ValueError("prefix_k, prefix_v and prefix_index must be given together (or all None)")
    if prefix_k.dim() != 4 or prefix_k.shape[2] != Hkv or prefix_k.shape[3] != D:
        raise ValueError(f"prefix_k must have shape (E, P, Hkv={Hkv}, D={D}), got {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have shape (E, P, Hkv, D) = {tuple(prefix_k.shape)} like "
                         f"prefix_k, got {tuple(prefix_v.shape)}")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    E, P = prefix_k.shape[0], prefix_k.shape[1]
    if prefix_index.dim() != 2 or prefix_index.shape[0] != B:
        raise ValueError(f"prefix_index must have shape (B={B}, kk), got {tuple(prefix_index.shape)}")
    if prefix_index.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"prefix_index must be an integer tensor, got {prefix_index.dtype}")
    if prefix_index.device != q.device:
        raise ValueError(f"prefix_index must be on q's device {q.device}, got {prefix_index.device}")
    if prefix_weight is not None:
        if tuple(prefix_weight.shape) != tuple(prefix_index.shape):
            raise ValueError(f"prefix_weight must have shape (B, kk) = {tuple(prefix_index.shape)}, "
                             f"got {tuple(prefix_weight.shape)}")
        if not prefix_weight.is_floating_point():
            raise ValueError(f"prefix_weight must be a floating tensor, got {prefix_weight.dtype}")
        if prefix_weight.device != q.device:
            raise ValueError(f"prefix_weight must be on q's device {q.device}, got {prefix_weight.device}")
    if prefix_lens is not None:
        if tuple(prefix_lens.shape) != (E,):
            raise ValueError(f"prefix_lens must have shape (E,) = ({E},), got {tuple(prefix_lens.shape)}")
        if prefix_lens.is_floating_point() or prefix_lens.dtype == torch.bool:
            raise ValueError(f"prefix_lens must be an integer tensor, got {prefix_lens.dtype}")
        if prefix_lens.device != q.device:
            raise ValueError(f"prefix_lens must be on q's device {q.device}, got {prefix_lens.device}")


def check_prefix_values(prefix_index, prefix_weight, prefix_lens, E: int, P: int,
                        names=("prefix_index", "prefix_weight", "prefix_lens")) -> None:
    """ValueError unless index in [-1, E), weight finite and >= 0, lens in [0, P] (any may be None).

    Reads the values back on the host (a device sync each on a GPU): call it where data enters,
    not per layer. `names` are the argument names the messages use (e.g. generate's expert_index)."""
    n_idx, n_w, n_lens = names
    if prefix_index is not None and prefix_index.numel():
        lo, hi = int(prefix_index.min()), int(prefix_index.max())
        if lo < -1 or hi >= E:
            raise ValueError(f"{n_idx} out of range: values must lie in [-1, E={E}), got [{lo}, {hi}]")
    if prefix_weight is not None and prefix_weight.numel() and \
            not bool(((prefix_weight >= 0) & (prefix_weight < math.inf)).all()):
        raise ValueError(f"{n_w} must be finite and >= 0 (w == 0 excludes a slot), got NaN/inf/negative values")
    if prefix_lens is not None and prefix_lens.numel():
        lo, hi = int(prefix_lens.min()), int(prefix_lens.max())
        if lo < 0 or hi > P:
            raise ValueError(f"{n_lens} out of range: values must lie in [0, P={P}], got [{lo}, {hi}]")


def _host_checks_allowed(q) -> bool:
    """Value checks on the host here: autograd on and no CUDA graph being captured (module docstring)."""
    if not torch.is_grad_enabled():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _values_on_device(q, prefix_index, prefix_weight, prefix_lens, E, P, backend):
    """The unchecked path: no host read; returns (prefix_index, prefix_lens) that cannot read out of
    bounds. The cpu backend's C++ glue checks the ranges itself."""
    if backend == "cpu":
        return prefix_index, prefix_lens
    if q.device.type == "cpu":     # synchronous on a CPU: a clear error, no Python-side host read
        if prefix_index.numel():
            torch._assert_async(((prefix_index >= -1) & (prefix_index < E)).all(),
                                f"prefix_index values must lie in [-1, E={E})")
        if prefix_lens is not None and prefix_lens.numel():
            torch._assert_async(((prefix_lens >= 0) & (prefix_lens <= P)).all(),
                                f"prefix_lens values must lie in [0, P={P}]")
        return prefix_index, prefix_lens
    return harmless_values(prefix_index, prefix_lens, E, P)


def harmless_values(prefix_index, prefix_lens, E: int, P: int):
    """No host read, graph-capturable: an index >= E becomes -1 (an empty slot; < 0 already is one)
    and lens are clamped to [0, P], so no kernel can read outside the pool [E, P, Hkv, D]."""
    prefix_index = torch.where(prefix_index < E, prefix_index, torch.full_like(prefix_index, -1))
    if prefix_lens is not None:
        prefix_lens = prefix_lens.clamp(0, P)
    return prefix_index, prefix_lens


# --------------------------------------------------------------------------------------------
# torch backend: SDPA (with the selected slots gathered when there are prefixes)
# --------------------------------------------------------------------------------------------
def _seq_mask(B, T, S, attention_mask, causal, device):
    """Boolean [B, 1, T, S]: padding and bottom-right causal masks (None if everything is visible)."""
    ok = None
    if attention_mask is not None:
        ok = attention_mask.bool().view(B, 1, 1, S)
    if causal:
        t = torch.arange(T, device=device).view(T, 1)
        s = torch.arange(S, device=device).view(1, S)
        c = (s <= S - T + t).view(1, 1, T, S)
        ok = c if ok is None else ok & c
    return ok


def _sdpa(q, k, v, mask, scale):
    """SDPA with GQA (heads expanded), a boolean or float mask; rows with no valid key give 0."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    gqa = Hq != Hkv and q.device.type == "cpu"
    if Hq != Hkv and not gqa:  # CUDA: expand the kv heads (not every masked SDPA kernel takes GQA)
        g = Hq // Hkv
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    # A row with no valid key: unmask it for SDPA (no NaN, in the output or the backward), then 0.
    if mask.dtype == torch.bool:
        valid = mask.any(-1, keepdim=True)
        mask = mask | ~valid
    else:
        valid = (mask > -math.inf).any(-1, keepdim=True)
        mask = torch.where(valid, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _torch_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
                   attention_mask, causal, scale):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    seq_ok = _seq_mask(B, T, S, attention_mask, causal, q.device)
    if prefix_index is None or prefix_index.shape[1] == 0:
        return _sdpa(q, k, v, seq_ok, scale)
    # The materialising baseline: gather the selected slots [B, Hkv, kk*P, D] and one SDPA call.
    E, P, Hkv, _ = prefix_k.shape
    kk = prefix_index.shape[1]
    idx = prefix_index.long()
    slot = idx.clamp(min=0).reshape(-1)
    pk = prefix_k.index_select(0, slot).view(B, kk * P, Hkv, D).transpose(1, 2)
    pv = prefix_v.index_select(0, slot).view(B, kk * P, Hkv, D).transpose(1, 2)
    lens = (torch.full((E,), P, device=q.device, dtype=torch.long) if prefix_lens is None
            else prefix_lens.long())
    tok_ok = (torch.arange(P, device=q.device) < lens[idx.clamp(min=0)].unsqueeze(-1)) \
        & (idx >= 0).unsqueeze(-1)                                                # [B, kk, P]
    w = (torch.ones(B, kk, device=q.device, dtype=torch.float32) if prefix_weight is None
         else prefix_weight)
    safe = torch.where(w > 0, w, torch.ones_like(w))
    logw = torch.where(w > 0, torch.log(safe), torch.full_like(w, -math.inf))
    pbias = torch.where(tok_ok, logw.unsqueeze(-1), torch.full_like(logw.unsqueeze(-1), -math.inf))
    pbias = pbias.reshape(B, 1, 1, kk * P).expand(B, 1, T, kk * P)
    sbias = torch.zeros(B, 1, T, S, device=q.device, dtype=pbias.dtype)
    if seq_ok is not None:
        sbias = sbias.masked_fill(~seq_ok, -math.inf)
    mask = torch.cat([pbias, sbias], dim=-1).to(q.dtype)
    return _sdpa(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), mask, scale)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# Decode (T = 1, no grad) on a GPU: which fused kernel runs when both can serve the call.
# AWAITS THE GPU RUN: this order is to be set by measurement, benchmarks/spec6.py timing both on
# SPEC §6's decode shape. Until then it follows the only measurement this repo has, the SASS of
# the two main loops (sm_90, fp16, D = 128; tests/test_sass_budget_attention.py), per 16 B of K/V
# against the 111-145 instructions an SM can issue at full HBM bandwidth: Triton's split kernel
# (tensor-core q.k^T and p.v for the whole GQA group, cp.async tiles) issues ~24 at any G <= 16;
# the CUDA kernel 36 at G = 1, 90 at G = 4, 164 at G = 8 (fp32 FMAs per query head).
DECODE_ORDER_CUDA = ("triton", "cuda")
_CUDA_DECODE_MAX_SLOTS = 64   # pamath::kMaxSlots: the packed-prefix table in shared memory


def _triton_kernel_case(q, has_prefix, grad, kk=0):
    D = q.shape[3]
    return (D & (D - 1)) == 0 and 16 <= D <= 128


def _cuda_kernel_case(q, has_prefix, grad, kk=0):
    return (not grad and q.shape[2] == 1 and q.shape[3] in (64, 128) and kk <= _CUDA_DECODE_MAX_SLOTS
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _backend.ext_has("prefix_attention_cuda"))


def _decode_choice(q, has_prefix, grad, kk):
    """GPU decode with no forced backend: the first of DECODE_ORDER_CUDA that can run the call
    (None where the table does not apply, or neither can)."""
    if q.device.type != "cuda" or q.shape[2] != 1 or grad or _backend.forced(_OP) is not None:
        return None
    case = {"cuda": _cuda_kernel_case, "triton": _triton_kernel_case}
    for b in DECODE_ORDER_CUDA:
        if case[b](q, has_prefix, grad, kk) and _backend.why_not(b, q.device, (b,)) is None:
            return b
    return None


def _triton_case(q, has_prefix, grad, kk=0):
    return _triton_kernel_case(q, has_prefix, grad, kk) and \
        _decode_choice(q, has_prefix, grad, kk) in (None, "triton")


def _cuda_case(q, has_prefix, grad, kk=0):
    return _cuda_kernel_case(q, has_prefix, grad, kk) and \
        _decode_choice(q, has_prefix, grad, kk) in (None, "cuda")


def _cpu_case(q, has_prefix, grad, kk=0):
    return not grad and q.shape[2] == 1 and _backend.ext_has("prefix_attention_cpu")


def _run_torch(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens, attention_mask,
               causal, scale):
    return _torch_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
                          attention_mask, causal, scale).to(q.dtype)


def _run_triton(*args):
    from ._prefix_attention_triton import prefix_attention_triton
    return prefix_attention_triton(*args)


def _extension_kernel(name):
    def run(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens, attention_mask,
            causal, scale):
        return getattr(_backend.extension(), name)(
            q, k, v, prefix_k, prefix_v, prefix_index,
            prefix_weight.float().contiguous() if prefix_weight is not None else None,
            prefix_lens, attention_mask, causal, scale)
    return run


_backend.register("prefix_attention", "triton", _run_triton, supports=_triton_case)
_backend.register("prefix_attention", "cuda", _extension_kernel("prefix_attention_cuda"), supports=_cuda_case)
_backend.register("prefix_attention", "cpu", _extension_kernel("prefix_attention_cpu"), supports=_cpu_case)
_backend.register("prefix_attention", "torch", _run_torch)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor],
                     prefix_index: Optional[torch.Tensor],
                     prefix_weight: Optional[torch.Tensor] = None, *,
                     prefix_lens: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None,
                     causal: bool = True, scale: Optional[float] = None) -> torch.Tensor:
    """Gated prefix attention, SPEC §1 (shapes in the module docstring). Returns q's dtype."""
    _check(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens, attention_mask)
    D = q.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    has_prefix = prefix_index is not None and prefix_index.shape[1] > 0 and prefix_k.shape[1] > 0
    if not has_prefix:
        prefix_k = prefix_v = prefix_index = prefix_weight = prefix_lens = None
    grad = _needs_grad(q, k, v, prefix_k, prefix_v, prefix_weight)
    args = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens, attention_mask, causal, scale)
    # CPU with no prefixes (HF calls this on every layer of a bare model): SDPA for prefill and
    # training; decode (T = 1, no grad) goes to the registry, whose C++ kernel is faster there
    # (`benchmarks/bench_prefix_attention.py --quick`, rows *_no_prefix, SmolLM2 heads, S=200:
    # 0.049 vs 0.160 ms at B=1, 0.234 vs 0.360 ms at B=8).
    if not has_prefix and q.device.type == "cpu" and _backend.forced(_OP) is None and (q.shape[2] > 1 or grad):
        return _run_torch(*args)
    kk = prefix_index.shape[1] if has_prefix else 0
    impl = _backend.dispatch(_OP, q.device, q, has_prefix, grad, kk)
    if has_prefix:       # values: checked on the host, or made harmless on the device (docstring)
        E, P = prefix_k.shape[0], prefix_k.shape[1]
        if _host_checks_allowed(q):
            check_prefix_values(prefix_index, prefix_weight, prefix_lens, E, P)
        else:
            prefix_index, prefix_lens = _values_on_device(q, prefix_index, prefix_weight, prefix_lens,
                                                          E, P, impl.backend)
            args = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens, attention_mask,
                    causal, scale)
    return impl.fn(*args)

"""One registry of backends per op, and the rule that picks one per call.

Backends, in the order tried:
    cuda    the compiled extension's CUDA kernels (mops_kernels._C built with CUDA), CUDA tensors
    triton  Triton kernels: CUDA tensors, or any tensor under TRITON_INTERPRET=1 (how CI runs them)
    cpu     the compiled extension's C++ kernels, CPU tensors
    torch   mops_kernels.reference (plain PyTorch), anywhere

Each op file registers its implementations next to the kernels, one line per backend:

    register("int4_matmul", "cpu", _forward_cpu, supports=_cpu_case, backward=_backward_cpu)

and calls `dispatch(op, device, *case)`, which returns the `Impl` (fn, backward) of the backend
that `pick` chose among those whose `supports(*case)` is true (no `supports`: every case). A new
backend for an op is that one registration; a new op also adds its name to OPS.

`MOPS_BACKEND` forces backends: `cpu` (every op), `int4_matmul:cpu,prefix_attention:torch` (per
op), or both (`cpu,gate_topk:torch`: the per-op entries win). A forced backend that cannot serve a
call raises the real reason (never a silent fallback), naming the op and the per-op form.
Without it, `pick` takes the first backend that is available, runs on the tensor's device and
supports the case; the choice is logged once per (op, backend). On CPU tensors the default order
is cpu, torch: the Triton interpreter is for proving kernels correct, not for speed.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

log = logging.getLogger("mops_kernels")

BACKENDS = ("cuda", "triton", "cpu", "torch")
OPS = ("prefix_attention", "gate_topk", "int4_matmul", "rational", "iapt_generate")


class BackendUnavailable(RuntimeError):
    """Raised when MOPS_BACKEND forces a backend that cannot serve the call."""


@lru_cache(maxsize=None)
def _extension():
    """(module or None, import error or None). Imported lazily: never at package import."""
    try:
        return importlib.import_module("mops_kernels._C"), None
    except Exception as e:  # missing toolchain at build time, ABI mismatch, ...
        return None, e


def extension():
    """The compiled extension module; raises the real import error if it is missing."""
    mod, err = _extension()
    if mod is None:
        raise BackendUnavailable(f"the compiled extension mops_kernels._C is not importable: {err!r}")
    return mod


def has_extension() -> bool:
    return _extension()[0] is not None


def ext_has(name: str) -> bool:
    mod, _ = _extension()
    return mod is not None and hasattr(mod, name)


def extension_has_cuda() -> bool:
    mod, _ = _extension()
    return mod is not None and bool(getattr(mod, "WITH_CUDA", False))


# The two variables every dispatch reads, straight from os.environ's own store: os.environ.get costs
# ~0.5 us for an unset variable (a KeyError inside), a tenth of a small decode GEMV; the store is
# what os.environ reads and writes (putenv included), so a value set at any time is seen at once.
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEYS = None
if isinstance(_ENV_STORE, dict) and hasattr(os.environ, "encodekey"):
    try:
        _ENV_KEYS = (os.environ.encodekey("MOPS_BACKEND"), os.environ.encodekey("TRITON_INTERPRET"))
    except Exception:
        _ENV_KEYS = None


def _dispatch_env() -> tuple:
    """(MOPS_BACKEND, TRITON_INTERPRET) as raw values (None when unset): a memo key, not for parsing."""
    if _ENV_KEYS is not None:
        return _ENV_STORE.get(_ENV_KEYS[0]), _ENV_STORE.get(_ENV_KEYS[1])
    env = os.environ
    return env.get("MOPS_BACKEND"), env.get("TRITON_INTERPRET")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return True
    except Exception:
        return False


@lru_cache(maxsize=None)
def parse_forced(spec: str) -> Tuple[Optional[str], Dict[str, str]]:
    """MOPS_BACKEND -> (global backend or None, {op: backend}); ValueError naming the bad entry."""
    default, per_op = None, {}
    for entry in (e.strip().lower() for e in spec.split(",")):
        if not entry:
            continue
        op, sep, name = entry.rpartition(":")
        if name not in BACKENDS:
            raise ValueError(f"MOPS_BACKEND: {entry!r} names no backend; each entry is a backend "
                             f"{BACKENDS} or op:backend with op in {OPS}")
        if not sep:
            if default is not None and default != name:
                raise ValueError(f"MOPS_BACKEND names two global backends ({default}, {name}): {spec!r}")
            default = name
        elif op not in OPS:
            raise ValueError(f"MOPS_BACKEND: unknown op {op!r} in {entry!r}; ops are {OPS}")
        else:
            per_op[op] = name
    return default, per_op


def forced(op: Optional[str] = None) -> Optional[str]:
    """The backend MOPS_BACKEND forces for `op` (per-op entry, else the global one), or None.

    Without `op`: the global backend when no per-op entry exists, else the whole setting (a caller
    that bypasses the registry must then ask per op)."""
    spec = os.environ.get("MOPS_BACKEND", "").strip()
    if not spec:
        return None
    default, per_op = parse_forced(spec)
    if op is None:
        return default if not per_op else spec.lower()
    return per_op.get(op, default)


def why_not(backend: str, device: torch.device, supported: Iterable[str]) -> Optional[str]:
    """None if `backend` can run here, else the reason it cannot."""
    if backend not in supported:
        return f"this op/case is not implemented by the {backend!r} backend (it has {tuple(supported)})"
    if backend == "torch":
        return None
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if device.type == "cuda" or triton_interpret():
            return None
        return f"triton needs a CUDA tensor (or TRITON_INTERPRET=1), got device {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got device {device}"
        if not has_extension():
            return f"the compiled extension is not importable: {_extension()[1]!r}"
        if not extension_has_cuda():
            return "the compiled extension was built without CUDA kernels"
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got device {device}"
        if not has_extension():
            return f"the compiled extension is not importable: {_extension()[1]!r}"
        return None
    return f"unknown backend {backend!r}"


_announced = set()


def _announce(op: str, backend: str, note: str = "") -> None:
    if (op, backend) not in _announced:
        _announced.add((op, backend))
        log.info("mops_kernels: %s runs on the %s backend%s", op, backend, note)


# --------------------------------------------------------------------------------------------
# The registry: op -> backend -> Impl, filled by the op files at import.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op. `supports(*case) -> bool` says which calls it
    takes (None: all); `backward` is the op's own backward where the op needs one per backend."""
    op: str
    backend: str
    fn: Callable
    supports: Optional[Callable[..., bool]] = None
    backward: Optional[Callable] = None


_REGISTRY: Dict[str, Dict[str, Impl]] = {}


def register(op: str, backend: str, fn: Callable, *, supports: Optional[Callable[..., bool]] = None,
             backward: Optional[Callable] = None) -> Callable:
    """Add (or replace) `backend`'s implementation of `op`. Returns fn (usable as a decorator body)."""
    if op not in OPS:
        raise ValueError(f"register: unknown op {op!r}; add it to _backend.OPS (ops are {OPS})")
    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(op, backend, fn, supports, backward)
    _picked.clear()
    return fn


def registered(op: str) -> Dict[str, Impl]:
    """backend -> Impl for `op` (empty until the op's module is imported)."""
    return dict(_REGISTRY.get(op, {}))


def dispatch(op: str, device: torch.device, *case) -> Impl:
    """The Impl that runs this call of `op`: `pick` over the registered backends whose
    `supports(*case)` holds.

    Fast path (every decode-step call goes through here): the backends that can run on this device
    at all, in pick's order (only the forced one under MOPS_BACKEND), are memoised with the picks;
    the first whose `supports` holds is the answer pick would give, so only those `supports` run.
    A call none of them takes, or a pick not yet announced, goes the slow way (its errors, its log)."""
    key = ("order", op, device.type, _dispatch_env())
    order = _picked.get(key)
    if order is None:
        order = _picked[key] = _candidates(op, device)
    for impl in order:
        if impl.supports is None or impl.supports(*case):
            if (op, impl.backend) in _announced:
                return impl
            break
    impls = _REGISTRY.get(op)
    if not impls:
        raise BackendUnavailable(f"no backend is registered for {op!r}")
    ok = tuple(b for b, i in impls.items() if i.supports is None or i.supports(*case))
    return impls[pick(op, device, ok)]


def _candidates(op: str, device: torch.device) -> tuple:
    """The Impls of `op` that can run on `device` (whatever the case), in the order `_pick` tries them."""
    impls = _REGISTRY.get(op, {})
    every = tuple(impls)
    f = forced(op)
    if f is not None:
        return (impls[f],) if f in impls and why_not(f, device, every) is None else ()
    order = BACKENDS if device.type == "cuda" else ("cpu", "torch")
    return tuple(impls[b] for b in order if b in impls and why_not(b, device, every) is None)


_picked = {}


def pick(op: str, device: torch.device, supported: Optional[Iterable[str]] = None) -> str:
    """The backend that runs `op` on `device`, given the backends that support this case (default:
    every registered one).

    Memoised on everything the answer depends on (the environment variables included), since
    hot paths call it for every op of every decode step."""
    supported = tuple(_REGISTRY.get(op, {}) if supported is None else supported)
    key = (op, device.type, supported, _dispatch_env())
    hit = _picked.get(key)
    if hit is not None:
        return hit
    _picked[key] = b = _pick(op, device, supported)
    return b


def _pick(op: str, device: torch.device, supported: tuple) -> str:
    f = forced(op)
    if f is not None:
        reason = why_not(f, device, supported)
        if reason is not None:
            alt = [b for b in ("cpu", "torch") if b != f and why_not(b, device, supported) is None]
            hint = (f"; force it per op instead, e.g. MOPS_BACKEND={f},{op}:{alt[-1]}" if alt else "")
            raise BackendUnavailable(f"MOPS_BACKEND={os.environ.get('MOPS_BACKEND', '').strip()} cannot run "
                                     f"{op} on the {f} backend: {reason}{hint}")
        _announce(op, f, " (forced by MOPS_BACKEND)")
        return f
    # On the CPU the interpreter is a correctness tool, far slower than C++ or PyTorch: Triton
    # runs CPU tensors only when forced (the tests do, with TRITON_INTERPRET=1).
    order = BACKENDS if device.type == "cuda" else ("cpu", "torch")
    skipped = []
    for b in order:
        reason = why_not(b, device, supported)
        if reason is None:
            _announce(op, b, f" (skipped: {'; '.join(skipped)})" if skipped else "")
            return b
        skipped.append(f"{b}: {reason}")
    raise BackendUnavailable(f"no backend can run {op} on {device}: {'; '.join(skipped)}")


def describe() -> dict:
    """What this installation can run: handy in bug reports and benchmark rows."""
    for op in OPS:                      # each op registers its backends when its file is imported
        importlib.import_module(f"mops_kernels.ops.{op}")
    mod, err = _extension()
    return {
        "extension": None if mod is None else getattr(mod, "__file__", "built"),
        "extension_error": None if err is None else repr(err),
        "extension_cuda": extension_has_cuda(),
        "cpu_isa": mod.cpu_isa() if mod is not None and hasattr(mod, "cpu_isa") else None,
        "triton": has_triton(),
        "triton_interpret": triton_interpret(),
        "forced": os.environ.get("MOPS_BACKEND") or None,
        "registered": {op: sorted(impls) for op, impls in sorted(_REGISTRY.items())},
        "cuda_available": torch.cuda.is_available(),
    }

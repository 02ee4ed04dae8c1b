"""One registry of backends, and the rule that picks one per call.

Backends, in the order tried:
    cuda    the compiled extension's CUDA kernels (mops_kernels._C built with CUDA), CUDA tensors
    triton  Triton kernels: CUDA tensors, or any tensor under TRITON_INTERPRET=1 (how CI runs them)
    cpu     the compiled extension's C++ kernels, CPU tensors
    torch   mops_kernels.reference (plain PyTorch), anywhere

`MOPS_BACKEND=cuda|triton|cpu|torch` forces one backend for every op; if it cannot serve a call
the real reason is raised (never a silent fallback). Without it, each op asks `pick(op, tensor,
supported)` for the first backend that is available, runs on the tensor's device and supports the
op (and the case: an op passes the backends that can take the given shapes/dtypes); the choice is
logged once per (op, backend). On CPU tensors the default order is cpu, torch: the Triton
interpreter is for proving kernels correct, not for speed.
"""
from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from typing import Iterable, Optional

import torch

log = logging.getLogger("mops_kernels")

BACKENDS = ("cuda", "triton", "cpu", "torch")


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


def forced() -> Optional[str]:
    name = os.environ.get("MOPS_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"MOPS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


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


_picked = {}


def pick(op: str, device: torch.device, supported: Iterable[str]) -> str:
    """The backend that runs `op` on `device`, given the backends that support this case.

    Memoised on everything the answer depends on (the environment variables included), since
    hot paths call it for every op of every decode step."""
    supported = tuple(supported)
    env = os.environ
    key = (op, device.type, supported, env.get("MOPS_BACKEND", ""), env.get("TRITON_INTERPRET", "0"))
    hit = _picked.get(key)
    if hit is not None:
        return hit
    _picked[key] = b = _pick(op, device, supported)
    return b


def _pick(op: str, device: torch.device, supported: tuple) -> str:
    f = forced()
    if f is not None:
        reason = why_not(f, device, supported)
        if reason is not None:
            raise BackendUnavailable(f"MOPS_BACKEND={f} cannot run {op}: {reason}")
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
    mod, err = _extension()
    return {
        "extension": None if mod is None else getattr(mod, "__file__", "built"),
        "extension_error": None if err is None else repr(err),
        "extension_cuda": extension_has_cuda(),
        "triton": has_triton(),
        "triton_interpret": triton_interpret(),
        "forced": os.environ.get("MOPS_BACKEND") or None,
        "cuda_available": torch.cuda.is_available(),
    }

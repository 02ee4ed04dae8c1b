"""triton, or a stand-in when it is not installed, so that kernel files import anywhere.

    from ._triton import triton, tl      # real modules when triton imports

Without triton, `triton.jit` leaves the function undecorated (it is never launched: the triton
backend then reports itself unavailable to `_backend.pick`), and any other attribute raises an
ImportError that says triton is missing. `tl.constexpr` only appears in annotations, which
`from __future__ import annotations` keeps as strings.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception as _err:  # noqa: BLE001 - any import failure means "no triton backend"
    class _Absent:
        def __init__(self, name):
            self._name = name

        def jit(self, fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, attr):
            raise ImportError(f"{self._name}.{attr} is unavailable: triton is not installed ({_err!r})")

    triton = _Absent("triton")
    tl = _Absent("triton.language")

__all__ = ["triton", "tl"]

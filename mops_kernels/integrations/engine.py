"""Moved: the Engine lives in mops_kernels.serving (this name is kept for old imports)."""
from ..serving.engine import Engine, Request, summarize  # noqa: F401

"""Moved to `mops_kernels.shipped` (the shipped bank is not part of training); kept importable here."""
from ..shipped import DATA, SHIPPED, load_shipped, shipped_info  # noqa: F401

__all__ = ["DATA", "SHIPPED", "load_shipped", "shipped_info"]

"""Helpers shared by the tests (import as `from utils import ...`)."""
import torch

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 if both are zero)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num if den == 0 else num / den


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so unwritten elements cannot pass."""
    return t.fill_(float("nan"))


def tol_ok(out: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype,
           fp32_tol: float = 1e-4) -> bool:
    """SPEC §6: fp32 rel. err <= fp32_tol; low precision within 2x plain PyTorch's error + 1e-5."""
    if torch.isnan(out).any():
        return False
    if dtype == torch.float32:
        return rel_err(out, ref) <= fp32_tol
    return rel_err(out, ref) <= 2 * rel_err(plain, ref) + 1e-5

"""Shared test set-up.

TRITON_INTERPRET=1 must be set before any @triton.jit kernel is defined (Triton reads it at
decoration time), so it is set here, before mops_kernels is imported. Tests that prove a backend
force it with the `backend` fixture (MOPS_BACKEND), so the dispatcher raises instead of falling back.
"""
import os

# MOPS_TEST_DEVICE=cuda (on a GPU machine, with TRITON_INTERPRET=0): every tensor a test makes without
# naming a device lands on the GPU (torch.set_default_device), so the kernel tests written for the CPU
# interpreter run the compiled Triton kernels and the CUDA extension instead.
TEST_DEVICE = os.environ.get("MOPS_TEST_DEVICE", "")
os.environ.setdefault("TRITON_INTERPRET", "0" if TEST_DEVICE.startswith("cuda") else "1")
# OpenMP workers that spin while waiting collapse when the cores are shared (CI runs other
# processes beside pytest): sleeping waiters cost little for the kernels' few-ms regions.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from mops_kernels import _backend  # noqa: E402

if TEST_DEVICE:
    torch.set_default_device(TEST_DEVICE)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """Every requires_cuda test also carries the `gpu` mark: `pytest -m gpu` selects exactly the
    tests that place tensors on a GPU (what scripts/gpu_run.sh runs there)."""
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == requires_cuda.kwargs["reason"]
               for m in item.iter_markers()):
            item.add_marker(pytest.mark.gpu)


def available_backends(device: str = "cpu"):
    """Backends that can run on `device` in this environment (capability, not runtime errors)."""
    dev = torch.device(device)
    out = []
    for b in _backend.BACKENDS:
        if _backend.why_not(b, dev, _backend.BACKENDS) is None:
            out.append(b)
    return out


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend('triton') -> every op in this test runs on that backend or raises."""
    def _force(name):
        monkeypatch.setenv("MOPS_BACKEND", name)
    return _force


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

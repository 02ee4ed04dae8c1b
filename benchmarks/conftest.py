"""pytest set-up of the benchmark suites (benchmarks/test_bench_*.py; not part of `pytest` alone:
pytest.ini's testpaths is tests/).

Makes `harness` (device name, versions) and the bench scripts' input builders importable, and gives
every benchmark the `record` fixture that fills `benchmark.extra_info` the same way.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]   # harness.py, and the package from a checkout

from harness import device_name, versions  # noqa: E402


@pytest.fixture(scope="session")
def run_info():
    """What every row carries about the machine and the software (computed once per session)."""
    return {"device": device_name("cpu"), "versions": versions(), "torch_threads": torch.get_num_threads(),
            **{v: os.environ.get(v, "unset") for v in ("MOPS_INT4_CPU_HELPERS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}}


@pytest.fixture
def record(benchmark, run_info):
    """record(group, provider, shapes, dtype, bytes=None, flops=None, backend=None) -> benchmark.

    Sets benchmark.group and extra_info (device, versions, shapes, dtype, the 1/5/15-minute load
    average when the case starts, the backend that ran), and after the timing adds GB/s and GFLOP/s
    from `bytes` and `flops` per call over the median (absent under --benchmark-disable)."""
    pending = {}

    def _record(group, provider, shapes, dtype, bytes=None, flops=None, backend=None):
        benchmark.group = group
        benchmark.extra_info.update(run_info)
        benchmark.extra_info.update(provider=provider, shapes=shapes, dtype=dtype, backend=backend,
                                    loadavg=list(os.getloadavg()), bytes=bytes, flops=flops)
        pending.update(bytes=bytes, flops=flops)
        return benchmark

    yield _record
    stats = getattr(benchmark, "stats", None)
    if stats:
        median = stats.stats.median
        if pending.get("bytes"):
            benchmark.extra_info["GB/s"] = pending["bytes"] / median / 1e9
        if pending.get("flops"):
            benchmark.extra_info["GFLOP/s"] = pending["flops"] / median / 1e9

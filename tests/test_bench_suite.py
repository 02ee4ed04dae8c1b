"""The pytest-benchmark suite (benchmarks/test_bench_ops.py) runs: every case once, untimed.

`pytest benchmarks/ --benchmark-only` is not part of the test run (pytest.ini: testpaths = tests);
this test runs the suite in a child pytest with --benchmark-disable (each benchmarked function is
called once, without timing), so each case's correctness check against mops_kernels.reference runs
here too, and a suite broken by a change in the ops fails CI instead of the next person who times it.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mops_kernels import _backend

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "test_bench_ops.py"


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("MOPS_BACKEND", None)          # the suite picks its backends per case
    env.pop("TRITON_INTERPRET", None)      # as a user runs it: tests/conftest.py sets it for the tests
    return subprocess.run([sys.executable, "-m", "pytest", str(SUITE), "-q", "-rs", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_benchmark_suite_runs_once_untimed():
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")
    n = 5 * 2 * 3 + 2 * 3 + 1      # 5 matrices x 2 token counts x 3 providers, 2 batches x 3 providers, 1 gate
    res = _run("--benchmark-disable")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    passed = int(re.search(r"(\d+) passed", res.stdout).group(1))
    skipped = re.search(r"(\d+) skipped", res.stdout)
    skipped = int(skipped.group(1)) if skipped else 0
    assert passed + skipped == n, out[-2000:]
    has_kernels = _backend.why_not("cpu", torch.device("cpu"), _backend.BACKENDS) is None
    # only the compiled-kernel rows may skip, and only where the extension is not built
    assert skipped == (0 if has_kernels else 5 * 2 + 2), out[-2000:]
    assert "benchmark '" not in res.stdout          # no table: nothing was timed

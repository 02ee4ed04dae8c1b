"""The README's main job runs: the demo on the embedded 4-bit SmolLM2, with MoPs routing."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_and_reports_routing_and_speed():
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MOPS_BACKEND", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "python", "demo.py"), "--batch", "2",
                        "--max-new-tokens", "4", "--no-baseline"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    from mops_kernels.shipped import shipped_info
    info = shipped_info()
    if info is None:   # no shipped bank in this checkout: the untrained one, labelled so
        assert out.count("gate chose: expert") == 2, out
        assert "UNTRAINED" in out
    else:              # the shipped bank asked one held-out example per task, reference beside it
        assert out.count("gate chose: expert") == len(info["examples"]) == len(info["tasks"]), out
        assert out.count("reference answer:") == len(info["examples"]), out
        assert out.count("without the bank:") == len(info["examples"]), out
        assert "the shipped bank" in out and "UNTRAINED" not in out
    assert "mops_kernels 4-bit (Engine):" in out and "tok/s decode" in out

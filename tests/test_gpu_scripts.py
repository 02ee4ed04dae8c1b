"""The prepared GPU session on the CPU: scripts/gpu_run.sh --dry-run runs every stage's plumbing
(env, the background build, the GPU-test selection, benchmarks/spec6.py --dry-run, bench_e2e on a
tiny model) and packs its results after every stage; a stage past its deadline loses nothing."""
import json
import os
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC6_FIGURES = ("ceiling: device copy", "ceiling: fp32 matmul", "correct: int4_matmul",
                 "correct: prefix_attention decode", "correct: prefix_attention prefill",
                 "int4_matmul 64x64 M=1: speed-up over", "int4_matmul 64x64 M=1: % of HBM",
                 "prefix decode", "prefix prefill", "e2e decode")


def _run(tmp_path, *args, **env):
    out = tmp_path / "out"
    e = {**os.environ, "OUT": str(out), **env}
    e.pop("MOPS_BACKEND", None)
    r = subprocess.run(["bash", "scripts/gpu_run.sh", "--dry-run", *args], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=900)
    return r, out


def _members(out):
    with tarfile.open(out / "gpu.tgz") as tf:
        return {m.name: tf.extractfile(m).read().decode() for m in tf.getmembers() if m.isfile()}


def test_gpu_run_dry_run_every_stage(tmp_path):
    before = sorted(os.listdir(os.path.join(ROOT, "benchmarks", "results")))
    r, out = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for st in ("env", "build", "tests_triton", "tests_cuda", "spec6", "e2e"):
        assert f"=== {st} rc=0" in summary, summary
    files = _members(out)
    logs = {os.path.basename(n) for n in files if "/logs/" in "/" + n}
    assert {"env.log", "build.log", "tests_triton.log", "tests_cuda.log", "spec6.log", "e2e.log"} <= logs
    # the test stages selected the GPU tests (skipped here for want of a GPU), nothing else
    for name in ("tests_triton.log", "tests_cuda.log"):
        log = next(v for k, v in files.items() if k.endswith(name))
        assert "skipped" in log and "passed" not in log and "failed" not in log, log[-2000:]
    table = [json.loads(l) for k, v in files.items() if k.endswith(".jsonl") and "/spec6-" in "/" + k
             for l in v.splitlines()]
    assert all(r["dry_run"] for r in table)
    for fig in SPEC6_FIGURES:
        assert any(r["figure"].startswith(fig) for r in table), fig
    bad = [r for r in table if r["status"] == "ERROR" or (r["figure"].startswith("correct") and
                                                           r["status"] not in ("PASS", "n/a"))]
    assert not bad, bad
    assert any(k.endswith(".md") and "| figure | value | target | PASS/FAIL | device |" in v for k, v in files.items())
    assert any("e2e_decode-" in k for k in files)
    env_log = next(v for k, v in files.items() if k.endswith("env.log"))
    for pkg in ("torch", "triton", "transformers", "peft"):
        assert any(line.startswith(pkg) and "MISSING" not in line for line in env_log.splitlines()), pkg
    assert sorted(os.listdir(os.path.join(ROOT, "benchmarks", "results"))) == before   # dry rows went elsewhere


def test_gpu_run_stage_past_its_deadline_is_recorded_and_packed(tmp_path):
    r, out = _run(tmp_path, "spec6", LIMIT_spec6="3")
    assert r.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "=== env rc=0" in summary and "=== spec6 rc=124" in summary and "TIMED OUT" in summary, summary
    assert "build" not in summary and "e2e" not in summary            # stages not asked for do not run
    assert any(k.endswith("spec6.log") for k in _members(out))


def test_spec6_refuses_unknown_stages():
    r = subprocess.run(["python3", "benchmarks/spec6.py", "--dry-run", "--stages", "nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "unknown stages" in r.stderr


def test_rotation_overflows_three_caches():
    """harness.rotation: the fewest input copies whose bytes exceed 3x the cache (L2 / LLC)."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from harness import cache_bytes, rotation
    cache = cache_bytes("cpu")
    for b in (1 << 10, 1 << 20, 7 << 20, cache * 5):
        n = rotation(b, "cpu", cap=1 << 30)
        assert n * b >= 3 * cache and (n == 1 or (n - 1) * b < 3 * cache), (b, n)
    assert rotation(1, "cpu", cap=64) == 64

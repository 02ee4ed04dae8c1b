"""The shared benchmark harness: providers side by side, medians with p20/p80, a roofline figure.

    from harness import Bench, rotation
    b = Bench("int4_matmul", device="cuda")
    n = rotation(bytes_per_call, "cuda")      # copies of the inputs so they exceed 3x the L2
    b.run("ours", fn, shapes=dict(M=1, N=4096, K=4096), dtype="bf16", bytes=..., flops=...)
    b.summary()

How a sample is timed (`time_calls`; the row's "timing" field says which was used):
  - CUDA, graph=None/True: after warm-up, `calls` calls of fn are captured in ONE CUDA graph and
    each sample is one replay between two events, divided by `calls`. So a sample is GPU time of
    many back-to-back kernels, not Python dispatch plus one kernel (an event pair around a single
    Python call mostly measures the host when the kernel takes a few microseconds). `calls` is
    chosen so a replay lasts >= ~2 ms, and is at least `copies`, so that when fn rotates over
    `copies` input copies (sized with `rotation`: their bytes exceed 3x the L2) every replay
    reads them all from HBM. If the capture fails (fn syncs or reads values on the host), the
    sample is `calls` eager calls between two events, with no sync between them ("eager").
  - CUDA, graph=False: the same eager loop (for callers whose fn is itself a whole step with host
    work, e.g. an Engine decode step, which uses its own CUDA graph inside).
  - CPU: time.perf_counter around `calls` calls (default 1: per call).
Each row records the median and 20th/80th percentiles in ms per call, GB/s (`bytes` / median) and
TFLOP/s (`flops` / median) when given, the peak device memory on CUDA, and is appended as one JSON
line (device, versions, shapes, dtype, timing) to `benchmarks/results/<name>-<device-slug>.jsonl`
as soon as it is measured, so a run cut short keeps every row it finished.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import torch

# MOPS_BENCH_RESULTS moves every row elsewhere (scripts/gpu_run.sh --dry-run keeps the repo's clean)
RESULTS_DIR = os.environ.get("MOPS_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "results")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} x{torch.get_num_threads()} threads"


def source_commit() -> Optional[str]:
    """The repository's HEAD commit, "+dirty" when tracked files differ from it (the row then timed
    code no commit holds), or None outside a git checkout."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "commit": source_commit()}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    try:
        import mops_kernels
        out["mops_kernels"] = mops_kernels.__version__
        out["backends"] = mops_kernels.backend_info()
    except Exception as e:  # the harness also times code outside the package
        out["mops_kernels"] = f"unavailable: {e!r}"
    return out


def _percentile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cache_bytes(device: str) -> int:
    """The cache a rotation must overflow: the GPU's L2, or the CPU's last-level cache (sysfs;
    32 MiB if it cannot be read)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                txt = f.read().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 * 2**20


def rotation(bytes_per_call: int, device: str, factor: float = 3.0, cap: int = 256) -> int:
    """How many distinct copies of a call's inputs make their bytes exceed `factor` x the cache
    (give the bytes the kernel really reads: for int4 weights the packed codes + scales)."""
    return max(1, min(cap, math.ceil(factor * cache_bytes(device) / max(1, bytes_per_call))))


def _event_ms(work: Callable[[], object]) -> float:
    """GPU milliseconds of work() between two CUDA events (no sync inside work)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    work()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def _loop(fn, n):
    def work():
        for _ in range(n):
            fn()
    return work


def time_calls(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 20,
               graph: Optional[bool] = None, calls: Optional[int] = None, copies: int = 1,
               target_ms: float = 2.0, max_calls: int = 2000):
    """(per-call times in ms, one per sample; timing method; calls per sample). See the module
    docstring. Warm-up is excluded."""
    if not str(device).startswith("cuda"):
        _loop(fn, warmup)()
        calls = calls or 1
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _loop(fn, calls)()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
        return times, f"cpu perf_counter x{calls}", calls
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm-up off the default stream (as capture wants)
        _loop(fn, max(warmup, 1))()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if calls is None:                              # size a sample from an eager estimate
        n = max(copies, 4)
        per = max(_event_ms(_loop(fn, n)) / n, 1e-4)
        calls = int(min(max_calls, max(copies, math.ceil(target_ms / per))))
        calls = max(copies, math.ceil(calls / copies) * copies)   # whole rotations
    if graph is not False:
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                _loop(fn, calls)()
        except Exception as exc:                   # fn syncs / reads values: time it eagerly
            print(f"  (CUDA graph capture failed, timing eagerly: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160]})", flush=True)
            torch.cuda.synchronize()
            g = None
        if g is not None:
            g.replay()
            torch.cuda.synchronize()
            times = [_event_ms(g.replay) / calls for _ in range(reps)]
            del g
            return times, f"cuda graph x{calls}", calls
    times = [_event_ms(_loop(fn, calls)) / calls for _ in range(reps)]
    return times, f"eager events x{calls}", calls


class Bench:
    def __init__(self, name: str, device: str = "cpu", results_dir: Optional[str] = None,
                 save: bool = True):
        self.name = name
        self.device = device
        self.device_name = device_name(device)
        self.versions = versions()
        self.rows = []
        self.save = save
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.device_name).strip("-").lower()
        self.path = os.path.join(results_dir or RESULTS_DIR, f"{name}-{slug}.jsonl")
        self.command = " ".join([os.path.basename(sys.executable)] + sys.argv)
        self.stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def run(self, provider: str, fn: Callable[[], object], *, shapes: dict, dtype: str,
            bytes: Optional[int] = None, flops: Optional[int] = None, warmup: int = 3,
            reps: int = 20, note: str = "", graph: Optional[bool] = None, copies: int = 1,
            calls: Optional[int] = None) -> dict:
        """Time fn (see time_calls: graph, copies = how many input copies fn rotates over, calls)
        and append its row."""
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, timing, calls = time_calls(fn, self.device, warmup=warmup, reps=reps, graph=graph,
                                          calls=calls, copies=copies)
        med = statistics.median(times)
        row = {
            "bench": self.name, "provider": provider, "shapes": shapes, "dtype": dtype,
            "median_ms": med, "p20_ms": _percentile(times, 0.2), "p80_ms": _percentile(times, 0.8),
            "reps": len(times), "timing": timing, "copies": copies,
            "gbps": None if bytes is None else bytes / (med * 1e-3) / 1e9,
            "tflops": None if flops is None else flops / (med * 1e-3) / 1e12,
            "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "device": self.device_name, "versions": self.versions, "command": self.command,
            "time": self.stamp, "note": note,
        }
        self.rows.append(row)
        print(self._fmt(row), flush=True)
        if self.save:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    @staticmethod
    def _fmt(row: dict) -> str:
        shp = ",".join(f"{k}={v}" for k, v in row["shapes"].items())
        extra = ""
        if row["gbps"] is not None:
            extra += f"  {row['gbps']:8.1f} GB/s"
        if row["tflops"] is not None:
            extra += f"  {row['tflops']:8.3f} TFLOP/s"
        return (f"{row['bench']:<18} {row['provider']:<22} {row['dtype']:<5} {shp:<40} "
                f"median {row['median_ms']:9.4f} ms  [p20 {row['p20_ms']:.4f}, p80 {row['p80_ms']:.4f}]"
                + extra)

    def summary(self, baseline: Optional[str] = None) -> None:
        """Print every row, and each provider's speed-up over `baseline` for the same shapes."""
        print(f"\n== {self.name} on {self.device_name} ==")
        for r in self.rows:
            print(self._fmt(r))
        if baseline:
            print(f"\nspeed-up over {baseline} (median / median):")
            base = {json.dumps(r["shapes"], sort_keys=True) + r["dtype"]: r["median_ms"]
                    for r in self.rows if r["provider"] == baseline}
            for r in self.rows:
                key = json.dumps(r["shapes"], sort_keys=True) + r["dtype"]
                if r["provider"] != baseline and key in base:
                    print(f"  {r['provider']:<22} {r['dtype']:<5} "
                          f"{','.join(f'{k}={v}' for k, v in r['shapes'].items()):<40} "
                          f"{base[key] / r['median_ms']:6.2f}x")
        if self.save:
            print(f"rows appended to {os.path.relpath(self.path)}")

"""The shared benchmark harness: providers side by side, medians with p20/p80, a roofline figure.

    from harness import Bench
    b = Bench("int4_matmul", device="cuda")
    b.run("ours", fn, shapes=dict(M=1, N=4096, K=4096), dtype="bf16", bytes=..., flops=...)
    b.summary()

Each `run` times `fn()` after warm-up (excluded), `reps` times: with CUDA events on a GPU,
`time.perf_counter` around a synchronised call on the CPU. It records the median and the 20th/80th
percentiles in ms, GB/s (`bytes` / median) and TFLOP/s (`flops` / median) when given, the peak
device memory on CUDA, and appends one JSON row (with device, versions, shapes, dtype) to
`benchmarks/results/<name>-<device-slug>.jsonl`, so anyone can rerun the command and compare.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
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


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 20,
            min_time_s: float = 0.0) -> list:
    """Per-call times in ms (warm-up excluded)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time_s:
        if cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * reps:
            break
    return times


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
            reps: int = 20, note: str = "") -> dict:
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = time_fn(fn, self.device, warmup=warmup, reps=reps)
        med = statistics.median(times)
        row = {
            "bench": self.name, "provider": provider, "shapes": shapes, "dtype": dtype,
            "median_ms": med, "p20_ms": _percentile(times, 0.2), "p80_ms": _percentile(times, 0.8),
            "reps": len(times),
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

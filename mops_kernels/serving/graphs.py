"""CUDA graphs of the decode step, one per row bucket (1, 2, 4, ... max_batch rows, all max_len columns).

Capture runs two warm-up steps on a side stream (allocations happen outside the graph), then records
one step. Warm-up and capture write the cache (mask, lens, K, V at each row's next position), so the
cache's decode state is cloned first and restored in `finally`: whether the capture succeeds or raises,
the cache is as it was, and a failed capture leaves the eager path decoding on an uncorrupted cache
(tests/test_serving.py forces that failure). Capture needs compute capability >= 7.0; on failure the
Engine stays eager and says why.
"""
from __future__ import annotations

import warnings


def bucket(n: int, max_batch: int) -> int:
    """The smallest power of two >= n, capped at max_batch."""
    m = 1
    while m < n:
        m *= 2
    return min(m, max_batch)


class DecodeGraphs:
    """Replays a captured `step(m, max_len)` for n <= m rows; `enabled` False: the caller runs eagerly."""

    def __init__(self, step, cache, max_batch: int, max_len: int, enabled: bool):
        self.step, self.cache = step, cache
        self.max_batch, self.max_len = max_batch, max_len
        self.enabled = enabled
        self.graphs = {}

    def __call__(self, n: int):
        """Logits [n, V] by replay, or None when capture failed (then `enabled` is False)."""
        m = bucket(n, self.max_batch)
        if m not in self.graphs:
            try:
                self.graphs[m] = self.capture(m)
            except Exception as e:                          # capture unsupported by some op: stay eager
                warnings.warn(f"Engine: CUDA graph capture failed ({e!r}); decoding eagerly")
                self.enabled = False
                return None
        g, out = self.graphs[m]
        g.replay()
        return out[:n]

    def warm_up(self, m: int) -> None:
        """Two eager steps of m rows (on a side stream on CUDA): allocations happen before capture."""
        import torch
        if self.cache.mask.device.type != "cuda":
            for _ in range(2):
                self.step(m, self.max_len)
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step(m, self.max_len)
        torch.cuda.current_stream().wait_stream(s)

    def record(self, m: int):
        import torch
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self.step(m, self.max_len)
        return g, out

    def capture(self, m: int):
        state = self.cache.decode_state()
        saved = [t.clone() for t in state]
        try:
            self.warm_up(m)
            return self.record(m)
        finally:                                             # undo warm-up / capture writes, always
            for dst, src in zip(state, saved):
                dst.copy_(src)

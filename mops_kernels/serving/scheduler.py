"""Requests, slots and admission: the bookkeeping half of continuous batching (no tensors).

A `Request` is one prompt being answered; the `Scheduler` owns the queue of waiting requests and
the `max_batch` slots (row b of the Engine's static cache belongs to slots[b] while it runs).
Slots are handed out lowest first, so the rows the decode step must run (0 .. highest busy) stay
few; a request leaves its slot the moment it is done, failed or cancelled.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, List, Optional


class QueueFull(RuntimeError):
    """submit() with `max_waiting` requests already queued (the server answers 429)."""


class Request:
    """One generation request and its output.

    Inputs: `ids` [T] prompt token ids, `max_new_tokens` (0: prefill only, e.g. to score the prompt),
    `expert_index` / `expert_weight` [1, k] as submitted (None: the gate picks), `sampler` (None:
    greedy), `stop` (a sampling.StopStrings or None), `logprobs` (None, or k: record each new token's
    log-probability and the k best), `prompt_logprobs` (likewise for the prompt's tokens).

    Output: `tokens`, `done`, `finish_reason` ("length", "eos", "stop", "cancelled" or "error"),
    `error` (the exception that ended it), `experts` = (slots, weights) that served it (the gate's
    choice or the named ones, numbered within its prompt set when it has one; None without a bank), `token_logprobs` / `prompt_token_logprobs`
    (one (logprob, {token: logprob of the k best}) per token; the prompt's first token has None),
    `stop_string` (the stop string that ended it), and the time of submit and of every token."""

    def __init__(self, rid, ids, expert_index=None, expert_weight=None, max_new_tokens=32,
                 on_token: Optional[Callable] = None, sampler=None, stop=None, logprobs=None,
                 prompt_logprobs=None):
        self.id, self.ids, self.max_new_tokens, self.on_token = rid, ids, max_new_tokens, on_token
        self.expert_index, self.expert_weight = expert_index, expert_weight
        self.prompt_set = None          # the PromptSets member it uses (Engine.submit(prompt_set=))
        self.position_offset = 0        # its position shift (PEFT prefix tuning), set by Engine.submit
        self.sampler, self.stop = sampler, stop
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.tokens: List[int] = []
        self.token_logprobs: list = []
        self.prompt_token_logprobs: Optional[list] = None
        self.experts = None
        self.slot: Optional[int] = None
        self.done = False
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.stop_string: Optional[str] = None
        self.t_submit = time.perf_counter()
        self.t_tokens: List[float] = []

    @property
    def ttft(self):
        """Seconds from submit to the first token."""
        return self.t_tokens[0] - self.t_submit if self.t_tokens else None

    @property
    def token_latencies(self):
        """Seconds between consecutive tokens after the first."""
        return [b - a for a, b in zip(self.t_tokens, self.t_tokens[1:])]

    def __repr__(self):
        return (f"Request(id={self.id}, prompt={self.ids.numel()} tokens, {len(self.tokens)} new, "
                f"slot={self.slot}, finish_reason={self.finish_reason})")


class Scheduler:
    """The waiting queue (at most `max_waiting`, None: unbounded) and the slots."""

    def __init__(self, max_batch: int, max_waiting: Optional[int] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.slots: List[Optional[Request]] = [None] * max_batch
        self.waiting: deque = deque()
        self.max_waiting = max_waiting

    def enqueue(self, req: Request) -> None:
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue holds {len(self.waiting)} waiting requests (max_waiting="
                            f"{self.max_waiting}); retry later")
        self.waiting.append(req)

    def admit(self) -> List[Request]:
        """Move waiting requests into free slots (lowest first); returns the admitted ones."""
        new = []
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            req.slot = self.slots.index(None)
            self.slots[req.slot] = req
            new.append(req)
        return new

    def release(self, req: Request) -> Optional[int]:
        """Take `req` out of its slot or the queue; returns the slot it held (None if it held none)."""
        b = req.slot
        if b is not None and self.slots[b] is req:
            self.slots[b] = None
            return b
        try:
            self.waiting.remove(req)
        except ValueError:
            pass
        return None

    def busy(self) -> List[int]:
        return [b for b, s in enumerate(self.slots) if s is not None]

    def idle(self) -> bool:
        return not self.waiting and all(s is None for s in self.slots)


def summarize(requests):
    """Latency stats over finished requests: mean TTFT (ms), median per-token latency (ms), tokens."""
    ttft = [r.ttft for r in requests if r.ttft is not None]
    lat = sorted(x for r in requests for x in r.token_latencies)
    return {
        "requests": len(requests),
        "tokens": sum(len(r.tokens) for r in requests),
        "ttft_ms_mean": 1e3 * sum(ttft) / max(1, len(ttft)),
        "token_ms_p50": 1e3 * lat[len(lat) // 2] if lat else None,
        "token_ms_p90": 1e3 * lat[int(len(lat) * 0.9)] if lat else None,
    }

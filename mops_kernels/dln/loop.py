"""DLN-1 and DLN-2: prompt learning by proposing and scoring (microsoft/deep-language-networks,
projects/vi_dln/vi_main.py and dln/vi/model.py, re-written for in-process scoring).

DLN-1 (`DLN1.fit`), per iteration t = 0..iters:
  - dev accuracy of the current prompt when t == 0 or t % val_freq == 0 (and at t == iters); a new
    best dev accuracy keeps the prompt as `best` (and in the memory of the `memory` best prompts),
    patience 0; otherwise patience += 1 and, when tolerance >= 0 and patience >= tolerance, the current
    prompt goes back to `best` (patience reload). The loop stops after the evaluation at t == iters;
  - a batch of `batch_size` training examples, balanced over the classes (DLN's sampler, numpy
    RandomState(seed));
  - the current prompt's predictions on the batch; `num_candidates - 1` proposals from the backward
    template (the student's successes and errors, one of DLN's four rewrite instructions per proposal,
    cycled; with held_out_half each proposal sees a random half of the batch), written by the
    proposer from [current] + memory;
  - every candidate (current first, then memory, then proposals, duplicates dropped) scored on the
    whole batch: the mean log-probability of the right class; the argmax wins, so a tie keeps the
    current prompt.
The test accuracy is that of the best-dev prompt. Every prompt carries the name of whoever wrote it
("init", a proposer's name, "memory" never: memory holds prompts that already have an author).

The scorer is anything with `class_logprobs(prompts, inputs, classes) -> [P, I, C]` (PromptScorer, or
a fake in tests); the proposer anything with `name` and `generate(texts, seed, max_new_tokens, stop)`.
State (`state_dict` / `load_state_dict`) is plain JSON, so a run resumes where it stopped.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import templates as T


def _rng_state(rng: np.random.RandomState):
    s = rng.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _set_rng_state(rng: np.random.RandomState, s):
    rng.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def balanced_batch(labels: Sequence[int], size: int, rng: np.random.RandomState) -> List[int]:
    """DLN's balanced sampler (dln/dataset.py get_batch): a permuted pool per class, classes visited in
    a permuted order, one example at a time."""
    per_class = defaultdict(list)
    for i, y in enumerate(labels):
        per_class[y].append(i)
    keys = sorted(per_class)
    pools = {k: list(rng.permutation(per_class[k])) for k in keys}
    order = list(rng.permutation(keys))
    out, i = [], 0
    if size > len(labels):
        raise ValueError(f"batch_size {size} > {len(labels)} training examples")
    while len(out) < size:
        k = order[i % len(order)]
        if pools[k]:
            out.append(int(pools[k].pop(0)))
        i += 1
    return out


class DLN1:
    """One-layer DLN (module docstring). rows: dicts with "input" and "label" (class index)."""

    def __init__(self, scorer, proposer, classes: Sequence[str], *, num_candidates: int = 5, batch_size: int = 20,
                 iters: int = 10, val_freq: int = 2, memory: int = 2, tolerance: int = -1,
                 held_out_half: bool = True, seed: int = 0, max_new_tokens: int = 96,
                 names: Optional[Sequence[str]] = None, log: Optional[Callable[[dict], None]] = None):
        if num_candidates < 1 or batch_size < 1 or iters < 0 or val_freq < 1 or memory < 0:
            raise ValueError("num_candidates, batch_size, val_freq must be >= 1; iters, memory >= 0")
        self.scorer, self.proposer, self.classes = scorer, proposer, list(classes)
        self.num_candidates, self.batch_size, self.iters, self.val_freq = num_candidates, batch_size, iters, val_freq
        self.memory_size, self.tolerance, self.held_out_half = memory, tolerance, held_out_half
        self.seed, self.max_new_tokens, self.log = seed, max_new_tokens, log
        # how a class is written in the backward template (the task's targets, e.g. "(A)")
        self.names = list(names) if names is not None else [c.split("|")[0] for c in self.classes]
        if len(self.names) != len(self.classes):
            raise ValueError(f"names must have one entry per class ({len(self.classes)}), got {len(self.names)}")
        self.train_rng = np.random.RandomState(seed)
        self.state = None

    # ---------------------------------------------------------------- evaluation
    def predict(self, prompt: str, rows: Sequence[dict]) -> torch.Tensor:
        """Predicted class per row (argmax of the class log-probabilities)."""
        if not rows:
            return torch.zeros(0, dtype=torch.long)
        return self.scorer.class_logprobs([prompt], [r["input"] for r in rows], self.classes)[0].argmax(-1)

    def accuracy(self, prompt: str, rows: Sequence[dict]) -> float:
        pred = self.predict(prompt, rows)
        return float((pred == torch.tensor([r["label"] for r in rows])).float().mean()) if rows else 0.0

    # ---------------------------------------------------------------- state
    def init_state(self, prompt: str, author: str = "init") -> dict:
        self.train_rng = np.random.RandomState(self.seed)
        self.state = dict(t=0, current=prompt, author={prompt: author}, best=prompt, best_dev=-1.0,
                          memory=[], patience=0, log=[], done=False, rng=_rng_state(self.train_rng))
        return self.state

    def state_dict(self) -> dict:
        self.state["rng"] = _rng_state(self.train_rng)
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state
        _set_rng_state(self.train_rng, state["rng"])

    # ---------------------------------------------------------------- the loop
    def _validate(self, dev, entry):
        s = self.state
        acc = self.accuracy(s["current"], dev)
        entry["dev_acc"] = acc
        if acc > s["best_dev"]:
            s["best_dev"], s["best"], s["patience"] = acc, s["current"], 0
            if self.memory_size:
                mem = [m for m in s["memory"] if m[0] != s["current"]] + [[s["current"], acc]]
                s["memory"] = sorted(mem, key=lambda m: -m[1])[:self.memory_size]
        else:
            s["patience"] += 1
            if self.tolerance >= 0 and s["patience"] >= self.tolerance:
                s["current"], s["patience"] = s["best"], 0
                entry["reloaded"] = s["best"]

    def _propose(self, prompts_from: List[str], x, y_names, yhat_names, losses, t) -> List[str]:
        n = self.num_candidates - 1
        texts = []
        infos = [T.Info(xi, oi, yi, li) for xi, oi, yi, li in zip(x, yhat_names, y_names, losses)]
        for i in range(n):
            idx = self.train_rng.permutation(len(infos))
            if self.held_out_half:
                idx = idx[:max(1, len(infos) // 2)]
            texts.append(T.backward(prompts_from[i % len(prompts_from)], [infos[j] for j in idx],
                                    T.MESSAGES[i % len(T.MESSAGES)]))
        if not texts:
            return []
        return self.proposer.generate(texts, seed=self.seed * 100003 + t, max_new_tokens=self.max_new_tokens,
                                      stop=T.STOP)

    def step(self, train, dev) -> dict:
        """One iteration (module docstring); returns its log entry."""
        s = self.state
        t = s["t"]
        entry = dict(t=t, current=s["current"])
        if t == 0 or t % self.val_freq == 0 or t == self.iters:
            self._validate(dev, entry)
        if t == self.iters:
            s["done"] = True
            s["log"].append(entry)
            if self.log:
                self.log(entry)
            return entry
        batch = balanced_batch([r["label"] for r in train], self.batch_size, self.train_rng)
        rows = [train[i] for i in batch]
        x = [r["input"] for r in rows]
        y = torch.tensor([r["label"] for r in rows])
        pred = self.predict(s["current"], rows)
        losses = (pred != y).float().tolist()
        names = self.names
        memory = [m[0] for m in s["memory"]]
        proposals = self._propose([s["current"]] + memory, x, [names[i] for i in y.tolist()],
                                  [names[i] for i in pred.tolist()], losses, t)
        for p in proposals:
            s["author"].setdefault(p, self.proposer.name)
        cands = list(dict.fromkeys([s["current"]] + memory + proposals))
        lp = self.scorer.class_logprobs(cands, x, self.classes)                    # [P, B, C]
        score = lp.gather(2, y.view(1, -1, 1).expand(len(cands), -1, 1)).squeeze(2).mean(1)  # [P]
        best = int(torch.argmax(score))           # first maximum: a tie keeps the current prompt
        entry.update(batch_acc=1.0 - float(np.mean(losses)), candidates=cands, scores=score.tolist(),
                     chosen=cands[best], author=s["author"][cands[best]])
        s["current"] = cands[best]
        s["t"] = t + 1
        s["log"].append(entry)
        if self.log:
            self.log(entry)
        return entry

    def fit(self, train: Sequence[dict], dev: Sequence[dict], init_prompt: str = "",
            on_step: Optional[Callable[[dict], None]] = None) -> dict:
        """Run (or continue, after load_state_dict) to the end; returns {"prompt", "author", "dev_acc"}."""
        if self.state is None:
            self.init_state(init_prompt)
        while not self.state["done"]:
            self.step(train, dev)
            if on_step:
                on_step(self.state_dict())
        s = self.state
        return dict(prompt=s["best"], author=s["author"].get(s["best"], "init"), dev_acc=s["best_dev"])

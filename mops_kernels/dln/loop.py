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

    def _proposals(self, prompts_from: List[str], infos: List[T.Info], seed: int) -> List[str]:
        """num_candidates - 1 proposals: proposal i rewrites prompts_from[i % len] with DLN's i-th (cycled)
        rewrite instruction, shown a random half (held_out_half) or all of the batch in random order."""
        texts = []
        for i in range(self.num_candidates - 1):
            idx = self.train_rng.permutation(len(infos))
            if self.held_out_half:
                idx = idx[:max(1, len(infos) // 2)]
            texts.append(T.backward(prompts_from[i % len(prompts_from)], [infos[j] for j in idx],
                                    T.MESSAGES[i % len(T.MESSAGES)]))
        if not texts:
            return []
        return self.proposer.generate(texts, seed=seed, max_new_tokens=self.max_new_tokens, stop=T.STOP)

    def _record(self, entry: dict) -> dict:
        self.state["log"].append(entry)
        if self.log:
            self.log(entry)
        return entry

    def _begin(self, train, dev):
        """The start both loops share: validation on schedule, the end of the run, this iteration's
        balanced batch. -> (entry, rows), rows None when the run just ended (entry recorded)."""
        s = self.state
        t = s["t"]
        entry = dict(t=t, current=s["current"])
        if t == 0 or t % self.val_freq == 0 or t == self.iters:
            self._validate(dev, entry)
        if t == self.iters:
            s["done"] = True
            return self._record(entry), None
        batch = balanced_batch([r["label"] for r in train], self.batch_size, self.train_rng)
        return entry, [train[i] for i in batch]

    def step(self, train, dev) -> dict:
        """One iteration (module docstring); returns its log entry."""
        entry, rows = self._begin(train, dev)
        if rows is None:
            return entry
        s = self.state
        t = s["t"]
        x = [r["input"] for r in rows]
        y = torch.tensor([r["label"] for r in rows])
        pred = self.predict(s["current"], rows)
        losses = (pred != y).float().tolist()
        names = self.names
        memory = [m[0] for m in s["memory"]]
        infos = [T.Info(xi, names[o], names[yi], li) for xi, o, yi, li in zip(x, pred.tolist(), y.tolist(), losses)]
        proposals = self._proposals([s["current"]] + memory, infos, self.seed * 100003 + t)
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
        return self._record(entry)

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


class DLN2(DLN1):
    """Two-layer DLN: a hidden layer writes thoughts h = forward_gen(hidden_forward(p1, x)) ("Let's think
    step by step", greedy), the output layer classifies residual(x, h) with p2.

    Per training iteration (dln/vi/model.py inference_vi, simplified where said):
      - posterior samples of h for each example: the forward h plus `num_h_samples - 1` rewrites by the
        proposer from hidden_backward(p2, x, h, y) (DLN's suffix_backward_h_np_y);
      - their weights w[b, k] = softmax_k log p(y_b | residual(x_b, h_bk), p2) (the output layer's
        likelihood; DLN's optional prior term log p(h | x, p1) is left out);
      - p1 proposals from the backward template (target: the best-weighted h), each candidate scored by
        the ELBO term sum_k w[b, k] log p(h_bk | x_b, p1) (target_logprobs, mean over the batch);
      - p2 proposals likewise (inputs residual(x, h_best)), scored by sum_k w[b, k] log p(y_b | residual(x_b,
        h_bk), p2); each layer keeps its argmax (index 0 = its current prompt: ties keep it).
    Prompts are the pair (p1, p2), kept in the state as "p1 \\x1e p2" strings so DLN1's memory, patience
    and resume logic applies unchanged."""

    SEP = "\x1e"

    def __init__(self, scorer, proposer, forward_gen, classes, *, num_h_samples: int = 2, hidden_tokens: int = 48,
                 **kw):
        super().__init__(scorer, proposer, classes, **kw)
        if num_h_samples < 1:
            raise ValueError(f"num_h_samples must be >= 1, got {num_h_samples}")
        self.forward_gen, self.num_h_samples, self.hidden_tokens = forward_gen, num_h_samples, hidden_tokens
        self._hidden: Dict[tuple, str] = {}

    def split(self, pair: str):
        p1, _, p2 = pair.partition(self.SEP)
        return p1, p2

    def join(self, p1: str, p2: str) -> str:
        return f"{p1}{self.SEP}{p2}"

    def hidden(self, p1: str, xs: Sequence[str]) -> List[str]:
        """The hidden layer's thoughts for each input (greedy, cached per (p1, x))."""
        todo = [x for x in dict.fromkeys(xs) if (p1, x) not in self._hidden]
        if todo:
            outs = self.forward_gen.generate([T.hidden_forward(p1, x) for x in todo], seed=0,
                                             max_new_tokens=self.hidden_tokens, stop=("\n\n",))
            self._hidden.update({(p1, x): h for x, h in zip(todo, outs)})
        return [self._hidden[(p1, x)] for x in xs]

    def predict(self, pair: str, rows: Sequence[dict]) -> torch.Tensor:
        if not rows:
            return torch.zeros(0, dtype=torch.long)
        p1, p2 = self.split(pair)
        xs = [r["input"] for r in rows]
        res = [T.residual(x, h) for x, h in zip(xs, self.hidden(p1, xs))]
        return self.scorer.class_logprobs([p2], res, self.classes)[0].argmax(-1)

    def init_state(self, prompt: str, author: str = "init") -> dict:
        return super().init_state(prompt if self.SEP in prompt else self.join("", prompt), author)

    def step(self, train, dev) -> dict:
        entry, rows = self._begin(train, dev)
        if rows is None:
            return entry
        s = self.state
        t = s["t"]
        p1, p2 = self.split(s["current"])
        x = [r["input"] for r in rows]
        y = torch.tensor([r["label"] for r in rows])
        B, K = len(rows), self.num_h_samples
        h = self.hidden(p1, x)
        pred = self.scorer.class_logprobs([p2], [T.residual(a, b) for a, b in zip(x, h)], self.classes)[0].argmax(-1)
        losses = (pred != y).float().tolist()
        yname = [self.names[i] for i in y.tolist()]
        seed = self.seed * 100003 + t
        # posterior samples of h, weighted by the output layer's likelihood of y
        rewrites = []
        if K > 1:
            texts = [T.hidden_backward(p2, x[b], h[b], yname[b], T.HIDDEN_MESSAGES[k % len(T.HIDDEN_MESSAGES)])
                     for b in range(B) for k in range(K - 1)]
            rewrites = self.proposer.generate(texts, seed=seed, max_new_tokens=self.hidden_tokens, stop=("\n\n",))
        hs = [[h[b]] + rewrites[b * (K - 1):(b + 1) * (K - 1)] for b in range(B)]
        res = [T.residual(x[b], hs[b][k]) for b in range(B) for k in range(K)]
        ll = self.scorer.class_logprobs([p2], res, self.classes)[0].view(B, K, -1)
        ll = ll.gather(2, y.view(B, 1, 1).expand(B, K, 1)).squeeze(2)                # [B, K]
        w = torch.softmax(ll, dim=1)
        best_h = [hs[b][int(w[b].argmax())] for b in range(B)]
        memory = [self.split(m[0]) for m in s["memory"]]
        # layer 1
        infos = [T.Info(x[b], h[b], best_h[b], float(h[b] != best_h[b])) for b in range(B)]
        props1 = self._proposals([p1] + [m[0] for m in memory], infos, seed)
        c1 = list(dict.fromkeys([p1] + [m[0] for m in memory] + props1))
        ctx = [f"{c} Let's think step by step." for c in c1 for b in range(B) for k in range(K)]
        pre = [x[b] for c in c1 for b in range(B) for k in range(K)]
        tgt = [hs[b][k] for c in c1 for b in range(B) for k in range(K)]
        lp1 = self.scorer.target_logprobs(ctx, tgt, prompts=pre).view(len(c1), B, K)
        score1 = (lp1 * w).sum(2).mean(1)
        # layer 2
        infos = [T.Info(T.residual(x[b], best_h[b]), self.names[int(pred[b])], yname[b], losses[b]) for b in range(B)]
        props2 = self._proposals([p2] + [m[1] for m in memory], infos, seed + 1)
        c2 = list(dict.fromkeys([p2] + [m[1] for m in memory] + props2))
        lp2 = self.scorer.class_logprobs(c2, res, self.classes)
        lp2 = lp2.gather(2, y.repeat_interleave(K).view(1, -1, 1).expand(len(c2), -1, 1)).view(len(c2), B, K)
        score2 = (lp2 * w).sum(2).mean(1)
        n1, n2 = c1[int(torch.argmax(score1))], c2[int(torch.argmax(score2))]
        chosen = self.join(n1, n2)
        for layer, props in (("1", props1), ("2", props2)):
            for p in props:
                s["author"].setdefault(f"{layer}:{p}", self.proposer.name)
        a1, a2 = s["author"].get(f"1:{n1}", "init"), s["author"].get(f"2:{n2}", "init")
        s["author"].setdefault(chosen, a1 if a1 == a2 else f"p1 {a1}, p2 {a2}")
        entry.update(batch_acc=1.0 - float(np.mean(losses)), candidates_p1=c1, scores_p1=score1.tolist(),
                     candidates_p2=c2, scores_p2=score2.tolist(), chosen=chosen, author=s["author"][chosen])
        s["current"] = chosen
        s["t"] = t + 1
        return self._record(entry)

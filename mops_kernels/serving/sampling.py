"""Choosing each request's next token and deciding when it stops, through transformers' own pieces.

- `Sampler`: transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in a
  LogitsProcessorList, in the order and with the conditions of `generate()` (temperature != 1,
  top_k not 0/None, top_p < 1), then softmax and torch.multinomial(probs, 1) drawing from the
  request's own torch.Generator. A request alone with seed s therefore gives the tokens of
  `torch.manual_seed(s); model.generate(do_sample=True, ...)` (tests/test_serving.py).
- `StopStrings`: transformers' StopStringCriteria over the request's generated tokens (a stop string
  may span tokens and overhang the last one), plus `truncate(text)`, which cuts the text before the
  first stop string as OpenAI's API does.
EOS and the token budget are checked on host ints by the Engine (no tensor built per token).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """ValueError naming the argument for values transformers' warpers would refuse or misread."""
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature):
        raise ValueError(f"temperature must be a number > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def logits_processors(temperature=1.0, top_k=None, top_p=None):
    """transformers' warpers for these settings, in generate()'s order."""
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)
    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        procs.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    return procs


class Sampler:
    """One request's sampling: the warpers and its generator (seed None: a fresh random seed)."""

    def __init__(self, temperature=1.0, top_k=None, top_p=None, seed=None, device="cpu"):
        check_sampling(temperature, top_k, top_p)
        self.procs = logits_processors(temperature, top_k, top_p)
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor) -> int:
        """One token id from logits [V]."""
        return sample_token(logits, generator=self.generator, procs=self.procs)


_NO_IDS = torch.zeros(1, 0, dtype=torch.long)


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, procs=None):
    """One token from logits [V] as generate(do_sample=True) draws it: the warpers on fp32 scores
    [1, V], softmax, torch.multinomial(probs, 1) from `generator`."""
    procs = logits_processors(temperature, top_k, top_p) if procs is None else procs
    scores = procs(_NO_IDS, logits.float().view(1, -1))       # the warpers do not read input_ids
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


class StopStrings:
    """Stop strings of one request, matched on its generated tokens with the tokenizer's vocabulary."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        from transformers import StopStringCriteria
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Engine(..., tokenizer=tok))")
        self.strings = stop
        self.tokenizer = tokenizer
        self.criteria = StopStringCriteria(tokenizer, stop)

    def hit(self, tokens: Sequence[int]) -> Optional[str]:
        """The stop string that the last token completes, or None."""
        if not tokens:
            return None
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        if not bool(self.criteria(ids, None)[0]):
            return None
        text = self.tokenizer.decode(list(tokens))
        found = [(text.find(s), s) for s in self.strings if s in text]
        return min(found)[1] if found else self.strings[0]

    def truncate(self, text: str) -> str:
        """`text` up to (excluding) the first stop string."""
        cut = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[:min(cut)] if cut else text

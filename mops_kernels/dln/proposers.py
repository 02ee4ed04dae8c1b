"""Who writes the candidate prompts (and DLN-2's hidden texts): each proposer has a `name` that the
results carry, and `generate(texts, seed, max_new_tokens, stop) -> list[str]` (one continuation per
text, cut before the first stop string, stripped). Same seed, same outputs.

    EngineProposer(model, tok)       the scoring model itself through mops_kernels.Engine (sampled at
                                     temperature 0.7 as DLN's backward model, a seed per request)
    HFProposer(directory)            a larger local Hugging Face causal LM (transformers' generate)
    TemplateProposer()               deterministic edits of the current prompt (no model): DLN's four
                                     rewrite instructions applied as fixed text operations
"""
from __future__ import annotations

import inspect
import re
from typing import List, Optional, Sequence

import torch

from .templates import STOP, cut_at_stop


class EngineProposer:
    """Generation with the package's Engine on the same backbone as the scorer."""

    def __init__(self, model, tok, *, temperature: float = 0.7, max_batch: int = 4, max_len: int = 2048):
        from .. import Engine
        self.name = "engine"
        self.tok, self.temperature, self.max_len = tok, float(temperature), int(max_len)
        # stop strings: the Engine's own (submit(stop=...), with its tokenizer) where it has them, else
        # the request is ended from its on_token callback as soon as a stop string appears
        self._native_stop = "tokenizer" in inspect.signature(Engine).parameters
        kw = dict(tokenizer=tok) if self._native_stop else {}
        self.engine = Engine(model, max_batch=max_batch, max_len=max_len, eos_token_id=tok.eos_token_id, **kw)

    def generate(self, texts: Sequence[str], seed: int, max_new_tokens: int = 96,
                 stop: Sequence[str] = STOP) -> List[str]:
        reqs = []
        for i, t in enumerate(texts):
            ids = self.tok(t)["input_ids"]
            keep = self.max_len - max_new_tokens
            ids = ids[-keep:]                                    # the template's end is what matters
            kw = dict(max_new_tokens=max_new_tokens, do_sample=self.temperature > 0,
                      temperature=self.temperature or 1.0, seed=seed * 1000003 + i)
            if self._native_stop:
                kw["stop"] = list(stop)
            else:
                kw["on_token"] = self._stopper(stop)
            reqs.append(self.engine.submit(ids, **kw))
        self.engine.run_until_done()
        return [cut_at_stop(self.tok.decode(r.tokens, skip_special_tokens=True), stop) for r in reqs]

    def _stopper(self, stop):
        def on_token(req, _tok):
            text = self.tok.decode(req.tokens, skip_special_tokens=True)
            if any(s in text for s in stop):
                req.max_new_tokens = len(req.tokens)             # the Engine ends a request at max_new_tokens
        return on_token


class HFProposer:
    """A larger local model (a Hugging Face checkpoint directory), unquantized, transformers' generate."""

    def __init__(self, directory: str, *, temperature: float = 0.7, device=None, dtype=torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.name = f"hf:{directory.rstrip('/').split('/')[-1]}"
        self.tok = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device or "cpu").eval()
        self.temperature = float(temperature)

    @torch.no_grad()
    def generate(self, texts: Sequence[str], seed: int, max_new_tokens: int = 96,
                 stop: Sequence[str] = STOP) -> List[str]:
        out = []
        for i, t in enumerate(texts):
            torch.manual_seed(seed * 1000003 + i)
            ids = self.tok(t, return_tensors="pt").to(self.model.device)
            gen = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=self.temperature > 0,
                                      temperature=self.temperature or None, stop_strings=list(stop),
                                      tokenizer=self.tok, pad_token_id=self.tok.eos_token_id)
            out.append(cut_at_stop(self.tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True),
                                   stop))
        return out


_EDITS = (
    ("clarify", lambda p, task: (p + " " if p else "") + task.get("clarify", "Answer with one of the options.")),
    ("example", lambda p, task: (p + " " if p else "") + task.get("example", "")),
    ("shorten", lambda p, task: _first_sentence(p)),
    ("rewrite", lambda p, task: task.get("rewrite", p)),
)


def _first_sentence(p: str) -> str:
    parts = re.split(r"(?<=[.!?])\s+", p.strip())
    return parts[0] if parts else p


class TemplateProposer:
    """Deterministic prompt edits, one per DLN rewrite instruction (clarify / example / shorten /
    rewrite), from fixed task hints: `hints` maps "clarify", "example", "rewrite" to text. It reads
    the current prompt from the backward text (the line after "## Instruction\\n> ")."""

    name = "template"

    def __init__(self, hints: Optional[dict] = None):
        self.hints = dict(hints or {})

    def generate(self, texts: Sequence[str], seed: int, max_new_tokens: int = 96,
                 stop: Sequence[str] = STOP) -> List[str]:
        out = []
        for i, t in enumerate(texts):
            m = re.search(r"## Instruction\n> (.*?)\n\[END\]", t, re.S)
            current = m.group(1).strip() if m else ""
            _, edit = _EDITS[(seed + i) % len(_EDITS)]
            out.append(edit(current, self.hints).strip())
        return out

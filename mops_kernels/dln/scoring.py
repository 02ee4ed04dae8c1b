"""Shared-prefix scoring of (prompt, input) pairs for DLN (SPEC §7).

    scorer = PromptScorer(model, tok)
    lp = scorer.class_logprobs(prompts, inputs, classes)    # [len(prompts), len(inputs), len(classes)]
    lp = scorer.target_logprobs(contexts, targets)          # [n]

The context of a pair is DLN's forward template `"{prompt}\\n\\n{input}\\n\\nAnswer:"` (the input alone
when the prompt is empty); the class is read from the next token after `"\\n"` (DLN scores the context
plus "\\n"): a class "yes|Yes" sums the probabilities of the tokens "yes", "Yes", " yes", " Yes" (each
verbaliser variant that is one token; a class with none, under a byte-level tokenizer, uses the first
token of each verbaliser as written; two classes sharing a token is an error), then the class scores are
normalised: lp = log(score_c / sum_c' score_c').

How the pairs run (`share=True`): the text `"{prompt}\\n\\n"` of each distinct prompt is prefilled once
through the decoder; its per-layer keys and values (RoPE already applied at positions 0..P-1) become
one slot of a pool [E, P_max, Hkv, D] per layer with lens [E]. Each pair then runs only its remaining
tokens, with the pool read in place by `prefix_attention` (the `mops_prefix` routing of
integrations/attention.py: index [B, 1] = the pair's slot) and position_ids starting at its slot's
length, per row, so that every token sees exactly what it sees in the plain concatenated forward.
Which tokens a pair shares is decided on tokens, since tokenisation does not always split at a string
boundary (SmolLM2 writes "\n\n" as one token at the end of a text but as two before a word): the
tokens of `"{prompt}\n\n"` are compared with each pair's own tokens (those of its whole text); the
pairs whose tokens agree on the most common length share it (plus any identical leading input tokens),
the others run in full, as with `share=False`, which is the plain concatenated forward of every pair
(the oracle and the benchmark's baseline). Rows are
batched in length order and cut so that batch x longest row stays within `token_budget`; only the
positions that are scored go through the output head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..integrations.attention import ATTN_NAME, PrefixRouting, use_mops_attention

SEP = "\n\n"


def forward_context(prompt: str, inp: str) -> str:
    """DLN's forward template (dln/templates/classify_forward.yaml): "{prompt}\\n\\n{input}\\n\\nAnswer:"."""
    return f"{prompt}{SEP}{inp}{SEP}Answer:" if prompt else f"{inp}{SEP}Answer:"


def _ids(tok, text: str) -> List[int]:
    return list(tok(text)["input_ids"])


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Item:
    prefix: str                 # shared text ("" = none)
    ids: List[int]              # token ids of the whole text
    score_from: int             # first position whose hidden state is read (its next-token distribution)
    score_to: int               # one past the last such position
    slot: int = -1              # prefix slot, -1 = runs in full
    skip: int = 0               # tokens covered by the slot


@dataclass
class ScoreStats:
    """Token counts of the last call (and totals): what sharing saved."""
    pairs: int = 0
    shared_pairs: int = 0
    prefill_tokens: int = 0     # tokens run through the decoder
    plain_tokens: int = 0       # tokens the plain concatenated forward would run
    totals: Dict[str, int] = field(default_factory=lambda: dict(pairs=0, prefill_tokens=0, plain_tokens=0))

    def add(self, pairs, shared, run, plain):
        self.pairs, self.shared_pairs, self.prefill_tokens, self.plain_tokens = pairs, shared, run, plain
        for k, v in (("pairs", pairs), ("prefill_tokens", run), ("plain_tokens", plain)):
            self.totals[k] += v


class PromptScorer:
    """Scores prompts on inputs with one model, each distinct prompt prefilled once (module docstring).

    model: a Llama/Mistral/Qwen2-family causal LM (e.g. from `load_backbone`); switched to the "mops"
    attention if it runs another one (same math without prefixes). tok: a callable returning
    {"input_ids": [...]} (an HF tokenizer or training.data.ByteTokenizer)."""

    def __init__(self, model, tok, *, share: bool = True, token_budget: int = 4096,
                 prefix_budget: int = 16384, progress: bool = False):
        if tok is None:
            raise ValueError("tok must be a tokenizer (load_backbone(config=...) has none: use ByteTokenizer)")
        if token_budget < 1 or prefix_budget < 1:
            raise ValueError(f"token_budget and prefix_budget must be >= 1, got {token_budget}, {prefix_budget}")
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            use_mops_attention(model)
        self.model, self.tok, self.share = model, tok, bool(share)
        self.token_budget, self.prefix_budget, self.progress = int(token_budget), int(prefix_budget), progress
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.stats = ScoreStats()
        self._verb_cache: Dict[str, List[int]] = {}

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def class_logprobs(self, prompts: Sequence[str], inputs: Sequence[str],
                       classes: Sequence[str]) -> torch.Tensor:
        """[len(prompts), len(inputs), len(classes)] log-probabilities normalised over the classes.

        classes: DLN verbaliser strings, e.g. ["yes|Yes", "no|No"] (see the module docstring)."""
        prompts, inputs = self._strings("prompts", prompts), self._strings("inputs", inputs)
        verb = self._verbalisers(classes)
        items = []
        for p in prompts:
            for x in inputs:
                ids = _ids(self.tok, forward_context(p, x) + "\n")
                items.append(_Item(p + SEP if p else "", ids, len(ids) - 1, len(ids)))
        hidden = self._run(items)
        if not items:
            return torch.zeros(len(prompts), len(inputs), len(verb))
        logp = torch.log_softmax(self.head(torch.cat(hidden)).float(), dim=-1)          # [n, V]
        scores = torch.stack([logp[:, v].logsumexp(-1) for v in verb], dim=-1)         # [n, C]
        return torch.log_softmax(scores, dim=-1).view(len(prompts), len(inputs), len(verb)).cpu()

    @torch.no_grad()
    def target_logprobs(self, contexts: Sequence[str], targets: Sequence[str],
                        prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """[n] mean log-probability of the tokens of "\\n{target}" after each context (DLN's echo
        scoring of `context + "\\n" + target`). prompts (optional, one per context): a leading part
        that contexts share (the text is prompts[i] + "\\n\\n" + contexts[i]), prefilled once each."""
        contexts, targets = self._strings("contexts", contexts), self._strings("targets", targets)
        if len(contexts) != len(targets):
            raise ValueError(f"targets must have one entry per context ({len(contexts)}), got {len(targets)}")
        if prompts is not None:
            prompts = self._strings("prompts", prompts)
            if len(prompts) != len(contexts):
                raise ValueError(f"prompts must have one entry per context ({len(contexts)}), got {len(prompts)}")
        items = []
        for i, (c, t) in enumerate(zip(contexts, targets)):
            pre = (prompts[i] + SEP) if prompts is not None and prompts[i] else ""
            ctx = _ids(self.tok, pre + c)
            ids = _ids(self.tok, pre + c + "\n" + t)
            n = 0
            while n < min(len(ctx), len(ids)) and ctx[n] == ids[n]:
                n += 1
            if n == 0 or n >= len(ids):
                raise ValueError(f"context {i} must be non-empty text followed by target tokens")
            items.append(_Item(pre, ids, n - 1, len(ids) - 1))
        hidden = self._run(items)
        out = []
        for it, h in zip(items, hidden):
            logp = torch.log_softmax(self.head(h).float(), dim=-1)
            nxt = torch.tensor(it.ids[it.score_from + 1:it.score_to + 1], device=logp.device)
            out.append(logp.gather(1, nxt[:, None]).mean())
        return torch.stack(out).cpu() if out else torch.zeros(0)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _strings(name, xs):
        xs = list(xs)
        bad = [i for i, x in enumerate(xs) if not isinstance(x, str)]
        if bad:
            raise ValueError(f"{name} must be a list of strings; entry {bad[0]} is {type(xs[bad[0]]).__name__}")
        return xs

    def _verbalisers(self, classes) -> List[torch.Tensor]:
        classes = self._strings("classes", classes)
        if len(classes) < 2:
            raise ValueError(f"classes must name at least 2 classes, got {classes}")
        out, owner = [], {}
        for c in classes:
            toks = [_ids(self.tok, w) for v in c.split("|") for w in (v, " " + v)]
            ids = {t[0] for t in toks if len(t) == 1}
            if not ids:            # no one-token variant (a byte-level tokenizer): first tokens, no space
                ids = {t[0] for t in toks[::2] if t}
            if not ids:
                raise ValueError(f"class {c!r}: its verbalisers have no tokens")
            for t in ids:
                if owner.setdefault(t, c) != c:
                    raise ValueError(f"classes {owner[t]!r} and {c!r} share the token id {t}")
            out.append(torch.tensor(sorted(ids), device=self.device))
        return out

    def _run(self, items: List[_Item]) -> List[torch.Tensor]:
        """Hidden states (after the final norm) at positions score_from..score_to-1 of each item."""
        plain = sum(len(it.ids) for it in items)
        pre_ids = self._shared_prefixes(items) if self.share else {}
        used = sorted(pre_ids)
        groups, cur, size = [], [], 0          # prompt groups whose pool fits prefix_budget
        for p in used:
            if cur and size + len(pre_ids[p]) > self.prefix_budget:
                groups.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += len(pre_ids[p])
        groups.append(cur)
        out: List[Optional[torch.Tensor]] = [None] * len(items)
        run = 0
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc="score", dynamic_ncols=True, leave=False)
        for gi, group in enumerate(groups):
            slot = {p: i for i, p in enumerate(group)}
            if gi == 0:
                rows = [i for i, it in enumerate(items) if not it.skip or it.prefix in slot]
            else:
                rows = [i for i, it in enumerate(items) if it.skip and it.prefix in slot]
            for i in rows:
                items[i].slot = slot[items[i].prefix] if items[i].skip else -1
            routing, n = self._prefill([pre_ids[p] for p in group]) if group else (None, 0)
            run += n
            run += self._suffixes(items, rows, routing, out, bar)
        if bar is not None:
            bar.close()
        shared = sum(1 for it in items if it.skip)
        self.stats.add(len(items), shared, run, plain)
        return out

    def _shared_prefixes(self, items: List[_Item]) -> Dict[str, List[int]]:
        """Per group (items with the same prefix text): the token ids its members share, and each
        member's `skip`. The tokens of the prefix text are checked against each item's own tokens:
        n_i = common length (at most score_from). The most frequent n_i wins; items with fewer common
        tokens (tokenisation did not split at the prefix text's end) run in full. The winners' common
        prefix is then extended over identical leading input tokens (still exact: same tokens, same
        positions). A group shares only when >= 2 items share >= 1 token."""
        groups: Dict[str, List[_Item]] = {}
        for it in items:
            it.skip, it.slot = 0, -1
            groups.setdefault(it.prefix, []).append(it)
        out = {}
        for text, members in groups.items():
            cand = _ids(self.tok, text) if text else []
            common = [min(_lcp(cand, it.ids), it.score_from) for it in members]
            counts: Dict[int, int] = {}
            for n in common:
                counts[n] = counts.get(n, 0) + 1
            n0 = max(counts, key=lambda n: (counts[n], n))
            sharers = [it for it, n in zip(members, common) if n >= n0]
            n = min(it.score_from for it in sharers)
            for it in sharers[1:]:
                n = min(n, _lcp(sharers[0].ids, it.ids))
            if n < 1 or len(sharers) < 2:
                continue
            out[text] = sharers[0].ids[:n]
            for it in sharers:
                it.skip = n
        return out

    def _batches(self, lengths: List[int], order: List[int]):
        """Cut `order` (sorted by length) into batches with batch x longest <= token_budget."""
        batch, longest = [], 0
        for i in order:
            L = lengths[i]
            if batch and max(longest, L) * (len(batch) + 1) > self.token_budget:
                yield batch
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, L)
        if batch:
            yield batch

    def _prefill(self, prefixes: List[List[int]]) -> Tuple[PrefixRouting, int]:
        """Run each prefix once; its keys/values become one slot of the per-layer pools."""
        E, P = len(prefixes), max(len(p) for p in prefixes)
        L = len(self.decoder.layers)
        pk = pv = None
        lengths = [len(p) for p in prefixes]
        for batch in self._batches(lengths, sorted(range(E), key=lengths.__getitem__)):
            T = max(lengths[i] for i in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long, device=self.device)
            mask = torch.zeros(len(batch), T, dtype=torch.long, device=self.device)
            for r, i in enumerate(batch):
                ids[r, :lengths[i]] = torch.tensor(prefixes[i], device=self.device)
                mask[r, :lengths[i]] = 1
            cache = self.decoder(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            for l in range(L):
                k, v = cache.layers[l].keys, cache.layers[l].values            # [b, Hkv, T, D]
                if pk is None:
                    shape = (E, P, k.shape[1], k.shape[3])
                    pk = [torch.zeros(shape, dtype=k.dtype, device=k.device) for _ in range(L)]
                    pv = [torch.zeros(shape, dtype=k.dtype, device=k.device) for _ in range(L)]
                idx = torch.tensor(batch, device=k.device)
                pk[l][idx, :T] = k.transpose(1, 2)
                pv[l][idx, :T] = v.transpose(1, 2)
        lens = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        return PrefixRouting(pk, pv, index=None, lens=lens), sum(lengths)

    def _suffixes(self, items, rows, routing, out, bar) -> int:
        """Run the remaining tokens of items[rows] (slot or full), fill out[i] with their hidden rows."""
        lengths = {i: len(items[i].ids) - items[i].skip for i in rows}
        order = sorted(rows, key=lambda i: lengths[i])
        full = [0] * len(items)
        for i in rows:
            full[i] = lengths[i]
        run = 0
        for batch in self._batches(full, order):
            T = max(lengths[i] for i in batch)
            B = len(batch)
            ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
            mask = torch.zeros(B, T, dtype=torch.long, device=self.device)
            start = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            index = torch.full((B, 1), -1, dtype=torch.int32, device=self.device)
            for r, i in enumerate(batch):
                it = items[i]
                ids[r, :lengths[i]] = torch.tensor(it.ids[it.skip:], device=self.device)
                mask[r, :lengths[i]] = 1
                start[r, 0] = it.skip
                index[r, 0] = it.slot if it.skip else -1
            pos = start + torch.arange(T, device=self.device)
            kw = {}
            if routing is not None and bool((index >= 0).any()):
                kw["mops_prefix"] = PrefixRouting(routing.prefix_k, routing.prefix_v, index, None, routing.lens)
            h = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                             **kw).last_hidden_state
            for r, i in enumerate(batch):
                it = items[i]
                out[i] = h[r, it.score_from - it.skip:it.score_to - it.skip]
            run += sum(lengths[i] for i in batch)
            if bar is not None:
                bar.update(B)
        return run

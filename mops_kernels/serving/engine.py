"""Batched low-latency serving of many prompt adapters on one frozen model (SPEC §5, issues 5, 14).

    eng = Engine(model, prompts, max_batch=8, max_len=512, tokenizer=tok)
    eng.submit(ids, expert_index=[3, 1], expert_weight=[0.6, 0.4], max_new_tokens=32, on_token=cb)
    eng.submit(ids2)                    # no experts named: the gate of `prompts` picks them at prefill
    eng.submit(ids3, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, seed=1234, stop=["\\n\\n"])
    for req, token in eng.stream(): ... # or eng.run_until_done()

Several prompt sets at once (MoPs banks, PEFT prefix adapters): `Engine(model, PromptSets({...}))`
and `submit(ids, prompt_set=name)` (prompt_sets.py): each set's gate picks among its own slots, named
slots are numbered within the set, each request runs at its set's position offset (PEFT's shift), and
a request that uses no slot runs the plain model.

The parts (this package): scheduler.py (requests, slots, admission), sampling.py (transformers'
warpers and StopStringCriteria), decode.py (the static slot cache and the lean decode step),
graphs.py (CUDA graphs of that step), prompt_sets.py (several prompt sets as one pool of slots), and
this file, which joins them:

- Prefill: the requests admitted at a step run together (right-padded, causal + padding mask)
  straight into their slot rows through the model's own modules (input_layernorm, q/k/v/o_proj, the
  family's apply_rotary_pos_emb, post_attention_layernorm, mlp): the gate reads the masked mean after
  `gate_layer` in that pass (unless the request named its experts), IAPT prompts are generated from
  the hidden states entering each injected layer. The gate's choice is checked (slots in range,
  finite weights) and recorded on the request (`req.experts`).
- Decode: one step for rows 0..n-1 only, n = the highest busy slot + 1 (slots are handed out lowest
  first; free rows below n are fully masked and produce nothing); attention reads only the first
  S = longest running sequence + 1 cache columns (decode.py). On CUDA the step is replayed from a
  graph per row bucket (graphs.py).
- Tokens: greedy by default; `do_sample=True` samples with transformers' warpers and the request's
  own generator, so a request alone gives the tokens of `torch.manual_seed(seed);
  model.generate(do_sample=True, ...)` (tests/test_serving.py).
- A request stops at its token budget, at EOS (`eos_token_id=None`: the model's generation_config;
  `[]`: never), or at a stop string (`submit(stop=...)`, needs the tokenizer; `req.text()` excludes it).
- Continuous batching: requests join (prefill) and leave (slot freed) between decode steps.
- Failures stay with their request: an exception in a request's prefill (retried alone when it ran
  with others), its `on_token` callback or its stop check ends that request only, with
  `finish_reason="error"` and `req.error` set, and frees its slot; the others' tokens are unchanged.
  An exception in the batched decode step ends every running request that way and is re-raised.
- Inputs are checked at submit (token ids in [0, vocab), expert slots in range, finite weights >= 0,
  sampling values, max_new_tokens >= 0), never inside the decode step, which reads nothing on the host.

A sliding window (Mistral, Qwen2) shorter than `max_len` is refused at construction: the static cache
attends to every cached token (attach() + generate() applies windows).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterator, Optional

import torch

from ..families import decoder, head_dim
from ..integrations.hf import Plan, check_expert_index, run_prefix_attention, validate
from .decode import DecodeStep, SlotCache, rms
from .graphs import DecodeGraphs
from .sampling import Sampler, StopStrings
from .prompt_sets import PromptSets
from .scheduler import QueueFull, Request, Scheduler, summarize  # noqa: F401 (re-exported)


def _sliding_window(layer, cfg):
    """The sliding window of one decoder layer, or None (Qwen2 sets it per layer, Mistral per model)."""
    attn = layer.self_attn
    w = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
    return None if w is None else int(w)


def _eos_ids(model, eos_token_id):
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def _top_logprobs(lp, tok, k):
    """(logprob of tok, {token id: logprob} of the k best) from log-probs [V]."""
    best = {}
    if k:
        v, i = torch.topk(lp, min(int(k), lp.numel()))
        best = dict(zip(i.tolist(), v.tolist()))
    return float(lp[tok]), best


class Engine:
    """Continuous-batching generation over a static KV cache (module docstring).

    experts_per_request: slots each request may use (default: the gate's top_k, else 2).
    eos_token_id: int, list, None (the model's generation_config) or [] (no EOS).
    tokenizer: needed for stop strings and `text()`. max_waiting: queue bound (QueueFull beyond)."""

    def __init__(self, model, prompts=None, *, max_batch=8, max_len=512, experts_per_request=None,
                 eos_token_id=None, tokenizer=None, max_waiting=None, cuda_graph=True, fuse=True, **kwargs):
        if "top_k" in kwargs:
            raise TypeError("Engine(top_k=) was renamed Engine(experts_per_request=): the number of prompt "
                            "slots per request. Sampling's top_k is an argument of submit().")
        if kwargs:
            raise TypeError(f"Engine() got unexpected keyword arguments {sorted(kwargs)}")
        cfg = model.config
        self.plan = plan = Plan(prompts, cfg.num_hidden_layers)
        self.layers = validate(model, plan)
        self.model, self.tokenizer = model, tokenizer
        base = decoder(model)
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        self.vocab_size = int(self.embed.num_embeddings)
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.L, self.Hkv, self.Hq = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
        self.D = head_dim(cfg)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.max_batch, self.max_len = max_batch, max_len
        self.eos = _eos_ids(model, eos_token_id)
        windows = {i: _sliding_window(layer, cfg) for i, layer in enumerate(self.layers)}
        short = {i: w for i, w in windows.items() if w is not None and w < max_len}
        if short:
            i, w = next(iter(short.items()))
            raise ValueError(
                f"Engine: layer {i} of this {cfg.model_type} model attends through a sliding window of "
                f"{w} tokens, shorter than max_len={max_len}; the Engine's static cache attends to every "
                f"cached token, which would give wrong answers past the window. Use max_len <= {w}, or "
                f"mops_kernels.attach(model, ...) + model.generate(), which applies the window.")
        self.device = dev = next(model.parameters()).device
        with torch.no_grad():
            self.dtype = self.embed(torch.zeros(1, 1, dtype=torch.long, device=dev)).dtype
        # several prompt sets pooled (prompt_sets.PromptSets): each set's gate runs on its own requests
        self.sets = prompts if isinstance(prompts, PromptSets) else None
        gate_k = int(plan.gate.top_k) if plan.gate is not None else (self.sets.top_k if self.sets else None)
        kk = experts_per_request or gate_k or 2
        if gate_k is not None and kk < gate_k:
            raise ValueError(f"experts_per_request={kk} < the gate's top_k={gate_k}")
        self.sched = Scheduler(max_batch, max_waiting)
        self.cache = SlotCache(plan, self.L, self.Hkv, self.D, max_batch, max_len, kk, self.dtype, dev)
        self.decoder = DecodeStep(model, self.layers, self.cache, Hq=self.Hq, Hkv=self.Hkv, D=self.D,
                                  max_len=max_len, dtype=self.dtype, device=dev, fuse=fuse)
        # the prefill's projections on the decode step's CPU kernel calls (norms and residual sums
        # inside them, q/k/v as one call): a layer whose four projections all have them, else None
        self._lean = [ly if dev.type == "cpu" and self.dtype == torch.float32 and ly.gate_up is not None and
                      all(p.pre is not None for p in (ly.qkv, ly.o, ly.gate_up, ly.down)) else None
                      for ly in self.decoder.lean]
        use_graph = bool(cuda_graph and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 7)
        self.graphs = DecodeGraphs(lambda n, S: self._decode_step(n, S), self.cache, max_batch, max_len,
                                   use_graph)
        self._next_id = 0

    lean_prefill = True   # False: the prefill through the model's own modules (A/B and tests)

    # views kept for callers of the one-file Engine
    slots = property(lambda self: self.sched.slots)
    waiting = property(lambda self: self.sched.waiting)
    use_graph = property(lambda self: self.graphs.enabled)
    _cos = property(lambda self: self.decoder.cos)
    _sin_s = property(lambda self: self.decoder.sin_s)
    _rms = staticmethod(rms)

    # ---------------------------------------------------------------------------------------- API
    def submit(self, ids, expert_index=None, expert_weight=None, max_new_tokens=32,
               on_token: Optional[Callable] = None, *, do_sample=False, temperature=1.0, top_k=None,
               top_p=None, seed=None, stop=None, logprobs=None, prompt_logprobs=None,
               prompt_set=None) -> Request:
        """Queue a request: ids [T] or [1, T] token ids; expert_index [k] (slots, -1: unused) or None for
        the gate; expert_weight [k] (default 1 each). With PromptSets: prompt_set names the set (its
        gate picks, or expert_index numbers slots within it); None: no slot, or expert_index numbers
        pool slots.

        max_new_tokens >= 0 (0: prefill only, for `prompt_logprobs`). Greedy unless do_sample: then
        temperature (> 0), top_k (None/0: off), top_p (None/1: off) as in transformers' generate(),
        drawing from torch.Generator().manual_seed(seed) (None: a fresh nondeterministic seed).
        stop: a string or list of strings that end the request (needs the tokenizer). logprobs /
        prompt_logprobs: None, or k >= 0 to record each generated / prompt token's log-probability
        and the k most likely. on_token(req, token) is called for every token on the Engine's thread.
        Raises ValueError naming the argument, QueueFull when max_waiting requests are queued."""
        if isinstance(ids, torch.Tensor) and ids.dtype.is_floating_point:
            raise ValueError(f"ids must be integer token ids, got {ids.dtype}")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if ids.numel() == 0 or ids.numel() + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens + max_new_tokens={max_new_tokens} must fit "
                             f"max_len={self.max_len} (and the prompt must not be empty)")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"ids: token ids must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        kk = self.cache.index.shape[1]
        if prompt_set is not None:
            if self.sets is None:
                raise ValueError("prompt_set: this Engine serves one prompt set (Engine(model, PromptSets(...)) "
                                 "serves several)")
            self.sets.check(prompt_set)
        if expert_index is not None:
            ei = torch.as_tensor(expert_index, device=self.device).reshape(1, -1)
            ew = None if expert_weight is None else torch.as_tensor(expert_weight, dtype=torch.float32,
                                                                      device=self.device).reshape(1, -1)
            if prompt_set is not None:               # slots numbered within the set -> pool slots
                try:
                    check_expert_index(ei, ew, self.sets.sizes[prompt_set])
                except ValueError as e:
                    raise ValueError(f"prompt set {prompt_set!r}: {e}") from None
                ei = torch.where(ei >= 0, ei + self.sets.offsets[prompt_set], ei)
            check_expert_index(ei, ew, self.plan.num_experts)
            if ew is not None and not bool(torch.isfinite(ew).all()):
                raise ValueError(f"expert_weight must be finite, got {ew.view(-1).tolist()}")
            if ei.shape[1] > kk:
                raise ValueError(f"expert_index: {ei.shape[1]} experts named, the engine holds at most "
                                 f"{kk} (Engine(experts_per_request=))")
            expert_index, expert_weight = ei, ew
        elif expert_weight is not None:
            raise ValueError("expert_weight given without expert_index")
        elif self.sets is not None:
            if prompt_set is not None and prompt_set not in self.sets.gates:
                raise ValueError(f"expert_index: prompt set {prompt_set!r} has no gate; name the experts")
        elif self.plan.bank is not None and self.plan.gate is None:
            raise ValueError("expert_index: the prompts have no gate; name the experts")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.vocab_size):
                raise ValueError(f"{name} must be None or an integer in [0, {self.vocab_size}], got {k!r}")
        sampler = Sampler(temperature, top_k, top_p, seed, self.device) if do_sample else None
        stops = None if stop is None or stop == [] else StopStrings(self.tokenizer, stop)
        req = Request(self._next_id, ids, expert_index, expert_weight, max_new_tokens, on_token, sampler,
                      stops, logprobs, prompt_logprobs)
        req.prompt_set = prompt_set
        req.position_offset = self._position_offset(prompt_set, expert_index)
        self.sched.enqueue(req)
        self._next_id += 1
        return req

    def cancel(self, req: Request) -> None:
        """End `req` now (finish_reason "cancelled") and free its slot; call between steps."""
        if not req.done:
            self._finish(req, "cancelled")

    def text(self, req: Request, **decode_kw) -> str:
        """The request's generated text, cut before its stop string (OpenAI's rule)."""
        if self.tokenizer is None:
            raise ValueError("text() needs the tokenizer (Engine(..., tokenizer=tok))")
        text = self.tokenizer.decode(req.tokens, **decode_kw)
        return req.stop.truncate(text) if req.stop is not None and req.finish_reason == "stop" else text

    def idle(self) -> bool:
        return self.sched.idle()

    def stream(self) -> Iterator:
        """Run until every request is done, yielding (request, token) as tokens are produced."""
        while not self.sched.idle():
            yield from self.step()

    def run_until_done(self):
        for _ in self.stream():
            pass

    def step(self):
        """Admit waiting requests into free slots (prefill), then one decode step. Returns the events
        [(request, token)]."""
        events = []
        new = self.sched.admit()
        if new:
            events += self._admit(new)
        busy = self.sched.busy()
        if busy:
            n = busy[-1] + 1
            reqs = [self.slots[b] for b in busy]
            try:
                logits = self._decode(n)
            except Exception as e:
                for r in reqs:
                    self._finish(r, "error", e)
                raise
            for req, tok in zip(reqs, self._choose(reqs, logits if len(busy) == n else logits[busy])):
                if tok is not None:
                    events += self._emit(req, tok)
        return events

    # ----------------------------------------------------------------------------------- internals
    def _finish(self, req, reason, error=None):
        req.done, req.finish_reason, req.error = True, reason, error
        b = self.sched.release(req)
        if b is not None:
            self.cache.clear(b)

    def _admit(self, new):
        """Prefill `new` together; when that raises, each alone, so only the failing ones fail."""
        try:
            logits = self._prefill(new)
        except Exception as e:
            for r in new:
                self.cache.clear(r.slot)
            if len(new) == 1:
                self._finish(new[0], "error", e)
                return []
            return [ev for r in new for ev in self._admit([r])]
        events = []
        for req, tok in zip(new, self._choose(new, logits)):
            if req.max_new_tokens == 0 and not req.done:
                self._finish(req, "length")
            elif tok is not None:
                events += self._emit(req, tok)
        return events

    def _choose(self, reqs, logits):
        """The next token of each request from its logits row: argmax, or its sampler (None: failed)."""
        toks = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            if r.max_new_tokens == 0:
                continue
            try:
                if r.sampler is not None:
                    toks[i] = r.sampler(logits[i])
                if r.logprobs is not None:
                    r.token_logprobs.append(_top_logprobs(logits[i].float().log_softmax(-1), toks[i], r.logprobs))
            except Exception as e:
                self._finish(r, "error", e)
                toks[i] = None
        return toks

    def _emit(self, req, tok):
        req.tokens.append(tok)
        req.t_tokens.append(time.perf_counter())
        try:
            if req.on_token is not None:
                req.on_token(req, tok)
            reason = None
            if tok in self.eos:
                reason = "eos"
            elif req.stop is not None and (hit := req.stop.hit(req.tokens)) is not None:
                req.stop_string, reason = hit, "stop"
            elif len(req.tokens) >= req.max_new_tokens:
                reason = "length"
        except Exception as e:
            self._finish(req, "error", e)
            return [(req, tok)]
        if reason is not None:
            self._finish(req, reason)
        else:
            self.cache.tokens_in[req.slot] = tok
        return [(req, tok)]

    def _heads(self, t, B, T):
        """[B, T, H * D] (or [B * T, H * D]) -> [B, H, T, D]."""
        return t.view(B, T, -1, self.D).transpose(1, 2)

    def _qkv(self, layer, x, cos, sin):
        attn = layer.self_attn
        B, T, _ = x.shape
        q, k, v = (self._heads(p(x), B, T) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def _finish_layer(self, layer, h, o):
        B, T = h.shape[:2]
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    # The same two halves of a layer on the CPU kernel calls of the decode step's LeanLayer `ly`
    # (self._lean): each RMSNorm inside its projection's call, q/k/v one call, the residual sums
    # inside o's and down's calls: no aten op between them but rotary, SiLU * up and attention,
    # where each aten op on a [64, 576] activation is an OpenMP region that wakes a sleeping worker
    # under OMP_WAIT_POLICY=PASSIVE. SiLU * up stays aten here: the kernels' pre = 2 evaluates exp
    # per element (right for decode's few rows, slow for a prompt's).
    def _qkv_lean(self, ly, h, cos, sin):
        B, T, H = h.shape
        qkv = ly.qkv.normed(h.reshape(B * T, H), ly.ln1)
        q, k, v = (self._heads(t, B, T) for t in qkv.split([self.Hq * self.D, self.Hkv * self.D,
                                                              self.Hkv * self.D], -1))
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def _finish_lean(self, ly, h, o):
        B, T, H = h.shape
        h2 = ly.o.add(o.transpose(1, 2).reshape(B * T, -1), h.reshape(B * T, H))
        gu = ly.gate_up.normed(h2, ly.ln2)
        act = ly.act or torch.nn.functional.silu
        return ly.down.add(act(gu[:, :ly.inter]) * gu[:, ly.inter:], h2).view(B, T, H)

    def _position_offset(self, prompt_set, expert_index) -> int:
        """A request's position shift, decided at submit: its set's (PEFT prefix tuning shifts by its
        virtual tokens); none for a request that uses no slot (the plain model)."""
        if self.sets is not None:
            return self.sets.position_offsets[prompt_set] if prompt_set is not None else 0
        if expert_index is not None and not bool((expert_index >= 0).any()):
            return 0
        return self.plan.position_offset

    def _check_gate(self, reqs, gi, gw, E):
        """The gate's output (row i: reqs[i]) enters here: slots in [0, E), weights finite and >= 0."""
        for i in range(len(reqs)):
            idx, w = gi[i].tolist(), gw[i].float().tolist()
            if any(not 0 <= j < E for j in idx) or any(not (x >= 0 and x < float("inf")) for x in w):
                raise ValueError(f"request {reqs[i].id}: the gate chose slots {idx} with weights {w}; "
                                 f"slots must be in [0, {E}) and weights finite and >= 0")

    @torch.inference_mode()
    def _prefill(self, reqs):
        """Prefill new requests together (right-padded to the longest): last-token logits [n, V]."""
        plan, dev, c = self.plan, self.device, self.cache
        n, T = len(reqs), max(r.ids.numel() for r in reqs)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        ids = torch.zeros(n, T, dtype=torch.long, device=dev)
        pad = torch.zeros(n, T, dtype=torch.long, device=dev)      # 1 = real token (right padding)
        for i, r in enumerate(reqs):
            ids[i, :r.ids.numel()], pad[i, :r.ids.numel()] = r.ids, 1
            c.index[r.slot], c.weight[r.slot] = -1, 0.0
            if r.expert_index is not None:
                k = r.expert_index.shape[1]
                c.index[r.slot, :k] = r.expert_index[0].to(torch.int32)
                c.weight[r.slot, :k] = 1.0 if r.expert_weight is None else r.expert_weight[0]
        # (gate layer, gate, rows it picks for, slot offset, slots it picks among): the one gate of the
        # prompts, or each PromptSets member's on its own requests
        gates = [(plan.gate, [i for i, r in enumerate(reqs) if r.expert_index is None], 0, plan.num_experts)] \
            if plan.gate is not None else []
        if self.sets is not None:
            gates = [(g, [i for i, r in enumerate(reqs) if r.expert_index is None and r.prompt_set == name],
                      self.sets.offsets[name], self.sets.sizes[name]) for name, g in self.sets.gates.items()]
        gates = [(int(g.gate_layer), g, rows, off, size) for g, rows, off, size in gates if rows]
        h = self.embed(ids)
        offs = torch.tensor([r.position_offset for r in reqs], dtype=torch.long, device=dev)
        c.pos_offset[slots] = offs
        pos = torch.arange(T, device=dev).expand(n, T) + offs.view(n, 1)
        cos, sin = self.rotary(h, pos)
        for l, layer in enumerate(self.layers):
            if l in c.iapt:
                pk, pv = plan.generator_prefix(layer, l, h, pad)
                c.iapt[l][0][slots], c.iapt[l][1][slots] = pk, pv
            ly = self._lean[l] if self.lean_prefill else None
            if ly is not None:
                q, k, v = self._qkv_lean(ly, h, cos, sin)
            else:
                q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            c.K[l][slots, :, :T], c.V[l][slots, :, :T] = k, v
            pk, pv, idx, w, lens = c.prefix(l, slots)
            o = run_prefix_attention(q, k, v, pk, pv, idx, w, lens=lens, mask=pad, causal=True,
                                     scale=layer.self_attn.scaling)
            h = self._finish_layer(layer, h, o) if ly is None else self._finish_lean(ly, h, o)
            for gl, gate, rows, off, size in gates:
                if l == gl:
                    if len(rows) == n:                    # every request: no gather
                        gi, gw, g = *gate(h, pad), slots
                    else:
                        sel = torch.tensor(rows, device=dev)
                        gi, gw, g = *gate(h[sel], pad[sel]), slots[sel]
                    self._check_gate([reqs[i] for i in rows], gi, gw, size)
                    c.index[g, :gi.shape[1]] = gi.to(torch.int32) + off
                    c.weight[g, :gi.shape[1]] = gw.float()
        c.mask[slots] = 0
        c.mask[slots, :T] = pad
        c.lens[slots] = pad.sum(1)
        c.active[slots] = 1
        if plan.bank is not None:
            chosen, weights = c.index[slots].tolist(), c.weight[slots].tolist()
        for i, r in enumerate(reqs):
            c.host_lens[r.slot] = r.ids.numel()
            if plan.bank is not None:
                off = self.sets.offsets[r.prompt_set] if r.prompt_set is not None else 0   # within the set
                r.experts = ([j - off for j in chosen[i] if j >= 0], [w for j, w in zip(chosen[i], weights[i]) if j >= 0])
            if r.prompt_logprobs is not None:
                Ti = r.ids.numel()
                lp = self.lm_head(self.norm(h[i, :Ti - 1])).float().log_softmax(-1)
                toks = r.ids[1:].tolist()
                r.prompt_token_logprobs = [None] + [_top_logprobs(lp[t], toks[t], r.prompt_logprobs)
                                                    for t in range(Ti - 1)]
        last = h[torch.arange(n, device=dev), pad.sum(1) - 1]
        return self.lm_head(self.norm(last)).float()

    def _decode_step(self, n, S):
        """Logits [n, V] of rows 0..n-1 over cache columns 0..S-1 (decode.DecodeStep: no host read)."""
        return self.decoder(n, S)

    @torch.inference_mode()
    def _decode(self, n):
        """Logits [n, V] of rows 0..n-1 (rows beyond n hold no request)."""
        c = self.cache
        out = self.graphs(n) if self.graphs.enabled else None
        if out is None:
            out = self._decode_step(n, max(c.host_lens[:n]) + 1)
        for b in range(n):
            if self.slots[b] is not None:
                c.host_lens[b] += 1
        return out

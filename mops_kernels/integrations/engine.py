"""Batched low-latency serving of many prompt adapters on one frozen model (SPEC §5, issue 5).

    eng = Engine(model, prompts, max_batch=8, max_len=512)
    eng.submit(ids, expert_index=[3, 1], expert_weight=[0.6, 0.4], max_new_tokens=32, on_token=cb)
    eng.submit(ids2)                    # no experts named: the gate of `prompts` picks them at prefill
    for req, token in eng.stream(): ... # or eng.run_until_done()

- Static KV cache: per layer K, V [max_batch, Hkv, max_len, D], preallocated; row b of the batch is a
  slot owned by one request while it runs; `mask` [max_batch, max_len] marks its valid tokens.
- Prefill: the requests admitted at a step run together (right-padded, causal + padding mask)
  straight into their slot rows: the gate reads the masked mean after `gate_layer` in that pass (unless the request named its experts),
  IAPT prompts are generated from the hidden states entering each injected layer.
- Decode: one step for all max_batch rows at once (free rows are fully masked and produce nothing):
  the new key/value of row b is written at position lens[b], then `prefix_attention(q [B, Hq, 1, D],
  K, V, pool, index, weight, attention_mask=mask, causal=False)`.
- Continuous batching: requests join (prefill) and leave (slot freed) between decode steps.
- CUDA: the decode step is captured once in a CUDA graph over static input buffers and replayed
  (capture needs a device with compute capability >= 7.0; on failure the engine stays eager and says why).
- Each request records time to first token and the time of every later token.

The decoder is stepped layer by layer through the model's own modules (input_layernorm, q/k/v/o_proj,
the family's apply_rotary_pos_emb, post_attention_layernorm, mlp), found through hf.FAMILIES: one code
path for Llama, Mistral and Qwen2. Greedy decoding.
"""
from __future__ import annotations

import sys
import time
import warnings
from collections import deque
from typing import Callable, Iterator, List, Optional

import torch

from .hf import FAMILIES, Plan, _get_path, check_expert_index, run_prefix_attention, validate


class Request:
    """One generation request and its streamed output."""

    def __init__(self, rid, ids, expert_index, expert_weight, max_new_tokens, on_token):
        self.id, self.ids, self.max_new_tokens, self.on_token = rid, ids, max_new_tokens, on_token
        self.expert_index, self.expert_weight = expert_index, expert_weight
        self.tokens: List[int] = []
        self.slot: Optional[int] = None
        self.done = False
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


class Engine:
    def __init__(self, model, prompts=None, *, max_batch=8, max_len=512, top_k=None, eos_token_id=None,
                 cuda_graph=True):
        cfg = model.config
        self.plan = plan = Plan(prompts, cfg.num_hidden_layers)
        self.layers = validate(model, plan)
        path = FAMILIES[cfg.model_type][0].rsplit(".", 1)[0]
        base = _get_path(model, path)
        self.model, self.embed, self.norm, self.rotary = model, base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.L, self.Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_batch, self.max_len, self.eos = max_batch, max_len, eos_token_id
        self.device = next(model.parameters()).device
        with torch.no_grad():
            self.dtype = self.embed(torch.zeros(1, 1, dtype=torch.long, device=self.device)).dtype
        kk = top_k or (int(plan.gate.top_k) if plan.gate is not None else 2)
        B, dev = max_batch, self.device
        self.K = [torch.zeros(B, self.Hkv, max_len, self.D, dtype=self.dtype, device=dev) for _ in range(self.L)]
        self.V = [torch.zeros_like(k) for k in self.K]
        self.mask = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        self.lens = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.long, device=dev)
        self.index = torch.full((B, kk), -1, dtype=torch.int32, device=dev)
        self.weight = torch.zeros(B, kk, dtype=torch.float32, device=dev)
        self.tokens_in = torch.zeros(B, dtype=torch.long, device=dev)
        self.iapt = {}                                   # layer -> (k, v) pools [max_batch, 4, Hkv, D]
        if plan.generator is not None:
            for l in plan.generator_layers(self.L):
                self.iapt[l] = (torch.zeros(B, 4, self.Hkv, self.D, dtype=self.dtype, device=dev),
                                torch.zeros(B, 4, self.Hkv, self.D, dtype=self.dtype, device=dev))
        self.slots: List[Optional[Request]] = [None] * B
        self.waiting: deque = deque()
        self._next_id = 0
        self._graph = None
        self.use_graph = bool(cuda_graph and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 7)

    # ---------------------------------------------------------------------------------------- API
    def submit(self, ids, expert_index=None, expert_weight=None, max_new_tokens=32,
               on_token: Optional[Callable] = None) -> Request:
        """Queue a request: ids [T] or [1, T] token ids; expert_index [k] (slots) or None for the gate."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0 or ids.numel() + max_new_tokens > self.max_len:
            raise ValueError(f"submit: prompt of {ids.numel()} tokens + {max_new_tokens} new must fit "
                             f"max_len={self.max_len}")
        kk = self.index.shape[1]
        if expert_index is not None:
            ei = torch.as_tensor(expert_index, device=self.device).reshape(1, -1)
            ew = None if expert_weight is None else torch.as_tensor(expert_weight, dtype=torch.float32,
                                                                      device=self.device).reshape(1, -1)
            check_expert_index(ei, ew, self.plan.num_experts)
            if ei.shape[1] > kk:
                raise ValueError(f"submit: {ei.shape[1]} experts named, the engine holds at most {kk}")
            expert_index, expert_weight = ei, ew
        elif self.plan.bank is not None and self.plan.gate is None:
            raise ValueError("submit: the prompts have no gate; name the experts (expert_index)")
        req = Request(self._next_id, ids, expert_index, expert_weight, max_new_tokens, on_token)
        self._next_id += 1
        self.waiting.append(req)
        return req

    def stream(self) -> Iterator:
        """Run until every request is done, yielding (request, token) as tokens are produced."""
        while self.waiting or any(s is not None for s in self.slots):
            yield from self.step()

    def run_until_done(self):
        for _ in self.stream():
            pass

    def step(self):
        """Admit waiting requests into free slots (prefill), then one decode step. Returns the events."""
        events = []
        new = []
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            req.slot = self.slots.index(None)
            self.slots[req.slot] = req
            new.append(req)
        if new:
            for req, tok in zip(new, self._prefill(new)):
                events += self._emit(req, tok)
        if any(s is not None for s in self.slots):
            logits = self._decode()
            nxt = logits.argmax(-1).tolist()
            for b, req in enumerate(self.slots):
                if req is not None:
                    events += self._emit(req, nxt[b])
        return events

    # ----------------------------------------------------------------------------------- internals
    def _emit(self, req, tok):
        req.tokens.append(tok)
        req.t_tokens.append(time.perf_counter())
        if req.on_token is not None:
            req.on_token(req, tok)
        b = req.slot
        if len(req.tokens) >= req.max_new_tokens or (self.eos is not None and tok == self.eos):
            req.done = True
            self.slots[b] = None
            self.active[b] = 0
            self.mask[b].zero_()
            self.lens[b] = 0
            self.index[b] = -1
        else:
            self.tokens_in[b] = tok
        return [(req, tok)]

    def _prefix(self, l, rows):
        """(pool_k, pool_v, index, weight, lens) for layer l and batch rows `rows` (slice or index)."""
        plan = self.plan
        if l in self.iapt:
            pk, pv = self.iapt[l]
            idx = torch.arange(self.max_batch, dtype=torch.int32, device=self.device)[rows].view(-1, 1)
            return pk, pv, idx, None, None
        if plan.bank is not None and l >= plan.inject_from:
            kv = plan.bank.layer(l)
            if kv is not None:
                return kv[0], kv[1], self.index[rows], self.weight[rows], plan.bank.lens
        return None, None, None, None, None

    def _qkv(self, layer, x, cos, sin):
        attn = layer.self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, self.D).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, self.D).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, self.D).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def _finish_layer(self, layer, h, o):
        B, T = h.shape[:2]
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    @torch.no_grad()
    def _prefill(self, reqs):
        """Prefill new requests together (right-padded to the longest): one token each."""
        plan, dev = self.plan, self.device
        n, T = len(reqs), max(r.ids.numel() for r in reqs)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        ids = torch.zeros(n, T, dtype=torch.long, device=dev)
        pad = torch.zeros(n, T, dtype=torch.long, device=dev)      # 1 = real token (right padding)
        for i, r in enumerate(reqs):
            ids[i, :r.ids.numel()], pad[i, :r.ids.numel()] = r.ids, 1
            self.index[r.slot], self.weight[r.slot] = -1, 0.0
            if r.expert_index is not None:
                k = r.expert_index.shape[1]
                self.index[r.slot, :k] = r.expert_index[0].to(torch.int32)
                self.weight[r.slot, :k] = 1.0 if r.expert_weight is None else r.expert_weight[0]
        gated = [i for i, r in enumerate(reqs) if r.expert_index is None and plan.gate is not None]
        h = self.embed(ids)
        pos = torch.arange(T, device=dev).expand(n, T) + plan.position_offset
        cos, sin = self.rotary(h, pos)
        for l, layer in enumerate(self.layers):
            if l in self.iapt:
                pk, pv = plan.generator.to_prefix(layer, plan.generator(l, h, pad))
                self.iapt[l][0][slots], self.iapt[l][1][slots] = pk, pv
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.K[l][slots, :, :T], self.V[l][slots, :, :T] = k, v
            pk, pv, idx, w, lens = self._prefix(l, slots)
            o = run_prefix_attention(q, k, v, pk, pv, idx, w, lens=lens, mask=pad, causal=True,
                                     scale=layer.self_attn.scaling)
            h = self._finish_layer(layer, h, o)
            if gated and l == int(plan.gate.gate_layer):
                gi, gw = plan.gate(h, pad)
                g = slots[gated]
                self.index[g, :gi.shape[1]] = gi[gated].to(torch.int32)
                self.weight[g, :gi.shape[1]] = gw[gated].float()
        self.mask[slots] = 0
        self.mask[slots, :T] = pad
        self.lens[slots] = pad.sum(1)
        self.active[slots] = 1
        last = h[torch.arange(n, device=dev), pad.sum(1) - 1]
        return self.lm_head(self.norm(last)).argmax(-1).tolist()

    def _decode_step(self):
        """One token for every row from the static buffers (capturable: no host sync, static shapes)."""
        B = self.max_batch
        ar = torch.arange(B, device=self.device)
        pos = self.lens.clamp(max=self.max_len - 1)        # free rows write at 0, fully masked anyway
        h = self.embed(self.tokens_in.view(B, 1))
        cos, sin = self.rotary(h, (pos + self.plan.position_offset).view(B, 1))
        self.mask[ar, pos] = self.active
        for l, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.K[l][ar, :, pos] = k[:, :, 0]
            self.V[l][ar, :, pos] = v[:, :, 0]
            pk, pv, idx, w, lens = self._prefix(l, slice(None))
            o = run_prefix_attention(q, self.K[l], self.V[l], pk, pv, idx, w, lens=lens, mask=self.mask,
                                     causal=False, scale=layer.self_attn.scaling)
            h = self._finish_layer(layer, h, o)
        self.lens += self.active
        return self.lm_head(self.norm(h[:, -1]))

    @torch.no_grad()
    def _decode(self):
        if not self.use_graph:
            return self._decode_step()
        if self._graph is None:
            try:
                self._graph, self._graph_out = self._capture()
            except Exception as e:                          # capture unsupported by some op: stay eager
                warnings.warn(f"Engine: CUDA graph capture failed ({e!r}); decoding eagerly")
                self.use_graph = False
                return self._decode_step()
        self._graph.replay()
        return self._graph_out

    def _capture(self):
        state = [t.clone() for t in (self.mask, self.lens, *self.K, *self.V)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):                           # warm-up outside the graph (allocations)
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self._decode_step()
        for dst, src in zip((self.mask, self.lens, *self.K, *self.V), state):   # undo warm-up/capture writes
            dst.copy_(src)
        return g, out


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

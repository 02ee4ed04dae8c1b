"""Batched low-latency serving of many prompt adapters on one frozen model (SPEC §5, issue 5).

    eng = Engine(model, prompts, max_batch=8, max_len=512)
    eng.submit(ids, expert_index=[3, 1], expert_weight=[0.6, 0.4], max_new_tokens=32, on_token=cb)
    eng.submit(ids2)                    # no experts named: the gate of `prompts` picks them at prefill
    eng.submit(ids3, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, seed=1234)
    for req, token in eng.stream(): ... # or eng.run_until_done()

- Static KV cache: per layer K, V [max_batch, Hkv, max_len, D], preallocated; row b of the batch is a
  slot owned by one request while it runs; `mask` [max_batch, max_len] marks its valid tokens.
- Prefill: the requests admitted at a step run together (right-padded, causal + padding mask)
  straight into their slot rows through the model's own modules: the gate reads the masked mean after
  `gate_layer` in that pass (unless the request named its experts), IAPT prompts are generated from
  the hidden states entering each injected layer.
- Decode (the lean path): one step for rows 0..n-1 only, n = the highest busy slot + 1 (slots are
  handed out lowest first, so n is the number of running requests unless some left in between;
  free rows below n are fully masked and produce nothing); attention reads only the first
  S = longest running sequence + 1 cache columns. Per layer: one RMSNorm call, ONE int4 matmul
  for q/k/v (the three QuantizedWeights concatenated along N once at construction: lossless, every
  output row is the same dot product), rotary embedding from a table built once (q and k rotated
  together), the new key/value written at position lens[b], `prefix_attention(q [n, Hq, 1, D], K, V,
  pool, index, weight, attention_mask=mask, causal=False)`, o_proj, one int4 matmul for gate/up
  (fused likewise), act(gate) * up, down_proj. Weights and functions are bound once; the step runs
  under torch.inference_mode. Linears that are not Int4Linear (or do not share bits/group/K) run
  one by one. Fusion copies the fused weights once (`fuse=False` keeps the model's own tensors).
- Tokens: greedy by default; per request `do_sample=True` with temperature, top_k, top_p and a seed
  applies transformers' warpers in transformers' order (temperature, top-k, top-p) then
  softmax + torch.multinomial with the request's own torch.Generator, so a request alone gives the
  tokens of `torch.manual_seed(seed); model.generate(do_sample=True, ...)` (tests/test_serving.py).
- Continuous batching: requests join (prefill) and leave (slot freed) between decode steps.
- CUDA: the decode step is captured in a CUDA graph per row bucket (1, 2, 4, ... max_batch rows,
  all max_len columns) over static input buffers and replayed (capture needs compute capability
  >= 7.0; on failure the engine stays eager and says why).
- Each request records time to first token and the time of every later token.

The prefill steps the model's own modules (input_layernorm, q/k/v/o_proj, the family's
apply_rotary_pos_emb, post_attention_layernorm, mlp), found through hf.FAMILIES; the decode step reads
the same modules' weights: one code path for Llama, Mistral and Qwen2.
A sliding window (Mistral, Qwen2) shorter than `max_len` is refused at construction: the static cache
attends to every cached token (attach() + generate() applies windows).
"""
from __future__ import annotations

import sys
import time
import warnings
from collections import deque
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ..families import FAMILIES, get_path as _get_path
from .hf import Plan, check_expert_index, run_prefix_attention, validate


class Request:
    """One generation request and its streamed output."""

    def __init__(self, rid, ids, expert_index, expert_weight, max_new_tokens, on_token, sampling=None):
        self.id, self.ids, self.max_new_tokens, self.on_token = rid, ids, max_new_tokens, on_token
        self.expert_index, self.expert_weight = expert_index, expert_weight
        self.sampling = sampling          # None: greedy; else (temperature, top_k, top_p, generator)
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


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token from logits [V] as transformers' sampling does it: the warpers TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper (min_tokens_to_keep=1) in that order on fp32 scores, then
    softmax and torch.multinomial(probs, 1) (drawing from `generator`)."""
    s = logits.float().view(1, -1)
    if temperature != 1.0:
        s = s / temperature
    if top_k:
        k = min(int(top_k), s.shape[-1])
        s = s.masked_fill(s < torch.topk(s, k)[0][..., -1, None], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_s, sorted_i = torch.sort(s, descending=False)
        drop = sorted_s.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        s = s.masked_fill(drop.scatter(1, sorted_i, drop), -float("inf"))
    return int(torch.multinomial(F.softmax(s, dim=-1), num_samples=1, generator=generator))


class _Proj:
    """The linears of one layer that read the same input, as one call: x [M, K] -> y [M, sum N].

    Int4Linears of equal bits, group size and K are concatenated along N into one QuantizedWeight
    (lossless: row n of y is the same dot product as in its own layer) and run as one int4 matmul,
    on the CPU straight into the compiled kernel when the registry picks it. Anything else runs
    module by module and is concatenated."""

    def __init__(self, mods, device, fuse=True):
        from ..modules.int4_linear import Int4Linear
        from ..ops.int4_matmul import int4_matmul
        from ..ops.quant_format import QuantizedWeight
        self.mods = list(mods)
        self.fn = None
        same = {(m.bits, m.group_size, m.in_features) for m in self.mods if isinstance(m, Int4Linear)}
        if not all(isinstance(m, Int4Linear) for m in self.mods) or len(same) != 1 or \
                (len(self.mods) > 1 and not fuse):
            return
        qws = [m.qw for m in self.mods]
        if len(qws) == 1:
            qw = qws[0]
        else:
            qw = QuantizedWeight(torch.cat([w.qweight for w in qws]), torch.cat([w.scale for w in qws]),
                                 None if qws[0].min is None else torch.cat([w.min for w in qws]),
                                 (sum(w.out_features for w in qws), qws[0].in_features), qws[0].group_size,
                                 qws[0].bits)
        bias = None
        if any(m.bias is not None for m in self.mods):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=device)
                              for m in self.mods])
        cpu = device.type == "cpu" and _backend.forced() in (None, "cpu") and _backend.has_extension()
        if cpu and bias is None:
            kern = _backend.extension().int4_matmul_cpu
            q, s, mn, g, bits = qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits
            self.fn = lambda x: kern(x, q, s, mn, g, bits)
        else:
            self.fn = lambda x: int4_matmul(x, qw, bias)

    def __call__(self, x):
        if self.fn is not None:
            return self.fn(x)
        ys = [m(x) for m in self.mods]
        return ys[0] if len(ys) == 1 else torch.cat(ys, -1)


class _Layer:
    """What the decode step needs of one decoder layer, bound once."""

    def __init__(self, layer, device, fuse):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _Proj([attn.q_proj, attn.k_proj, attn.v_proj], device, fuse)
        self.o = _Proj([attn.o_proj], device)
        self.scale = attn.scaling
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            self.gate_up = _Proj([mlp.gate_proj, mlp.up_proj], device, fuse)
            self.down, self.act, self.inter = _Proj([mlp.down_proj], device), mlp.act_fn, mlp.gate_proj.out_features
        else:
            self.mlp = mlp
            self.gate_up = None


def _sliding_window(layer, cfg):
    """The sliding window of one decoder layer, or None (Qwen2 sets it per layer, Mistral per model)."""
    attn = layer.self_attn
    w = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
    return None if w is None else int(w)


class Engine:
    def __init__(self, model, prompts=None, *, max_batch=8, max_len=512, top_k=None, eos_token_id=None,
                 cuda_graph=True, fuse=True):
        cfg = model.config
        self.plan = plan = Plan(prompts, cfg.num_hidden_layers)
        self.layers = validate(model, plan)
        path = FAMILIES[cfg.model_type][0].rsplit(".", 1)[0]
        base = _get_path(model, path)
        self.model, self.embed, self.norm, self.rotary = model, base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        self.head = _Proj([model.lm_head], next(model.parameters()).device)
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.L, self.Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.Hq = cfg.num_attention_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_batch, self.max_len, self.eos = max_batch, max_len, eos_token_id
        windows = {i: _sliding_window(layer, cfg) for i, layer in enumerate(self.layers)}
        short = {i: w for i, w in windows.items() if w is not None and w < max_len}
        if short:
            i, w = next(iter(short.items()))
            raise ValueError(
                f"Engine: layer {i} of this {cfg.model_type} model attends through a sliding window of "
                f"{w} tokens, shorter than max_len={max_len}; the Engine's static cache attends to every "
                f"cached token, which would give wrong answers past the window. Use max_len <= {w}, or "
                f"mops_kernels.attach(model, ...) + model.generate(), which applies the window.")
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
        self.rows = torch.arange(B, device=dev)
        self.rows_i32 = self.rows.to(torch.int32).view(B, 1)
        self.iapt = {}                                   # layer -> (k, v) pools [max_batch, 4, Hkv, D]
        if plan.generator is not None:
            for l in plan.generator_layers(self.L):
                self.iapt[l] = (torch.zeros(B, 4, self.Hkv, self.D, dtype=self.dtype, device=dev),
                                torch.zeros(B, 4, self.Hkv, self.D, dtype=self.dtype, device=dev))
        self.host_lens = [0] * B                         # lens mirrored on the host (no device sync)
        self.slots: List[Optional[Request]] = [None] * B
        self.waiting: deque = deque()
        self._next_id = 0
        self.lean = [_Layer(layer, dev, fuse) for layer in self.layers]
        self._rope_table()
        # CPU decode attention: the C++ kernel prefix_attention's registry picks for T = 1, called
        # directly (the op's argument checks cost ~10 us per layer, per step)
        self._attn_cpu = None
        if dev.type == "cpu" and _backend.forced() in (None, "cpu") and _backend.ext_has("prefix_attention_cpu"):
            self._attn_cpu = _backend.extension().prefix_attention_cpu
        self._graphs = {}
        self.use_graph = bool(cuda_graph and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 7)

    def _rope_table(self):
        """cos and the sign-folded sin of every position, [max_len + offset, D], from the model's own rotary
        module, when its frequencies do not depend on the sequence length (else computed per step).

        rotate_half(x) * sin == flip_halves(x) * sin_s with sin_s = [-sin[:D/2], sin[D/2:]], bit for bit
        (a sign flip is exact), so the step rotates with one flip instead of a slice, neg and cat."""
        self._cos = self._sin_s = None
        if getattr(self.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            return
        n = self.max_len + self.plan.position_offset
        with torch.no_grad():
            x = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(x, torch.arange(n, device=self.device).view(1, n))
        h = self.D // 2
        self._cos = cos[0].contiguous()
        self._sin_s = torch.cat([-sin[0, :, :h], sin[0, :, h:]], -1).contiguous()

    # ---------------------------------------------------------------------------------------- API
    def submit(self, ids, expert_index=None, expert_weight=None, max_new_tokens=32,
               on_token: Optional[Callable] = None, *, do_sample=False, temperature=1.0, top_k=None,
               top_p=None, seed=None) -> Request:
        """Queue a request: ids [T] or [1, T] token ids; expert_index [k] (slots) or None for the gate.

        Greedy unless do_sample: then temperature (> 0), top_k (None/0: off), top_p (None/1: off) as in
        transformers' generate(), drawing from torch.Generator().manual_seed(seed) (seed None: a fresh
        nondeterministic seed)."""
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
        sampling = None
        if do_sample:
            if not temperature > 0:
                raise ValueError(f"submit: temperature must be > 0 when sampling, got {temperature}")
            if top_k is not None and top_k < 0:
                raise ValueError(f"submit: top_k must be >= 0, got {top_k}")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"submit: top_p must be in (0, 1], got {top_p}")
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed) if seed is not None else gen.seed()
            sampling = (float(temperature), top_k, top_p, gen)
        req = Request(self._next_id, ids, expert_index, expert_weight, max_new_tokens, on_token, sampling)
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
            logits = self._prefill(new)
            for req, tok in zip(new, self._choose(new, logits)):
                events += self._emit(req, tok)
        busy = [b for b, s in enumerate(self.slots) if s is not None]
        if busy:
            n = busy[-1] + 1
            logits = self._decode(n)
            reqs = [self.slots[b] for b in busy]
            for req, tok in zip(reqs, self._choose(reqs, logits if len(busy) == n else logits[busy])):
                events += self._emit(req, tok)
        return events

    # ----------------------------------------------------------------------------------- internals
    def _choose(self, reqs, logits):
        """The next token of each request from its logits row: argmax, or its sampler."""
        toks = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            if r.sampling is not None:
                t, k, p, gen = r.sampling
                toks[i] = sample_token(logits[i], t, k, p, gen)
        return toks

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
            self.host_lens[b] = 0
            self.index[b] = -1
        else:
            self.tokens_in[b] = tok
        return [(req, tok)]

    def _prefix(self, l, rows):
        """(pool_k, pool_v, index, weight, lens) for layer l and batch rows `rows` (slice or index)."""
        plan = self.plan
        if l in self.iapt:
            pk, pv = self.iapt[l]
            return pk, pv, self.rows_i32[rows], None, None
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

    @torch.inference_mode()
    def _prefill(self, reqs):
        """Prefill new requests together (right-padded to the longest): last-token logits [n, V]."""
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
        for r in reqs:
            self.host_lens[r.slot] = r.ids.numel()
        last = h[torch.arange(n, device=dev), pad.sum(1) - 1]
        return self.lm_head(self.norm(last)).float()

    @staticmethod
    def _rms(mod, x):
        if x.dtype == torch.float32 and hasattr(mod, "variance_epsilon"):
            # Llama/Mistral/Qwen2RMSNorm's fp32 arithmetic without its dtype casts (F.rms_norm is also
            # equal, but slower on the CPU: a composite of more ops)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon) * mod.weight
        return mod(x)

    def _decode_step(self, n, S):
        """Logits [n, V] of one token for rows 0..n-1 attending to cache columns 0..S-1, from the static
        buffers (capturable: no host sync; static shapes for a given (n, S))."""
        Hq, Hkv, D = self.Hq, self.Hkv, self.D
        H2 = Hq + Hkv
        ar = self.rows[:n]
        pos = self.lens[:n]
        h = self.embed(self.tokens_in[:n].view(n, 1)).view(n, -1)
        if self._cos is not None:
            p = pos + self.plan.position_offset if self.plan.position_offset else pos
            cos, sin_s = self._cos[p].view(n, 1, D), self._sin_s[p].view(n, 1, D)
        else:
            c, s = self.rotary(h.view(n, 1, -1), (pos + self.plan.position_offset).view(n, 1))
            cos, sin_s = c.view(n, 1, D), torch.cat([-s[..., :D // 2], s[..., D // 2:]], -1).view(n, 1, D)
        self.mask[ar, pos] = self.active[:n]
        mask = self.mask[:n, :S]
        rows = slice(0, n)
        for l, ly in enumerate(self.lean):
            y = ly.qkv(self._rms(ly.ln1, h)).view(n, Hq + 2 * Hkv, D)
            qk = y[:, :H2]
            qk = qk * cos + qk.reshape(n, H2, 2, D // 2).flip(2).view(n, H2, D) * sin_s
            self.K[l][ar, :, pos] = qk[:, Hq:]
            self.V[l][ar, :, pos] = y[:, H2:]
            pk, pv, idx, w, lens = self._prefix(l, rows)
            q, k, v = qk[:, :Hq].unsqueeze(2), self.K[l][:n, :, :S], self.V[l][:n, :, :S]
            if self._attn_cpu is not None:
                o = self._attn_cpu(q, k, v, pk, pv, idx, w, lens, mask, False, ly.scale)
            else:
                o = run_prefix_attention(q, k, v, pk, pv, idx, w, lens=lens, mask=mask, causal=False,
                                         scale=ly.scale)
            h = h + ly.o(o.reshape(n, Hq * D))
            a = self._rms(ly.ln2, h)
            if ly.gate_up is None:
                h = h + ly.mlp(a)
            else:
                gu = ly.gate_up(a)
                h = h + ly.down(ly.act(gu[:, :ly.inter]) * gu[:, ly.inter:])
        self.lens[:n] += self.active[:n]
        return self.head(self._rms(self.norm, h)).float()

    @torch.inference_mode()
    def _decode(self, n):
        """Logits [n, V] of rows 0..n-1 (rows beyond n hold no request)."""
        busy = range(n)
        if not self.use_graph:
            S = max(self.host_lens[b] for b in busy) + 1
            out = self._decode_step(n, S)
        else:
            out = self._decode_graph(n)
        for b in busy:
            if self.slots[b] is not None:
                self.host_lens[b] += 1
        return out

    def _decode_graph(self, n):
        m = 1
        while m < n:
            m *= 2
        m = min(m, self.max_batch)
        if m not in self._graphs:
            try:
                self._graphs[m] = self._capture(m)
            except Exception as e:                          # capture unsupported by some op: stay eager
                warnings.warn(f"Engine: CUDA graph capture failed ({e!r}); decoding eagerly")
                self.use_graph = False
                return self._decode_step(n, max(self.host_lens[:n]) + 1)
        g, out = self._graphs[m]
        g.replay()
        return out[:n]

    def _capture(self, m):
        state = [t.clone() for t in (self.mask, self.lens, *self.K, *self.V)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):                           # warm-up outside the graph (allocations)
            for _ in range(2):
                self._decode_step(m, self.max_len)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self._decode_step(m, self.max_len)
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

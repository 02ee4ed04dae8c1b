"""The static KV cache of the Engine's slots, and the lean decode step over it.

- `SlotCache`: per layer K, V [max_batch, Hkv, max_len, D], preallocated; row b belongs to slot b;
  `mask` [max_batch, max_len] marks its valid tokens, `lens` [max_batch] its length, `active` whether
  a request runs there, `index` / `weight` [max_batch, k] its experts, `tokens_in` the token it feeds
  next, IAPT pools [max_batch, 4, Hkv, D] per injected layer. `host_lens` mirrors lens on the host.
- `DecodeStep(n, S)`: logits [n, V] of one token for rows 0..n-1 attending to cache columns 0..S-1.
  Per layer: one RMSNorm call, ONE int4 matmul for q/k/v (the three QuantizedWeights concatenated
  along N once at construction: lossless, every output row is the same dot product), rotary
  embedding from a table built once (q and k rotated together), the new key/value written at
  position lens[b], prefix attention, o_proj, one int4 matmul for gate/up (fused likewise),
  act(gate) * up, down_proj. On the CPU kernel the RMSNorms, SiLU * up and the residual sums run
  inside the matmul's call that reads them (`int4_matmul_cpu_pre`), not as separate aten ops, and
  each call has its helper thread read the next weight ahead (`next_weight`). Linears that are not
  Int4Linear (or do not share bits/group/K) run one by one. The attention backend for T = 1 is
  picked once per layer from the op's registry and called directly (the op's argument checks read
  values on the host); value checks happen where data
  enters the Engine (submit, the gate's output). On the CPU with fp32 and the C++ kernel, rotary +
  cache write + attention run as one compiled call per layer (`decode_attention_cpu`, the same
  arithmetic: csrc/decode_step_cpu.cpp). The step reads nothing on the host and has static
  shapes for a given (n, S): it can be captured in a CUDA graph (graphs.py).
"""
from __future__ import annotations

from typing import List

import torch

from .. import _backend


class FusedProj:
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
        cpu = device.type == "cpu" and _backend.forced("int4_matmul") in (None, "cpu") and _backend.has_extension()
        if cpu and bias is None:
            kern = _backend.extension().int4_matmul_cpu
            q, s, mn, g, bits = qw.qweight, qw.scale, qw.min, qw.group_size, qw.bits
            self.fn = lambda x: kern(x, q, s, mn, g, bits)
            if _backend.ext_has("int4_matmul_cpu_pre"):
                kpre = _backend.extension().int4_matmul_cpu_pre
                self.qw = qw
                self.pre = lambda x, kind, w, eps, res=None: kpre(x, q, s, mn, g, bits, kind, w, eps, res,
                                                                  *self.next_weight)
        else:
            self.fn = lambda x: int4_matmul(x, qw, bias)

    pre = None  # the CPU kernel with its input transformed in the same call (csrc/ops.h), or None
    qw = None   # the (fused) QuantizedWeight behind `pre`
    # (qweight, scale, min) of the weight the step multiplies after this one: the kernel's helper
    # thread reads it ahead while Python and attention run in between (DecodeStep links them)
    next_weight = (None, None, None)

    def add(self, x, residual):
        """residual + self(x), the sum inside the kernel's call on the CPU kernel."""
        if self.pre is not None and x.dtype == torch.float32 and x.is_contiguous() and residual.is_contiguous():
            return self.pre(x, 0, None, 0.0, residual)
        return residual + self(x)

    def __call__(self, x):
        if self.fn is not None:
            return self.fn(x)
        ys = [m(x) for m in self.mods]
        return ys[0] if len(ys) == 1 else torch.cat(ys, -1)

    def normed(self, x, norm):
        """self(rms(norm, x)); on the CPU kernel the RMSNorm runs inside its call (no aten ops)."""
        if self.pre is not None and x.dtype == torch.float32 and hasattr(norm, "variance_epsilon") \
                and norm.weight.dtype == torch.float32:
            return self.pre(x, 1, norm.weight, float(norm.variance_epsilon))
        return self(rms(norm, x))

    def silu_mul(self, gu, act, inter, residual=None):
        """self(act(gu[:, :inter]) * gu[:, inter:]) (+ residual), act the MLP's activation (None: SiLU,
        which the CPU kernel applies inside its call, with the residual sum)."""
        if self.pre is not None and act is None and gu.dtype == torch.float32 and gu.is_contiguous() and \
                (residual is None or residual.is_contiguous()):
            return self.pre(gu, 2, None, 0.0, residual)
        y = self((act or torch.nn.functional.silu)(gu[:, :inter]) * gu[:, inter:])
        return y if residual is None else residual + y


class LeanLayer:
    """What the decode step needs of one decoder layer, bound once."""

    def __init__(self, layer, device, fuse):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = FusedProj([attn.q_proj, attn.k_proj, attn.v_proj], device, fuse)
        self.o = FusedProj([attn.o_proj], device)
        self.scale = attn.scaling
        self.attn = None                                   # the T = 1 backend, set by DecodeStep
        self.fused_attn = None                             # or the CPU's whole attention block (DecodeStep)
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            self.gate_up = FusedProj([mlp.gate_proj, mlp.up_proj], device, fuse)
            self.down, self.act, self.inter = FusedProj([mlp.down_proj], device), mlp.act_fn, mlp.gate_proj.out_features
            probe = torch.linspace(-12, 12, 97)
            with torch.no_grad():                          # SiLU (the kernels' pre=2): act = None
                if torch.equal(self.act(probe), torch.nn.functional.silu(probe)):
                    self.act = None
        else:
            self.mlp = mlp
            self.gate_up = None


def rms(mod, x):
    """The model's RMSNorm module `mod` applied to x."""
    if x.dtype == torch.float32 and hasattr(mod, "variance_epsilon"):
        # Llama/Mistral/Qwen2RMSNorm's fp32 arithmetic without its dtype casts (F.rms_norm is also
        # equal, but slower on the CPU: a composite of more ops)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon) * mod.weight
    return mod(x)


class SlotCache:
    """The static buffers of `max_batch` slots (module docstring)."""

    def __init__(self, plan, num_layers, Hkv, D, max_batch, max_len, experts_per_request, dtype, device):
        B, dev = max_batch, device
        self.plan = plan
        self.K = [torch.zeros(B, Hkv, max_len, D, dtype=dtype, device=dev) for _ in range(num_layers)]
        self.V = [torch.zeros_like(k) for k in self.K]
        self.mask = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        self.lens = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.long, device=dev)
        self.index = torch.full((B, experts_per_request), -1, dtype=torch.int32, device=dev)
        self.weight = torch.zeros(B, experts_per_request, dtype=torch.float32, device=dev)
        self.tokens_in = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos_offset = torch.zeros(B, dtype=torch.long, device=dev)   # per-row position shift (PEFT)
        # a pooled bank (serving.prompt_sets) has per-layer lengths; resolved once, not per layer per step
        self._layer_lens = getattr(plan.bank, "layer_lens", None) if plan.bank is not None else None
        self.rows = torch.arange(B, device=dev)
        self.rows_i32 = self.rows.to(torch.int32).view(B, 1)
        self.iapt = {}                                   # layer -> (k, v) pools [max_batch, 4, Hkv, D]
        if plan.generator is not None:
            for l in plan.generator_layers(num_layers):
                self.iapt[l] = (torch.zeros(B, 4, Hkv, D, dtype=dtype, device=dev),
                                torch.zeros(B, 4, Hkv, D, dtype=dtype, device=dev))
        self.host_lens: List[int] = [0] * B

    def decode_state(self):
        """The tensors one decode step writes (graphs.py restores them after a capture)."""
        return [self.mask, self.lens, *self.K, *self.V]

    def clear(self, b: int) -> None:
        """Row b holds no request: masked out, nothing attended, no experts."""
        self.active[b] = 0
        self.mask[b].zero_()
        self.lens[b] = 0
        self.host_lens[b] = 0
        self.index[b] = -1
        self.weight[b] = 0.0
        self.pos_offset[b] = 0

    def prefix(self, l, rows):
        """(pool_k, pool_v, index, weight, lens) for layer l and batch rows `rows` (slice or index)."""
        plan = self.plan
        if l in self.iapt:
            pk, pv = self.iapt[l]
            idx = self.rows_i32[rows]
            return pk, pv, idx, plan.generator_weight(l, idx.shape[0], idx.device), None
        if plan.bank is not None and l >= plan.inject_from:
            kv = plan.bank.layer(l)
            if kv is not None:
                idx = self.index[rows]
                lens = plan.bank.lens if self._layer_lens is None else self._layer_lens(l)
                return kv[0], kv[1], idx, plan.bank_weight(l, self.weight[rows], idx), lens
        return None, None, None, None, None


class DecodeStep:
    """step(n, S) -> logits [n, V] (module docstring). Weights and functions are bound once."""

    def __init__(self, model, layers, cache: SlotCache, *, Hq, Hkv, D, max_len, dtype, device, fuse=True):
        from ..families import decoder
        from ..ops import prefix_attention as pa_mod
        base = decoder(model)
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.head = FusedProj([model.lm_head], device)
        self.cache, self.plan = cache, cache.plan
        self.Hq, self.Hkv, self.D, self.max_len = Hq, Hkv, D, max_len
        self.dtype, self.device = dtype, device
        self.lean = [LeanLayer(layer, device, fuse) for layer in layers]
        # the largest position shift a row may have (SlotCache.pos_offset; 0: positions are the lengths)
        self.max_offset = int(getattr(self.plan.prompts, "max_position_offset", self.plan.position_offset) or 0)
        self._rope_table()
        # each CPU kernel call reads ahead the weight the step multiplies next (the last layer's down
        # projection: the head; the head: the first layer's q/k/v, for the next step)
        # (only the calls on the CPU kernel: a projection that is not skips to the next that is)
        chain = [p for ly in self.lean for p in (ly.qkv, ly.o, ly.gate_up, ly.down)] + [self.head]
        chain = [p for p in chain if p is not None and p.qw is not None]
        for p, nxt in zip(chain, chain[1:] + chain[:1]):
            p.next_weight = (nxt.qw.qweight, nxt.qw.scale, nxt.qw.min)
        # the CPU's attention block as one compiled call (rotary + cache write + the C++ kernel), on
        # the layers whose T = 1 backend is that kernel, with fp32 and the rotary table
        fused = None
        if device.type == "cpu" and dtype == torch.float32 and self.cos is not None and \
                _backend.ext_has("decode_attention_cpu"):
            fused = _backend.extension().decode_attention_cpu
        q1 = torch.empty(1, Hq, 1, D, dtype=dtype, device=device)
        for l, ly in enumerate(self.lean):
            has_prefix = cache.prefix(l, slice(0, 1))[2] is not None
            impl = _backend.dispatch(pa_mod._OP, device, q1, has_prefix, False)
            ly.attn = impl.fn
            ly.fused_attn = fused if impl.backend == "cpu" else None

    def _rope_table(self):
        """cos and the sign-folded sin of every position, [max_len + offset, D], from the model's own rotary
        module, when its frequencies do not depend on the sequence length (else computed per step).

        rotate_half(x) * sin == flip_halves(x) * sin_s with sin_s = [-sin[:D/2], sin[D/2:]], bit for bit
        (a sign flip is exact), so the step rotates with one flip instead of a slice, neg and cat."""
        self.cos = self.sin_s = None
        if getattr(self.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            return
        n = self.max_len + self.max_offset
        with torch.no_grad():
            x = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(x, torch.arange(n, device=self.device).view(1, n))
        h = self.D // 2
        self.cos = cos[0].contiguous()
        self.sin_s = torch.cat([-sin[0, :, :h], sin[0, :, h:]], -1).contiguous()

    def __call__(self, n: int, S: int) -> torch.Tensor:
        c = self.cache
        Hq, Hkv, D = self.Hq, self.Hkv, self.D
        H2 = Hq + Hkv
        ar = c.rows[:n]
        pos = c.lens[:n]
        h = self.embed(c.tokens_in[:n].view(n, 1)).view(n, -1)
        p = pos + c.pos_offset[:n] if self.max_offset else pos
        if self.cos is not None:
            cos_r, sin_r = self.cos[p], self.sin_s[p]
            cos, sin_s = cos_r.view(n, 1, D), sin_r.view(n, 1, D)
        else:
            co, s = self.rotary(h.view(n, 1, -1), p.view(n, 1))
            cos, sin_s = co.view(n, 1, D), torch.cat([-s[..., :D // 2], s[..., D // 2:]], -1).view(n, 1, D)
        c.mask[ar, pos] = c.active[:n]
        mask = c.mask[:n, :S]
        rows = slice(0, n)
        for l, ly in enumerate(self.lean):
            y = ly.qkv.normed(h, ly.ln1)
            pk, pv, idx, w, lens = c.prefix(l, rows)
            if ly.fused_attn is not None:
                o = ly.fused_attn(y, cos_r, sin_r, c.K[l], c.V[l], pos, pk, pv, idx, w, lens, c.mask, S, Hq,
                                  ly.scale)
            else:
                y = y.view(n, Hq + 2 * Hkv, D)
                qk = y[:, :H2]
                qk = qk * cos + qk.reshape(n, H2, 2, D // 2).flip(2).view(n, H2, D) * sin_s
                c.K[l][ar, :, pos] = qk[:, Hq:]
                c.V[l][ar, :, pos] = y[:, H2:]
                q, k, v = qk[:, :Hq].unsqueeze(2), c.K[l][:n, :, :S], c.V[l][:n, :, :S]
                o = ly.attn(q, k, v, pk, pv, idx, w, lens, mask, False, ly.scale).reshape(n, Hq * D)
            h = ly.o.add(o, h)
            if ly.gate_up is None:
                h = h + ly.mlp(rms(ly.ln2, h))
            else:
                h = ly.down.silu_mul(ly.gate_up.normed(h, ly.ln2), ly.act, ly.inter, residual=h)
        c.lens[:n] += c.active[:n]
        return self.head.normed(h, self.norm).float()

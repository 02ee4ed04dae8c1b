"""Several prompt sets as one pool of slots, so that one Engine (one continuous batch) serves them all.

    sets = PromptSets({"tasks": MixtureOfPrompts.load(a, model=m), "chat": MixtureOfPrompts.load(b, model=m)})
    eng = Engine(model, sets)
    eng.submit(ids, prompt_set="tasks")                       # the "tasks" gate picks among its slots
    eng.submit(ids, prompt_set="chat", expert_index=[1, 0])   # slots of "chat", numbered within it

The banks are concatenated: set i's slot j is pool slot offsets[i] + j; a prompt length shorter than
the longest is padded (its `lens` keep the true lengths, so the padding is never attended). Each set
keeps its own gate, run at its own gate layer on its own requests only, and its choice is shifted into
the pool. A bank's per-layer weight (PromptBank.prefix_weight, the trained log-weight per layer) is
read once here, per set and layer, into a table the pool multiplies each slot's weight by: the
pool serves the banks as they are when combined (frozen, as serving is).

Sets may inject different layers (a set's slots are empty, length 0, at the layers it does not
inject: PEFT prefix adapters inject every layer, a MoPs bank those from its inject_from) and shift
positions differently (PEFT prefix tuning moves the prompt by its virtual tokens, a MoPs bank does
not): the Engine gives each request its set's position offset. They must share one dtype, device and
(kv heads, head dim); otherwise ValueError names the mismatch. Requests report their experts numbered
within their set.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


class PooledBank:
    """The banks of several prompt sets as one: `layer(l)` -> (keys, values) [E, P, Hkv, D] or None,
    `lens` [E], `layer_lens(l)` [E] (0 for the slots of sets that do not inject layer l), and
    `prefix_weight` when a set's bank weights its layers."""

    def __init__(self, banks, num_layers: int):
        self.num_layers = num_layers
        self.sizes = [int(b.lens.numel()) for b in banks]
        E = sum(self.sizes)
        offsets = [sum(self.sizes[:i]) for i in range(len(banks))]
        self.lens = torch.cat([b.lens.to(torch.int32) for b in banks])
        self.kv, self._lens = {}, {}
        per_layer = {l: [b.layer(l) for b in banks] for l in range(num_layers)}
        per_layer = {l: kvs for l, kvs in per_layer.items() if any(kv is not None for kv in kvs)}
        everyone = [kv for kvs in per_layer.values() for kv in kvs if kv is not None]
        P = max((int(k.shape[1]) for k, _ in everyone), default=0)
        if everyone:
            ref = everyone[0][0]
            if any(k.dtype != ref.dtype or k.device != ref.device for k, _ in everyone):
                raise ValueError(f"the sets' prompts must share one dtype and device, got "
                                 f"{sorted({(str(k.dtype), str(k.device)) for k, _ in everyone})}")
            shapes = {tuple(k.shape[2:]) for k, _ in everyone}
            if len(shapes) != 1:
                raise ValueError(f"the sets' prompts have different (kv heads, head dim): {sorted(shapes)}")
            Hkv, D = shapes.pop()
        for l, kvs in per_layer.items():
            keys = torch.zeros(E, P, Hkv, D, dtype=ref.dtype, device=ref.device)
            values = torch.zeros_like(keys)
            lens = self.lens.clone()
            for o, n, kv in zip(offsets, self.sizes, kvs):
                if kv is None:                     # this set does not inject layer l: its slots are empty here
                    lens[o:o + n] = 0
                    continue
                k, v = kv
                keys[o:o + k.shape[0], :k.shape[1]] = k.detach()
                values[o:o + v.shape[0], :v.shape[1]] = v.detach()
            self.kv[l] = (keys, values)
            if not torch.equal(lens, self.lens):
                self._lens[l] = lens
        self.prompt_len = P
        # per-(layer, slot) weight factors: each set's bank.prefix_weight at weight 1, read once
        weighted = [getattr(b, "prefix_weight", None) for b in banks]
        self.factor = None
        if any(fn is not None for fn in weighted) and self.kv:
            dev = ref.device
            self.factor = {}
            for l, kvs in per_layer.items():
                cols = []
                for fn, n, kv in zip(weighted, self.sizes, kvs):
                    f = 1.0
                    if fn is not None and kv is not None:
                        with torch.no_grad():
                            one = torch.ones(1, 1, device=dev)
                            f = float(fn(l, one, torch.zeros(1, 1, dtype=torch.long, device=dev)).reshape(-1)[0])
                    if not (f >= 0 and f < float("inf")):
                        raise ValueError(f"layer {l}: a set's bank weight is {f}, not finite and >= 0")
                    cols.append(torch.full((n,), f, dtype=torch.float32, device=dev))
                self.factor[l] = torch.cat(cols)

    num_experts = property(lambda self: int(self.lens.numel()))

    def layer(self, l: int):
        return self.kv.get(l)

    def layer_lens(self, l: int) -> torch.Tensor:
        return self._lens.get(l, self.lens)

    def prefix_weight(self, layer_idx: int, weight: Optional[torch.Tensor], index: torch.Tensor):
        """[B, k] weights of a layer: the requests' weights (None = 1) times the slot's set factor."""
        if self.factor is None or layer_idx not in self.factor:
            return weight
        f = self.factor[layer_idx].to(index.device)[index.long().clamp(min=0)]
        return f if weight is None else weight * f


class PromptSets:
    """Named prompt sets (MixtureOfPrompts, or anything with .bank / .gate / .inject_from) pooled for one
    Engine; see the module docstring."""

    def __init__(self, sets: Dict[str, object], num_layers: Optional[int] = None):
        if not sets:
            raise ValueError("PromptSets needs at least one prompt set")
        self.names = list(sets)
        items = list(sets.values())
        for name, p in sets.items():
            if not hasattr(p, "bank") or p.bank is None:
                raise ValueError(f"prompt set {name!r}: not a bank of prompt slots ({type(p).__name__})")
        # each set's position offset (PEFT prefix tuning shifts the prompt's positions by its virtual
        # tokens, a MoPs bank does not): the Engine applies it per request
        self.position_offsets = {n: int(getattr(p, "position_offset", 0) or 0) for n, p in sets.items()}
        self.position_offset = 0                       # requests of no set: the plain model's positions
        self.max_position_offset = max(self.position_offsets.values())
        if num_layers is None:                      # PromptBank (and from_peft's) know their model's
            try:
                num_layers = max(int(p.bank.num_layers) for p in items)
            except AttributeError:
                raise ValueError("PromptSets: a bank does not say how many layers its model has; pass "
                                 "num_layers=model.config.num_hidden_layers") from None
        self.bank = PooledBank([p.bank for p in items], num_layers)
        self.gate = None                       # each set's own gate: `gates`, run by the Engine
        self.inject_from = min(int(getattr(p, "inject_from", 0)) for p in items)
        self.sizes = dict(zip(self.names, self.bank.sizes))
        self.offsets = {n: sum(self.bank.sizes[:i]) for i, n in enumerate(self.names)}
        self.gates = {n: p.gate for n, p in sets.items() if getattr(p, "gate", None) is not None}
        for n, g in self.gates.items():
            if int(g.gate_layer) >= int(getattr(sets[n], "inject_from", num_layers)):
                raise ValueError(f"prompt set {n!r}: gate_layer {g.gate_layer} must be below its inject_from")

    num_experts = property(lambda self: self.bank.num_experts)
    prompt_len = property(lambda self: self.bank.prompt_len)

    @property
    def top_k(self) -> Optional[int]:
        """The most slots any set's gate picks (the Engine holds that many per request)."""
        return max((int(g.top_k) for g in self.gates.values()), default=None)

    def check(self, name) -> None:
        if name not in self.offsets:
            raise ValueError(f"prompt_set: unknown set {name!r}; this pool holds {self.names}")

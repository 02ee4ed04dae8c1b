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

Sets must agree on what a slot means to the model: the same injected layers and the same position
offset (PEFT prefix tuning shifts the prompt's positions; a MoPs bank does not), one dtype and device;
otherwise ValueError names the first mismatch. Requests report their experts numbered within their set.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


class PooledBank:
    """The banks of several prompt sets as one: `layer(l)` -> (keys, values) [E, P, Hkv, D] or None,
    `lens` [E], and `prefix_weight` when a set's bank weights its layers."""

    def __init__(self, banks, num_layers: int):
        self.num_layers = num_layers
        self.sizes = [int(b.lens.numel()) for b in banks]
        E = sum(self.sizes)
        offsets = [sum(self.sizes[:i]) for i in range(len(banks))]
        self.kv = {}
        P = 0
        for l in range(num_layers):
            kvs = [b.layer(l) for b in banks]
            present = [kv is not None for kv in kvs]
            if any(present) and not all(present):
                have = [i for i, p in enumerate(present) if p]
                raise ValueError(f"layer {l}: prompt sets {have} inject it and the others do not; sets served "
                                 f"together must inject the same layers")
            if all(present) and kvs:
                P = max(P, max(int(k.shape[1]) for k, _ in kvs))
                self.kv[l] = kvs
        self.lens = torch.cat([b.lens.to(torch.int32) for b in banks])
        ref = next(iter(self.kv.values()))[0][0] if self.kv else None
        for l, kvs in self.kv.items():
            shapes = {tuple(k.shape[2:]) for k, _ in kvs}
            if len(shapes) != 1:
                raise ValueError(f"layer {l}: the sets' prompts have different (kv heads, head dim): {sorted(shapes)}")
            if any(k.dtype != ref.dtype or k.device != ref.device for k, _ in kvs):
                raise ValueError(f"layer {l}: the sets' prompts must share one dtype and device, got "
                                 f"{sorted({(str(k.dtype), str(k.device)) for k, _ in kvs})}")
            Hkv, D = kvs[0][0].shape[2:]
            keys = torch.zeros(E, P, Hkv, D, dtype=ref.dtype, device=ref.device)
            values = torch.zeros_like(keys)
            for o, (k, v) in zip(offsets, kvs):
                keys[o:o + k.shape[0], :k.shape[1]] = k.detach()
                values[o:o + v.shape[0], :v.shape[1]] = v.detach()
            self.kv[l] = (keys, values)
        self.prompt_len = P
        # per-(layer, slot) weight factors: each set's bank.prefix_weight at weight 1, read once
        weighted = [getattr(b, "prefix_weight", None) for b in banks]
        self.factor = None
        if any(fn is not None for fn in weighted) and self.kv:
            dev = ref.device
            self.factor = {}
            for l in self.kv:
                cols = []
                for fn, n in zip(weighted, self.sizes):
                    f = 1.0
                    if fn is not None:
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
        offs = {int(getattr(p, "position_offset", 0) or 0) for p in items}
        if len(offs) != 1:
            per = {n: int(getattr(p, "position_offset", 0) or 0) for n, p in sets.items()}
            raise ValueError(f"prompt sets with different position offsets cannot share a batch: {per} "
                             f"(PEFT prefix adapters shift the prompt's positions, MoPs banks do not)")
        self.position_offset = offs.pop()
        if num_layers is None:
            num_layers = max(int(getattr(p.bank, "num_layers", 0) or 0) for p in items) or \
                max(max(getattr(p.bank, "inject_layers", [0])) + 1 for p in items)
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

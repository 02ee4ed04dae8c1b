"""Drop-in Hugging Face integration: `attach(model, prompts)` / `detach(model)` (SPEC §5).

One table (`mops_kernels.families.FAMILIES`) covers the Llama, Mistral and Qwen2 families: where the
decoder layers live and which attention classes they use. Nothing per model is copied: the attention is the package's "mops"
entry of transformers' AttentionInterface (integrations/attention.py, 2-D padding mask), and the
per-request prefix information travels to every layer as the `mops_prefix` keyword that transformers
forwards from the model's forward call down to the attention function, which calls
`mops_prefix.prefix(layer_idx, device)` -> (prefix_k, prefix_v, index, weight, lens).

What attach does, on the model instance only (detach restores all of it):
- `model.set_attn_implementation("mops")` (our prefix attention, SPEC §1; detach restores the old one);
- `model.forward` / `model.generate` wrapped: they accept `expert_index` [B, k] and `expert_weight`
  [B, k] (one row per prompt, exactly) and carry a `_Request` (the experts of each row, the 2-D
  padding mask, IAPT prefixes) that belongs to the call (a context variable), not to the model, so
  concurrent generate() calls on one model never see each other's experts;
- `copy.deepcopy(model)` gives an attached copy that runs its own weights and prompts;
- MoPs: a forward hook on decoder layer `gate.gate_layer` runs the gate on the hidden state after that
  layer (masked mean over the prompt tokens) at prefill, in the same forward pass; the chosen experts
  stay with each row for every decode step (beams of one request share them);
- IAPT: a forward pre-hook on every injected layer turns the hidden states entering it into that
  request's 4 prefix tokens at prefill (per-request slots in `prefix_attention`).
Any transformers cache works (dynamic, StaticCache / cache_implementation="static", sliding-window
caches), and Mistral's / Qwen2's sliding windows are applied: attention.py says how.
`quantize=True` also swaps every nn.Linear of the decoder for an Int4Linear (irreversible).
Everything is validated before anything is touched: a ValueError names the mismatch.
`with attached(model, prompts):` attaches for the block and detaches after it.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
from typing import Optional

import torch

from ..families import FAMILIES, decoder, family, get_path, head_dim  # noqa: F401 (FAMILIES: kept importable here)
from .attention import ATTN_NAME, register


def run_prefix_attention(q, k, v, pk, pv, idx, w, *, lens=None, mask=None, causal=True, scale=None):
    """prefix_attention (SPEC §1) with the pool/index/weight/lens of one layer (all None: no prefix)."""
    from ..ops.prefix_attention import prefix_attention
    return prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask, causal=causal,
                            scale=scale)


# --------------------------------------------------------------------------------------------
# The prompts object: MixtureOfPrompts, InstructionPromptGenerator or None (duck-typed).
# --------------------------------------------------------------------------------------------
class Plan:
    """What the model must do per request, unpacked from `prompts`."""

    def __init__(self, prompts, num_layers):
        self.prompts = prompts
        self.bank = self.gate = self.generator = None
        self.inject_from = num_layers
        self.position_offset = int(getattr(prompts, "position_offset", 0) or 0)
        if prompts is None:
            return
        if hasattr(prompts, "to_prefix"):                       # InstructionPromptGenerator
            self.generator = prompts
            layers = getattr(prompts, "inject_layers", None)
            self.inject_layers = sorted(int(x) for x in layers) if layers is not None else None
            self.inject_from = int(getattr(prompts, "inject_from", 0))
            return
        if hasattr(prompts, "bank"):                           # MixtureOfPrompts
            self.bank, self.gate = prompts.bank, getattr(prompts, "gate", None)
            self.inject_from = int(getattr(prompts, "inject_from", 0))
        elif hasattr(prompts, "layer") and hasattr(prompts, "lens"):   # a bare PromptBank
            self.bank = prompts
            self.inject_from = 0
        else:
            raise ValueError(f"attach: prompts must be a MixtureOfPrompts, an InstructionPromptGenerator, "
                             f"a PromptBank or None, got {type(prompts).__name__}")

    @property
    def num_experts(self):
        return int(self.bank.lens.numel()) if self.bank is not None else 0

    def generator_layers(self, num_layers):
        if self.inject_layers is not None:
            return self.inject_layers
        return list(range(self.inject_from, num_layers))

    # The prompt objects are duck-typed: the hooks below are optional on them.
    def bank_weight(self, layer_idx, weight, index):
        """prefix_weight [B, k] of a bank layer: the requests' weights, times the bank's per-layer
        weight when it has one (PromptBank.prefix_weight)."""
        fn = getattr(self.bank, "prefix_weight", None)
        return weight if fn is None else fn(layer_idx, weight, index)

    def generator_weight(self, layer_idx, batch, device):
        fn = getattr(self.generator, "prefix_weight", None)
        return None if fn is None else fn(layer_idx, batch, device)

    def generator_prefix(self, layer_module, layer_idx, H, mask):
        """(k, v) [B, 4, Hkv, D] of an IAPT layer from the hidden states entering it."""
        fn = getattr(self.generator, "prefix", None)
        if fn is not None:
            return fn(layer_module, layer_idx, H, mask)
        return self.generator.to_prefix(layer_module, self.generator(layer_idx, H, mask))


def validate(model, plan):
    """Check that `model` is a supported family and `plan` fits it; returns its decoder layers."""
    cfg = model.config
    try:
        _, (path, attn_classes, _) = family(model)
    except ValueError as e:
        raise ValueError(f"attach: {e}") from None
    layers = get_path(model, path)
    if layers is None:
        raise ValueError(f"attach: {type(model).__name__} has no decoder layers at '{path}'")
    for i, layer in enumerate(layers):
        if type(getattr(layer, "self_attn", None)).__name__ not in attn_classes:
            raise ValueError(f"attach: layer {i} attention is {type(getattr(layer, 'self_attn', None)).__name__}, "
                             f"expected one of {attn_classes}")
    L = len(layers)
    Hkv = cfg.num_key_value_heads
    D = head_dim(cfg)
    bank = plan.bank
    if bank is not None:
        nl = getattr(bank, "num_layers", None)
        if nl is not None and nl != L:
            raise ValueError(f"attach: prompt bank built for {nl} layers, model has {L}")
        for l in range(L):
            kv = bank.layer(l)
            if kv is None:
                continue
            pk = kv[0]
            if pk.dim() != 4 or pk.shape[2] != Hkv or pk.shape[3] != D:
                raise ValueError(f"attach: prompt bank layer {l} has prefix_k {tuple(pk.shape)}, model needs "
                                 f"[E, P, Hkv={Hkv}, D={D}]")
            if l < plan.inject_from:
                raise ValueError(f"attach: prompt bank has layer {l} < inject_from={plan.inject_from}")
    if plan.gate is not None:
        g = int(plan.gate.gate_layer)
        if not 0 <= g < L:
            raise ValueError(f"attach: gate_layer={g} out of range for a model with {L} layers")
        if plan.inject_from <= g:
            raise ValueError(f"attach: inject_from={plan.inject_from} must be > gate_layer={g}")
        if plan.num_experts and int(plan.gate.top_k) > plan.num_experts:
            raise ValueError(f"attach: gate top_k={plan.gate.top_k} > {plan.num_experts} experts")
    if plan.generator is not None:
        for l in plan.generator_layers(L):
            if not 0 <= l < L:
                raise ValueError(f"attach: prompt generator layer {l} out of range for {L} layers")
    if plan.prompts is not None and hasattr(plan.prompts, "check_compatible"):
        plan.prompts.check_compatible(model)      # raises ValueError naming the mismatch
    _check_placement(model, plan, L)
    check_finite_prompts(plan, L)
    return layers


def _check_placement(model, plan, num_layers):
    """Every prompt tensor on the model's device; the bank's pools (and IAPT's generated prefixes,
    which take the frozen layer's dtype) in the model's activation dtype: prefix_attention takes
    prefix_k/v in q's dtype. The gate and the generator compute in fp32 from any float hidden
    state, so only their device must match. Raises ValueError naming the tensor and both sides."""
    from ..modules.prompts import model_placement
    device, dtype = model_placement(model)
    if device is None:
        return
    fix = ("build the prompts for this model: MixtureOfPrompts.for_model(model) / "
           ".load(dir, model=model) / load_shipped(model), or prompts.to(device=..., dtype=...)")

    def same_device(t):
        return t.device.type == device.type and (t.device.index or 0) == (device.index or 0)

    def check(name, t, want_dtype):
        if not isinstance(t, torch.Tensor):
            return
        if not same_device(t):
            raise ValueError(f"attach: {name} is on {t.device}, the model is on {device}; {fix}")
        if want_dtype is not None and t.dtype != want_dtype:
            raise ValueError(f"attach: {name} is {t.dtype}, the model computes in {want_dtype} "
                             f"(prefix_attention needs the prefixes in q's dtype); {fix}")

    bank = plan.bank
    if bank is not None:
        for l in range(num_layers):
            kv = bank.layer(l)
            if kv is not None:
                check(f"prompt bank keys of layer {l}", kv[0], dtype)
                check(f"prompt bank values of layer {l}", kv[1], dtype)
        check("prompt bank lens", bank.lens, None)
    for what, mod in (("gate", plan.gate), ("prompt generator", plan.generator)):
        if isinstance(mod, torch.nn.Module):
            for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                check(f"{what} tensor {name!r}", t, None)


def check_finite_prompts(plan, num_layers):
    """ValueError naming the first bank layer / gate / generator tensor with NaN or inf values (run
    after the placement checks: the tensors are then on the model's device)."""
    if plan.bank is not None:
        for l in range(num_layers):
            kv = plan.bank.layer(l)
            if kv is not None and not bool(torch.isfinite(kv[0]).all() & torch.isfinite(kv[1]).all()):
                raise ValueError(f"attach: prompt bank layer {l} has non-finite keys/values (NaN/inf)")
    for owner, mod in (("gate", plan.gate), ("generator", plan.generator)):
        mod = getattr(mod, "generator", mod)          # the trainer's instruction-mask wrapper
        if not isinstance(mod, torch.nn.Module):
            continue
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"attach: prompts {owner}.{name} has non-finite values (NaN/inf)")


def check_expert_index(index, weight, num_experts):
    """Validate explicit slots: index [B, k] int in [-1, E), weight [B, k] >= 0 or None."""
    if index is None:
        if weight is not None:
            raise ValueError("expert_weight given without expert_index")
        return
    if index.dim() != 2:
        raise ValueError(f"expert_index must have shape [B, k], got {tuple(index.shape)}")
    if index.dtype.is_floating_point:
        raise ValueError(f"expert_index must be an integer tensor, got {index.dtype}")
    if num_experts == 0:
        raise ValueError("expert_index given but no prompt bank is attached")
    if weight is not None and tuple(weight.shape) != tuple(index.shape):
        raise ValueError(f"expert_weight must have shape {tuple(index.shape)} like expert_index, "
                         f"got {tuple(weight.shape)}")
    # The values are checked here, where they enter: prefix_attention does not read them back
    # in the no_grad decode path (ops/prefix_attention.py, "Argument checks").
    from ..ops.prefix_attention import check_prefix_values
    check_prefix_values(index, weight, None, num_experts, 0, names=("expert_index", "expert_weight", None))


# --------------------------------------------------------------------------------------------
# Per-request state, carried as the `mops_prefix` keyword through every layer.
# --------------------------------------------------------------------------------------------
class _Request:
    def __init__(self, plan, index=None, weight=None, expand=1):
        self.plan = plan
        self.index = None if index is None else index.to(torch.int32)
        self.weight = None if weight is None else weight.float()
        self.expand = expand      # generate's rows per prompt (beams / returned sequences)
        self.mask = None          # [B, S] 1 = real token, for the current forward
        self.prefill = True       # the first forward of this request set (gate, IAPT run here)
        self.iapt = {}            # layer -> (k [B, 4, Hkv, D], v)

    def begin(self, batch, mask):
        """Called before each forward: batch rows (beams expanded) and the 2-D mask. Explicit slots
        have one row per prompt (generate repeats them for its beams / returned sequences) or one
        per batch row; any other count is an error, never a silent repeat."""
        for name in ("index", "weight"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.shape[0] != batch:
                if not (self.expand > 1 and t.shape[0] * self.expand == batch):
                    raise ValueError(f"expert_index has {t.shape[0]} rows, the batch has {batch // self.expand} "
                                     f"prompts" + (f" ({batch} rows with {self.expand} beams/sequences each)"
                                                   if self.expand > 1 else "") + ": give one row per prompt")
                t = t.repeat_interleave(self.expand, dim=0)       # beams share experts
            if mask is not None and t.device != mask.device:
                t = t.to(mask.device)      # once, not a host-to-device copy per layer
            setattr(self, name, t)
        self.mask = mask
        self.needs_gate = self.prefill and self.index is None and self.plan.gate is not None

    def prefix(self, layer_idx, device):
        """(prefix_k, prefix_v, index, weight, lens) for one layer, or Nones."""
        plan = self.plan
        if plan.generator is not None and layer_idx in self.iapt:
            k, v = self.iapt[layer_idx]
            B = k.shape[0]
            return k, v, torch.arange(B, dtype=torch.int32, device=device).view(B, 1), \
                plan.generator_weight(layer_idx, B, device), None
        if plan.bank is not None and layer_idx >= plan.inject_from and self.index is not None:
            kv = plan.bank.layer(layer_idx)
            if kv is not None:
                index = self.index.to(device)
                w = None if self.weight is None else self.weight.to(device)
                return kv[0], kv[1], index, plan.bank_weight(layer_idx, w, index), plan.bank.lens
        return None, None, None, None, None


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------
class _Attached:
    def __init__(self, plan, attn_impl, hooks):
        self.plan, self.attn_impl, self.hooks = plan, attn_impl, hooks


# The request of the generate() call running in this thread / task, as (attached state, request):
# per call, never on the model, so two threads generating on one model each keep their own experts.
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("mops_current_request", default=(None, None))


def _padding_mask(mask, batch, length, device):
    """The 2-D mask whose last columns are the current tokens (what the gate and IAPT read).

    generate() with a StaticCache hands forward the masks it already built (attention.py's
    mops_attention_mask: 2-D, right-aligned to the last query), one per layer type in a dict for
    models with `layer_types`; a 4-D mask or none at all means nothing is padded that we can see."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    if mask is None or mask.dim() != 2:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    return mask


def _layer_output_hidden(out):
    return out[0] if isinstance(out, tuple) else out


def attach(model, prompts=None, *, quantize=False):
    """Patch `model` (an HF causal LM) in place to run our prefix attention with `prompts`."""
    if getattr(model, "_mops_attached", None) is not None:
        raise ValueError("attach: the model already has mops attached; detach(model) first")
    if hasattr(prompts, "position_offsets"):        # serving.prompt_sets.PromptSets
        raise ValueError("attach: several prompt sets (PromptSets) are served by the Engine, which runs each "
                         "set's gate and position offset; attach one set (a MixtureOfPrompts) instead")
    plan = Plan(prompts, getattr(model.config, "num_hidden_layers", 0))
    layers = validate(model, plan)                  # raises before anything changes
    if quantize:
        from mops_kernels.modules.int4_linear import replace_linears
        replace_linears(decoder(model))
    register()
    hooks = []
    if plan.gate is not None:
        def gate_hook(mod, args, kwargs, out):
            req = kwargs.get("mops_prefix")
            if req is None or not req.needs_gate:
                return
            h = _layer_output_hidden(out)
            T = h.shape[1]
            m = req.mask[:, -T:] if req.mask is not None else h.new_ones(h.shape[:2])
            idx, w = plan.gate(h, m)
            req.index, req.weight = idx.to(torch.int32), w.float()
            req.needs_gate = False
        hooks.append(layers[int(plan.gate.gate_layer)].register_forward_hook(gate_hook, with_kwargs=True))
    if plan.generator is not None:
        for l in plan.generator_layers(len(layers)):
            def iapt_hook(mod, args, kwargs, l=l):
                req = kwargs.get("mops_prefix")
                if req is None or not req.prefill:
                    return
                H = args[0] if args else kwargs["hidden_states"]
                T = H.shape[1]
                m = req.mask[:, -T:] if req.mask is not None else H.new_ones(H.shape[:2])
                req.iapt[l] = plan.generator_prefix(mod, l, H, m)
            hooks.append(layers[l].register_forward_pre_hook(iapt_hook, with_kwargs=True))

    state = _Attached(plan, model.config._attn_implementation, hooks)
    orig_forward, orig_generate = model.forward, model.generate

    @functools.wraps(orig_forward)
    def forward(*args, expert_index=None, expert_weight=None, mops_prefix=None, **kwargs):
        if args:                                     # forward(input_ids, ...)
            kwargs.update(zip(list(inspect.signature(orig_forward).parameters)[:len(args)], args))
        owner, current = _CURRENT.get()
        req = mops_prefix or (current if owner is state else None)
        if req is None:
            check_expert_index(expert_index, expert_weight, plan.num_experts)
            req = _Request(plan, expert_index, expert_weight)
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs["inputs_embeds"]
        B, T = x.shape[0], x.shape[1]
        past = kwargs.get("past_key_values")
        past_len = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        req.begin(B, _padding_mask(kwargs.get("attention_mask"), B, past_len + T, x.device))
        if plan.position_offset:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
            off = plan.position_offset
            if req.index is not None:     # a row that uses no slot is the plain model: no shift
                off = (req.index >= 0).any(-1, keepdim=True).to(pos.device, torch.long) * off
            kwargs["position_ids"] = pos + off
        try:
            return orig_forward(mops_prefix=req, **kwargs)
        finally:
            req.prefill = False

    @functools.wraps(orig_generate)
    def generate(*args, expert_index=None, expert_weight=None, **kwargs):
        check_expert_index(expert_index, expert_weight, plan.num_experts)
        if plan.bank is not None and plan.gate is None and expert_index is None:
            raise ValueError("generate: this prompt bank has no gate; pass expert_index=[B, k]")
        expand = _expand_size(model, kwargs)
        if expert_index is not None:
            prompts = _prompt_rows(args, kwargs)
            if prompts is not None and expert_index.shape[0] not in (prompts, prompts * expand):
                raise ValueError(f"expert_index has {expert_index.shape[0]} rows, the batch has {prompts} "
                                 f"prompts: give one row per prompt" +
                                 (f" (or {prompts * expand}, one per beam/sequence)" if expand > 1 else ""))
        token = _CURRENT.set((state, _Request(plan, expert_index, expert_weight, expand)))
        try:
            return orig_generate(*args, **kwargs)
        finally:
            _CURRENT.reset(token)

    def deepcopy(memo):
        """A copy that runs its own weights: the original is detached while it is copied (so no
        hook or wrapper of the original travels), then both are attached, the copy to a copy of
        the prompts."""
        prompts = plan.prompts
        detach(model)
        try:
            clone = copy.deepcopy(model, memo)
            clone_prompts = copy.deepcopy(prompts, memo)
        finally:
            attach(model, prompts)
        return attach(clone, clone_prompts)

    model.forward, model.generate = forward, generate
    model.__deepcopy__ = deepcopy
    model.set_attn_implementation(ATTN_NAME)
    model._mops_attached = state
    return model


def _prompt_rows(args, kwargs):
    """Rows of the prompt batch handed to generate (None when it cannot be seen)."""
    x = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds")
                                   if kwargs.get(k) is not None), None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def _expand_size(model, kwargs):
    """How many rows generate() makes of each prompt (transformers: max(num_beams, num_return_sequences))."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
    seqs = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
    return max(int(beams), int(seqs))


@contextlib.contextmanager
def attached(model, prompts=None, *, quantize=False):
    """`with attached(model, prompts):` runs `model` with `prompts` inside the block and detaches on
    the way out (errors included). Yields the model."""
    attach(model, prompts, quantize=quantize)
    try:
        yield model
    finally:
        detach(model)


def detach(model):
    """Undo attach: original forward/generate and attention, hooks removed (Int4 swaps stay)."""
    state = getattr(model, "_mops_attached", None)
    if state is None:
        raise ValueError("detach: nothing is attached to this model")
    for h in state.hooks:
        h.remove()
    for name in ("forward", "generate", "__deepcopy__"):
        model.__dict__.pop(name, None)
    model.set_attn_implementation(state.attn_impl)
    del model._mops_attached
    return model

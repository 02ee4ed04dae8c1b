"""Train a PromptBank + SmartGate (MoPs), one soft prompt (the baseline) or an IAPT generator on a
frozen backbone.

    prompts = build_prompts(model, "mops", num_experts=4, prompt_len=8, top_k=2, gate_layer=10, inject_from=11)
    trainer = PromptTrainer(model, prompts, train_items, TrainConfig(steps=300, gate_steps=50, ...))
    trainer.train(checkpoint_dir)          # resumes from checkpoint_dir/checkpoint.safetensors if present
    ppl = trainer.evaluate(valid_items)    # {"overall": ..., "per_task": {label: ppl}}

The backbone is frozen (every parameter requires_grad False, checked); only the prompt modules train.
Forward: the model is `attach`ed to a MixtureOfPrompts that shares the bank but has no gate; our own
hook on decoder layer gate_layer runs the SmartGate on the instruction tokens only (input_mask), so
the gate never sees the target it is scored on (at serving time it sees the prompt only, too), and sets
the request's experts; layers >= inject_from read them through prefix_attention. Gradients reach
bank.keys/values through prefix_attention's backward and the gate through gate_topk's weights.
Loss: the model's LM loss with labels -100 outside the target tokens.
IAPT (mode "iapt", an InstructionPromptGenerator): attached as the model's prompt source, its 4 soft
tokens per injected layer are generated from the hidden states of the instruction tokens only (the
trainer hands the generator input_mask instead of the attention mask), so, as for the gate, the
target never leaks into its own prompt; gradients reach the generator through iapt_generate's backward
and through the frozen layer's k/v projections.

Schedule: steps [0, gate_steps) pretrain the gate as a routing head (routing_loss on the task labels,
the forward stops after gate_layer); steps [gate_steps, steps) train bank and gate jointly on the LM
loss. One AdamW over all prompt parameters (parameters without a gradient in a step are skipped).
The data order is a pure function of (seed, step), so a resumed run draws the same batches.
Checkpoint (safetensors, atomic replace): "param.<name>" tensors, "opt.<i>.<key>" AdamW state,
"rng.torch" CPU RNG state, metadata {"step", "config", "param_groups"}; written every
checkpoint_every steps, at the end, and on KeyboardInterrupt before re-raising.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..families import decoder_layers, model_dims
from ..modules.prompts import InstructionPromptGenerator, MixtureOfPrompts, PromptBank, model_placement
from .data import collate

CHECKPOINT = "checkpoint.safetensors"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    gate_steps: int = 0            # routing-head pretraining steps (MoPs only), counted in `steps`
    batch_size: int = 8
    lr: float = 3e-3
    gate_lr: Optional[float] = None   # default: lr
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    progress: bool = True
    # The recipe (defaults = a constant lr, no clipping, as before): linear warm-up over
    # warmup_steps, then cosine decay to min_lr_ratio * lr at `steps` (schedule="cosine");
    # gradients clipped to clip_norm (global L2 over the prompt parameters); the per-layer prefix
    # log-weights and IAPT's rational coefficients get their own lr (default: lr).
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    clip_norm: Optional[float] = None
    layer_weight_lr: Optional[float] = None
    rational_lr: Optional[float] = None
    generator_lr: Optional[float] = None   # IAPT's generator matrices (default: lr)

    def lr_factor(self, step: int) -> float:
        """The multiplier of every group's base lr at (0-based) step `step`."""
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# Trainer settings that may change between a checkpoint and its resumption (display, cadence).
RESUME_FREE = ("progress", "checkpoint_every")


def param_groups(prompts, config: TrainConfig) -> List[dict]:
    """AdamW groups: prompt tensors (lr), gate (gate_lr), per-layer prefix log-weights
    (layer_weight_lr), IAPT rational coefficients a/b (rational_lr, kept fp32), IAPT's other generator
    weights (generator_lr); empty groups dropped."""
    named = {"prompt": [], "gate": [], "layer_weight": [], "rational": [], "generator": []}
    for n, p in prompts.named_parameters():
        leaf = n.rsplit(".", 1)[-1]
        if n.startswith("gate."):
            named["gate"].append(p)
        elif leaf == "layer_log_weight":
            named["layer_weight"].append(p)
        elif isinstance(prompts, InstructionPromptGenerator) and leaf in ("a", "b"):
            if p.dtype != torch.float32:
                raise ValueError(f"the rational coefficients {n} must be float32, got {p.dtype}")
            named["rational"].append(p)
        elif isinstance(prompts, InstructionPromptGenerator):
            named["generator"].append(p)
        else:
            named["prompt"].append(p)
    def own(v):
        return config.lr if v is None else v
    lrs = {"prompt": config.lr, "gate": own(config.gate_lr), "layer_weight": own(config.layer_weight_lr),
           "rational": own(config.rational_lr), "generator": own(config.generator_lr)}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in named.items() if ps]


MODES = ("single", "mops", "iapt")


def build_prompts(model, mode: str, *, num_experts: int = 4, prompt_len: int = 8, top_k: int = 2,
                  gate_layer: int = 10, inject_from: int = 11, gate_hidden: int = 64,
                  iapt_bottleneck: int = 16, seed: int = 0):
    """mode "mops": E experts of P tokens + a SmartGate; mode "single": the baseline, one prompt of
    E*P tokens (same number of trainable prompt values) and no gate; mode "iapt": an
    InstructionPromptGenerator (4 generated tokens per layer >= inject_from, bottleneck
    iapt_bottleneck). Initialised from `seed`."""
    torch.manual_seed(seed)
    if mode == "iapt":
        dims = model_dims(model)
        L = dims["num_layers"]
        return InstructionPromptGenerator(dims["hidden_size"], L, range(inject_from, L),
                                          bottleneck=iapt_bottleneck).to(next(model.parameters()).device)
    if mode == "mops":
        return MixtureOfPrompts.for_model(model, num_experts=num_experts, prompt_len=prompt_len, top_k=top_k,
                                          gate_layer=gate_layer, inject_from=inject_from, gate_hidden=gate_hidden)
    if mode == "single":
        dims = model_dims(model)
        L = dims["num_layers"]
        dev, dtype = model_placement(model)
        bank = PromptBank(L, range(inject_from, L), 1, num_experts * prompt_len, dims["num_kv_heads"],
                          dims["head_dim"], dtype=dtype, device=dev)
        return MixtureOfPrompts(bank, None, inject_from)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def save_prompts(prompts, directory: str) -> None:
    """MixtureOfPrompts.save for bank/gate; an IAPT generator goes to directory/iapt.safetensors
    (its constructor arguments in the metadata: load_iapt reads it back)."""
    if not isinstance(prompts, InstructionPromptGenerator):
        prompts.save(directory)
        return
    os.makedirs(directory, exist_ok=True)
    prompts.save(os.path.join(directory, "iapt.safetensors"))


def load_iapt(directory: str, device=None) -> InstructionPromptGenerator:
    return InstructionPromptGenerator.load(os.path.join(directory, "iapt.safetensors"), device)


class _StopAfterGateLayer(Exception):
    pass


class _InstructionOnly:
    """What attach() sees in place of an InstructionPromptGenerator during training: the same
    generator, called with the trainer's instruction mask (input_mask) instead of the attention mask."""

    def __init__(self, generator: InstructionPromptGenerator, trainer: "PromptTrainer"):
        self.generator, self.trainer = generator, trainer
        self.inject_layers, self.inject_from = generator.inject_layers, generator.inject_from
        self.to_prefix, self.check_compatible = generator.to_prefix, generator.check_compatible
        self.prefix_weight = generator.prefix_weight

    def _mask(self, H, mask):
        m = self.trainer._input_mask
        return mask if m is None else m[:, -H.shape[1]:].to(H.device)

    def __call__(self, layer_idx, H, mask):
        return self.generator(layer_idx, H, self._mask(H, mask))

    def prefix(self, layer_module, layer_idx, H, mask):
        return self.generator.prefix(layer_module, layer_idx, H, self._mask(H, mask))


def _flatten_opt(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def _unflatten_opt(tensors: Dict[str, torch.Tensor], param_groups) -> dict:
    state: Dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": param_groups}


def score_items(logits_of, items: Sequence[dict], pad_id: int, batch_size: int) -> List[dict]:
    """PromptTrainer.evaluate_items for any `logits_of(batch) -> [B, T, V]` (e.g. the bare model)."""
    out = []
    for s in range(0, len(items), batch_size):
        batch = collate(items[s:s + batch_size], pad_id)
        logits = logits_of(batch).float()
        labels = batch["labels"].to(logits.device)[:, 1:]
        tok_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        valid = labels != -100
        hit = (logits[:, :-1].argmax(-1) == labels) | ~valid
        for i, lab in enumerate(batch["task"].tolist()):
            out.append(dict(label=lab, nll=float(tok_nll[i][valid[i]].sum()), tokens=int(valid[i].sum()),
                            exact=int(bool(hit[i].all()) and bool(valid[i].any()))))
    return out


def pretrain_gate(gate, features: torch.Tensor, targets: torch.Tensor, steps: int, lr: float = 1e-2,
                  batch_size: int = 32, seed: int = 0) -> List[float]:
    """Train the gate's routing head on cached pooled features [N, d] against expert targets [N]
    (cross-entropy of its scores; outside the LM step budget). Returns the losses."""
    if features.dim() != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(f"features [N, d] and targets [N] must agree, got {tuple(features.shape)} and "
                         f"{tuple(targets.shape)}")
    opt = torch.optim.AdamW(gate.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    dev = gate.w1.device
    feats, targets = features.to(dev), targets.to(dev).long()
    ones = torch.ones(1, 1, device=dev)
    losses = []
    for _ in range(steps):
        sel = torch.randint(0, feats.shape[0], (min(batch_size, feats.shape[0]),), generator=g).to(dev)
        x = feats[sel][:, None, :]
        loss = F.cross_entropy(gate.scores(x, ones.expand(x.shape[0], 1)), targets[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


class PromptTrainer:
    """See the module docstring. `items` are data.encode() outputs (ids, n_input, label)."""

    def __init__(self, model, prompts: MixtureOfPrompts, items: Sequence[dict], config: TrainConfig,
                 pad_id: int = 0):
        from ..integrations.hf import attach
        bad = [n for n, p in model.named_parameters() if p.requires_grad]
        if bad:
            raise ValueError(f"the backbone must be frozen; trainable backbone parameters: {bad[:5]}")
        if not items:
            raise ValueError("no training items")
        self.model, self.prompts, self.items, self.cfg, self.pad_id = model, prompts, list(items), config, pad_id
        self.gate = getattr(prompts, "gate", None)
        self.iapt = isinstance(prompts, InstructionPromptGenerator)
        self.device = next(model.parameters()).device
        self.step = 0
        self.opt = torch.optim.AdamW(param_groups(prompts, config), lr=config.lr,
                                     weight_decay=config.weight_decay)
        self._input_mask = None
        self._capture = None
        attach(model, _InstructionOnly(prompts, self) if self.iapt
               else MixtureOfPrompts(prompts.bank, None, prompts.inject_from))
        self._hook = None
        if self.gate is not None:
            layer = decoder_layers(model)[self.gate.gate_layer]
            self._hook = layer.register_forward_hook(self._gate_hook, with_kwargs=True)

    # ---------------------------------------------------------------- forward pieces
    def _gate_hook(self, mod, args, kwargs, out):
        h = out[0] if isinstance(out, tuple) else out
        if self._capture is not None:          # gate pretraining: keep h, skip the remaining layers
            self._capture.append(h)
            raise _StopAfterGateLayer
        req = kwargs.get("mops_prefix")
        if req is None or self._input_mask is None:
            return
        idx, w = self.gate(h, self._input_mask.to(h.device))
        req.index, req.weight = idx.to(torch.int32), w.float()

    def _forward(self, batch):
        """The model output with the prompts routed for this batch (labels given -> .loss)."""
        ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        kw = {}
        if self.gate is None and not self.iapt:    # one prompt for every row
            kw["expert_index"] = torch.zeros(ids.shape[0], 1, dtype=torch.int32, device=self.device)
        self._input_mask = batch["input_mask"]
        try:
            return self.model(input_ids=ids, attention_mask=attn, labels=labels, **kw)
        finally:
            self._input_mask = None

    def _gate_hidden(self, batch) -> torch.Tensor:
        """The hidden state after gate_layer [B, T, d] (no gradient; the later layers are skipped)."""
        self._capture = []
        try:
            with torch.no_grad():
                self.model(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device))
        except _StopAfterGateLayer:
            pass
        finally:
            h, self._capture = self._capture, None
        if not h:
            raise RuntimeError("the gate layer's hook did not run")
        return h[0]

    def routing_loss(self, batch) -> torch.Tensor:
        """The gate's cross-entropy against the task labels (label % E: tasks may outnumber experts)."""
        return self.gate.routing_loss(self._gate_hidden(batch), batch["input_mask"].to(self.device),
                                      batch["task"].to(self.device) % self.gate.num_experts)

    # ---------------------------------------------------------------- data order
    def batch_at(self, step: int):
        """The batch of global step `step`: epoch e's permutation comes from seed and e only."""
        n, bs = len(self.items), self.cfg.batch_size
        per_epoch = max(1, n // bs)
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        sel = perm[pos * bs:(pos + 1) * bs] if n >= bs else perm
        return collate([self.items[i] for i in sel.tolist()], self.pad_id)

    # ---------------------------------------------------------------- checkpoints
    def named_trainables(self):
        return [(n, p) for n, p in self.prompts.named_parameters()]

    def save_checkpoint(self, directory: str) -> str:
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in self.named_trainables()}
        opt_t, groups = _flatten_opt(self.opt)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_t.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"step": str(self.step), "config": json.dumps(dataclasses.asdict(self.cfg)),
                "param_groups": json.dumps(groups)}
        path = os.path.join(directory, CHECKPOINT)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        # the bytes reach the disk before the rename, and the rename before we go on: a crash
        # (or power loss) never leaves a torn or missing checkpoint
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return path

    def load_checkpoint(self, path: str, allow_config_change: bool = False) -> int:
        """Restore parameters, optimizer, RNG and step. A checkpoint written under another
        TrainConfig is refused (ValueError naming the fields) unless allow_config_change."""
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        defaults = dataclasses.asdict(TrainConfig())      # a field added since: its default
        saved = {**defaults, **json.loads(meta.get("config", "{}"))}
        now = dataclasses.asdict(self.cfg)
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RESUME_FREE and saved.get(k) != now.get(k))
        if changed and not allow_config_change:
            raise ValueError(f"{path} was written with another training configuration: "
                             + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
                             + " (resume with the same settings, or allow_config_change=True / "
                               "--override-config to continue anyway)")
        params = dict(self.named_trainables())
        names = {k[len("param."):] for k in tensors if k.startswith("param.")}
        if names != set(params):
            raise ValueError(f"{path}: checkpoint parameters {sorted(names)} differ from the prompts' "
                             f"{sorted(params)} (another mode or size?)")
        with torch.no_grad():
            for n, p in params.items():
                src = tensors[f"param.{n}"]
                if src.shape != p.shape:
                    raise ValueError(f"{path}: {n} has shape {tuple(src.shape)}, the prompts need {tuple(p.shape)}")
                p.copy_(src)
        sd = _unflatten_opt({k: v.to(self.device) if k.endswith(("exp_avg", "exp_avg_sq")) else v
                             for k, v in tensors.items()}, json.loads(meta["param_groups"]))
        self.opt.load_state_dict(sd)
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        return self.step

    # ---------------------------------------------------------------- the loop
    def train_step(self, batch) -> float:
        self.prompts.train()
        self.opt.zero_grad(set_to_none=True)
        if self.gate is not None and self.step < self.cfg.gate_steps:
            loss = self.routing_loss(batch)
        else:
            loss = self._forward(batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {self.step}")
        loss.backward()
        if self.cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                           self.cfg.clip_norm)
        f = self.cfg.lr_factor(self.step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    def train(self, checkpoint_dir: Optional[str] = None, resume: bool = True,
              stop_at: Optional[int] = None, on_step: Optional[Callable[[int, float], None]] = None,
              allow_config_change: bool = False) -> List[float]:
        """Run to cfg.steps (or stop_at); returns the losses of the steps run here."""
        if checkpoint_dir and resume and os.path.isfile(os.path.join(checkpoint_dir, CHECKPOINT)):
            self.load_checkpoint(os.path.join(checkpoint_dir, CHECKPOINT), allow_config_change)
        end = min(self.cfg.steps, stop_at if stop_at is not None else self.cfg.steps)
        bar = None
        if self.cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        losses = []
        try:
            while self.step < end:
                batch = self.batch_at(self.step)
                t0 = time.perf_counter()
                loss = self.train_step(batch)
                dt = time.perf_counter() - t0
                losses.append(loss)
                if bar is not None:
                    phase = "gate" if self.gate is not None and self.step <= self.cfg.gate_steps else "lm"
                    bar.set_postfix(phase=phase, loss=f"{loss:.3f}",
                                    tok_s=f"{int(batch['attention_mask'].sum()) / dt:.0f}")
                    bar.update(1)
                if on_step is not None:
                    on_step(self.step, loss)
                if checkpoint_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir)
        except KeyboardInterrupt:
            if checkpoint_dir:
                path = self.save_checkpoint(checkpoint_dir)
                print(f"\ninterrupted at step {self.step}: checkpoint written to {path}")
            raise
        finally:
            if bar is not None:
                bar.close()
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)
        return losses

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_items(self, items: Sequence[dict], batch_size: Optional[int] = None) -> List[dict]:
        """Per item, in order: {"label", "nll": summed NLL of its target tokens, "tokens": their
        count, "exact": 1 if the argmax at every target position is the target token (teacher
        forced), else 0}."""
        self.prompts.eval()
        return score_items(lambda batch: self._forward(batch).logits, items, self.pad_id,
                           batch_size or self.cfg.batch_size)

    @torch.no_grad()
    def gate_features(self, items: Sequence[dict], batch_size: Optional[int] = None) -> torch.Tensor:
        """[N, d] fp32: the masked mean over each item's instruction tokens of the hidden state after
        gate_layer (what the gate pools): cached once, the gate's routing head trains on it."""
        if self.gate is None:
            raise ValueError("gate_features needs prompts with a gate")
        bs = batch_size or self.cfg.batch_size
        out = []
        for s in range(0, len(items), bs):
            batch = collate(items[s:s + bs], self.pad_id)
            h = self._gate_hidden(batch).float()
            m = batch["input_mask"].to(h.device).float()
            out.append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, items: Sequence[dict], batch_size: Optional[int] = None) -> dict:
        """Perplexity on the target tokens: {"overall", "per_task": {label: ppl}, "tokens": {label: n}}."""
        nll: Dict[int, float] = {}
        count: Dict[int, int] = {}
        for r in self.evaluate_items(items, batch_size):
            lab = r["label"]
            nll[lab] = nll.get(lab, 0.0) + r["nll"]
            count[lab] = count.get(lab, 0) + r["tokens"]
        per_task = {lab: math.exp(nll[lab] / count[lab]) for lab in sorted(nll) if count[lab]}
        total = sum(count.values())
        return {"overall": math.exp(sum(nll.values()) / total) if total else float("nan"),
                "per_task": per_task, "tokens": {lab: count[lab] for lab in sorted(count)}}

    @torch.no_grad()
    def routing(self, items: Sequence[dict], batch_size: Optional[int] = None) -> Dict[int, List[int]]:
        """{task label: counts of the top-1 expert the gate picks on its items} (MoPs only)."""
        if self.gate is None:
            return {}
        out: Dict[int, List[int]] = {}
        bs = batch_size or self.cfg.batch_size
        for s in range(0, len(items), bs):
            batch = collate(items[s:s + bs], self.pad_id)
            scores = self.gate.scores(self._gate_hidden(batch), batch["input_mask"].to(self.device))
            for lab, e in zip(batch["task"].tolist(), scores.argmax(-1).tolist()):
                out.setdefault(lab, [0] * self.gate.num_experts)[e] += 1
        return out

    def close(self):
        """Remove the hook and detach the model."""
        from ..integrations.hf import detach
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        detach(self.model)

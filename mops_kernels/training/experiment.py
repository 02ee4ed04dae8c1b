"""The MoPs experiment: fair arms, one training recipe, and an evaluation that can carry a claim.

    from mops_kernels.training.experiment import ExperimentConfig, run_experiment
    result = run_experiment(model, tok, data_dir, ExperimentConfig(steps=200, seeds=(0, 1)), out_dir)

Arms (same LM steps, same batches in the same order, same recipe, one lr for all):
  none        the frozen model alone
  single_kP   one soft prompt of k*P tokens: the prefix tokens a MoPs request sees
  single_EP   one soft prompt of E*P tokens: the size of the MoPs bank
  mops        E experts of P tokens, top-k gate; the gate's weights are scaled by k
              (SmartGate.weight_scale) so that a uniform gate equals one prompt of k*P tokens
  iapt        the IAPT generator (4 tokens per injected layer from the instruction)

Every prompt source starts as a near no-op on the frozen model (tested: step-0 validation loss within
2% of `none`): bank keys/values are copied from real token keys/values of the same layer (k_proj /
v_proj outputs at random non-first positions of training inputs: real scale, no position), and every
injected layer carries a learnable prefix log-weight (`layer_log_weight`, started at
`cfg.layer_log_weight`) that enters prefix_attention as log w on that layer's prefix keys; IAPT reads
the frozen layer's normed hidden states without the attention-sink token, with the same log-weight.
IAPT also starts with a zero up-projection and works in the layer's normalised input space (its soft
tokens go to k_proj / v_proj without a second pass through the norm, which would restore any small
output to unit scale in an arbitrary direction: measured on SmolLM2, a std-0.02 init moved the loss by
0.75 nat despite the -6 log-weight, and two steps from a zero init by 5 nats). Zero soft tokens give
keys k_proj(0) with logit 0, which the log-weight keeps quiet, and they grow smoothly from there.

The gate, once pretrained, is kept fixed during LM training (gate_joint_lr = 0): with the prompts'
lr it lost its routing in a few steps (smoke run: accuracy 0.97 -> 0.44 after 4 joint steps); the
experts then specialise to the task groups the gate was pretrained on.

Recipe: AdamW, linear warm-up (cfg.warmup_frac of the steps), cosine decay to cfg.min_lr_ratio,
gradient clipping at cfg.clip_norm; the layer log-weights at cfg.layer_weight_lr, IAPT's rational
coefficients (fp32) at cfg.rational_lr; the prompt lr is chosen once per run by a short probe on the
single_kP arm (cfg.lr_grid, cfg.probe_steps each, lowest validation loss) and used for every arm.
IAPT's generator is a network (down/up projections), not a table of prompt vectors: its matrices
train at lr x cfg.iapt_lr_scale (0.1). Measured on the --small data, seed 0, 50 steps (2026-11-26):
at the probe's lr 0.03 the IAPT arm diverged (validation-curve NLL 6.79 -> 16.9 at step 50, 17.4 at 150),
at 0.003 it trained (6.79 -> 4.47 at step 50).

Gate: pretrained outside the step budget as a routing head on cached pooled gate-layer features of
the training items; its target expert per task comes from k-means over the tasks' mean features
(tasks that look alike to the gate layer share an expert), not from an index modulo E. Routing
accuracy (top-1 = assigned expert) on validation items and the task x expert matrix are reported.

Evaluation: "{input}" + cfg.separator + " {target}", inputs never truncated (too-long items are
dropped and counted), >= cfg.min_eval_per_task validation items per task. Primary metric: the mean
over tasks of each task's mean target-token NLL; for every arm, per seed, a paired bootstrap 95% CI of
its difference to MoPs (items resampled within each task, the same draws for both arms). Secondary:
token-weighted perplexity and teacher-forced exact match (argmax = target at every target token).
A MoPs win is claimed only where MoPs is better than both single-prompt arms with both CIs excluding
0 in every seed (`verdict`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..families import decoder_layers, model_dims
from ..modules.prompts import InstructionPromptGenerator, MixtureOfPrompts, PromptBank, SmartGate
from .data import encode, load_split, task_names
from .trainer import PromptTrainer, TrainConfig, pretrain_gate, save_prompts, score_items

ARMS = ("none", "single_kP", "single_EP", "mops", "iapt")
TRAINED = ARMS[1:]


@dataclasses.dataclass
class ExperimentConfig:
    experts: int = 4
    prompt_len: int = 8
    top_k: int = 2
    gate_layer: int = 10
    inject_from: int = 11
    gate_hidden: int = 64
    iapt_bottleneck: int = 16
    arms: Sequence[str] = ARMS
    seeds: Sequence[int] = (0, 1)
    steps: int = 200
    batch_size: int = 4
    lr: Optional[float] = None             # None: the probe picks it
    lr_grid: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2)
    probe_steps: int = 20
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    layer_log_weight: float = -6.0
    layer_weight_lr: float = 0.05
    rational_lr: float = 1e-4
    iapt_lr_scale: float = 0.1             # IAPT's generator matrices train at lr x this (module docstring)
    gate_pretrain_steps: int = 300
    gate_lr: float = 1e-2                  # routing-head pretraining
    gate_joint_lr: float = 0.0             # the gate during LM training (0: kept as pretrained)
    eval_every: int = 50                   # validation curve points (and the final one)
    curve_items_per_task: int = 8          # validation items per task for the curve points
    separator: str = "\nAnswer:"
    max_len: int = 128
    max_train: Optional[int] = None        # training items per task
    min_eval_per_task: int = 24
    max_eval: Optional[int] = None         # validation items per task (None: all)
    bootstrap: int = 2000
    checkpoint_every: int = 50


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def load_items(tok, data: str, split: str, cfg: ExperimentConfig, per_task: Optional[int] = None):
    """Encoded items of every task (never truncated: too-long items dropped) and {task: dropped}."""
    items, dropped = [], {}
    for t in task_names(data):
        kept = 0
        for r in load_split(data, split, [t]):
            if per_task is not None and kept >= per_task:
                break
            it = encode(tok, r, cfg.max_len, separator=cfg.separator, truncate=False)
            if it is None:
                dropped[t] = dropped.get(t, 0) + 1
                continue
            items.append(it)
            kept += 1
    return items, dropped


# --------------------------------------------------------------------------------------------
# Prompt sources that start as a no-op
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def real_token_kv(model, items: Sequence[dict], layers: Sequence[int], count: int, seed: int,
                  pad_id: int = 0, batch_size: int = 8):
    """{layer: (k, v) [count, Hkv, D]}: k_proj / v_proj outputs of `count` random tokens of `items`
    (never a row's first token, the attention sink), the same tokens at every layer."""
    from .data import collate
    dims = model_dims(model)
    D = dims["head_dim"]
    dec = decoder_layers(model)
    got: Dict[int, List] = {l: [] for l in layers}
    hooks = []
    for l in layers:
        attn = dec[l].self_attn
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, l=l: got[l].append(["k", o])))
        hooks.append(attn.v_proj.register_forward_hook(lambda m, a, o, l=l: got[l].append(["v", o])))
    g = torch.Generator().manual_seed(seed)
    n = min(len(items), max(1, math.ceil(count / 4)))
    pick = torch.randperm(len(items), generator=g)[:n].tolist()
    dev = next(model.parameters()).device
    pos: List[tuple] = []
    outs: Dict[int, Dict[str, List]] = {l: {"k": [], "v": []} for l in layers}
    try:
        for s in range(0, n, batch_size):
            batch = collate([items[i] for i in pick[s:s + batch_size]], pad_id)
            for l in layers:
                got[l].clear()
            model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
            for l in layers:
                for name, o in got[l]:
                    outs[l][name].append(o.float().view(o.shape[0], o.shape[1], -1, D).cpu())
            for b in range(batch["input_ids"].shape[0]):
                L = int(batch["attention_mask"][b].sum())
                pos += [(s // batch_size, b, t) for t in range(1, L)]
    finally:
        for h in hooks:
            h.remove()
    if not pos:
        raise ValueError("real_token_kv: the items have no token past the first")
    sel = torch.randint(0, len(pos), (count,), generator=g).tolist()
    res = {}
    for l in layers:
        ks, vs = outs[l]["k"], outs[l]["v"]
        res[l] = (torch.stack([ks[pos[i][0]][pos[i][1], pos[i][2]] for i in sel]),
                  torch.stack([vs[pos[i][0]][pos[i][1], pos[i][2]] for i in sel]))
    return res


def init_bank_from_model(bank: PromptBank, model, items: Sequence[dict], seed: int, pad_id: int = 0) -> None:
    """Fill every slot of `bank` with real token keys/values of its layers (see real_token_kv)."""
    E, P = bank.num_experts, bank.prompt_len
    kv = real_token_kv(model, items, bank.inject_layers, E * P, seed, pad_id)
    for e in range(E):
        bank.set_slot(e, {l: (k[e * P:(e + 1) * P].to(bank.keys.dtype), v[e * P:(e + 1) * P].to(bank.keys.dtype))
                          for l, (k, v) in kv.items()})


def build_arm(model, arm: str, cfg: ExperimentConfig, items: Sequence[dict], seed: int, pad_id: int = 0):
    """A fresh prompt source for `arm` (None for "none"), initialised from `seed` as a near no-op."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if arm == "none":
        return None
    torch.manual_seed(seed)
    dims = model_dims(model)
    L, dev = dims["num_layers"], next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    layers = range(cfg.inject_from, L)
    if arm == "iapt":
        return InstructionPromptGenerator(dims["hidden_size"], L, layers, bottleneck=cfg.iapt_bottleneck,
                                          normalize_input=True, drop_first_token=True,
                                          layer_log_weight=cfg.layer_log_weight, up_init_std=0.0).to(dev)
    E, P = {"single_kP": (1, cfg.top_k * cfg.prompt_len), "single_EP": (1, cfg.experts * cfg.prompt_len),
            "mops": (cfg.experts, cfg.prompt_len)}[arm]
    bank = PromptBank(L, layers, E, P, dims["num_kv_heads"], dims["head_dim"], dtype=dtype, device=dev,
                      layer_log_weight=cfg.layer_log_weight)
    if items is not None:                  # None: the caller loads trained values (federated clients)
        init_bank_from_model(bank, model, items, seed, pad_id)
    gate = None
    if arm == "mops":
        gate = SmartGate(dims["hidden_size"], E, cfg.top_k, cfg.gate_layer, cfg.gate_hidden,
                         weight_scale=float(cfg.top_k)).to(dev)
    return MixtureOfPrompts(bank, gate, cfg.inject_from)


def train_config(cfg: ExperimentConfig, lr: float, seed: int, steps: Optional[int] = None) -> TrainConfig:
    steps = cfg.steps if steps is None else steps
    return TrainConfig(steps=steps, gate_steps=0, batch_size=cfg.batch_size, lr=lr, gate_lr=cfg.gate_joint_lr,
                       seed=seed,
                       checkpoint_every=cfg.checkpoint_every, warmup_steps=max(1, int(cfg.warmup_frac * steps)),
                       schedule="cosine", min_lr_ratio=cfg.min_lr_ratio, clip_norm=cfg.clip_norm,
                       layer_weight_lr=cfg.layer_weight_lr, rational_lr=cfg.rational_lr,
                       generator_lr=lr * cfg.iapt_lr_scale, progress=False)


# --------------------------------------------------------------------------------------------
# Gate routing targets
# --------------------------------------------------------------------------------------------
def task_experts(features: torch.Tensor, labels: torch.Tensor, num_experts: int, seed: int = 0,
                 iters: int = 50) -> Dict[int, int]:
    """{task label: expert}: k-means (cosine, k-means++ seeding from `seed`) of the tasks' mean
    pooled gate-layer features into min(E, tasks) groups; group g is expert g."""
    tasks = sorted(set(labels.tolist()))
    cent = torch.stack([features[labels == t].mean(0) for t in tasks]).float()
    cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(num_experts, len(tasks))
    g = torch.Generator().manual_seed(seed)
    centers = [cent[int(torch.randint(0, len(tasks), (1,), generator=g))]]
    while len(centers) < k:
        d = (1 - cent @ torch.stack(centers).T).clamp_min(0).min(1).values
        nxt = int(torch.multinomial(d + 1e-12, 1, generator=g)) if float(d.sum()) > 0 else len(centers)
        centers.append(cent[nxt])
    C = torch.stack(centers)
    assign = None
    for _ in range(iters):
        new = (cent @ C.T).argmax(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                c = cent[assign == j].mean(0)
                C[j] = c / c.norm().clamp_min(1e-12)
    # every expert used when there are enough tasks: an empty group takes the farthest task
    for j in range(k):
        if not (assign == j).any():
            far = int((cent * C[assign]).sum(1).argmin())
            assign[far] = j
    return {t: int(a) for t, a in zip(tasks, assign.tolist())}


def routing_report(gate: SmartGate, features: torch.Tensor, labels: torch.Tensor, mapping: Dict[int, int],
                   names: Sequence[str]) -> dict:
    """Top-1 routing accuracy against `mapping` and the task x expert matrix of top-1 counts."""
    with torch.no_grad():
        x = features.to(gate.w1.device)[:, None, :]
        top1 = gate.scores(x, torch.ones(x.shape[0], 1, device=x.device)).argmax(-1).cpu()
    target = torch.tensor([mapping[int(t)] for t in labels.tolist()])
    matrix = {names[t]: [int(((labels == t) & (top1 == e)).sum()) for e in range(gate.num_experts)]
              for t in sorted(set(labels.tolist()))}
    return dict(accuracy=float((top1 == target).float().mean()), matrix=matrix,
                task_to_expert={names[t]: e for t, e in mapping.items()})


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def task_mean_nll(rows: Sequence[dict], idx: Optional[Dict[int, torch.Tensor]] = None) -> float:
    """Mean over tasks of each task's mean target-token NLL (rows from score_items); `idx` picks
    (bootstrap) item indices per task."""
    by = _by_task(rows)
    vals = []
    for t, rs in sorted(by.items()):
        sel = rs if idx is None else [rs[i] for i in idx[t].tolist()]
        n = sum(r["tokens"] for r in sel)
        vals.append(sum(r["nll"] for r in sel) / max(1, n))
    return sum(vals) / len(vals)


def _by_task(rows):
    by: Dict[int, List[dict]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    return by


def paired_bootstrap(rows_a: Sequence[dict], rows_b: Sequence[dict], draws: int, seed: int = 0) -> dict:
    """task_mean_nll(a) - task_mean_nll(b) and its 95% CI: items resampled with replacement within
    each task, the same draws for both (rows of both arms in the same item order)."""
    if [r["label"] for r in rows_a] != [r["label"] for r in rows_b]:
        raise ValueError("paired_bootstrap: the two arms were scored on different items")
    g = torch.Generator().manual_seed(seed)
    sizes = {t: len(rs) for t, rs in _by_task(rows_a).items()}
    diffs = []
    for _ in range(draws):
        idx = {t: torch.randint(0, n, (n,), generator=g) for t, n in sizes.items()}
        diffs.append(task_mean_nll(rows_a, idx) - task_mean_nll(rows_b, idx))
    d = torch.tensor(diffs)
    return dict(diff=task_mean_nll(rows_a) - task_mean_nll(rows_b),
                ci95=[float(d.quantile(0.025)), float(d.quantile(0.975))])


def metrics(rows: Sequence[dict], names: Sequence[str]) -> dict:
    by = _by_task(rows)
    tokens = sum(r["tokens"] for r in rows)
    return dict(task_mean_nll=task_mean_nll(rows),
                per_task_nll={names[t]: sum(r["nll"] for r in rs) / max(1, sum(r["tokens"] for r in rs))
                              for t, rs in sorted(by.items())},
                token_ppl=math.exp(sum(r["nll"] for r in rows) / max(1, tokens)),
                exact_match=sum(r["exact"] for r in rows) / max(1, len(rows)),
                items=len(rows), target_tokens=tokens)


def verdict(summary: dict) -> str:
    """The claim the numbers allow (see the module docstring)."""
    seeds = summary["seeds"]
    singles = [a for a in ("single_kP", "single_EP") if a in summary["arms"]]
    if "mops" not in summary["arms"] or not singles:
        return "no verdict: MoPs or the single-prompt arms did not run"
    wins = all(summary["per_seed"][str(s)]["vs_mops"][a]["ci95"][0] > 0 for s in seeds for a in singles)
    if wins:
        return (f"MoPs wins: lower task-mean NLL than {' and '.join(singles)} with every 95% CI above 0 "
                f"in every seed ({len(seeds)} seeds)")
    held = []
    for a in singles:
        signs = [summary["per_seed"][str(s)]["vs_mops"][a] for s in seeds]
        better = sum(r["ci95"][0] > 0 for r in signs)
        worse = sum(r["ci95"][1] < 0 for r in signs)
        held.append(f"vs {a}: MoPs significantly better in {better}/{len(seeds)} seeds, significantly "
                    f"worse in {worse}/{len(seeds)}, inconclusive in the rest")
    return "no MoPs win: " + "; ".join(held)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def evaluate_arm(model, prompts, trainer: Optional[PromptTrainer], items, pad_id, batch_size):
    if trainer is None:
        return score_items(lambda b: model(input_ids=b["input_ids"].to(model.device),
                                           attention_mask=b["attention_mask"].to(model.device)).logits,
                           items, pad_id, batch_size)
    return trainer.evaluate_items(items, batch_size)


def curve_subset(items: Sequence[dict], per_task: int) -> List[dict]:
    seen: Dict[int, int] = {}
    out = []
    for it in items:
        if seen.get(it["label"], 0) < per_task:
            out.append(it)
            seen[it["label"]] = seen.get(it["label"], 0) + 1
    return out


def run_arm(model, arm: str, cfg: ExperimentConfig, train_items, valid_items, seed: int, lr: float,
            pad_id: int, out_dir: Optional[str], steps: Optional[int] = None, names=None,
            resume: bool = False, allow_config_change: bool = False) -> dict:
    """Train one arm (no training for "none") and score it: curve, per-item rows, routing."""
    t0 = time.perf_counter()
    prompts = build_arm(model, arm, cfg, train_items, seed, pad_id)
    res = dict(arm=arm, seed=seed, lr=lr)
    if prompts is None:
        res.update(rows=evaluate_arm(model, None, None, valid_items, pad_id, cfg.batch_size), curve=[],
                   trainable_params=0, prefix_tokens_per_request=0, wall_seconds=time.perf_counter() - t0)
        return res
    tc = train_config(cfg, lr, seed, steps)
    trainer = PromptTrainer(model, prompts, train_items, tc, pad_id=pad_id)
    try:
        if arm == "mops":
            # outside the LM step budget: the routing head on cached features, targets by k-means
            feats = trainer.gate_features(train_items)
            labels = torch.tensor([it["label"] for it in train_items])
            mapping = task_experts(feats, labels, cfg.experts, seed)
            targets = torch.tensor([mapping[int(t)] for t in labels.tolist()])
            if cfg.gate_pretrain_steps:
                res["gate_pretrain_loss"] = pretrain_gate(prompts.gate, feats, targets, cfg.gate_pretrain_steps,
                                                          cfg.gate_lr, seed=seed)[-1]
            vf = trainer.gate_features(valid_items)
            vl = torch.tensor([it["label"] for it in valid_items])
            res["routing_before_lm"] = routing_report(prompts.gate, vf, vl, mapping, names)
        curve_items = curve_subset(valid_items, cfg.curve_items_per_task)
        curve = [(0, task_mean_nll(trainer.evaluate_items(curve_items)))]

        def on_step(step, loss):
            if cfg.eval_every and step % cfg.eval_every == 0 and step < tc.steps:
                curve.append((step, task_mean_nll(trainer.evaluate_items(curve_items))))

        ckpt = None if out_dir is None else os.path.join(out_dir, "checkpoint")
        losses = trainer.train(ckpt, resume=resume, on_step=on_step, allow_config_change=allow_config_change)
        rows = trainer.evaluate_items(valid_items)
        curve.append((trainer.step, task_mean_nll(trainer.evaluate_items(curve_items))))
        res.update(rows=rows, curve=curve, train_loss_last=losses[-1] if losses else None,
                   trainable_params=sum(p.numel() for p in prompts.parameters()),
                   prefix_tokens_per_request=_prefix_tokens(arm, cfg, model))
        if arm == "mops":
            vf = trainer.gate_features(valid_items)
            vl = torch.tensor([it["label"] for it in valid_items])
            res["routing"] = routing_report(prompts.gate, vf, vl, mapping, names)
        if out_dir is not None:
            save_prompts(prompts, os.path.join(out_dir, "prompts"))
        res["prompts"] = prompts
    finally:
        trainer.close()
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def _prefix_tokens(arm, cfg, model):
    return {"single_kP": cfg.top_k * cfg.prompt_len, "single_EP": cfg.experts * cfg.prompt_len,
            "mops": cfg.top_k * cfg.prompt_len, "iapt": 4, "none": 0}[arm]


def federated_settings(cfg: ExperimentConfig, arm: str, lr: float, seed: int, local_steps: int) -> dict:
    """The server's per-round settings (federated.SERVER_SETTINGS) for one arm of this config."""
    return {"arm": arm, "experts": cfg.experts, "prompt-len": cfg.prompt_len, "top-k": cfg.top_k,
            "gate-layer": cfg.gate_layer, "inject-from": cfg.inject_from, "gate-hidden": cfg.gate_hidden,
            "iapt-bottleneck": cfg.iapt_bottleneck, "max-len": cfg.max_len, "max-train": cfg.max_train or 0,
            "separator": cfg.separator, "local-steps": local_steps, "batch-size": cfg.batch_size, "lr": lr,
            "seed": seed, "warmup-frac": cfg.warmup_frac, "min-lr-ratio": cfg.min_lr_ratio,
            "clip-norm": cfg.clip_norm, "layer-log-weight": cfg.layer_log_weight,
            "layer-weight-lr": cfg.layer_weight_lr, "rational-lr": cfg.rational_lr,
            "iapt-lr-scale": cfg.iapt_lr_scale}


def run_federated_arm(model, arm: str, cfg: ExperimentConfig, train_items, valid_items, seed: int, lr: float,
                      pad_id: int, fed: dict, names=None) -> dict:
    """One arm on Flower (training.federated): initialised here as in the centralized arm (the MoPs
    gate pretrained centrally on cached features before round 1), then fed["rounds"] rounds of
    fed["local_steps"] steps on fed["clients"] non-IID clients; scored like run_arm."""
    from .federated import load_prompt_params, prompt_params, run_federated
    t0 = time.perf_counter()
    if arm == "none":
        return run_arm(model, arm, cfg, train_items, valid_items, seed, lr, pad_id, None, names=names)
    prompts = build_arm(model, arm, cfg, train_items, seed, pad_id)
    res = dict(arm=arm, seed=seed, lr=lr, clients=fed["clients"], rounds=fed["rounds"],
               local_steps=fed["local_steps"])
    mapping = None
    if arm == "mops":
        tr = PromptTrainer(model, prompts, train_items, train_config(cfg, lr, seed), pad_id=pad_id)
        try:
            feats = tr.gate_features(train_items)
        finally:
            tr.close()
        labels = torch.tensor([it["label"] for it in train_items])
        mapping = task_experts(feats, labels, cfg.experts, seed)
        if cfg.gate_pretrain_steps:
            pretrain_gate(prompts.gate, feats, torch.tensor([mapping[int(t)] for t in labels.tolist()]),
                          cfg.gate_pretrain_steps, cfg.gate_lr, seed=seed)
    final, history = run_federated(prompt_params(prompts), fed["clients"], fed["rounds"],
                                   federated_settings(cfg, arm, lr, seed, fed["local_steps"]),
                                   ray_cpus=fed.get("ray_cpus", 2), local=fed.get("local"))
    if any(m.get("backbone-changed", 0) for m in history.values()):
        raise RuntimeError(f"a client's backbone changed during federated training: {history}")
    load_prompt_params(prompts, final)
    tr = PromptTrainer(model, prompts, valid_items, train_config(cfg, lr, seed), pad_id=pad_id)
    try:
        res["rows"] = tr.evaluate_items(valid_items)
        if mapping is not None:
            vf = tr.gate_features(valid_items)
            res["routing"] = routing_report(prompts.gate, vf, torch.tensor([it["label"] for it in valid_items]),
                                            mapping, names)
    finally:
        tr.close()
    res.update(rounds_metrics={str(k): dict(v) for k, v in history.items()}, curve=[],
               trainable_params=sum(p.numel() for p in prompts.parameters()),
               prefix_tokens_per_request=_prefix_tokens(arm, cfg, model), wall_seconds=time.perf_counter() - t0)
    return res


def probe_lr(model, cfg: ExperimentConfig, train_items, valid_items, seed: int, pad_id: int) -> dict:
    """{lr: curve-subset task-mean NLL after cfg.probe_steps on single_kP}; the best is used."""
    sub = curve_subset(valid_items, cfg.curve_items_per_task)
    out = {}
    for lr in cfg.lr_grid:
        r = run_arm(model, "single_kP", cfg, train_items, sub, seed, lr, pad_id, None, steps=cfg.probe_steps,
                    names=None)
        out[lr] = task_mean_nll(r["rows"])
    return out


def summarize(results: Dict[int, Dict[str, dict]], names: Sequence[str], cfg: ExperimentConfig) -> dict:
    arms = [a for a in cfg.arms if all(a in r for r in results.values())]
    per_seed = {}
    for s, rs in results.items():
        d = {a: metrics(rs[a]["rows"], names) for a in arms}
        if "mops" in arms:
            d["vs_mops"] = {a: paired_bootstrap(rs[a]["rows"], rs["mops"]["rows"], cfg.bootstrap, seed=s)
                            for a in arms if a != "mops"}
        per_seed[str(s)] = d
    out = dict(seeds=list(results), arms=arms, per_seed=per_seed,
               mean_task_nll={a: sum(per_seed[str(s)][a]["task_mean_nll"] for s in results) / len(results)
                              for a in arms})
    out["verdict"] = verdict(out)
    return out


def run_experiment(model, tok, data: str, cfg: ExperimentConfig, out_dir: str, results_path: Optional[str] = None,
                   resume: bool = False, allow_config_change: bool = False, log=print,
                   federated: Optional[dict] = None) -> dict:
    """Every arm and seed, centralized, then (with `federated`: clients, rounds, local_steps, local =
    the clients' own data/backbone settings, ray_cpus) the same arms on Flower; the JSON is rewritten
    after every arm (a cut-off run keeps what it did)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    names = task_names(data)
    train_items, dropped_train = load_items(tok, data, "train", cfg, cfg.max_train)
    valid_items, dropped_valid = load_items(tok, data, "validation", cfg, cfg.max_eval)
    counts = {names[t]: n for t, n in sorted({it["label"]: 0 for it in valid_items}.items())}
    for it in valid_items:
        counts[names[it["label"]]] += 1
    short = {t: n for t, n in counts.items() if n < cfg.min_eval_per_task}
    if short:
        raise ValueError(f"fewer than {cfg.min_eval_per_task} validation items for {short} "
                         f"(dropped as too long for max_len={cfg.max_len}: {dropped_valid})")
    t_start = time.perf_counter()
    doc = dict(config=dataclasses.asdict(cfg), tasks=names, validation_items=counts,
               dropped_too_long=dict(train=dropped_train, validation=dropped_valid), seeds={}, started=time.time())
    results: Dict[int, Dict[str, dict]] = {}
    fed_results: Dict[int, Dict[str, dict]] = {}

    def write():
        doc["wall_seconds"] = time.perf_counter() - t_start
        complete = {s: r for s, r in fed_results.items() if all(a in r for a in cfg.arms)}
        if complete:
            doc["federated_summary"] = summarize(complete, names, cfg)
        if results and all("mops" in r or "mops" not in cfg.arms for r in results.values()):
            try:
                doc["summary"] = summarize({s: r for s, r in results.items() if all(a in r for a in cfg.arms)},
                                           names, cfg) if any(all(a in r for a in cfg.arms)
                                                              for r in results.values()) else None
            except (ValueError, KeyError) as e:
                doc["summary_error"] = repr(e)
        if results_path:
            os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
            tmp = results_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, default=float)
            os.replace(tmp, results_path)

    for seed in cfg.seeds:
        lr = cfg.lr
        sd = doc["seeds"][str(seed)] = {}
        if lr is None:
            probe = probe_lr(model, cfg, train_items, valid_items, seed, pad_id)
            lr = min(probe, key=probe.get)
            sd["lr_probe"] = {str(k): v for k, v in probe.items()}
            log(f"seed {seed}: lr probe {probe} -> {lr}")
        sd["lr"] = lr
        results[seed] = {}
        for arm in cfg.arms:
            r = run_arm(model, arm, cfg, train_items, valid_items, seed, lr, pad_id,
                        os.path.join(out_dir, f"seed{seed}", arm), names=names, resume=resume,
                        allow_config_change=allow_config_change)
            r.pop("prompts", None)
            results[seed][arm] = r
            m = metrics(r["rows"], names)
            sd[arm] = {k: v for k, v in r.items() if k != "rows"} | {"metrics": m}
            log(f"[{time.perf_counter() - t_start:7.0f}s] seed {seed} {arm}: task-mean NLL "
                f"{m['task_mean_nll']:.4f}, token ppl {m['token_ppl']:.3f}, exact {m['exact_match']:.3f}")
            write()
        if federated:
            fed_results[seed] = {}
            sd["federated"] = {}
            for arm in cfg.arms:
                r = run_federated_arm(model, arm, cfg, train_items, valid_items, seed, lr, pad_id, federated,
                                      names=names)
                r.pop("prompts", None)
                fed_results[seed][arm] = r
                m = metrics(r["rows"], names)
                sd["federated"][arm] = {k: v for k, v in r.items() if k != "rows"} | {"metrics": m}
                log(f"[{time.perf_counter() - t_start:7.0f}s] seed {seed} federated {arm}: task-mean NLL "
                    f"{m['task_mean_nll']:.4f}")
                write()
    write()
    return doc


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def table(doc: dict) -> str:
    """The README table, centralized then federated: per arm, trainable parameters, prefix tokens per
    request, task-mean NLL per seed with its difference to MoPs and the 95% CI, token ppl, exact match."""
    out = []
    for title, key, sub in (("centralized", "summary", None), ("federated", "federated_summary", "federated")):
        s = doc.get(key)
        if not s:
            continue
        out.append(f"{title}:")
        out.append(f"{'arm':10s} {'params':>8s} {'prefix':>6s} " + " ".join(
            f"{'seed ' + str(k) + ': NLL   d vs MoPs [95% CI]':>38s}" for k in s["seeds"])
            + f" {'ppl':>8s} {'exact':>6s}")
        for a in s["arms"]:
            cells = []
            for k in s["seeds"]:
                ps = s["per_seed"][str(k)]
                if a == "mops":
                    cells.append(f"{ps[a]['task_mean_nll']:7.4f} {'(reference)':>30s}")
                elif a not in ps.get("vs_mops", {}):       # a run without the mops arm: no difference
                    cells.append(f"{ps[a]['task_mean_nll']:7.4f} {'(no MoPs arm)':>30s}")
                else:
                    b = ps["vs_mops"][a]
                    cells.append(f"{ps[a]['task_mean_nll']:7.4f} {b['diff']:+8.4f} "
                                 f"[{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}]")
            info = doc["seeds"][str(s["seeds"][0])]
            info = (info.get(sub, {}) if sub else info)[a]
            m0 = s["per_seed"][str(s["seeds"][0])][a]
            out.append(f"{a:10s} {info.get('trainable_params', 0):8d} {info.get('prefix_tokens_per_request', 0):6d} "
                       + " ".join(f"{c:>38s}" for c in cells) + f" {m0['token_ppl']:8.3f} {m0['exact_match']:6.3f}")
        out.append("verdict: " + s["verdict"])
    return "\n".join(out) if out else "(no complete seed yet)"


def plot(doc: dict, path: str) -> str:
    """Validation curves (curve subset, task-mean NLL vs step) per seed, and the final task-mean
    NLL per arm with the bootstrap CI of its difference to MoPs drawn around MoPs' value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = list(doc["seeds"])
    fig, axes = plt.subplots(1, len(seeds) + 1, figsize=(5 * (len(seeds) + 1), 3.8), squeeze=False)
    for ax, s in zip(axes[0], seeds):
        for a, r in doc["seeds"][s].items():
            if isinstance(r, dict) and r.get("curve"):
                xs, ys = zip(*r["curve"])
                ax.plot(xs, ys, marker=".", label=a)
        ax.set_title(f"seed {s}: validation (curve subset)", fontsize=9)
        ax.set_xlabel("LM step")
        ax.set_ylabel("task-mean target NLL")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    summ = doc.get("summary")
    if summ:
        arms = summ["arms"]
        for j, s in enumerate(summ["seeds"]):
            ps = summ["per_seed"][str(s)]
            base = ps["mops"]["task_mean_nll"] if "mops" in ps else 0.0
            vals = [ps[a]["task_mean_nll"] for a in arms]
            err = [[0 if a == "mops" else base + ps["vs_mops"][a]["diff"] - (base + ps["vs_mops"][a]["ci95"][0])
                    for a in arms],
                   [0 if a == "mops" else (base + ps["vs_mops"][a]["ci95"][1]) - (base + ps["vs_mops"][a]["diff"])
                    for a in arms]]
            ax.bar([i + 0.8 / len(summ["seeds"]) * j for i in range(len(arms))], vals,
                   width=0.8 / len(summ["seeds"]), yerr=err, capsize=3, label=f"seed {s}")
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        ax.set_ylabel("task-mean target NLL (CI: diff to MoPs)")
        ax.set_ylim(bottom=min(min(summ["per_seed"][str(s)][a]["task_mean_nll"] for a in arms)
                               for s in summ["seeds"]) * 0.95)
        ax.legend(fontsize=7)
        ax.set_title(summ["verdict"][:70], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def should_ship(rows_mops: Sequence[dict], rows_none: Sequence[dict], draws: int, seed: int = 0) -> dict:
    """Ship a trained MoPs only if it beats the no-prompt model on held-out items: its task-mean NLL
    lower with the paired bootstrap CI of (MoPs - none) entirely below 0."""
    b = paired_bootstrap(rows_mops, rows_none, draws, seed)
    return dict(b, ship=b["ci95"][1] < 0)

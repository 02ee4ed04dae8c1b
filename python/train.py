"""Train MoPs (bank + smart gate), the single-prompt baseline or IAPT on the frozen 4-bit SmolLM2 backbone.

    python python/prepare_data.py --out data/bigbench
    python python/train.py --data data/bigbench --mode mops --steps 300 --gate-steps 50 --out runs/mops
    python python/train.py ... --out runs/mops --resume          # continues exactly from the checkpoint
    python python/train.py --data data/bigbench --mode single --out runs/single   # the baseline
    python python/train.py --data data/bigbench --mode iapt --out runs/iapt       # IAPT generator

Writes OUT/checkpoint.safetensors (every --checkpoint-every steps, at the end, and on Ctrl-C),
OUT/prompts/ (MixtureOfPrompts.save: bank.safetensors, gate.safetensors, mops.json; load with
MixtureOfPrompts.load and mops_kernels.attach; IAPT: iapt.safetensors, load with
mops_kernels.training.trainer.load_iapt) and OUT/metrics.json (validation perplexity per task).
Without --resume an existing checkpoint in OUT is refused, so a run is never silently continued.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Spinning OpenMP waiters collapse on shared cores (see python/demo.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mops_kernels.training.data import encode, load_split, task_names  # noqa: E402
from mops_kernels.training.trainer import (CHECKPOINT, MODES, PromptTrainer, TrainConfig,  # noqa: E402
                                           build_prompts, save_prompts)


def add_model_args(ap):
    ap.add_argument("--data", required=True, help="cache directory written by prepare_data.py")
    ap.add_argument("--backbone", default=None, help="GGUF / HF dir (default: SmolLM2-135M Q4_1 GGUF)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8, help="tokens per expert (baseline: experts * this)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--gate-layer", type=int, default=10)
    ap.add_argument("--inject-from", type=int, default=11)
    ap.add_argument("--gate-hidden", type=int, default=64)
    ap.add_argument("--iapt-bottleneck", type=int, default=16, help="IAPT generator bottleneck width")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--max-train", type=int, default=None, help="items per task kept for training")
    ap.add_argument("--max-eval", type=int, default=None, help="validation items per task")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gate-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_items(tok, cache, split, max_len, per_task=None):
    rows = []
    for t in task_names(cache):
        r = load_split(cache, split, [t])
        rows += r[:per_task] if per_task else r
    return [encode(tok, r, max_len) for r in rows]


def new_prompts(args, model, mode):
    return build_prompts(model, mode, num_experts=args.experts, prompt_len=args.prompt_len, top_k=args.top_k,
                         gate_layer=args.gate_layer, inject_from=args.inject_from,
                         gate_hidden=args.gate_hidden, iapt_bottleneck=args.iapt_bottleneck, seed=args.seed)


def measure(args, mode, trainer, prompts, valid, steps):
    """Validation perplexity per task / overall and the gate's routing, as the metrics dict."""
    names = task_names(args.data)
    ev = trainer.evaluate(valid)
    routing = trainer.routing(valid)
    return dict(mode=mode, seed=args.seed, steps=steps, overall_ppl=ev["overall"],
                trainable_params=sum(p.numel() for p in prompts.parameters()),
                per_task_ppl={names[k]: v for k, v in ev["per_task"].items()},
                target_tokens={names[k]: v for k, v in ev["tokens"].items()},
                routing_top1={names[k]: v for k, v in routing.items()},
                config={k: v for k, v in vars(args).items() if not callable(v)})


def run(args, mode, out, resume=False, backbone=None):
    """Train one mode into `out`; returns the metrics dict (also written to out/metrics.json)."""
    from mops_kernels.integrations.backbone import load_backbone
    if os.path.isfile(os.path.join(out, CHECKPOINT)) and not resume:
        raise SystemExit(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    model, tok = backbone or load_backbone(args.backbone, device=args.device)
    tok.padding_side = "right"
    train = load_items(tok, args.data, "train", args.max_len, args.max_train)
    valid = load_items(tok, args.data, "validation", args.max_len, args.max_eval)
    prompts = new_prompts(args, model, mode)
    cfg = TrainConfig(steps=args.steps, gate_steps=args.gate_steps if mode == "mops" else 0,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      checkpoint_every=args.checkpoint_every)
    trainer = PromptTrainer(model, prompts, train, cfg, pad_id=tok.pad_token_id or 0)
    try:
        trainer.train(out, resume=resume)
        save_prompts(prompts, os.path.join(out, "prompts"))
        metrics = measure(args, mode, trainer, prompts, valid, trainer.step)
    finally:
        trainer.close()
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--mode", choices=MODES, default="mops")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    m = run(args, args.mode, args.out, resume=args.resume)
    print(f"{args.mode}: validation perplexity {m['overall_ppl']:.3f} after {m['steps']} steps")
    for t, p in m["per_task_ppl"].items():
        print(f"  {t:50s} {p:10.3f}")


if __name__ == "__main__":
    main()

"""Train one prompt source (MoPs, a single prompt or IAPT) on the frozen 4-bit SmolLM2 backbone, with
the experiment's recipe (mops_kernels.training.experiment: no-op start, warm-up + cosine, clipping,
gate pretrained on cached features).

    python python/prepare_data.py --out data/bigbench
    python python/train.py --data data/bigbench --mode mops --steps 300 --lr 1e-2 --out runs/mops
    python python/train.py ... --out runs/mops --resume          # continues exactly from the checkpoint
    python python/train.py --data data/bigbench --mode single_EP --out runs/single   # a baseline
    python python/train.py --data data/bigbench --mode iapt --out runs/iapt

Writes OUT/checkpoint/checkpoint.safetensors (every --checkpoint-every steps, at the end, on Ctrl-C),
OUT/prompts/ (MixtureOfPrompts.save, or iapt.safetensors: load with
mops_kernels.training.trainer.load_iapt) and OUT/metrics.json (validation metrics per task).
Without --resume an existing checkpoint in OUT is refused; with it, a changed configuration is
refused unless --override-config.
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

from mops_kernels.training import experiment as ex  # noqa: E402
from mops_kernels.training.data import task_names  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cache directory written by prepare_data.py")
    ap.add_argument("--backbone", default=None, help="GGUF / HF dir (default: SmolLM2-135M Q4_1 GGUF)")
    ap.add_argument("--mode", choices=ex.TRAINED, default="mops")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--override-config", action="store_true")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--gate-layer", type=int, default=10)
    ap.add_argument("--inject-from", type=int, default=11)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    ckpt = os.path.join(args.out, "checkpoint")
    if os.path.isfile(os.path.join(ckpt, "checkpoint.safetensors")) and not args.resume:
        raise SystemExit(f"{args.out} already holds a checkpoint: pass --resume to continue it, or another --out")
    cfg = ex.ExperimentConfig(experts=args.experts, prompt_len=args.prompt_len, top_k=args.top_k,
                              gate_layer=args.gate_layer, inject_from=args.inject_from, steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, max_len=args.max_len,
                              max_train=args.max_train, max_eval=args.max_eval, seeds=(args.seed,),
                              checkpoint_every=args.checkpoint_every, min_eval_per_task=1)
    from mops_kernels.integrations.backbone import load_backbone
    model, tok = load_backbone(args.backbone, device=args.device)
    tok.padding_side = "right"
    train, _ = ex.load_items(tok, args.data, "train", cfg, cfg.max_train)
    valid, _ = ex.load_items(tok, args.data, "validation", cfg, cfg.max_eval)
    names = task_names(args.data)
    r = ex.run_arm(model, args.mode, cfg, train, valid, args.seed, args.lr, tok.pad_token_id or 0, args.out,
                   names=names, resume=args.resume, allow_config_change=args.override_config)
    r.pop("prompts", None)
    m = ex.metrics(r.pop("rows"), names)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(dict(r, metrics=m), f, indent=1, default=float)
    print(f"{args.mode}: validation task-mean NLL {m['task_mean_nll']:.4f}, token ppl {m['token_ppl']:.3f}")
    for t, v in m["per_task_nll"].items():
        print(f"  {t:50s} {v:8.4f}")


if __name__ == "__main__":
    main()

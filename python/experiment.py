"""Test the MoPs claim on the frozen 4-bit SmolLM2-135M: a single soft prompt of the same total size
(E*P tokens, the baseline) vs MoPs (E experts of P tokens + smart gate), trained centralized on the
BIG-bench multi-task cache, compared by validation perplexity on the target tokens, per task and
overall.

    python python/prepare_data.py --out data/bigbench
    python python/experiment.py --data data/bigbench --smoke     # a few steps end to end (minutes)
    python python/experiment.py --data data/bigbench --small     # designed for < 1 h on a 2-core CPU
    python python/experiment.py --data data/bigbench --device cuda --steps 2000 --batch-size 32  # GPU

Writes benchmarks/results/mops_experiment.json (setting, seed, config, per-task / overall perplexity of
both modes, the relative change, the gate's top-1 expert counts per task) and RUNS/<mode>/ (checkpoint,
prompts, metrics). The PNG plot needs matplotlib; without it the program says so and writes none.
The federated (Flower) setting is not part of this program yet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Spinning OpenMP waiters collapse on shared cores (see python/demo.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from train import add_model_args, run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "mops_experiment.json")
# Settings override the parser defaults (explicit flags given on the command line still win).
SETTINGS = {
    "smoke": dict(steps=4, gate_steps=2, batch_size=2, max_train=4, max_eval=2, max_len=48, checkpoint_every=2),
    # 2 modes x 100 steps x batch 4 x <= 64 tokens + 80 validation items: ran end to end in ~5 min on the
    # shared 2-core CPU (1.0-1.6 s per step, ~110 target+instruction tokens/s), so it can grow.
    "small": dict(steps=100, gate_steps=20, batch_size=4, max_train=60, max_eval=8, max_len=64, checkpoint_every=25),
}


def table(results, names):
    lines = [f"{'task':48s} {'single':>10s} {'mops':>10s} {'change':>8s}"]
    s, m = results["single"], results["mops"]
    for t in names + ["overall"]:
        a = s["overall_ppl"] if t == "overall" else s["per_task_ppl"].get(t)
        b = m["overall_ppl"] if t == "overall" else m["per_task_ppl"].get(t)
        if a is None or b is None:
            continue
        lines.append(f"{t:48s} {a:10.3f} {b:10.3f} {100 * (b - a) / a:+7.1f}%")
    return "\n".join(lines)


def plot(results, names, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plot written")
        return None
    xs = names + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(xs)), 4))
    for j, mode in enumerate(("single", "mops")):
        r = results[mode]
        vals = [r["overall_ppl"] if t == "overall" else r["per_task_ppl"][t] for t in xs]
        ax.bar([i + 0.4 * j for i in range(len(xs))], vals, width=0.4, label=mode)
    ax.set_xticks([i + 0.2 for i in range(len(xs))], xs, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity (target tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--small", action="store_true")
    ap.add_argument("--runs", default=os.path.join(ROOT, "out", "mops_experiment"))
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--resume", action="store_true")
    setting = "smoke" if "--smoke" in (argv or sys.argv) else "small" if "--small" in (argv or sys.argv) else "custom"
    if setting in SETTINGS:
        ap.set_defaults(**SETTINGS[setting])
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    from mops_kernels.integrations.backbone import load_backbone
    from mops_kernels.training.data import task_names
    backbone = load_backbone(args.backbone, device=args.device)
    results = {}
    for mode in ("single", "mops"):
        results[mode] = run(args, mode, os.path.join(args.runs, setting, mode), resume=args.resume,
                            backbone=backbone)
    names = task_names(args.data)
    print(f"setting={setting} seed={args.seed} steps={args.steps}")
    print(table(results, names))
    a, b = results["single"]["overall_ppl"], results["mops"]["overall_ppl"]
    out = dict(setting=setting, seed=args.seed, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               device=args.device, torch=torch.__version__, python=platform.python_version(),
               config={k: v for k, v in vars(args).items()}, tasks=names,
               centralized={m: {k: r[k] for k in ("overall_ppl", "per_task_ppl", "target_tokens", "routing_top1",
                                                    "steps")} for m, r in results.items()},
               mops_vs_single_overall_change=(b - a) / a, federated=None)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(out, f, indent=1)
    png = plot(results, names, os.path.splitext(args.results)[0] + ".png")
    print(f"wrote {args.results}" + (f" and {png}" if png else ""))
    return out


if __name__ == "__main__":
    main()

"""Test the MoPs claim on the frozen 4-bit SmolLM2-135M, centralized and federated (non-IID).

Modes, each trained from the same seed on the BIG-bench multi-task cache and compared by validation
perplexity on the target tokens, per task and overall:
  centralized: (a) single  one soft prompt of E*P tokens (the baseline: same number of prompt values)
               (b) mops    E experts of P tokens + the smart gate (pretrained on task labels, then joint)
               (c) iapt    the IAPT generator (4 tokens per injected layer from the instruction)
  federated:   (a) single and (b) mops on Flower (FedAvg over the prompt parameters, Ray simulation),
               non-IID: --clients clients, each holding a contiguous chunk of the task list.
Federated runs spend the same number of client training steps in all as a centralized run
(clients x rounds x local steps = --steps by default in --small).

    python python/prepare_data.py --out data/bigbench
    python python/experiment.py --data data/bigbench --smoke     # a few steps end to end (minutes)
    python python/experiment.py --data data/bigbench --small     # designed for < 1 h on a 2-core CPU
    python python/experiment.py --data data/bigbench --small --ship   # + ship the MoPs bank in the package
    python python/experiment.py --data data/bigbench --device cuda --steps 2000 --batch-size 32 \\
        --rounds 20 --local-steps 20 --seeds 0,1,2                     # GPU-sized

Writes benchmarks/results/mops_experiment.json (setting, seeds, config, per-task / overall perplexity
of every mode, seed and setting, the MoPs-vs-single change, the gate's top-1 expert counts per task,
measured wall times) and a PNG beside it; RUNS/<setting>/seed<s>/<mode>/ holds checkpoints and prompts.
--ship copies the first seed's centralized MoPs bank + gate into mops_kernels/data/ (load_shipped).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Spinning OpenMP waiters collapse on shared cores (see python/demo.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from train import add_model_args, load_items, measure, new_prompts, run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "mops_experiment.json")
CENTRALIZED = ("single", "mops", "iapt")
FEDERATED = ("single", "mops")
PAPER = {"centralized": [0.03, 0.30], "federated": [0.09, 0.70]}   # perplexity reduction, MoPs vs single
# Settings override the parser defaults (explicit flags given on the command line still win).
SETTINGS = {
    "smoke": dict(steps=4, gate_steps=2, batch_size=2, max_train=4, max_eval=2, max_len=48, checkpoint_every=2,
                  clients=2, rounds=1, local_steps=2, fed_gate_steps=1, seeds="0"),
    # per seed: 3 centralized modes x 100 steps (batch 4, <= 64 tokens) + 2 federated modes x 5 clients x
    # 4 rounds x 5 local steps (the same 100 client steps), 16 validation items per task.
    "small": dict(steps=100, gate_steps=20, batch_size=4, max_train=60, max_eval=16, max_len=64, checkpoint_every=25,
                  clients=5, rounds=4, local_steps=5, fed_gate_steps=5, seeds="0,1"),
}


def change(a, b):
    return (b - a) / a


def summarize(runs, names):
    """Per setting and mode: mean over seeds of overall / per-task ppl; MoPs vs single per seed."""
    out = {}
    for setting, modes in (("centralized", CENTRALIZED), ("federated", FEDERATED)):
        seeds = [s for s in runs if setting in runs[s]]
        if not seeds:
            continue
        o = {}
        for m in modes:
            rs = [runs[s][setting][m] for s in seeds]
            o[m] = dict(overall_ppl=sum(r["overall_ppl"] for r in rs) / len(rs),
                        per_task_ppl={t: sum(r["per_task_ppl"][t] for r in rs) / len(rs) for t in names})
        per_seed = {s: change(runs[s][setting]["single"]["overall_ppl"], runs[s][setting]["mops"]["overall_ppl"])
                    for s in seeds}
        o["mops_vs_single_change_per_seed"] = per_seed
        o["mops_vs_single_change_mean"] = sum(per_seed.values()) / len(per_seed)
        o["mops_vs_single_change_of_means"] = change(o["single"]["overall_ppl"], o["mops"]["overall_ppl"])
        out[setting] = o
    return out


def table(summary, names):
    lines = []
    for setting, modes in (("centralized", CENTRALIZED), ("federated", FEDERATED)):
        if setting not in summary:
            continue
        s = summary[setting]
        lines.append(f"\n{setting} (validation perplexity, mean over seeds; change = mops vs single)")
        lines.append(f"{'task':48s} " + " ".join(f"{m:>10s}" for m in modes) + f" {'change':>8s}")
        for t in names + ["overall"]:
            vals = [s[m]["overall_ppl"] if t == "overall" else s[m]["per_task_ppl"][t] for m in modes]
            lines.append(f"{t:48s} " + " ".join(f"{v:10.3f}" for v in vals)
                         + f" {100 * change(vals[0], vals[1]):+7.1f}%")
        lines.append("per seed (overall): " + ", ".join(f"seed {k}: {100 * v:+.1f}%"
                                                         for k, v in s["mops_vs_single_change_per_seed"].items()))
    return "\n".join(lines)


def plot(summary, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = names + ["overall"]
    settings = [(s, m) for s, m in (("centralized", CENTRALIZED), ("federated", FEDERATED)) if s in summary]
    fig, axes = plt.subplots(len(settings), 1, figsize=(max(7, 0.9 * len(xs)), 3.6 * len(settings)), squeeze=False)
    for ax, (setting, modes) in zip(axes[:, 0], settings):
        w = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            r = summary[setting][mode]
            vals = [r["overall_ppl"] if t == "overall" else r["per_task_ppl"][t] for t in xs]
            ax.bar([i + w * j for i in range(len(xs))], vals, width=w, label=mode)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(xs))], xs, rotation=50, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("val. perplexity")
        ax.set_title(f"{setting}: MoPs vs single {100 * summary[setting]['mops_vs_single_change_of_means']:+.1f}% "
                     f"(paper: -{100 * PAPER[setting][0]:.0f}% to -{100 * PAPER[setting][1]:.0f}%)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def federated(args, mode, backbone):
    """Flower FedAvg for one mode; -> the metrics dict of the final global prompts (+ round metrics)."""
    from mops_kernels.training.federated import load_prompt_params, prompt_params, run_federated
    from mops_kernels.training.trainer import PromptTrainer, TrainConfig
    model, tok = backbone
    prompts = new_prompts(args, model, mode)
    cc = {"data": os.path.abspath(args.data), "backbone": args.backbone or "", "mode": mode,
          "experts": args.experts, "prompt-len": args.prompt_len, "top-k": args.top_k,
          "gate-layer": args.gate_layer, "inject-from": args.inject_from, "gate-hidden": args.gate_hidden,
          "max-len": args.max_len, "max-train": args.max_train or 0, "local-steps": args.local_steps,
          "gate-steps": args.fed_gate_steps if mode == "mops" else 0, "batch-size": args.batch_size,
          "lr": args.lr, "seed": args.seed, "threads": 1}
    final, rounds = run_federated(prompt_params(prompts), args.clients, args.rounds, cc, ray_cpus=args.ray_cpus)
    load_prompt_params(prompts, final)
    valid = load_items(tok, args.data, "validation", args.max_len, args.max_eval)
    tr = PromptTrainer(model, prompts, valid, TrainConfig(batch_size=args.batch_size, progress=False),
                       pad_id=tok.pad_token_id or 0)
    try:
        m = measure(args, mode, tr, prompts, valid, steps=args.rounds * args.local_steps)
    finally:
        tr.close()
    m["rounds"] = {str(k): v for k, v in rounds.items()}
    if any(v.get("backbone-changed", 0) for v in rounds.values()):
        raise RuntimeError(f"a client's backbone changed during federated training: {rounds}")
    return m


def shipped_examples(data, names):
    """The first test-split example of each task: what the demo asks the shipped MoPs."""
    from mops_kernels.training.data import load_split
    first = {}
    for row in load_split(data, "test", names):
        first.setdefault(row["task"], {"task": row["task"], "input": row["input"], "target": row["target"]})
    return [first[t] for t in names if t in first]


def ship(run_dir, names, metrics, command, data=None):
    """Copy a trained MoPs (bank + gate) into the package: mops_kernels/data/mops_{bank,gate}.safetensors
    + mops.json (placement, task names, routing, validation ppl, the command that made it, and one
    held-out test example per task for the demo)."""
    from mops_kernels.training.shipped import SHIPPED
    os.makedirs(os.path.dirname(SHIPPED["bank"]), exist_ok=True)
    with open(os.path.join(run_dir, "mops.json")) as f:
        meta = json.load(f)
    shutil.copyfile(os.path.join(run_dir, "bank.safetensors"), SHIPPED["bank"])
    shutil.copyfile(os.path.join(run_dir, "gate.safetensors"), SHIPPED["gate"])
    meta.update(tasks=names, label_to_expert="task label % num_experts (gate pretraining target)",
                routing_top1=metrics["routing_top1"], validation_ppl=metrics["overall_ppl"],
                per_task_ppl=metrics["per_task_ppl"], trained_by=command)
    if data is not None:
        meta["examples"] = shipped_examples(data, names)
    with open(SHIPPED["meta"], "w") as f:
        json.dump(meta, f, indent=1)
    return SHIPPED


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--small", action="store_true")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (overrides --seed)")
    ap.add_argument("--clients", type=int, default=5, help="federated clients (non-IID task chunks)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--fed-gate-steps", type=int, default=5, help="gate pretraining steps per client (MoPs)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--no-federated", action="store_true")
    ap.add_argument("--runs", default=os.path.join(ROOT, "out", "mops_experiment"))
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ship", action="store_true", help="copy the first seed's centralized MoPs into the package")
    argv = sys.argv[1:] if argv is None else argv
    setting = "smoke" if "--smoke" in argv else "small" if "--small" in argv else "custom"
    if setting in SETTINGS:
        ap.set_defaults(**SETTINGS[setting])
    args = ap.parse_args(argv)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    t_start = time.perf_counter()
    from mops_kernels.integrations.backbone import load_backbone
    from mops_kernels.training.data import task_names
    backbone = load_backbone(args.backbone, device=args.device)
    names = task_names(args.data)
    runs, wall = {}, {}

    def write():
        # after every seed, so a run cut off later still leaves the seeds it finished
        summary = summarize(runs, names)
        total = time.perf_counter() - t_start
        print(f"setting={setting} seeds={list(runs)} steps={args.steps} federated={args.clients} clients x "
              f"{args.rounds} rounds x {args.local_steps} local steps; wall {total:.0f} s")
        print(table(summary, names))
        import flwr
        out = dict(setting=setting, seeds=list(runs), seeds_asked=seeds, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   device=args.device, cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                   flwr=flwr.__version__, python=platform.python_version(),
                   command="python python/experiment.py " + " ".join(argv),
                   wall_seconds_total=total, wall_seconds=wall,
                   note="measured on the shared 2-core dev CPU while other jobs were running",
                   config={k: v for k, v in vars(args).items()}, tasks=names,
                   non_iid_clients=None if args.no_federated else __import__(
                       "mops_kernels.training.federated", fromlist=["non_iid_split"]).non_iid_split(names, args.clients),
                   paper_ppl_reduction=PAPER, summary=summary,
                   runs={str(s): {st: {m: {k: r[k] for k in ("overall_ppl", "per_task_ppl", "target_tokens",
                                                             "routing_top1", "steps", "trainable_params")
                                           if k in r} | ({"rounds": r["rounds"]} if "rounds" in r else {})
                                       for m, r in d.items()} for st, d in v.items()} for s, v in runs.items()})
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "w") as f:
            json.dump(out, f, indent=1)
        png = plot(summary, names, os.path.splitext(args.results)[0] + ".png")
        print(f"wrote {args.results} and {png}")
        return out

    out = None
    for seed in seeds:
        a = argparse.Namespace(**{**vars(args), "seed": seed})
        torch.manual_seed(seed)
        runs[seed] = {"centralized": {}}
        for mode in CENTRALIZED:
            t0 = time.perf_counter()
            runs[seed]["centralized"][mode] = run(a, mode, os.path.join(args.runs, setting, f"seed{seed}", mode),
                                                  resume=args.resume, backbone=backbone)
            wall[f"seed{seed}/centralized/{mode}"] = time.perf_counter() - t0
            print(f"[{time.perf_counter() - t_start:7.0f}s] seed {seed} centralized {mode}: "
                  f"ppl {runs[seed]['centralized'][mode]['overall_ppl']:.3f}", flush=True)
        if not args.no_federated:
            runs[seed]["federated"] = {}
        for mode in () if args.no_federated else FEDERATED:
            t0 = time.perf_counter()
            runs[seed]["federated"][mode] = federated(a, mode, backbone)
            wall[f"seed{seed}/federated/{mode}"] = time.perf_counter() - t0
            print(f"[{time.perf_counter() - t_start:7.0f}s] seed {seed} federated {mode}: "
                  f"ppl {runs[seed]['federated'][mode]['overall_ppl']:.3f}", flush=True)
        out = write()
        if args.ship and seed == seeds[0]:
            shipped = ship(os.path.join(args.runs, setting, f"seed{seed}", "mops", "prompts"), names,
                           runs[seed]["centralized"]["mops"], out["command"], data=args.data)
            print("shipped:", ", ".join(shipped.values()), flush=True)
    return out


if __name__ == "__main__":
    main()

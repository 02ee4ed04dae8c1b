"""End-to-end batched decode: tokens/s and per-token latency (SPEC §6, last speed line).

Providers, on the same 4-bit backbone (load_backbone), one decode step per timed call:
  ours-engine     Engine: static KV cache, mixed experts per request (row b uses slots b%E and
                  (b+3)%E, gate weights 0.7/0.3), prefix_attention; CUDA graph on GPU
  ours-engine-plain  the same Engine with no prefixes (the lean decode step alone; SmolLM2 on the CPU)
  hf-peft-prefix  transformers + PEFT prefix tuning (ONE adapter, P tokens: PEFT cannot mix adapters
                  in a batch): PEFT prefills (its prefix copied into every request's DynamicCache),
                  then each step is the base model's forward on that cache, as PEFT's generate does
  hf-plain        transformers, no prefixes: forward on a DynamicCache
and, for SmolLM2 on the CPU, SPEC §6's baseline:
  hf-fp32         transformers' own float32 model loaded from the same GGUF file (no mops code at
                  all), forward on a DynamicCache, no prefixes
Per-token latency = median time of one step; tokens/s = B / that time. Every step of ours
includes choosing the next token (argmax) and its bookkeeping; the HF steps do an argmax too.

    python benchmarks/bench_e2e.py --quick                 # CPU, SmolLM2-135M, B = 1, 8
    python benchmarks/bench_e2e.py --device cuda --model llama7b   # random 4-bit Llama-7B shape
"""
import argparse
import os
import sys
import tempfile

# As in python/demo.py: OpenMP threads spinning while they wait collapse on a shared 2-core CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from harness import Bench  # noqa: E402

import mops_kernels  # noqa: E402
from mops_kernels.serving import Engine  # noqa: E402

LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


PROVIDERS = ("ours-engine", "ours-engine-plain", "hf-peft-prefix", "hf-plain", "hf-fp32")


def load(name, device):
    if name == "smollm2":
        model, _ = mops_kernels.load_backbone(device=device)
    else:
        from transformers import LlamaConfig
        model, _ = mops_kernels.load_backbone(config=LlamaConfig(**LLAMA7B), device=device)
    return model


def prompts(B, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, T), generator=g)


def engine_step(model, mops, ids, steps, device):
    B, T = ids.shape
    eng = Engine(model, mops, max_batch=B, max_len=T + steps + 4, eos_token_id=[])   # fixed batch: no EOS
    for b in range(B):
        if mops is None:
            eng.submit(ids[b], max_new_tokens=steps + 2)
        else:
            E = mops.bank.num_experts
            eng.submit(ids[b], expert_index=[b % E, (b + 3) % E], expert_weight=[0.7, 0.3],
                       max_new_tokens=steps + 2)
    eng.step()                                              # prefill all + first decode step
    return eng.step, eng.use_graph


def hf_step(model, ids, device, peft_model=None):
    """One decode step of HF on a DynamicCache (prefilled by PEFT when given)."""
    B = ids.shape[0]
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = (peft_model or model)(input_ids=ids, attention_mask=mask, use_cache=True)
    st = {"cache": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True),
          "mask": torch.ones(B, out.past_key_values.get_seq_length(), dtype=torch.long, device=device)}

    @torch.no_grad()
    def step():
        st["mask"] = torch.cat([st["mask"], st["mask"].new_ones(B, 1)], 1)
        o = model(input_ids=st["tok"], past_key_values=st["cache"], attention_mask=st["mask"], use_cache=True)
        st["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
        return st["tok"]
    return step


def peft_wrap(model, P, tmp):
    """A PEFT prefix-tuning model (one random adapter, P tokens) over `model`, its dir."""
    from peft import PrefixTuningConfig, get_peft_model
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    pm.eval()
    pm.save_pretrained(tmp)
    return pm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["smollm2", "llama7b"], default=None)
    ap.add_argument("--batches", default=None, help="default 1,8 with --quick, else 1,8,32")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small CPU run")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    name = args.model or ("llama7b" if cuda else "smollm2")
    T = args.prompt_len or (8 if args.quick else 128)
    warmup, reps = (2, 10) if args.quick else (3, 20)
    E, P, k = 8, 16, 2
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]

    model = load(name, args.device)
    torch.manual_seed(0)
    mops = mops_kernels.MixtureOfPrompts.for_model(model, num_experts=E, prompt_len=P, top_k=k,
                                                   gate_layer=min(10, model.config.num_hidden_layers - 2),
                                                   inject_from=min(11, model.config.num_hidden_layers - 1))
    ref32 = None
    if name == "smollm2" and not cuda:
        from transformers import AutoModelForCausalLM
        from mops_kernels.integrations.backbone import default_gguf_path
        path = default_gguf_path()
        ref32 = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    dtype = "bf16" if cuda else "fp32"
    bench = Bench("e2e_decode", args.device)
    tps = {}
    tmp = tempfile.mkdtemp()
    for B in batches:
        ids = prompts(B, T, model.config.vocab_size)
        shapes = dict(model=name, B=B, prompt=T, E=E, P=P, k=k)
        step, graph = engine_step(model, mops, ids, warmup + 10 * reps, args.device)
        r = bench.run("ours-engine", step, shapes=shapes, dtype=dtype, warmup=warmup, reps=reps,
                      note=f"mixed experts, cuda_graph={graph}")
        tps[("ours-engine", B)] = B / (r["median_ms"] * 1e-3)
        del step
        if ref32 is not None:                               # the CPU comparison with transformers fp32
            step, _ = engine_step(model, None, ids, warmup + 10 * reps, args.device)
            r = bench.run("ours-engine-plain", step, shapes=shapes, dtype=dtype, warmup=warmup, reps=reps,
                          note=f"no prefixes, cuda_graph={graph}")
            tps[("ours-engine-plain", B)] = B / (r["median_ms"] * 1e-3)
            del step
            r = bench.run("hf-fp32", hf_step(ref32, ids, args.device), shapes=shapes, dtype="fp32",
                          warmup=warmup, reps=reps, note="transformers' own fp32 GGUF load, no prefixes")
            tps[("hf-fp32", B)] = B / (r["median_ms"] * 1e-3)
        r = bench.run("hf-plain", hf_step(model, ids, args.device), shapes=shapes, dtype=dtype,
                      warmup=warmup, reps=reps, note="no prefixes")
        tps[("hf-plain", B)] = B / (r["median_ms"] * 1e-3)
        pm = peft_wrap(model, P, tmp)
        try:
            r = bench.run("hf-peft-prefix", hf_step(model, ids, args.device, peft_model=pm), shapes=shapes,
                          dtype=dtype, warmup=warmup, reps=reps, note="one PEFT prefix adapter")
            tps[("hf-peft-prefix", B)] = B / (r["median_ms"] * 1e-3)
        finally:
            model = pm.get_base_model()
    bench.summary()
    print("\ntokens/s (B / median step):")
    for B in batches:
        row = "  ".join(f"{p} {tps[(p, B)]:8.1f}" for p in PROVIDERS if (p, B) in tps)
        print(f"  B={B:<3} {row}")
        for ours, base in (("ours-engine-plain", "hf-fp32"), ("ours-engine", "hf-peft-prefix")):
            if (ours, B) in tps and (base, B) in tps:
                print(f"        {ours} / {base}: {tps[(ours, B)] / tps[(base, B)]:.2f}x")


if __name__ == "__main__":
    main()

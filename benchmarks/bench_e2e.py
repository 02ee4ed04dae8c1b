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
    python benchmarks/bench_e2e.py --device cuda --batches 32,8,1  # the GPU default: SPEC's B=32 first

Each batch size runs on its own: one that fails (memory, a capture error) is reported and the others
still run (exit status 1 at the end). The ours-engine row's note says whether the Engine's CUDA
graph was actually used (cuda_graph_used=...), read after its first decode step.
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


# --model tiny: the same code paths in seconds (spec6.py --dry-run, scripts/gpu_run.sh --dry-run)
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128)

PROVIDERS = ("ours-engine", "ours-engine-plain", "hf-peft-prefix", "hf-plain", "hf-fp32")


def load(name, device):
    if name == "smollm2":
        model, _ = mops_kernels.load_backbone(device=device)
    elif name == "tiny":
        model, _ = mops_kernels.load_backbone(config=dict(TINY), device=device)
    else:
        from transformers import LlamaConfig
        model, _ = mops_kernels.load_backbone(config=LlamaConfig(**LLAMA7B), device=device)
    return model


def prompts(B, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, T), generator=g)


def engine_step(model, mops, ids, steps, device):
    """(step function, engine): an Engine with every row of `ids` admitted and its first decode step
    run (so a GPU engine has captured its CUDA graph, or fallen back to eager)."""
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
    return eng.step, eng


def graph_used(eng) -> bool:
    """Whether the engine's decode steps replay a captured CUDA graph (False: eager, or a failed
    capture that fell back)."""
    graphs = getattr(getattr(eng, "graphs", None), "graphs", None)     # serving.graphs.DecodeGraphs
    return bool(getattr(eng, "use_graph", False) and graphs)


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


def measure_batch(bench, name, model, mops, B, T, warmup, reps, device, ref32=None, tmp=None):
    """Every provider at batch B; returns ({provider: tokens/s}, the model (PEFT unwrapped))."""
    cuda = device.startswith("cuda")
    dtype = "bf16" if cuda else "fp32"
    E, P, k = mops.bank.num_experts, mops.bank.prompt_len, mops.top_k
    ids = prompts(B, T, model.config.vocab_size)
    shapes = dict(model=name, B=B, prompt=T, E=E, P=P, k=k)
    # one decode step per sample (calls=1), timed eagerly: the step is the whole Engine step, host
    # bookkeeping included, and replays the Engine's own CUDA graph inside
    timing = dict(shapes=shapes, warmup=warmup, reps=reps, graph=False, calls=1)
    tps = {}
    step, eng = engine_step(model, mops, ids, warmup + reps + 2, device)
    used = graph_used(eng)                                  # captured (or not) by the first step
    r = bench.run("ours-engine", step, dtype=dtype, note=f"mixed experts, cuda_graph_used={used}", **timing)
    if graph_used(eng) != used:
        print(f"  ours-engine B={B}: the CUDA graph was dropped while timing (row says {used})")
    tps["ours-engine"] = B / (r["median_ms"] * 1e-3)
    del step, eng
    if ref32 is not None:                                   # the CPU comparison with transformers fp32
        step, eng = engine_step(model, None, ids, warmup + reps + 2, device)
        r = bench.run("ours-engine-plain", step, dtype=dtype, note=f"no prefixes, cuda_graph_used={graph_used(eng)}",
                      **timing)
        tps["ours-engine-plain"] = B / (r["median_ms"] * 1e-3)
        del step, eng
        r = bench.run("hf-fp32", hf_step(ref32, ids, device), dtype="fp32",
                      note="transformers' own fp32 GGUF load, no prefixes", **timing)
        tps["hf-fp32"] = B / (r["median_ms"] * 1e-3)
    r = bench.run("hf-plain", hf_step(model, ids, device), dtype=dtype, note="no prefixes", **timing)
    tps["hf-plain"] = B / (r["median_ms"] * 1e-3)
    pm = peft_wrap(model, P, tmp or tempfile.mkdtemp())
    try:
        r = bench.run("hf-peft-prefix", hf_step(model, ids, device, peft_model=pm), dtype=dtype,
                      note="one PEFT prefix adapter", **timing)
        tps["hf-peft-prefix"] = B / (r["median_ms"] * 1e-3)
    finally:
        model = pm.get_base_model()
    return tps, model


def make_mops(model, E=8, P=16, k=2):
    torch.manual_seed(0)
    L = model.config.num_hidden_layers
    return mops_kernels.MixtureOfPrompts.for_model(model, num_experts=E, prompt_len=P, top_k=k,
                                                   gate_layer=min(10, L - 2), inject_from=min(11, L - 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["smollm2", "llama7b", "tiny"], default=None)
    ap.add_argument("--batches", default=None,
                    help="in this order; default 1,8 with --quick, 32,8,1 on CUDA (SPEC's B=32 first), else 1,8,32")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small CPU run")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    name = args.model or ("llama7b" if cuda else "smollm2")
    T = args.prompt_len or (8 if args.quick else 128)
    warmup, reps = (2, 10) if args.quick else (3, 20)
    default = "1,8" if args.quick else ("32,8,1" if cuda else "1,8,32")
    batches = [int(b) for b in (args.batches or default).split(",")]

    model = load(name, args.device)
    mops = make_mops(model)
    ref32 = None
    if name == "smollm2" and not cuda:
        from transformers import AutoModelForCausalLM
        from mops_kernels.integrations.backbone import default_gguf_path
        path = default_gguf_path()
        ref32 = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    bench = Bench("e2e_decode", args.device)
    tps, failed = {}, []
    tmp = tempfile.mkdtemp()
    for B in batches:
        try:                      # one batch size failing (memory, a capture error) keeps the others
            tps[B], model = measure_batch(bench, name, model, mops, B, T, warmup, reps, args.device, ref32, tmp)
        except Exception as e:
            failed.append(B)
            print(f"B={B} FAILED: {type(e).__name__}: {e}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            model = getattr(model, "get_base_model", lambda: model)()
    bench.summary()
    print("\ntokens/s (B / median step):")
    for B, row in tps.items():
        print(f"  B={B:<3} " + "  ".join(f"{p} {row[p]:8.1f}" for p in PROVIDERS if p in row))
        for ours, base in (("ours-engine-plain", "hf-fp32"), ("ours-engine", "hf-peft-prefix")):
            if ours in row and base in row:
                print(f"        {ours} / {base}: {row[ours] / row[base]:.2f}x")
    if failed:
        print(f"failed batch sizes: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()

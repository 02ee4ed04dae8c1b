"""Demo: the 4-bit SmolLM2-135M-Instruct backbone answering a batch of chat prompts.

    python3 python/demo.py                       # batch 8, 32 new tokens, ours vs transformers fp32
    python3 python/demo.py --batch 1 --max-new-tokens 64
    python3 python/demo.py --no-baseline
    python3 python/demo.py --bank DIR            # another trained MixtureOfPrompts saved with .save(DIR)

After the plain backbone, the demo attaches a Mixture of Prompts (the shipped one: 4 experts of 8
tokens, top-2, gate after layer 10, experts injected from layer 11): the gate picks experts per
request in the same forward pass, and the demo prints which ones and with what weight. Without --bank it uses the
bank and gate shipped in the package (mops_kernels/data, trained by `python3 python/experiment.py
--small --ship` on 10 BIG-bench tasks) and asks it one held-out test example per task, printing the
reference answer beside ours; if those files are absent, an untrained (random) bank, labelled so.

"Ours" answers the prompts through the serving Engine (mops_kernels.serving: static KV
cache, the lean decode step with fused int4 q/k/v and gate/up matmuls), greedy, every request
submitted at once without padding. The baseline is transformers' own float32 model loaded from the
same GGUF file, answering the same prompts (left-padded) with `generate()` (greedy); the demo checks
that both give the same tokens. Each side runs once on the same prompts as a warm-up (4 tokens),
then the timed run; tokens counted are the new tokens actually produced per request (up to and
including EOS), summed over the batch. "generate" divides them by the whole time (prefill
included); "decode" leaves out the first token of each request and the prefill time: for the
Engine the time until every request had its first token, for transformers the median of 3
separate forwards over the same prompts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

# OpenMP threads that spin while waiting collapse when the 2 cores are shared with other work
# (measured here: batch-1 decode step 1.9 s spinning vs 53-88 ms passive, for the int4 kernel's
# 211 small parallel regions per step). Must be set before torch loads the OpenMP runtime; it
# applies to the transformers baseline in this process as well. Override it from the shell.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mops_kernels  # noqa: E402
from mops_kernels import _backend  # noqa: E402
from mops_kernels.examples import EXAMPLE_PROMPTS as PROMPTS  # noqa: E402
from mops_kernels.integrations.backbone import chat_batch, default_gguf_path  # noqa: E402
from mops_kernels.shipped import load_shipped, shipped_info  # noqa: E402
from mops_kernels.serving import Engine  # noqa: E402


def int4_backend():
    from mops_kernels.ops import int4_matmul  # noqa: F401 (registers its backends)
    return _backend.pick("int4_matmul", torch.device("cpu"))


def new_tokens(out, prompt_len, eos_id):
    """Tokens generated per request, up to and including the first EOS."""
    gen = out[:, prompt_len:]
    counts = []
    for row in gen.tolist():
        counts.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return counts


@dataclass
class Speed:
    tokens: int          # new tokens produced, summed over the batch
    seconds: float       # the whole generate() call
    prefill_s: float     # one forward over the prompts
    batch: int

    @property
    def generate_tps(self):
        return self.tokens / self.seconds

    @property
    def decode_tps(self):
        return (self.tokens - self.batch) / max(self.seconds - self.prefill_s, 1e-9)

    def line(self, name):
        return (f"{name}: {self.tokens} tokens in {self.seconds:.2f}s = {self.generate_tps:.1f} tok/s "
                f"generate, {self.decode_tps:.1f} tok/s decode (prefill {self.prefill_s * 1e3:.0f} ms)")


def timed_generate(model, batch, max_new_tokens, pad_id, eos_id):
    """One greedy generate() after a warm-up -> (output ids, Speed)."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    with torch.no_grad():
        model.generate(**batch, **{**kw, "max_new_tokens": min(4, max_new_tokens)})   # warm-up
        t0 = time.perf_counter()
        out = model.generate(**batch, **kw)
        dt = time.perf_counter() - t0
        prefill = []
        for _ in range(3):
            t1 = time.perf_counter()
            model(**batch, logits_to_keep=1)
            prefill.append(time.perf_counter() - t1)
    n = sum(new_tokens(out, batch["input_ids"].shape[1], eos_id))
    return out, Speed(n, dt, sorted(prefill)[1], batch["input_ids"].shape[0])


def timed_engine(model, batch, max_new_tokens, eos_id, prompts=None):
    """The prompts of a (left-padded) batch through the Engine (with `prompts`: a MixtureOfPrompts whose
    gate picks each request's experts) after a warm-up -> (tokens per request, Speed)."""
    ids = [row[m.bool()] for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    eng = Engine(model, prompts, max_batch=len(ids), max_len=max(x.numel() for x in ids) + max_new_tokens,
                 eos_token_id=eos_id)
    for x in ids:                                                     # warm-up
        eng.submit(x, max_new_tokens=min(4, max_new_tokens))
    eng.run_until_done()
    t0 = time.perf_counter()
    reqs = [eng.submit(x, max_new_tokens=max_new_tokens) for x in ids]
    eng.run_until_done()
    dt = time.perf_counter() - t0
    prefill = max(r.t_tokens[0] for r in reqs) - t0                  # every request has its first token
    return [r.tokens for r in reqs], Speed(sum(len(r.tokens) for r in reqs), dt, prefill, len(ids))


def task_batch(tok, examples, separator=""):
    """The shipped bank's held-out task examples as raw text, the way it was trained (no chat
    template; the training separator after the input): input_ids / attention_mask, right-padded
    (timed_engine strips the padding)."""
    ids = [tok(e["input"].rstrip() + separator, add_special_tokens=False)["input_ids"] for e in examples]
    T = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([x + [pad] * (T - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])}


def run_mops(model, tok, prompts, batch, args):
    """Attach a MixtureOfPrompts, let the gate route each request, print its experts and answer.

    The bank: --bank DIR, else the one shipped in the package (trained by python/experiment.py
    --small --ship), asked one held-out test example of each task it was trained on, else an
    untrained bank (labelled as such) on the chat prompts."""
    targets = None
    shipped = None if args.bank else load_shipped(model)
    if args.bank:
        mops = mops_kernels.MixtureOfPrompts.load(args.bank, model=model)
        label = f"trained bank from {args.bank}"
    elif shipped is not None:
        mops, info = shipped, shipped_info()
        examples = info["examples"]
        prompts = [f"[{e['task']}] {e['input'].strip()}" for e in examples]
        targets = [e["target"] for e in examples]
        batch = task_batch(tok, examples, info.get("separator", ""))
        quality = (f"validation ppl {info['validation_ppl']:.2f}" if "validation_ppl" in info else
                   "test NLL vs no prompt {:+.3f}".format(info["test_vs_no_prompt"]["diff"])
                   if "test_vs_no_prompt" in info else "")
        label = (f"the shipped bank (mops_kernels/data, {len(info['tasks'])} BIG-bench tasks"
                 f"{', ' + quality if quality else ''}); one held-out test example per task")
    else:
        torch.manual_seed(0)
        mops = mops_kernels.MixtureOfPrompts.for_model(model, num_experts=8, prompt_len=16, top_k=2,
                                                       gate_layer=10, inject_from=11)
        label = "UNTRAINED bank and gate (random): real routing, no learned skill"
    chosen = []
    hook = mops.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out))
    try:
        toks, speed = timed_engine(model, batch, args.max_new_tokens, tok.eos_token_id, prompts=mops)
    finally:
        hook.remove()
    idx, w = chosen[-1]        # the timed run's prefill: all requests together, in order
    answers = [tok.decode(t, skip_special_tokens=True) for t in toks]
    plain = None
    if targets is not None:    # the same questions without the bank: what the bank changes
        plain_toks, _ = timed_engine(model, batch, args.max_new_tokens, tok.eos_token_id)
        plain = [tok.decode(t, skip_special_tokens=True) for t in plain_toks]
    print(f"\n== Mixture of Prompts: {mops.num_experts} experts x {mops.prompt_len} tokens, "
          f"top-{mops.top_k}, gate after layer {mops.gate_layer}, injected from layer {mops.inject_from}; "
          f"{label}")
    for i, (p, a) in enumerate(zip(prompts, answers)):
        experts = ", ".join(f"expert {int(e)} (w={float(x):.2f})" for e, x in zip(idx[i], w[i]))
        want = "" if targets is None else f"\n  reference answer: {targets[i]}"
        bare = "" if plain is None else f"\n  without the bank: {plain[i].strip()}"
        print(f"\n> {p}\n  gate chose: {experts}\n{a.strip()}{bare}{want}")
    print(speed.line("\nmops_kernels 4-bit + MoPs (Engine)"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help=f"prompts per batch (1..{len(PROMPTS)})")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers' float32 generate()")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--bank", default=None, help="directory of a saved MixtureOfPrompts (default: untrained)")
    ap.add_argument("--no-mops", action="store_true", help="skip the Mixture-of-Prompts part")
    args = ap.parse_args(argv)
    if not 1 <= args.batch <= len(PROMPTS):
        ap.error(f"--batch must be in 1..{len(PROMPTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = mops_kernels.load_backbone()
    print(f"loaded 4-bit backbone in {time.perf_counter() - t0:.1f}s "
          f"(int4_matmul backend: {int4_backend()}, threads: {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    prompts = PROMPTS[:args.batch]
    batch = chat_batch(tok, prompts)
    eos = tok.eos_token_id
    toks, ours = timed_engine(model, batch, args.max_new_tokens, eos)
    for p, t in zip(prompts, toks):
        print(f"\n> {p}\n{tok.decode(t, skip_special_tokens=True).strip()}")
    print(f"\nbatch {args.batch}, up to {args.max_new_tokens} new tokens per request")
    if args.no_baseline:
        print(ours.line("mops_kernels 4-bit (Engine)"))
    if not args.no_mops:
        run_mops(model, tok, prompts, batch, args)
    if args.no_baseline:
        return
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    ref_out, base = timed_generate(ref, batch, args.max_new_tokens, tok.pad_token_id, eos)
    T = batch["input_ids"].shape[1]
    ref_toks = [row[:n] for row, n in zip(ref_out[:, T:].tolist(), new_tokens(ref_out, T, eos))]
    print(ours.line("mops_kernels 4-bit (Engine)"))
    print(base.line("transformers fp32 generate()"))
    print(f"speed-up: {ours.generate_tps / base.generate_tps:.2f}x generate, "
          f"{ours.decode_tps / base.decode_tps:.2f}x decode; "
          f"same tokens as transformers: {toks == ref_toks}")


if __name__ == "__main__":
    main()

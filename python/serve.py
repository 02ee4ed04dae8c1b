"""An OpenAI-compatible server: many prompt adapters over one frozen 4-bit model, continuously batched.

    python3 python/serve.py --host 127.0.0.1 --port 8000                      # base + the shipped bank "mops"
    python3 python/serve.py --prompts tasks=saved_mops/ --max-batch 16 --max-len 1024
    python3 python/serve.py --peft qa=adapter_a/ --peft sum=adapter_b/        # PEFT prefix adapters

Models (`model` in a request; GET /v1/models lists them): "base" (no prompts), the MoPs bank (its
gate picks each request's experts, or the body's `expert_index` / `expert_weight`), each PEFT
adapter by its name. Endpoints and semantics: mops_kernels/serving/openai_api.py. Several --prompts
banks and --peft adapters share one continuous batch (mops_kernels.serving.prompt_sets.PromptSets:
each bank keeps its gate, each PEFT request its shifted positions).
The batch command line that this program used to be is python/batch_generate.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def named_dirs(values, flag):
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes NAME=DIR, got {v!r}")
        if name in out or name == "base":
            raise SystemExit(f"{flag}: the name {name!r} is taken")
        out[name] = path
    return out


def build(args):
    """-> (engine, tokenizer, models) from the command line."""
    import mops_kernels
    from mops_kernels.serving import Engine
    from mops_kernels.serving.prompt_sets import PromptSets
    prompts_dirs, peft_dirs = named_dirs(args.prompts, "--prompts"), named_dirs(args.peft, "--peft")
    taken = set(prompts_dirs) & set(peft_dirs)
    if taken:
        raise SystemExit(f"--prompts and --peft both name {sorted(taken)}")
    model, tok = mops_kernels.load_backbone(args.backbone, device=args.device)
    if tok is None:
        raise SystemExit(f"the backbone {args.backbone} has no tokenizer")
    models = {"base": {"kind": "base", "expert_index": None}}
    prompts = None
    if len(prompts_dirs) > 1 or (prompts_dirs and peft_dirs):
        sets = {name: mops_kernels.MixtureOfPrompts.load(path, model=model) for name, path in prompts_dirs.items()}
        for name in prompts_dirs:
            models[name] = {"kind": "mops", "expert_index": None, "prompt_set": name}
        if peft_dirs:
            sets[" peft"] = mops_kernels.from_peft(model, list(peft_dirs.values()))
            for slot, name in enumerate(peft_dirs):
                models[name] = {"kind": "peft", "expert_index": [slot], "prompt_set": " peft"}
        try:
            prompts = PromptSets(sets, num_layers=model.config.num_hidden_layers)
        except ValueError as e:
            raise SystemExit(f"these prompt sets cannot share one server: {e}")
    elif peft_dirs:
        prompts = mops_kernels.from_peft(model, list(peft_dirs.values()))
        for slot, name in enumerate(peft_dirs):
            models[name] = {"kind": "peft", "expert_index": [slot]}
    else:
        if prompts_dirs:
            name, path = next(iter(prompts_dirs.items()))
            prompts = mops_kernels.MixtureOfPrompts.load(path, model=model)
        else:
            name, prompts = "mops", mops_kernels.load_shipped(model)
            if prompts is None:
                print("serve: the shipped bank is absent (mops_kernels/data); serving the base model only",
                      file=sys.stderr)
        if prompts is not None:
            models[name] = {"kind": "mops", "expert_index": None}
    if prompts is not None:
        models["base"]["expert_index"] = [-1]             # no slot: the plain model
    engine = Engine(model, prompts, max_batch=args.max_batch, max_len=args.max_len, tokenizer=tok,
                    max_waiting=args.max_queue)
    return engine, tok, models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backbone", default=None, help="GGUF file or HF directory (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--prompts", action="append", metavar="NAME=DIR", help="a saved MixtureOfPrompts")
    ap.add_argument("--peft", action="append", metavar="NAME=DIR", help="a PEFT prefix-tuning adapter")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-len", type=int, default=1024, help="prompt + new tokens per request")
    ap.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which the answer is 429")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    import uvicorn
    from mops_kernels.serving.openai_api import create_app
    engine, tok, models = build(args)
    print(f"serving {sorted(models)} on http://{args.host}:{args.port} (device {args.device}, max_batch "
          f"{args.max_batch}, max_len {args.max_len})", flush=True)
    uvicorn.run(create_app(engine, tok, models), host=args.host, port=args.port, log_level="warning", ws="none")


if __name__ == "__main__":
    main()

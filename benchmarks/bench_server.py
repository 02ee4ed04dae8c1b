"""The OpenAI-compatible server under N concurrent streaming clients, beside the Engine alone (issue 14).

    python3 benchmarks/bench_server.py                        # N = 1, 8, 32; SmolLM2 Q4_1 + the shipped bank
    python3 benchmarks/bench_server.py --clients 1 8 --requests 3 --max-tokens 24
    python3 benchmarks/bench_server.py --llama-server /path/to/llama-server   # or LLAMA_SERVER=...

For each N: python/serve.py runs as its own process on 127.0.0.1 (max_batch = the largest N), and N
clients in this process each send `--requests` streaming completions one after another (greedy,
`--max-tokens`, prompts and models mixed: "mops" with the gate, "base", "mops" with named experts),
bounded by `--time-limit` seconds per N. Measured: aggregate completion tokens / wall time, time to
first token (request sent -> first text chunk) and inter-token latency (gaps between chunks) p50/p99.
Then, in this process with the server stopped, the Engine alone serves the same requests with the same
N in flight (a closed loop: a request finishing lets the next one in): the same figures from the
Engine's own token times. Last, llama.cpp's llama-server on the same GGUF under the same client load,
only when a build is given (this script never builds it). One JSON row per (provider, N) is appended
to benchmarks/results/server-<device>.jsonl; the ratio server / Engine is printed per N.
"""
import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone

# OpenMP workers that spin while waiting collapse when the cores are shared (the Engine alone measured
# 10x slower than through the server on the loaded 2-core CI machine): both sides, the server process
# inherits it, run with sleeping waiters unless the caller chose otherwise (as tests/conftest.py does)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from harness import RESULTS_DIR, _percentile, device_name, versions  # noqa: E402

TEXTS = ["The capital of France is", "Write a haiku about the sea.", "Two plus two equals",
         "List three prime numbers:", "The word ocentcr is a scrambled version of the English word ",
         "He did his work with diligence. Change tense to FUTURE PERFECT: ", "Translate 'good morning' into Spanish:",
         "I have a stove, a couch and three chairs. How many objects do I have?"]
# the mixed prompt sets: (model, extra body) per request, cycled
MIX = [("mops", {}), ("base", {}), ("mops", {"expert_index": [1, 2], "expert_weight": [0.6, 0.4]})]


def workload(n_clients, per_client):
    """[(client, [(text, model, extra) per request])]."""
    return [[(TEXTS[(c * 3 + i) % len(TEXTS)],) + MIX[(c + i) % len(MIX)] for i in range(per_client)]
            for c in range(n_clients)]


def stats(n, requests, wall, tokens, ttft, gaps):
    ms = lambda xs, q: None if not xs else 1e3 * _percentile(xs, q)  # noqa: E731
    return {"clients": n, "requests": requests, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_ms_p50": ms(ttft, 0.5), "ttft_ms_p99": ms(ttft, 0.99),
            "itl_ms_p50": ms(gaps, 0.5), "itl_ms_p99": ms(gaps, 0.99)}


# ------------------------------------------------------------------------------------- HTTP load
async def http_load(url, jobs, max_tokens, time_limit, model_names=True):
    import httpx
    ttft, gaps, tokens, finished = [], [], [0], [0]
    deadline = time.perf_counter() + time_limit

    async def client(hc, reqs):
        for text, model, extra in reqs:
            if time.perf_counter() > deadline:
                return
            body = {"model": model if model_names else "default", "prompt": text, "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            if model_names:
                body.update(extra)
            t0 = time.perf_counter()
            last = None
            async with hc.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("usage") and not ev.get("choices"):
                        tokens[0] += ev["usage"]["completion_tokens"]
                        continue
                    if ev.get("usage"):                     # llama-server puts usage on the last chunk
                        tokens[0] += ev["usage"]["completion_tokens"]
                    if not ev["choices"] or not ev["choices"][0].get("text"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        gaps.append(now - last)
                    last = now
            finished[0] += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(jobs) + 4)) as hc:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(hc, reqs) for reqs in jobs))
        wall = time.perf_counter() - t0
    return stats(len(jobs), finished[0], wall, tokens[0], ttft, gaps)


# ------------------------------------------------------------------------------------- Engine alone
def engine_load(eng, tok, jobs, max_tokens, time_limit):
    """The same requests with len(jobs) in flight (each client's next request once its last finished)."""
    queues = [list(reqs) for reqs in jobs]
    running, done = {}, []
    deadline = time.perf_counter() + time_limit
    t0 = time.perf_counter()

    def feed(c):
        if queues[c] and time.perf_counter() <= deadline:
            text, model, extra = queues[c].pop(0)
            kw = dict(extra)
            if model == "base":
                kw["expert_index"] = [-1]
            r = eng.submit(tok(text)["input_ids"], max_new_tokens=max_tokens, **kw)
            running[r] = c
    for c in range(len(queues)):
        feed(c)
    while running:
        eng.step()
        for r in [r for r in running if r.done]:
            done.append(r)
            feed(running.pop(r))
    wall = time.perf_counter() - t0
    return stats(len(jobs), len(done), wall, sum(len(r.tokens) for r in done), [r.ttft for r in done if r.ttft is not None],
                 [g for r in done for g in r.token_latencies])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=3, help="requests per client (bounded)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per N before no new request starts")
    ap.add_argument("--backbone", default=None, help="GGUF (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                    help="a llama.cpp llama-server binary (or env LLAMA_SERVER); skipped when absent")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if max(args.clients) > 64 or args.requests > 20:
        raise SystemExit("bounded load: at most 64 clients and 20 requests per client")
    if args.llama_server and not os.path.isfile(args.llama_server):
        raise SystemExit(f"--llama-server / LLAMA_SERVER {args.llama_server}: no such file")

    import mops_kernels
    from mops_kernels.serving import Engine
    from mops_kernels.integrations.backbone import default_gguf_path
    from mops_kernels.serving.openai_api import ServerProcess, free_port

    gguf = args.backbone or default_gguf_path()
    max_batch = max(args.clients)
    dev = device_name(args.device)
    rows = []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None

    def record(provider, st):
        row = {"bench": "server", "provider": provider, **st, "max_tokens": args.max_tokens,
               "max_batch": max_batch, "device": dev, "loadavg_before": load, "versions": versions(),
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "time": stamp}
        rows.append(row)
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(f"{provider:<13} N={st['clients']:<3} {st['requests']:>4} req {st['tokens']:>6} tok "
              f"{f(st['tokens_per_s']):>8} tok/s  TTFT p50 {f(st['ttft_ms_p50'])} p99 {f(st['ttft_ms_p99'])} ms  "
              f"ITL p50 {f(st['itl_ms_p50'])} p99 {f(st['itl_ms_p99'])} ms", flush=True)

    # 1. the server, one process, all N
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, os.path.join(ROOT, "python", "serve.py"), "--port", str(port), "--backbone", gguf,
           "--max-batch", str(max_batch), "--max-len", str(args.max_len), "--device", args.device]
    with ServerProcess(cmd, url, 300, cwd=ROOT):
        asyncio.run(http_load(url, workload(1, 1), args.max_tokens, 60))                  # warm-up
        for n in args.clients:
            record("server", asyncio.run(http_load(url, workload(n, args.requests), args.max_tokens,
                                                   args.time_limit)))

    # 2. the Engine alone, same requests, same N in flight
    model, tok = mops_kernels.load_backbone(gguf, device=args.device)
    eng = Engine(model, mops_kernels.load_shipped(model), max_batch=max_batch, max_len=args.max_len, tokenizer=tok)
    engine_load(eng, tok, workload(1, 1), args.max_tokens, 60)                               # warm-up
    for n in args.clients:
        record("engine-alone", engine_load(eng, tok, workload(n, args.requests), args.max_tokens, args.time_limit))
    del eng, model

    # 3. llama.cpp's llama-server, when a build is given
    if args.llama_server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(max_batch),
               "-c", str(args.max_len * max_batch)]
        with ServerProcess(cmd, url, 120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            asyncio.run(http_load(url, workload(1, 1), args.max_tokens, 60, model_names=False))
            for n in args.clients:
                record("llama-server", asyncio.run(http_load(url, workload(n, args.requests), args.max_tokens,
                                                             args.time_limit, model_names=False)))
    else:
        print("llama-server: no build given (--llama-server or LLAMA_SERVER): skipped")

    print("\nserver / Engine alone, aggregate tokens/s:")
    by = {(r["provider"], r["clients"]): r for r in rows}
    for n in args.clients:
        s, e = by.get(("server", n)), by.get(("engine-alone", n))
        if s and e and s["tokens_per_s"] and e["tokens_per_s"]:
            print(f"  N={n:<3} {s['tokens_per_s']:.1f} / {e['tokens_per_s']:.1f} = {s['tokens_per_s'] / e['tokens_per_s']:.2f}")
    if not args.no_save:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()          # harness.Bench's file naming
        path = os.path.join(RESULTS_DIR, f"server-{slug}.jsonl")
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(path, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()

"""The OpenAI-compatible server (mops_kernels/serving/openai_api.py) through the official `openai` client,
against a server started on 127.0.0.1 (a free port) inside the test and stopped by its fixture.

Oracle: the same Engine configuration answering each request alone (max_batch=1) in this process."""
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from _hf_doubles import tiny_model, tiny_mops
from _serving_doubles import tiny_tokenizer
from mops_kernels.serving import Engine
from mops_kernels.serving.openai_api import BackgroundServer, ServerProcess, create_app, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"base": {"kind": "base", "expert_index": [-1]}, "mops": {"kind": "mops", "expert_index": None},
          "slot3": {"kind": "peft", "expert_index": [3]}}
PROMPTS = ["the sea is", "2 + 2 =", "Once upon a time, ", "abc", "xyz xyz", "Q: why?\nA:", "#1", "hello there"]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(seed=11)
    mops = tiny_mops(model)
    tok = tiny_tokenizer()
    engine = Engine(model, mops, max_batch=4, max_len=96, tokenizer=tok, max_waiting=64)
    with BackgroundServer(create_app(engine, tok, MODELS), timeout=30) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield dict(srv=srv, model=model, mops=mops, tok=tok, engine=engine, client=client)
    assert not srv.thread.is_alive()


def solo(t, prompt, model="mops", max_tokens=8, ids=None, **kw):
    """The Engine's answer to one request alone: (request, text)."""
    eng = Engine(t["model"], t["mops"], max_batch=1, max_len=96, tokenizer=t["tok"])
    if ids is None:
        ids = t["tok"](prompt)["input_ids"]
    if MODELS[model]["expert_index"] is not None and "expert_index" not in kw:
        kw["expert_index"] = MODELS[model]["expert_index"]
    r = eng.submit(ids, max_new_tokens=max_tokens, **kw)
    eng.run_until_done()
    text = t["tok"].decode(r.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if r.finish_reason == "stop":
        text = r.stop.truncate(text)
    return r, text


@pytest.mark.parametrize("model,extra", [("base", {}), ("mops", {}), ("slot3", {}),
                                         ("mops", {"expert_index": [4, 0], "expert_weight": [0.25, 0.75]})])
def test_completions_equal_the_engine(tiny, model, extra):
    c = tiny["client"]
    out = c.completions.create(model=model, prompt=PROMPTS[:3], max_tokens=9, temperature=0, extra_body=extra)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    for p, ch in zip(PROMPTS[:3], out.choices):
        r, text = solo(tiny, p, model, 9, **{k: v for k, v in extra.items()})
        assert ch.text == text and ch.finish_reason == {"eos": "stop", "length": "length"}[r.finish_reason]
        experts = ch.model_extra["experts"]
        if model == "mops":
            assert experts["index"] == r.experts[0] and len(experts["index"]) == 2
        assert experts["index"] == r.experts[0]              # weights: batched vs alone prefill, fp32 rounding
        assert experts["weight"] == pytest.approx(r.experts[1], abs=1e-5)
    assert out.usage.completion_tokens == sum(len(solo(tiny, p, model, 9, **extra)[0].tokens) for p in PROMPTS[:3])
    # sampling with a seed: the Engine's sampled tokens
    out = c.completions.create(model=model, prompt=PROMPTS[3], max_tokens=9, temperature=0.8, top_p=0.9, seed=5,
                               extra_body=extra)
    _, text = solo(tiny, PROMPTS[3], model, 9, do_sample=True, temperature=0.8, top_p=0.9, seed=5, **extra)
    assert out.choices[0].text == text


def test_stream_chunks_concatenate_to_the_text(tiny):
    c = tiny["client"]
    for prompt, stop in ((PROMPTS[2], None), (PROMPTS[5], None)):
        whole = c.completions.create(model="mops", prompt=prompt, max_tokens=30, temperature=0, stop=stop)
        chunks = list(c.completions.create(model="mops", prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                           stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert len(chunks) > 3
        last = list(c.completions.create(model="mops", prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))[-1]
        assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    # a stop string: excluded from the text, streamed or not
    _, text = solo(tiny, PROMPTS[1], "mops", 30)
    stop = text[6:8]
    whole = c.completions.create(model="mops", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop])
    assert whole.choices[0].text == text[:text.index(stop)] and whole.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="mops", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                       stop=[stop], stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    # echo in a stream: the prompt first
    chunks = list(c.completions.create(model="base", prompt="hi", max_tokens=3, temperature=0, echo=True,
                                       stream=True))
    assert chunks[0].choices[0].text == "hi"
    # logprobs in a stream: the chunks' log-probs concatenate to the non-streamed answer's (with a stop
    # string too: the tokens past it are reported, as without stream)
    for stop_ in (None, [stop]):
        whole = c.completions.create(model="mops", prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=2,
                                     stop=stop_).choices[0].logprobs
        chunks = list(c.completions.create(model="mops", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                           logprobs=2, stop=stop_, stream=True))
        got = {k: [x for ch in chunks if ch.choices[0].logprobs for x in getattr(ch.choices[0].logprobs, k)]
               for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert got["tokens"] == whole.tokens and got["text_offset"] == whole.text_offset
        assert got["token_logprobs"] == pytest.approx(whole.token_logprobs, abs=1e-6)
        assert got["top_logprobs"] == whole.top_logprobs


def test_echo_logprobs_equal_a_plain_forward(tiny):
    c = tiny["client"]
    prompt = "The quick brown fox"
    out = c.completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    ch = out.choices[0]
    ids = tiny["tok"](prompt)["input_ids"]
    with torch.no_grad():
        lp = tiny["model"](torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert ch.text == prompt and out.usage.completion_tokens == 0
    assert ch.logprobs.tokens == list(prompt) and ch.logprobs.token_logprobs[0] is None
    for t in range(1, len(ids)):
        assert abs(ch.logprobs.token_logprobs[t] - float(lp[t - 1, ids[t]])) < 1e-4
        assert len(ch.logprobs.top_logprobs[t]) == 3
        assert max(ch.logprobs.top_logprobs[t].values()) == pytest.approx(float(lp[t - 1].max()), abs=1e-4)
    assert ch.logprobs.text_offset == list(range(len(prompt)))
    # generated tokens' log-probs (greedy: the best one)
    out = c.completions.create(model="base", prompt=prompt, max_tokens=2, logprobs=1, temperature=0)
    lps = out.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) <= 2
    assert lps.token_logprobs[0] == pytest.approx(float(lp[-1].max()), abs=1e-4)


def test_chat_completions_use_the_chat_template(tiny):
    c = tiny["client"]
    msgs = [{"role": "user", "content": "hi!"}]
    out = c.chat.completions.create(model="mops", messages=msgs, max_tokens=12, temperature=0)
    ids = tiny["tok"].apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    r, text = solo(tiny, None, "mops", 12, ids=ids)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="mops", messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    # logprobs: the Engine's, one entry per generated token, streamed or not; top_logprobs needs logprobs
    eng = Engine(tiny["model"], tiny["mops"], max_batch=1, max_len=96, tokenizer=tiny["tok"])
    want = eng.submit(ids, max_new_tokens=12, logprobs=3)
    eng.run_until_done()
    out = c.chat.completions.create(model="mops", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                    top_logprobs=3)
    got = out.choices[0].logprobs.content
    assert [e.logprob for e in got] == pytest.approx([lp for lp, _ in want.token_logprobs], abs=1e-6)
    assert all(len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode()) for e in got)
    assert "".join(e.token for e in got) == tiny["tok"].decode(want.tokens, clean_up_tokenization_spaces=False)
    chunks = list(c.chat.completions.create(model="mops", messages=msgs, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in got]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model="mops", messages=msgs, max_tokens=2, top_logprobs=2)


def test_16_concurrent_clients_each_get_their_solo_answer(tiny):
    url = tiny["srv"].url + "/v1"
    jobs = [(PROMPTS[i % len(PROMPTS)], ("base", "mops", "slot3")[i % 3], 4 + i % 7) for i in range(16)]

    async def run():
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as ac:
            async def one(p, m, n, i):
                if i % 2:
                    return (await ac.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)).choices[0].text
                parts = await ac.completions.create(model=m, prompt=p, max_tokens=n, temperature=0, stream=True)
                return "".join([ch.choices[0].text async for ch in parts])
            return await asyncio.gather(*(one(p, m, n, i) for i, (p, m, n) in enumerate(jobs)))
    texts = asyncio.run(run())
    for (p, m, n), text in zip(jobs, texts):
        assert text == solo(tiny, p, m, n)[1], (p, m, n)


def test_one_requests_failure_never_touches_the_others(tiny, monkeypatch):
    """A request whose stop check raises inside the Engine answers 500 (streamed: an error event); the
    requests running beside it get their solo answers."""
    from mops_kernels.serving.sampling import StopStrings
    hit = StopStrings.hit

    def boom(self, tokens):
        if "BOOM" in self.strings and len(tokens) == 3:
            raise RuntimeError("stop check failed")
        return hit(self, tokens)
    monkeypatch.setattr(StopStrings, "hit", boom)
    url = tiny["srv"].url + "/v1"

    async def run():
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as ac:
            async def ok(p):
                return (await ac.completions.create(model="mops", prompt=p, max_tokens=12, temperature=0)).choices[0].text

            async def bad():
                with pytest.raises(openai.InternalServerError, match="stop check failed"):
                    await ac.completions.create(model="mops", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                stop=["BOOM"])

            async def bad_stream():
                parts = await ac.completions.create(model="base", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                                    stop=["BOOM"], stream=True)
                with pytest.raises(openai.APIError, match="stop check failed"):
                    async for _ in parts:
                        pass
            return await asyncio.gather(ok(PROMPTS[2]), bad(), ok(PROMPTS[3]), bad_stream(), ok(PROMPTS[4]))
    texts = asyncio.run(run())
    for p, text in zip((PROMPTS[2], PROMPTS[3], PROMPTS[4]), (texts[0], texts[2], texts[4])):
        assert text == solo(tiny, p, "mops", 12)[1]
    assert all(s is None for s in tiny["engine"].slots)


def _long_prompt(t, n):
    """A prompt whose greedy answer runs n tokens without EOS."""
    for p in PROMPTS + [f"{i}: " for i in range(40)]:
        if solo(t, p, "base", n)[0].finish_reason == "length":
            return p
    pytest.fail("no prompt runs long enough on this tiny model")


def test_disconnect_frees_the_slot(tiny, monkeypatch):
    eng, srv = tiny["engine"], tiny["srv"]
    prompt = _long_prompt(tiny, 80)
    step = eng.step
    monkeypatch.setattr(eng, "step", lambda: time.sleep(0.05) or step())     # 80 tokens take >= 4 s

    def running():
        return httpx.get(srv.url + "/health", timeout=10).json()["running"]
    body = {"model": "base", "prompt": prompt, "max_tokens": 80, "temperature": 0}
    for stream in (True, False):
        t0 = time.monotonic()
        with httpx.Client(timeout=10) as hc:
            if stream:
                with hc.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as resp:
                    assert resp.status_code == 200
                    next(resp.iter_lines())                   # the first token arrived: it runs
            else:
                with pytest.raises(httpx.ReadTimeout):
                    hc.post(srv.url + "/v1/completions", json=body, timeout=0.6)
        while running() and time.monotonic() - t0 < 3.0:
            time.sleep(0.05)
        assert running() == 0 and time.monotonic() - t0 < 3.0, stream
    assert all(s is None for s in eng.slots)


def _error(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


def test_errors_answer_openai_bodies_naming_the_field(tiny):
    c, srv = tiny["client"], tiny["srv"]
    cases = [
        (dict(model="nope"), "model"),
        (dict(model="mops", extra_body={"expert_index": [0, 9]}), "expert_index"),
        (dict(model="mops", extra_body={"expert_index": [0], "expert_weight": [-1]}), "expert_weight"),
        (dict(model="base", extra_body={"expert_index": [0]}), "expert_index"),
        (dict(model="mops", max_tokens=95), "max_tokens"),
        (dict(model="mops", temperature=-1), "temperature"),
        (dict(model="mops", top_p=1.5), "top_p"),
        (dict(model="mops", n=2), "n"),
        (dict(model="mops", stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(model="mops", logprobs=2, stream=True, echo=True), "logprobs"),
    ]
    for kw, field in cases:
        kw.setdefault("prompt", "hello")
        kw.setdefault("max_tokens", 4)
        e = _error(lambda: c.completions.create(**kw))
        assert e.status_code == 400 and e.body["param"] == field and field in e.body["message"], (kw, e.body)
    e = _error(lambda: c.chat.completions.create(model="mops", messages=[{"role": "user"}]))
    assert e.status_code == 400 and e.body["param"] == "messages"
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    eng = tiny["engine"]
    eng.sched.max_waiting, saved = 0, eng.sched.max_waiting        # the queue is full
    try:
        e = _error(lambda: c.completions.create(model="mops", prompt="hello", max_tokens=4))
    finally:
        eng.sched.max_waiting = saved
    assert isinstance(e, openai.RateLimitError) and e.body["type"] == "rate_limit_exceeded"
    models = {m.id for m in c.models.list().data}
    assert models == set(MODELS)
    assert httpx.get(srv.url + "/health", timeout=10).json()["status"] == "ok"
    assert c.completions.create(model="mops", prompt="hello", max_tokens=2, temperature=0).choices[0].text \
        == solo(tiny, "hello", "mops", 2)[1]                    # the server still answers


@pytest.mark.slow
def test_serve_py_smollm2_completions_equal_the_engine():
    """python/serve.py as a process (SmolLM2 Q4_1 + the shipped bank as "mops"), stopped by the test."""
    import mops_kernels
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, os.path.join(ROOT, "python", "serve.py"), "--port", str(port), "--max-batch", "2",
           "--max-len", "96", "--device", "cpu"]
    with ServerProcess(cmd, url, start_timeout=180, cwd=ROOT):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        model, tok = mops_kernels.load_backbone()
        mops = mops_kernels.load_shipped(model)
        prompt = "The capital of France is"
        for name, kw in (("mops", {}), ("base", {"expert_index": [-1]})):
            out = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            eng = Engine(model, mops, max_batch=1, max_len=96, tokenizer=tok)
            r = eng.submit(tok(prompt)["input_ids"], max_new_tokens=6, **kw)
            eng.run_until_done()
            assert out.choices[0].text == tok.decode(r.tokens, skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False)
            if name == "mops":
                assert out.choices[0].model_extra["experts"]["index"] == r.experts[0]
        out = client.completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        got = out.choices[0].logprobs.token_logprobs
        assert max(abs(got[t] - float(lp[t - 1, ids[t]])) for t in range(1, len(ids))) < 1e-4
        _readme_examples_run(port)


def _readme_examples_run(port):
    """The README's curl and openai examples, pointed at this server's port, run and answer."""
    import re
    import shutil
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### The OpenAI-compatible server"):]
    curl = re.search(r"```bash\n(curl .*?)```", section, re.S).group(1).replace("8000", str(port))
    py = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("8000", str(port))
    if shutil.which("curl"):
        out = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120).stdout)
        assert out["choices"][0]["finish_reason"] in ("stop", "length") and out["choices"][0]["experts"]
    exec(compile(py, "README.md", "exec"), {})


def test_two_prompt_sets_in_one_server():
    """Two MoPs banks behind one server and one continuous batch: each model answers as its bank's own
    Engine alone, named slots are numbered within the bank, and an out-of-range one is a 400."""
    from test_serving import _two_sets
    from mops_kernels.serving.prompt_sets import PromptSets
    model = tiny_model(seed=5)
    a, b = _two_sets(model)
    tok = tiny_tokenizer()
    models = {"base": {"kind": "base", "expert_index": [-1]},
              "a": {"kind": "mops", "expert_index": None, "prompt_set": "a"},
              "b": {"kind": "mops", "expert_index": None, "prompt_set": "b"}}
    engine = Engine(model, PromptSets({"a": a, "b": b}, num_layers=4), max_batch=4, max_len=96, tokenizer=tok)
    with BackgroundServer(create_app(engine, tok, models), timeout=30) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert {m.id for m in c.models.list().data} == {"base", "a", "b"}
        for name, extra in (("a", {}), ("b", {}), ("b", {"expert_index": [2, 1], "expert_weight": [0.5, 0.5]})):
            out = c.completions.create(model=name, prompt=PROMPTS[:3], max_tokens=7, temperature=0, extra_body=extra)
            for p, ch in zip(PROMPTS[:3], out.choices):
                alone = Engine(model, {"a": a, "b": b}[name], max_batch=1, max_len=96, tokenizer=tok,
                               experts_per_request=2)
                r = alone.submit(tok(p)["input_ids"], max_new_tokens=7, **extra)
                alone.run_until_done()
                assert ch.text == tok.decode(r.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                assert ch.model_extra["experts"]["index"] == r.experts[0]
        err = _error(lambda: c.completions.create(model="b", prompt="x", max_tokens=2,
                                                  extra_body={"expert_index": [3]}))
        assert err.status_code == 400 and err.body["param"] == "expert_index" and "[0, 3)" in err.body["message"]


def test_serve_py_builds_several_banks(tmp_path):
    """python/serve.py's build(): two --prompts banks become one PromptSets Engine (SmolLM2, the embedded
    default backbone). PEFT adapters beside MoPs banks in one Engine: test_peft_import.py."""
    import argparse
    import importlib.util
    import mops_kernels
    from mops_kernels.modules.prompts import MixtureOfPrompts
    spec = importlib.util.spec_from_file_location("serve_cli", os.path.join(ROOT, "python", "serve.py"))
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    model, _ = mops_kernels.load_backbone()
    for i, name in enumerate(("x", "y")):
        torch.manual_seed(i)
        MixtureOfPrompts.for_model(model, num_experts=3 + i, prompt_len=4, top_k=2, gate_hidden=16).save(
            str(tmp_path / name))
    args = argparse.Namespace(backbone=None, device="cpu", max_batch=2, max_len=64, max_queue=8,
                              prompts=[f"x={tmp_path / 'x'}", f"y={tmp_path / 'y'}"], peft=None)
    engine, tok, models = serve.build(args)
    assert engine.sets.sizes == {"x": 3, "y": 4} and models["y"]["prompt_set"] == "y"
    r = engine.submit(tok("The sea is")["input_ids"], prompt_set="y", max_new_tokens=3)
    engine.run_until_done()
    assert len(r.tokens) == 3 and all(0 <= j < 4 for j in r.experts[0])

"""An OpenAI-compatible HTTP server over one Engine: continuous batching across connections (issue 14).

    app = create_app(engine, tokenizer, models)          # FastAPI app
    with BackgroundServer(app) as srv: ...               # uvicorn on 127.0.0.1, a free port (tests, bench)
    python3 python/serve.py --port 8000                  # the command line

Endpoints (OpenAI semantics): GET /v1/models; POST /v1/completions (prompt: a string, a list of
strings, token ids or lists of them, one choice each; max_tokens, temperature (0: greedy), top_p,
top_k, seed, stop, n=1, stream, stream_options.include_usage, logprobs, echo); POST /v1/chat/completions (the tokenizer's chat
template; stream; logprobs / top_logprobs); GET /health (status and the Engine's running / waiting counts).
`model` selects the prompt set: `models[name]` is {"kind": "base" | "mops" | "peft", "expert_index":
slots or None, "prompt_set": its name in the Engine's PromptSets, when it serves several}. A MoPs
bank's gate picks per request unless the extra body fields `expert_index` / `expert_weight` name the
slots (numbered within the bank); every choice carries `experts` ({"index", "weight"}: what served it).
`echo=true, max_tokens=0, logprobs=k` returns the prompt's token log-probabilities (the scoring call of
lm-eval-harness's local-completions and DLN's OpenAI backend).

Threads: the Engine runs on ONE loop thread (`EngineLoop`); HTTP handlers are async and talk to it
through a command queue (submit, cancel) and one asyncio queue per HTTP call, fed with each request's
new tokens after every Engine step. A client that disconnects has its requests cancelled at once (their
slots freed). A full Engine queue answers 429, bad input 400 naming the field (OpenAI's error body);
an Engine failure of one request answers 500 for that request only.
Not supported (400 naming the field): n > 1, best_of, logprobs with both stream and echo.
"""

import asyncio
import json
import queue
import socket
import threading
import time
import traceback
import uuid
from typing import Optional

from .scheduler import QueueFull


class APIError(Exception):
    def __init__(self, status, message, param=None, type_="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The HTTP client disconnected while its requests ran (they are cancelled)."""


def _bad(param, message):
    return APIError(400, f"{param}: {message}", param)


# ------------------------------------------------------------------------------------ the loop thread
class EngineLoop:
    """Owns the Engine: every call into it happens on this thread."""

    def __init__(self, engine):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.live = {}                      # request -> [asyncio loop, asyncio queue, choice index, sent]
        self.running = self.waiting = 0
        self.steps = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mops-engine-loop", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, timeout=10.0):
        self._stop.set()
        self.commands.put(None)
        self.thread.join(timeout)

    # called from the event loop ----------------------------------------------------------
    async def submit(self, items):
        """Submit the engine kwargs of each choice; -> (requests, asyncio queue of their events)."""
        loop = asyncio.get_running_loop()
        fut, events = loop.create_future(), asyncio.Queue()
        self.commands.put(("submit", items, loop, events, fut))
        return await fut, events

    def cancel(self, reqs):
        self.commands.put(("cancel", reqs))

    # on the loop thread --------------------------------------------------------------------
    def _run(self):
        eng = self.engine
        while not self._stop.is_set():
            block = eng.idle()
            while True:
                try:
                    cmd = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
                except queue.Empty:
                    break
                block = False
                if cmd is None:
                    return
                self._do(cmd)
            if not eng.idle():
                try:
                    eng.step()
                except Exception:                 # the Engine ended the running requests with the error
                    traceback.print_exc()
                self.steps += 1
            self._publish()

    def _do(self, cmd):
        eng = self.engine
        if cmd[0] == "cancel":
            for r in cmd[1]:
                eng.cancel(r)
            return
        _, items, loop, events, fut = cmd
        reqs = []
        try:
            for i, kw in enumerate(items):
                reqs.append(eng.submit(**kw))
                self.live[reqs[-1]] = [loop, events, i, 0]
        except Exception as e:
            for r in reqs:
                eng.cancel(r)
                self.live.pop(r, None)
            loop.call_soon_threadsafe(_settle, fut, None, e)
            return
        loop.call_soon_threadsafe(_settle, fut, reqs, None)

    def _publish(self):
        self.running = sum(s is not None for s in self.engine.slots)
        self.waiting = len(self.engine.waiting)
        for r, st in list(self.live.items()):
            loop, events, i, sent = st
            n = len(r.tokens)
            if n > sent:
                loop.call_soon_threadsafe(events.put_nowait, ("tokens", i, r.tokens[sent:n]))
                st[3] = n
            if r.done:
                loop.call_soon_threadsafe(events.put_nowait, ("done", i, r))
                del self.live[r]


def _settle(fut, result, error):
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


# ------------------------------------------------------------------------------- request parsing
def _num(body, name, default, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"<= {hi}"
        raise _bad(name, f"must be {' and '.join(x for x in (lo_s, hi_s) if x)}, got {v!r}")
    return v


def _flag(body, name):
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {v!r}")
    return v


def _token_list(x):
    return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class Server:
    """The endpoints' logic over an EngineLoop (create_app wires it into FastAPI)."""

    def __init__(self, engine, tokenizer, models: dict, default_model: Optional[str] = None):
        if tokenizer is None:
            raise ValueError("the server needs the backbone's tokenizer")
        self.engine, self.tok, self.models = engine, tokenizer, dict(models)
        self.loop = EngineLoop(engine)
        self.created = int(time.time())

    # ---------------------------------------------------------------------------- parsing
    def _model(self, body):
        name = body.get("model")
        if not isinstance(name, str) or name not in self.models:
            raise _bad("model", f"unknown model {name!r}; this server serves {sorted(self.models)}")
        return name, self.models[name]

    def _sampling(self, body):
        temperature = _num(body, "temperature", 1.0, lo=0, hi=100)
        top_p = _num(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
        top_k = _num(body, "top_k", None, lo=-1, integer=True)
        seed = _num(body, "seed", None, integer=True)
        n = _num(body, "n", 1, integer=True)
        if n != 1:
            raise _bad("n", f"only n=1 is supported, got {n}")
        if body.get("best_of") not in (None, 1):
            raise _bad("best_of", "is not supported")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise _bad("stop", f"must be a non-empty string or a list of at most 4, got {stop!r}")
        kw = dict(stop=stop or None)
        if temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), seed=seed,
                      top_k=None if top_k in (None, -1) else top_k)
        return kw

    def _experts(self, body, entry):
        ei, ew = body.get("expert_index"), body.get("expert_weight")
        pset = entry.get("prompt_set")            # one of several sets in the Engine (PromptSets)
        if ei is None:
            if ew is not None:
                raise _bad("expert_weight", "given without expert_index")
            return dict(expert_index=entry.get("expert_index"), prompt_set=pset)
        if entry["kind"] != "mops":
            raise _bad("expert_index", f"only a MoPs bank's slots can be named; model "
                                       f"{body.get('model')!r} is a {entry['kind']} model")
        if not _token_list(ei):
            raise _bad("expert_index", f"must be a non-empty list of integers, got {ei!r}")
        E = self.engine.plan.num_experts if pset is None else self.engine.sets.sizes[pset]
        if any(not 0 <= j < E for j in ei):
            raise _bad("expert_index", f"slots must be in [0, {E}), got {ei}")
        if ew is not None:
            if not isinstance(ew, list) or len(ew) != len(ei) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf") for w in ew):
                raise _bad("expert_weight", f"must be {len(ei)} finite numbers >= 0, got {ew!r}")
        return dict(expert_index=ei, expert_weight=ew, prompt_set=pset)

    def _fit(self, ids, max_tokens):
        if not ids:
            raise _bad("prompt", "is empty")
        if len(ids) + max_tokens > self.engine.max_len:
            raise _bad("max_tokens", f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the "
                                     f"server's max_len={self.engine.max_len}")
        V = self.engine.vocab_size
        if any(not 0 <= t < V for t in ids):
            raise _bad("prompt", f"token ids must be in [0, {V})")

    def _prompts(self, prompt):
        """[(ids, text)] of the prompt field."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif _token_list(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of them")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((list(self.tok(p)["input_ids"]), p))
            elif _token_list(p):
                out.append((list(p), None))
            else:
                raise _bad("prompt", f"must be a string, a list of strings, a list of token ids or a list "
                                     f"of them, got an element {p!r}")
        return out

    # ---------------------------------------------------------------------------- output
    def _decode(self, tokens):
        return self.tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _text(self, req):
        text = self._decode(req.tokens)
        return req.stop.truncate(text) if req.stop is not None and req.finish_reason == "stop" else text

    def _safe_text(self, req, tokens, done):
        """The text of `tokens` that may be sent: all of it when done (cut at the stop string), else
        without an unfinished UTF-8 character or a tail that could begin a stop string."""
        if done:
            return self._text(req)
        text = self._decode(tokens).rstrip("\ufffd")
        if req.stop is not None:        # (a stop string split by a special token is in the text only)
            text = req.stop.truncate(text)
            text = text[:max(0, len(text) - (max(len(s) for s in req.stop.strings) - 1))]
        return text

    def _logprobs(self, entries, tokens):
        toks, lps, tops, offs, pos = [], [], [], [], 0
        for t, e in zip(tokens, entries):
            s = self.tok.decode([t], clean_up_tokenization_spaces=False)
            toks.append(s)
            offs.append(pos)
            pos += len(s)
            lps.append(None if e is None else e[0])
            tops.append(None if e is None else {self.tok.decode([i], clean_up_tokenization_spaces=False): v
                                                for i, v in e[1].items()})
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    @staticmethod
    def _finish(req):
        return {"eos": "stop", "stop": "stop", "length": "length"}.get(req.finish_reason, req.finish_reason)

    @staticmethod
    def _experts_out(req):
        return None if req.experts is None else {"index": req.experts[0], "weight": req.experts[1]}

    async def _wait(self, events, request, reqs, seen):
        """The next event; every 0.1 s (`seen[0]`: the last check) asks whether the client is still
        there, and if not cancels `reqs` (freeing their slots) and raises ClientGone."""
        while True:
            now = time.monotonic()
            if request is not None and now - seen[0] > 0.1:
                seen[0] = now
                if await request.is_disconnected():
                    self.loop.cancel(reqs)
                    raise ClientGone()
            try:
                return await asyncio.wait_for(events.get(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def _submit(self, items):
        try:
            return await self.loop.submit(items)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_exceeded")
        except ValueError as e:
            msg = str(e)
            param = next((p for key, p in (("max_new_tokens", "max_tokens"), ("ids", "prompt"),
                                           ("expert_weight", "expert_weight"), ("expert_index", "expert_index"),
                                           ("temperature", "temperature"), ("top_p", "top_p"),
                                           ("top_k", "top_k"), ("stop", "stop")) if key in msg), None)
            raise APIError(400, msg, param)

    @staticmethod
    def _failed(req):
        return APIError(500, f"request failed in the engine: {req.error!r}", None, "server_error")

    # ---------------------------------------------------------------------------- endpoints
    def list_models(self):
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "mops_kernels",
             "kind": e["kind"]} for name, e in self.models.items()]}

    def health(self):
        return {"status": "ok" if self.loop.thread.is_alive() else "engine loop stopped",
                "running": self.loop.running, "waiting": self.loop.waiting}

    def _completion_items(self, body):
        name, entry = self._model(body)
        max_tokens = _num(body, "max_tokens", 16, lo=0, integer=True)
        logprobs = _num(body, "logprobs", None, lo=0, hi=20, integer=True)
        echo, stream = _flag(body, "echo"), _flag(body, "stream")
        if stream and logprobs is not None and echo:
            raise _bad("logprobs", "is not supported together with stream and echo")
        kw = self._sampling(body)
        kw.update(self._experts(body, entry))
        if max_tokens == 0 and not echo:
            raise _bad("max_tokens", "0 is only meaningful with echo=true (scoring the prompt)")
        prompts = self._prompts(body.get("prompt"))
        items = []
        for ids, _ in prompts:
            self._fit(ids, max_tokens)
            items.append(dict(ids=ids, max_new_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=logprobs if echo and logprobs is not None else None, **kw))
        return name, prompts, items, echo, stream, logprobs

    async def completions(self, body, request=None):
        name, prompts, items, echo, stream, logprobs = self._completion_items(body)
        reqs, events = await self._submit(items)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            usage = self._usage_chunk(body, cid, "text_completion", created, name, sum(len(p[0]) for p in prompts))
            return self._stream(reqs, events, request, prompts if echo else None, usage,
                                lambda i, text, fin, req, lp=None: {
                                    "id": cid, "object": "text_completion", "created": created, "model": name,
                                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": fin,
                                                 **({"experts": self._experts_out(req)} if fin else {})}]},
                                logprobs=self._completion_logprobs if logprobs is not None else None)
        done = await self._collect(reqs, events, request)
        choices, usage = [], [0, 0]
        for i, req in enumerate(done):
            ids, text = prompts[i]
            out = self._text(req)
            lp = None
            if echo:
                out = (text if text is not None else self._decode(ids)) + out
            if logprobs is not None:
                entries = (req.prompt_token_logprobs if echo else []) + req.token_logprobs[:len(req.tokens)]
                lp = self._logprobs(entries, (list(ids) if echo else []) + req.tokens)
            choices.append({"index": i, "text": out, "logprobs": lp, "finish_reason": self._finish(req),
                            "experts": self._experts_out(req)})
            usage[0] += len(ids)
            usage[1] += len(req.tokens)
        return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}

    async def chat(self, body, request=None):
        name, entry = self._model(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise _bad("messages", "must be a non-empty list of {role, content} objects with string content")
        want_lp = _flag(body, "logprobs")
        top = _num(body, "top_logprobs", None, lo=0, hi=20, integer=True)
        if top is not None and not want_lp:
            raise _bad("top_logprobs", "needs logprobs=true")
        if getattr(self.tok, "chat_template", None) is None:
            raise _bad("messages", "the backbone's tokenizer has no chat template")
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _num({"max_tokens": mt}, "max_tokens", 16, lo=1, integer=True)
        stream = _flag(body, "stream")
        kw = self._sampling(body)
        kw.update(self._experts(body, entry))
        ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        self._fit(ids, max_tokens)
        reqs, events = await self._submit([dict(ids=ids, max_new_tokens=max_tokens,
                                                logprobs=(top or 0) if want_lp else None, **kw)])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            def chunk(i, text, fin, req, lp=None):
                delta = {} if fin else {"content": text}
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin,
                                     **({"experts": self._experts_out(req)} if fin else {})}]}
            usage = self._usage_chunk(body, cid, "chat.completion.chunk", created, name, len(ids))
            return self._stream(reqs, events, request, None, usage, chunk, first={
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}, logprobs=self._chat_logprobs if want_lp else None)
        req = (await self._collect(reqs, events, request))[0]
        lp = self._chat_logprobs(req.token_logprobs[:len(req.tokens)], req.tokens)[0] if want_lp else None
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self._text(req)},
                             "logprobs": lp, "finish_reason": self._finish(req),
                             "experts": self._experts_out(req)}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens),
                          "total_tokens": len(ids) + len(req.tokens)}}

    async def _collect(self, reqs, events, request):
        left, seen = set(range(len(reqs))), [time.monotonic()]
        try:
            while left:
                kind, i, _ = await self._wait(events, request, reqs, seen)
                if kind == "done":
                    left.discard(i)
        finally:
            if left:
                self.loop.cancel(reqs)
        for r in reqs:
            if r.finish_reason == "error":
                raise self._failed(r)
        return reqs

    @staticmethod
    def _usage_chunk(body, cid, obj, created, name, prompt_tokens):
        """stream_options.include_usage: a last chunk with no choices and the usage (None: not asked)."""
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options", f"must be an object, got {opts!r}")
        if not (opts or {}).get("include_usage"):
            return None
        return {"id": cid, "object": obj, "created": created, "model": name, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens}}

    def _completion_logprobs(self, entries, tokens, offset=0):
        """(completions' logprobs object, characters its tokens span), text_offset starting at offset."""
        lp = self._logprobs(entries, tokens)
        lp["text_offset"] = [o + offset for o in lp["text_offset"]]
        return lp, sum(len(t) for t in lp["tokens"])

    def _chat_logprobs(self, entries, tokens, offset=0):
        """(chat's logprobs object {"content": [{token, logprob, bytes, top_logprobs}]}, characters)."""
        def item(s, v):
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
        content, n = [], 0
        for t, e in zip(tokens, entries):
            s = self.tok.decode([t], clean_up_tokenization_spaces=False)
            n += len(s)
            tops = [item(self.tok.decode([j], clean_up_tokenization_spaces=False), v) for j, v in e[1].items()]
            content.append({**item(s, e[0]), "top_logprobs": tops})
        return {"content": content}, n

    def _stream(self, reqs, events, request, echo_prompts, usage, chunk, first=None, logprobs=None):
        """SSE chunks of `reqs`. logprobs (a formatter: _completion_logprobs or _chat_logprobs): each chunk
        carries the log-probs of the tokens that arrived since the previous chunk, the last chunk the
        rest, so the chunks' log-probs concatenate to the non-streamed answer's."""
        lp_sent, lp_off = [0] * len(reqs), [0] * len(reqs)

        def lp_since(i, req, n):
            if logprobs is None:
                return {}
            lp, chars = logprobs(req.token_logprobs[lp_sent[i]:n], req.tokens[lp_sent[i]:n], lp_off[i])
            lp_off[i] += chars
            lp_sent[i] = n
            return {"lp": lp}

        async def gen():
            tokens = [[] for _ in reqs]
            sent = [""] * len(reqs)
            left, seen = set(range(len(reqs))), [time.monotonic()]
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                if echo_prompts is not None:
                    for i, (ids, text) in enumerate(echo_prompts):
                        yield f"data: {json.dumps(chunk(i, text if text is not None else self._decode(ids), None, None))}\n\n"
                while left:
                    kind, i, payload = await self._wait(events, request, reqs, seen)
                    req = reqs[i]
                    if kind == "tokens":
                        tokens[i] += payload
                    if kind == "done" and req.finish_reason == "error":
                        left.discard(i)
                        yield f"data: {json.dumps(self._failed(req).body())}\n\n"
                        continue
                    text = self._safe_text(req, tokens[i], kind == "done")
                    if len(text) > len(sent[i]) and text.startswith(sent[i]):
                        yield f"data: {json.dumps(chunk(i, text[len(sent[i]):], None, req, **lp_since(i, req, len(tokens[i]))))}\n\n"
                        sent[i] = text
                    if kind == "done":
                        left.discard(i)
                        yield f"data: {json.dumps(chunk(i, '', self._finish(req), req, **lp_since(i, req, len(req.tokens))))}\n\n"
                if usage is not None:
                    n = sum(len(r.tokens) for r in reqs)
                    usage["usage"].update(completion_tokens=n, total_tokens=usage["usage"]["prompt_tokens"] + n)
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
            except ClientGone:
                pass
            finally:
                if left:                                   # the client went away (or the server stops)
                    self.loop.cancel(reqs)
        return gen()


# ------------------------------------------------------------------------------------ FastAPI wiring
def create_app(engine, tokenizer, models: dict):
    """The FastAPI app serving `engine` (its loop thread starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    srv = Server(engine, tokenizer, models)

    @asynccontextmanager
    async def lifespan(app):
        srv.loop.start()
        try:
            yield
        finally:
            srv.loop.stop()

    app = FastAPI(title="mops_kernels", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(ClientGone)
    async def client_gone(request, e):
        return Response(status_code=499)            # nobody reads it: the connection is closed

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def body_of(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", "body")
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", "body")
        return body

    def respond(out):
        if isinstance(out, dict):
            return out
        return StreamingResponse(out, media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return srv.health()

    @app.get("/v1/models")
    async def list_models():
        return srv.list_models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return respond(await srv.completions(await body_of(request), request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return respond(await srv.chat(await body_of(request), request))

    return app


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving `app` on a thread of this process, on 127.0.0.1 and a free port, until exit
    (both bounded in time): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app, host="127.0.0.1", port=None, timeout=30.0):
        import uvicorn
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.timeout = timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", ws="none",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.timeout:
                self.server.should_exit = True
                raise RuntimeError(f"the server did not start on {self.url} within {self.timeout} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(self.timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        return False


class ServerProcess:
    """A server command (python/serve.py, llama-server) as a child process: started, waited for until
    GET {url}/health answers 200 (bounded), terminated (then killed) on exit. `with ServerProcess(cmd,
    url) as p: ...`; p.proc is the Popen."""

    def __init__(self, cmd, url, start_timeout=180.0, **popen_kw):
        self.cmd, self.url, self.start_timeout, self.popen_kw = list(cmd), url, start_timeout, popen_kw
        self.proc = None

    def __enter__(self):
        import subprocess

        import httpx
        self.proc = subprocess.Popen(self.cmd, **self.popen_kw)
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.cmd[:2]} exited with {self.proc.returncode} before serving")
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > self.start_timeout:
                    raise RuntimeError(f"no healthy server at {self.url} within {self.start_timeout} s")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        import subprocess
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return False

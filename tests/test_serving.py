"""The serving engine (static KV cache, continuous batching) against HF generate() greedy, per request."""
import copy

import pytest
import torch

from _hf_doubles import Generator, tiny_model, tiny_mops
from mops_kernels.serving import Engine, summarize
from mops_kernels.integrations.hf import attach


def _prompts(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (int(t),), generator=g) for t in torch.randint(3, 19, (n,), generator=g)]


def _hf_alone(model, ids, new, **kw):
    out = model.generate(input_ids=ids.view(1, -1), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                         max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    return out[0, ids.numel():].tolist()


@pytest.mark.parametrize("kind", ["explicit", "gate"])
def test_engine_matches_generate_with_joins(kind):
    model = tiny_model()
    mops = tiny_mops(model, with_gate=(kind == "gate"))
    eng = Engine(model, mops, max_batch=3, max_len=48, eos_token_id=[])
    prompts = _prompts(5)
    news = [6, 9, 4, 7, 5]
    experts = [[0, 3], [2], [4, 1], None, [1, 2]]
    weights = [[0.3, 0.7], None, [0.5, 0.5], None, [1.0, 0.0]]
    streamed = {}
    cb = lambda r, t: streamed.setdefault(r.id, []).append(t)
    reqs = []

    def submit(i):
        kw = {} if kind == "gate" or experts[i] is None else dict(expert_index=experts[i], expert_weight=weights[i])
        if kind == "explicit" and experts[i] is None:
            kw = dict(expert_index=[3])
            experts[i], weights[i] = [3], None
        reqs.append(eng.submit(prompts[i], max_new_tokens=news[i], on_token=cb, **kw))
    for i in range(2):
        submit(i)
    eng.step(), eng.step()                        # two requests decoding ...
    for i in range(2, 5):                         # ... then three more join (one waits for a slot)
        submit(i)
        eng.step()
    eng.run_until_done()

    ref = copy.deepcopy(model)
    attach(ref, mops)
    for i, r in enumerate(reqs):
        kw = {}
        if kind == "explicit":
            kw["expert_index"] = torch.tensor([experts[i]])
            if weights[i] is not None:
                kw["expert_weight"] = torch.tensor([weights[i]])
        assert r.done and r.tokens == _hf_alone(ref, prompts[i], news[i], **kw), f"request {i}"
        assert streamed[r.id] == r.tokens
        assert r.ttft > 0 and len(r.token_latencies) == news[i] - 1
    s = summarize(reqs)
    assert s["tokens"] == sum(news) and s["token_ms_p50"] > 0


def test_engine_iapt_and_stream():
    model = tiny_model()
    gen = Generator(model.config.hidden_size, [2, 3])
    eng = Engine(model, gen, max_batch=2, max_len=40, eos_token_id=[])
    prompts = _prompts(3, seed=9)
    reqs = [eng.submit(p, max_new_tokens=5) for p in prompts]
    events = list(eng.stream())
    assert len(events) == 15
    ref = copy.deepcopy(model)
    attach(ref, gen)
    for p, r in zip(prompts, reqs):
        assert r.tokens == _hf_alone(ref, p, 5)
    plain = tiny_model()
    assert any(r.tokens != _hf_alone(plain, p, 5) for p, r in zip(prompts, reqs))


def test_engine_errors():
    model = tiny_model()
    eng = Engine(model, tiny_mops(model, with_gate=False), max_batch=2, max_len=20)
    with pytest.raises(ValueError, match="name the experts"):
        eng.submit([1, 2, 3], max_new_tokens=5)
    with pytest.raises(ValueError, match="out of range"):
        eng.submit([1, 2, 3], expert_index=[7], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_len"):
        eng.submit(list(range(1, 19)), expert_index=[1], max_new_tokens=5)


@pytest.mark.slow
def test_engine_smollm_matches_generate():
    import mops_kernels
    from mops_kernels.integrations.hf import detach
    model, tok = mops_kernels.load_backbone()
    torch.manual_seed(0)
    mops = mops_kernels.MixtureOfPrompts.for_model(model, num_experts=4, prompt_len=5, top_k=2,
                                                   gate_layer=10, inject_from=11)
    with torch.no_grad():
        mops.bank.keys.normal_(0, 1.0), mops.bank.values.normal_(0, 1.0)
    texts = ["The sea is", "Two plus two equals four because"]
    ids = [tok(t, return_tensors="pt")["input_ids"][0] for t in texts]
    eng = Engine(model, mops, max_batch=2, max_len=32, eos_token_id=[])
    reqs = [eng.submit(ids[0], expert_index=[1, 3], expert_weight=[0.6, 0.4], max_new_tokens=4),
            eng.submit(ids[1], max_new_tokens=4)]           # the gate picks
    eng.run_until_done()
    attach(model, mops)
    try:
        assert reqs[0].tokens == _hf_alone(model, ids[0], 4, expert_index=torch.tensor([[1, 3]]),
                                           expert_weight=torch.tensor([[0.6, 0.4]]))
        assert reqs[1].tokens == _hf_alone(model, ids[1], 4)
    finally:
        detach(model)


# ------------------------------------------------------------------------------ the lean decode path
def _int4_tiny(seed=0, family="llama"):
    from mops_kernels.modules.int4_linear import replace_linears
    model = tiny_model(family, seed=seed)
    replace_linears(model.model)            # q/k/v/o, gate/up/down as Q4_1, group 32 (K = 96, 160)
    return model


@pytest.mark.parametrize("M", [1, 3, 8])
def test_fused_projection_equals_separate_layers(M):
    """q/k/v (and gate/up) concatenated along N give, bit for bit, the three layers' outputs."""
    from mops_kernels.serving.decode import FusedProj as _Proj
    model = _int4_tiny()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    x = torch.randn(M, 96)
    fused = _Proj([attn.q_proj, attn.k_proj, attn.v_proj], x.device)
    assert fused.fn is not None                           # it did fuse
    with torch.no_grad():
        ref_qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        assert torch.equal(fused(x), ref_qkv)
        assert torch.equal(_Proj([mlp.gate_proj, mlp.up_proj], x.device)(x),
                           torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1))
        plain = tiny_model().model.layers[0].self_attn   # nn.Linear: not fused, run one by one
        p = _Proj([plain.q_proj, plain.k_proj], x.device)
        assert p.fn is None and torch.equal(p(x), torch.cat([plain.q_proj(x), plain.k_proj(x)], -1))


def test_rope_table_and_rmsnorm_equal_the_modules():
    model = tiny_model()
    eng = Engine(model, None, max_batch=2, max_len=40)
    pos = torch.tensor([[0, 5, 17, 39]])
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, 1, 1), pos)
    h = 8
    assert torch.equal(eng._cos[pos[0]], cos[0])
    assert torch.equal(eng._sin_s[pos[0]], torch.cat([-sin[0, :, :h], sin[0, :, h:]], -1))
    x = torch.randn(5, 96) * 3
    ln = model.model.layers[2].input_layernorm
    with torch.no_grad():
        ln.weight.normal_()
        assert torch.equal(Engine._rms(ln, x), ln(x))


def test_engine_int4_steps_only_busy_rows_and_matches_generate(monkeypatch):
    """One request in a max_batch=4 engine: the step runs 1 row over len+1 columns; tokens = generate()."""
    model = _int4_tiny(seed=3)
    eng = Engine(model, None, max_batch=4, max_len=48, eos_token_id=[])
    seen = []
    orig = eng._decode_step
    monkeypatch.setattr(eng, "_decode_step", lambda n, S: seen.append((n, S)) or orig(n, S))
    prompts = _prompts(3, seed=11)
    r0 = eng.submit(prompts[0], max_new_tokens=6)
    eng.run_until_done()
    T0 = prompts[0].numel()
    assert seen == [(1, T0 + 1 + i) for i in range(5)]
    assert r0.tokens == _hf_alone(model, prompts[0], 6)
    # slot 0 leaves while slot 1 runs on: rows 0..1 are stepped; then slot 1 alone
    seen.clear()
    ra = eng.submit(prompts[1], max_new_tokens=2)
    rb = eng.submit(prompts[2], max_new_tokens=7)
    eng.run_until_done()
    assert [n for n, _ in seen] == [2] + [2] * 5
    assert ra.tokens == _hf_alone(model, prompts[1], 2) and rb.tokens == _hf_alone(model, prompts[2], 7)


def test_lean_prefill_equals_the_modules_prefill(monkeypatch):
    """The prefill on the decode step's kernel calls (norms and residuals inside them, q/k/v as one
    call) gives the first-token logits of the prefill through the model's modules within fp32
    rounding, and the same tokens, with a gated mixture, mixed prompt lengths (right padding)."""
    model = _int4_tiny(seed=5)
    mops = tiny_mops(model, with_gate=True)
    prompts = _prompts(3, seed=31)
    out = {}
    for lean in (False, True):
        monkeypatch.setattr(Engine, "lean_prefill", lean)
        eng = Engine(model, mops, max_batch=3, max_len=48, eos_token_id=[])
        assert all(ly is not None for ly in eng._lean)       # every layer can take it
        first = []
        orig = eng._prefill
        monkeypatch.setattr(eng, "_prefill", lambda reqs: first.append(orig(reqs)) or first[-1])
        reqs = [eng.submit(p, max_new_tokens=6) for p in prompts]
        eng.run_until_done()
        out[lean] = (torch.cat(first), [r.tokens for r in reqs])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-4)
    assert not torch.equal(out[True][0], out[False][0])      # the other path did run (its own rounding)
    assert out[True][1] == out[False][1]


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_engine_int4_families_match_generate(family):
    """Qwen2's q/k/v biases ride along the fused int4 matmul; Mistral's layers share Llama's path."""
    model = _int4_tiny(seed=4, family=family)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (family == "qwen2")
    eng = Engine(model, tiny_mops(model, with_gate=True), max_batch=2, max_len=40, eos_token_id=[])
    prompts = _prompts(3, seed=21)
    reqs = [eng.submit(p, max_new_tokens=5) for p in prompts]
    eng.run_until_done()
    ref = copy.deepcopy(model)
    attach(ref, tiny_mops(model, with_gate=True))
    for p, r in zip(prompts, reqs):
        assert r.tokens == _hf_alone(ref, p, 5)


# ------------------------------------------------------------------------------------------ sampling
def _hf_sample(model, ids, new, seed, eos, **kw):
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.view(1, -1), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                         max_new_tokens=new, do_sample=True, pad_token_id=0, eos_token_id=eos, **kw)
    return out[0, ids.numel():].tolist()


def test_engine_sampling_equals_hf_generate_with_the_same_seed():
    """Per-request seeds: each request of a mixed batch samples exactly the tokens of HF generate(do_sample=True)
    run alone after torch.manual_seed(seed) (same warpers, same order, one multinomial draw per step)."""
    model = tiny_model(seed=5)
    eos = model.generation_config.eos_token_id
    eng = Engine(model, None, max_batch=3, max_len=60, eos_token_id=eos)
    prompts = _prompts(4, seed=13)
    settings = [dict(temperature=0.8, top_k=20, top_p=0.9), dict(temperature=1.3, top_k=0, top_p=1.0),
                None, dict(temperature=1.0, top_k=0, top_p=0.6)]
    seeds = [11, 22, None, 33]
    reqs = []
    for p, st, sd in zip(prompts, settings, seeds):
        if st is None:
            reqs.append(eng.submit(p, max_new_tokens=12))
        else:
            reqs.append(eng.submit(p, max_new_tokens=12, do_sample=True, seed=sd, **st))
    eng.run_until_done()
    for p, st, sd, r in zip(prompts, settings, seeds, reqs):
        if st is None:
            ref = _hf_alone(model, p, 12)
            ref = ref[:ref.index(eos) + 1] if eos in ref else ref
        else:
            ref = _hf_sample(model, p, 12, sd, eos, **st)
        assert r.tokens == ref, (st, sd)
    assert any(len(set(r.tokens)) > 1 for r in reqs)
    again = Engine(model, None, max_batch=1, max_len=60, eos_token_id=eos)
    r = again.submit(prompts[0], max_new_tokens=12, do_sample=True, seed=11, **settings[0])
    again.run_until_done()
    assert r.tokens == reqs[0].tokens                       # the seed alone fixes the tokens
    r = again.submit(prompts[0], max_new_tokens=12, do_sample=True, seed=12, temperature=3.0)
    again.run_until_done()
    assert r.tokens != reqs[0].tokens


def test_sampling_limits_are_greedy():
    from mops_kernels.serving.sampling import sample_token
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(97, generator=g) * 3
        best = int(logits.argmax())
        assert sample_token(logits, top_k=1, generator=g) == best
        assert sample_token(logits, temperature=1e-4, generator=g) == best
        assert sample_token(logits, top_p=1e-6, generator=g) == best
    logits = torch.zeros(97)
    logits[[3, 50]] = 10.0
    drawn = {sample_token(logits, top_k=2, generator=g) for _ in range(60)}
    assert drawn == {3, 50}
    model = tiny_model()
    eng = Engine(model, None, max_batch=2, max_len=40)
    p = _prompts(1, seed=4)[0]
    a = eng.submit(p, max_new_tokens=8)
    b = eng.submit(p, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.5, seed=1)
    eng.run_until_done()
    assert a.tokens == b.tokens
    with pytest.raises(ValueError, match="temperature"):
        eng.submit(p, max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        eng.submit(p, max_new_tokens=4, do_sample=True, top_p=1.5)


@pytest.mark.parametrize("family,config", [
    ("mistral", dict(sliding_window=8)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
])
def test_engine_refuses_a_sliding_window_shorter_than_its_cache(family, config):
    """The Engine attends to every cached token: a window it cannot apply must be refused, not ignored."""
    model = tiny_model(family, **config)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        Engine(model, max_batch=2, max_len=64)
    Engine(model, max_batch=2, max_len=8)          # the window covers the whole cache: exact, accepted
    Engine(tiny_model(family), max_batch=2, max_len=64)   # no window shorter than the cache


# ------------------------------------------------------------------------- safe to serve from (issue 14)
def _solo(model, prompts, ids, new, **kw):
    """The tokens of one request alone in its own Engine (the oracle of the isolation tests)."""
    eng = Engine(model, prompts, max_batch=1, max_len=48, eos_token_id=[])
    r = eng.submit(ids, max_new_tokens=new, **kw)
    eng.run_until_done()
    return r.tokens


def test_a_failing_callback_ends_only_its_request():
    model = tiny_model(seed=6)
    eng = Engine(model, None, max_batch=3, max_len=48, eos_token_id=[])
    prompts = _prompts(4, seed=17)

    def bad(req, tok):
        if len(req.tokens) == 3:
            raise RuntimeError("client went away")
    reqs = [eng.submit(p, max_new_tokens=7, on_token=bad if i == 1 else None) for i, p in enumerate(prompts)]
    eng.run_until_done()
    assert reqs[1].finish_reason == "error" and "client went away" in str(reqs[1].error)
    assert len(reqs[1].tokens) == 3 and reqs[1].slot is not None and eng.slots[reqs[1].slot] is not reqs[1]
    for i in (0, 2, 3):                                   # request 3 took the freed slot
        assert reqs[i].finish_reason == "length" and reqs[i].tokens == _solo(model, None, prompts[i], 7)
    assert all(s is None for s in eng.slots)


def test_a_failing_prefill_ends_only_its_request():
    """The gate's output is checked where it enters: a NaN weight for one request fails that request alone
    (the batched prefill is retried one by one); the others get their solo tokens and gate choice."""
    model = tiny_model(seed=7)
    mops = tiny_mops(model)
    gate_fwd = type(mops.gate).forward
    poison = {}

    def gate(self, hidden, mask):
        gi, gw = gate_fwd(self, hidden, mask)
        bad = (mask.sum(1) == poison.get("len", -1)).view(-1, 1)
        return gi, gw.masked_fill(bad, float("nan"))
    mops.gate.forward = gate.__get__(mops.gate)
    prompts = _prompts(3, seed=19)
    poison["len"] = prompts[1].numel()
    assert sum(p.numel() == poison["len"] for p in prompts) == 1
    eng = Engine(model, mops, max_batch=3, max_len=48, eos_token_id=[])
    reqs = [eng.submit(p, max_new_tokens=5) for p in prompts]
    eng.run_until_done()
    assert reqs[1].finish_reason == "error" and "weights finite" in str(reqs[1].error) and not reqs[1].tokens
    for i in (0, 2):
        assert reqs[i].tokens == _solo(model, mops, prompts[i], 5)
        idx, w = reqs[i].experts                          # the gate's choice, recorded
        assert len(idx) == 2 and all(0 <= j < 5 for j in idx)
        assert reqs[i].tokens == _solo(model, mops, prompts[i], 5, expert_index=idx, expert_weight=w)
    assert all(s is None for s in eng.slots) and int(eng.cache.active.sum()) == 0


def test_submit_refuses_bad_input_and_the_old_top_k_name():
    model = tiny_model()
    eng = Engine(model, tiny_mops(model, with_gate=False), max_batch=2, max_len=40)
    for ids, what in (([1, -2, 3], r"\[-2, 3\]"), ([1, 97], r"\[1, 97\]")):
        with pytest.raises(ValueError, match="token ids must be in \\[0, 97\\).*" + what):
            eng.submit(ids, expert_index=[1])
    with pytest.raises(ValueError, match="ids must be integer"):
        eng.submit(torch.tensor([1.0, 2.0]), expert_index=[1])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        eng.submit([1, 2], expert_index=[1], max_new_tokens=-1)
    with pytest.raises(ValueError, match="expert_weight must be finite"):
        eng.submit([1, 2], expert_index=[1, 2], expert_weight=[0.5, float("inf")])
    with pytest.raises(ValueError, match="expert_weight given without"):
        eng.submit([1, 2], expert_weight=[1.0])
    with pytest.raises(ValueError, match="top_k must be an integer"):
        eng.submit([1, 2], expert_index=[1], do_sample=True, top_k=-3)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.submit([1, 2], expert_index=[1], stop=["#"])
    assert not eng.waiting
    with pytest.raises(TypeError, match="renamed Engine\\(experts_per_request=\\)"):
        Engine(model, None, top_k=2)
    eng = Engine(model, tiny_mops(model, with_gate=False), max_len=20, experts_per_request=3)
    assert eng.cache.index.shape[1] == 3


def test_max_new_tokens_zero_scores_the_prompt():
    """0 new tokens: no token, finish "length"; prompt log-probs equal a plain forward's log_softmax."""
    model = tiny_model(seed=8)
    eng = Engine(model, None, max_batch=2, max_len=30)
    p = _prompts(1, seed=23)[0]
    r = eng.submit(p, max_new_tokens=0, prompt_logprobs=3)
    r2 = eng.submit(p, max_new_tokens=2, logprobs=2)
    eng.run_until_done()
    assert r.done and r.tokens == [] and r.finish_reason == "length"
    with torch.no_grad():
        lp = model(p.view(1, -1)).logits[0].float().log_softmax(-1)
    assert r.prompt_token_logprobs[0] is None and len(r.prompt_token_logprobs) == p.numel()
    for t in range(1, p.numel()):
        got, top = r.prompt_token_logprobs[t]
        assert abs(got - float(lp[t - 1, p[t]])) < 1e-4
        assert list(top) == lp[t - 1].topk(3).indices.tolist()
    got, top = r2.token_logprobs[0]
    assert abs(got - float(lp[-1].max())) < 1e-4 and len(top) == 2 and r2.tokens[0] == int(lp[-1].argmax())


def test_eos_from_generation_config_and_stop_strings():
    from _serving_doubles import tiny_tokenizer
    tok = tiny_tokenizer()
    model = tiny_model(seed=9)
    p = _prompts(1, seed=29)[0]
    free = _solo(model, None, p, 12)
    model.generation_config.eos_token_id = free[4]          # EOS read from the model when not given
    eng = Engine(model, None, max_batch=2, max_len=40, tokenizer=tok)
    r = eng.submit(p, max_new_tokens=12)
    eng.run_until_done()
    assert r.tokens == free[:free.index(free[4]) + 1] and r.finish_reason == "eos"
    text = tok.decode(free)
    stop = text[5:7]                                         # two characters the greedy text produces
    eng = Engine(model, None, max_batch=2, max_len=40, tokenizer=tok, eos_token_id=[])
    r = eng.submit(p, max_new_tokens=12, stop=["@@never", stop])
    eng.run_until_done()
    cut = text.index(stop)
    assert r.finish_reason == "stop" and r.stop_string == stop and r.tokens == free[:cut + 2]
    assert eng.text(r) == text[:cut]


# -------------------------------------------------------------------- the GPU path, proven on the CPU
def test_decode_step_reads_nothing_on_the_host(monkeypatch):
    """The decode step (int4 fused projections, prefix bank, IAPT-free) calls no host read: it can be
    captured in a CUDA graph and costs no device sync eagerly."""
    model = _int4_tiny(seed=2)
    mops = tiny_mops(model)
    eng = Engine(model, mops, max_batch=3, max_len=40, eos_token_id=[])
    for p, e in zip(_prompts(2, seed=31), ([0, 3], None)):
        eng.submit(p, expert_index=e, max_new_tokens=4)
    eng.step()                                               # prefill + one eager step
    S = max(eng.cache.host_lens) + 1

    def no_host_read(*a, **k):
        raise AssertionError("host read inside the decode step")
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    with torch.inference_mode():
        logits = eng._decode_step(2, S)
    monkeypatch.undo()
    assert logits.shape == (2, 97) and bool(torch.isfinite(logits).all())


def test_failed_graph_capture_gives_the_eager_tokens(monkeypatch):
    """A capture that fails after its two warm-up steps (which write mask, lens, K and V) restores the
    cache in `finally`: the eager fallback then decodes exactly the tokens of an eager engine."""
    model = tiny_model(seed=10)
    mops = tiny_mops(model)
    prompts = _prompts(3, seed=37)
    eager = Engine(model, mops, max_batch=4, max_len=48, eos_token_id=[])
    want = [eager.submit(p, max_new_tokens=6) for p in prompts]
    eager.run_until_done()
    eng = Engine(model, mops, max_batch=4, max_len=48, eos_token_id=[])
    eng.graphs.enabled = True                                # as on a GPU
    warm = []
    orig = eng.graphs.warm_up
    monkeypatch.setattr(eng.graphs, "warm_up", lambda m: warm.append(m) or orig(m))

    def record(m):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(eng.graphs, "record", record)
    reqs = [eng.submit(p, max_new_tokens=6) for p in prompts]
    with pytest.warns(UserWarning, match="capture failed"):
        eng.run_until_done()
    assert warm == [4] and not eng.use_graph
    assert [r.tokens for r in reqs] == [r.tokens for r in want]


# ---- several prompt sets in one Engine (serving.prompt_sets.PromptSets) ----------------------------
def _two_sets(model):
    """Set "a": the doubles' bank (5 slots of 7, gate at layer 1, top-2); set "b": real PromptBank +
    SmartGate (3 slots of 4 tokens, per-layer log-weights that differ by layer, gate at layer 0, top-1)."""
    from _hf_doubles import Bank, Gate, MoPs
    from mops_kernels.modules.prompts import MixtureOfPrompts, PromptBank, SmartGate
    cfg = model.config
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    a = MoPs(Bank(L, 2, 5, 7, Hkv, D, seed=1), Gate(cfg.hidden_size, 5, 1, 2), 2)
    torch.manual_seed(21)
    bank = PromptBank(L, range(2, L), 3, 4, Hkv, D, init_std=1.5, layer_log_weight=0.0)
    with torch.no_grad():
        bank.layer_log_weight.copy_(torch.tensor([0.7, -1.2]))
        bank.lens.copy_(torch.tensor([4, 2, 3], dtype=torch.int32))
    b = MixtureOfPrompts(bank, SmartGate(cfg.hidden_size, 3, 1, 0, 16), inject_from=2)
    return a, b


def test_prompt_sets_serve_each_set_as_alone():
    """Requests of two prompt sets (gate-picked and named slots) and plain ones, prefilled and decoded in
    one batch, get the tokens and experts each set's own Engine gives them alone."""
    from mops_kernels.serving.prompt_sets import PromptSets
    model = tiny_model(seed=5)
    a, b = _two_sets(model)
    sets = PromptSets({"a": a, "b": b}, num_layers=model.config.num_hidden_layers)
    assert sets.sizes == {"a": 5, "b": 3} and sets.offsets == {"a": 0, "b": 5} and sets.top_k == 2
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (5, 9, 3, 7, 6, 4)]
    asks = [("a", None), ("b", None), ("b", [2, 0]), ("a", [4]), (None, None), ("b", None)]
    eng = Engine(model, sets, max_batch=6, max_len=32, eos_token_id=[])
    reqs = [eng.submit(p, prompt_set=s, expert_index=ei, max_new_tokens=6) for p, (s, ei) in zip(prompts, asks)]
    eng.run_until_done()
    for p, (s, ei), r in zip(prompts, asks, reqs):
        alone = Engine(model, {"a": a, "b": b}.get(s), max_batch=1, max_len=32, eos_token_id=[],
                       experts_per_request=2)
        want = alone.submit(p, expert_index=ei, max_new_tokens=6)
        alone.run_until_done()
        assert r.tokens == want.tokens, (s, ei)
        if s is not None:
            assert r.experts[0] == want.experts[0], (s, ei, r.experts, want.experts)
            assert r.experts[1] == pytest.approx(want.experts[1], abs=1e-6)
        else:
            assert r.experts == ([], [])


def test_prompt_sets_refuse_what_they_cannot_serve():
    from _hf_doubles import Bank, MoPs
    from mops_kernels.serving.prompt_sets import PromptSets
    model = tiny_model(seed=5)
    a, b = _two_sets(model)
    cfg = model.config
    L = cfg.num_hidden_layers
    with pytest.raises(ValueError, match=r"different \(kv heads, head dim\)"):
        PromptSets({"a": a, "wide": MoPs(Bank(L, 2, 2, 4, 2, 32), None, 2)}, num_layers=L)
    sets = PromptSets({"a": a, "b": b, "fixed": MoPs(Bank(L, 2, 2, 4, 2, 16), None, 2)}, num_layers=L)
    eng = Engine(model, sets, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="unknown set 'c'"):
        eng.submit([1, 2], prompt_set="c")
    with pytest.raises(ValueError, match=r"prompt set 'b': expert_index out of range: .*E=3"):
        eng.submit([1, 2], prompt_set="b", expert_index=[3])          # slot 3 of a 3-slot set
    with pytest.raises(ValueError, match="'fixed' has no gate"):
        eng.submit([1, 2], prompt_set="fixed")
    plain = Engine(model, a, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="serves one prompt set"):
        plain.submit([1, 2], prompt_set="a")
    with pytest.raises(ValueError, match="served by the Engine"):     # attach would ignore sets' offsets
        attach(model, sets)


def test_prompt_sets_mix_layers_and_position_offsets():
    """A MoPs bank from layer 2, one from layer 3 and a PEFT-like set on every layer with its positions
    shifted by 4 (as PEFT prefix tuning does), plus plain requests, in one batch: each request gets the
    tokens its set's own Engine gives it alone (a plain request: the bare model's)."""
    from _hf_doubles import Bank, MoPs
    from mops_kernels.serving.prompt_sets import PromptSets
    model = tiny_model(seed=6)
    L = model.config.num_hidden_layers
    a, _ = _two_sets(model)
    late = MoPs(Bank(L, 3, 2, 4, 2, 16, seed=4), None, 3)
    peft = MoPs(Bank(L, 0, 3, 4, 2, 16, seed=9), None, 0)
    peft.position_offset = 4
    sets = {"a": a, "late": late, "peft": peft}
    pool = PromptSets(sets, num_layers=L)
    assert pool.position_offsets == {"a": 0, "late": 0, "peft": 4} and pool.inject_from == 0
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (6, 4, 8, 5, 7)]
    asks = [("peft", [1]), ("a", None), ("late", [1, 0]), (None, None), ("peft", [2, 0])]
    eng = Engine(model, pool, max_batch=3, max_len=40, eos_token_id=[])      # 5 requests through 3 rows
    reqs = [eng.submit(p, prompt_set=s, expert_index=ei, max_new_tokens=7) for p, (s, ei) in zip(prompts, asks)]
    eng.run_until_done()
    for p, (s, ei), r in zip(prompts, asks, reqs):
        alone = Engine(model, sets.get(s), max_batch=1, max_len=40, eos_token_id=[], experts_per_request=2)
        want = alone.submit(p, expert_index=ei, max_new_tokens=7)
        alone.run_until_done()
        assert r.tokens == want.tokens, (s, ei)


def test_a_request_with_no_slot_is_the_plain_model_under_shifted_prompts():
    """A PEFT-like set (positions shifted by its 4 virtual tokens): a request or generate() row that
    uses no slot (index -1) gets the bare model's tokens, unshifted, in the Engine and through attach."""
    from _hf_doubles import Bank, MoPs
    from mops_kernels.integrations.hf import detach
    model = tiny_model(seed=7)
    L = model.config.num_hidden_layers
    peft = MoPs(Bank(L, 0, 2, 4, 2, 16, seed=9), None, 0)
    peft.position_offset = 4
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                           pad_token_id=0)[:, 6:]
    eng = Engine(model, peft, max_batch=2, max_len=32, eos_token_id=[])
    r = [eng.submit(ids[0], expert_index=[-1], max_new_tokens=5), eng.submit(ids[1], expert_index=[1], max_new_tokens=5)]
    eng.run_until_done()
    assert r[0].tokens == plain[0].tolist()
    attach(model, peft)
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0, expert_index=torch.tensor([[-1], [1]]))[:, 6:]
    finally:
        detach(model)
    assert out[0].tolist() == plain[0].tolist() and out[1].tolist() == r[1].tokens

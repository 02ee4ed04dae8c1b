"""The serving engine (static KV cache, continuous batching) against HF generate() greedy, per request."""
import copy

import pytest
import torch

from _hf_doubles import Generator, tiny_model, tiny_mops
from mops_kernels.integrations.engine import Engine, summarize
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
    eng = Engine(model, mops, max_batch=3, max_len=48)
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
    eng = Engine(model, gen, max_batch=2, max_len=40)
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
    eng = Engine(model, mops, max_batch=2, max_len=32)
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

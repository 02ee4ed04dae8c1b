"""attach/detach on transformers models (SPEC §5): parity with the unpatched model, per-row experts
in mixed batches equal to each request alone, explicit slots, beam search, IAPT, errors."""
import pytest
import torch

from _hf_doubles import Generator, left_padded, row, tiny_model, tiny_mops
from mops_kernels.integrations.hf import ATTN_NAME, attach, detach

GEN = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)


def _gen_rows(model, ids, mask, **kw):
    """Generated tokens of each row (prompt and padding stripped)."""
    out = model.generate(input_ids=ids, attention_mask=mask, **{**GEN, **kw})
    return out[:, ids.shape[1]:]


def _rows_equal_alone(model, ids, mask, **kw):
    """Generate the batch, check each row equals that request alone; returns the batch's tokens."""
    batched = _gen_rows(model, ids, mask, **kw)
    for b in range(ids.shape[0]):
        i, m = row(ids, mask, b)
        assert torch.equal(_gen_rows(model, i, m, **kw)[0], batched[b]), f"row {b}"
    return batched


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_no_prompts_same_tokens_and_logits(family):
    model = tiny_model(family)
    ids, mask = left_padded()
    want = _gen_rows(model, ids, mask)
    want_logits = model(input_ids=ids, attention_mask=mask).logits
    attach(model, None)
    assert model.config._attn_implementation == ATTN_NAME
    got = _gen_rows(model, ids, mask)
    got_logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    real = mask.bool()
    err = (got_logits - want_logits)[real].norm() / want_logits[real].norm()
    assert err < 1e-4
    detach(model)
    assert "forward" not in model.__dict__ and model.config._attn_implementation != ATTN_NAME
    assert torch.equal(_gen_rows(model, ids, mask), want)


def test_no_prompts_sampling_fixed_seed():
    model = tiny_model()
    ids, mask = left_padded()
    kw = dict(max_new_tokens=7, do_sample=True, top_k=20, temperature=1.3, pad_token_id=0)
    torch.manual_seed(11)
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    attach(model, None)
    torch.manual_seed(11)
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_gate_mixed_batch_rows_equal_alone():
    model = tiny_model()
    mops = tiny_mops(model)
    ids, mask = left_padded()
    plain = _gen_rows(model, ids, mask)
    attach(model, mops)
    batched = _rows_equal_alone(model, ids, mask)
    assert mops.gate.calls == 1 + ids.shape[0]            # once per generate (prefill), not per step
    assert not torch.equal(batched, plain)                # the experts changed the answer


def test_gate_picks_experts_from_layer_hidden_state():
    """The gate must see the masked mean after gate_layer: compare with a manual forward."""
    model = tiny_model()
    mops = tiny_mops(model)
    ids, mask = left_padded()
    seen = {}
    orig = mops.gate.forward

    def spy(h, m):
        seen["h"], seen["m"] = h.detach().clone(), m.clone()
        return orig(h, m)
    mops.gate.forward = spy
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    attach(model, mops)
    model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(seen["h"][real], hs[mops.gate.gate_layer + 1][real], atol=1e-5)
    assert torch.equal(seen["m"].bool(), real)


def test_explicit_slots_rows_equal_alone_and_weights_matter():
    model = tiny_model()
    mops = tiny_mops(model, with_gate=False)
    ids, mask = left_padded()
    idx = torch.tensor([[3, 0], [1, -1], [4, 2]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, 0.8]])
    attach(model, mops)
    batched = _gen_rows(model, ids, mask, expert_index=idx, expert_weight=w)
    for b in range(3):
        i, m = row(ids, mask, b)
        alone = _gen_rows(model, i, m, expert_index=idx[b:b + 1], expert_weight=w[b:b + 1])
        assert torch.equal(alone[0], batched[b]), f"row {b}"
    logits_a = model(input_ids=ids, attention_mask=mask, expert_index=idx, expert_weight=w).logits
    logits_b = model(input_ids=ids, attention_mask=mask, expert_index=idx, expert_weight=w.flip(1)).logits
    assert (logits_a - logits_b)[0].abs().max() > 1e-3     # weights reach the attention
    with pytest.raises(ValueError, match="expert_index"):
        model.generate(input_ids=ids, attention_mask=mask, **GEN)   # no gate: slots required


def test_explicit_slots_match_prefix_attention_math():
    """One layer checked by hand: the prefix keys of the chosen slots join the softmax."""
    from mops_kernels import reference as ref
    model = tiny_model(layers=2)
    mops = tiny_mops(model, with_gate=False, inject_from=1, gate_layer=0)
    ids, mask = left_padded()
    idx = torch.tensor([[2, 0], [1, -1], [4, 3]], dtype=torch.int32)
    caught = {}
    attn = model.model.layers[1].self_attn
    h = attn.register_forward_hook(lambda m, a, k, o: caught.update(out=o[0]), with_kwargs=True)
    hin = attn.register_forward_pre_hook(lambda m, a, k: caught.update(kw=k), with_kwargs=True)
    attach(model, mops)
    model(input_ids=ids, attention_mask=mask, expert_index=idx)
    h.remove(), hin.remove()
    kw = caught["kw"]
    x = kw["hidden_states"]
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, -1, 16).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, 16).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, 16).transpose(1, 2)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = apply_rotary_pos_emb(q, k, *kw["position_embeddings"])
    pk, pv = mops.bank.layer(1)
    o = ref.prefix_attention(q, k, v, pk, pv, idx, None, prefix_lens=mops.bank.lens, attention_mask=mask)
    want = attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    real = mask.bool()
    assert (caught["out"] - want)[real].abs().max() < 1e-4


def test_real_prompt_modules_rows_equal_alone():
    """The package's MixtureOfPrompts (gate + bank) and InstructionPromptGenerator, not doubles."""
    from mops_kernels import InstructionPromptGenerator, MixtureOfPrompts
    model = tiny_model()
    torch.manual_seed(4)
    mops = MixtureOfPrompts.for_model(model, num_experts=5, prompt_len=6, top_k=2, gate_layer=1, inject_from=2)
    with torch.no_grad():
        mops.bank.keys.normal_(0, 2.0), mops.bank.values.normal_(0, 2.0)
    gen = InstructionPromptGenerator(model.config.hidden_size, 4, [2, 3], bottleneck=16)
    with torch.no_grad():
        gen.w_up.normal_(0, 1.0)
    ids, mask = left_padded()
    plain = _gen_rows(model, ids, mask)
    for prompts in (mops, gen):
        attach(model, prompts)
        batched = _rows_equal_alone(model, ids, mask)
        assert not torch.equal(batched, plain)
        detach(model)
    with pytest.raises(ValueError, match="4 layers, model has 3"):
        attach(tiny_model(layers=3), mops)


def test_beam_search_keeps_experts():
    model = tiny_model()
    mops = tiny_mops(model)
    ids, mask = left_padded()
    attach(model, mops)
    kw = dict(max_new_tokens=6, num_beams=3, early_stopping=True)
    batched = _rows_equal_alone(model, ids, mask, **kw)
    detach(model)
    assert not torch.equal(_gen_rows(model, ids, mask, **kw), batched)


def test_iapt_generator_rows_equal_alone():
    model = tiny_model()
    gen = Generator(model.config.hidden_size, [2, 3])
    ids, mask = left_padded()
    plain = _gen_rows(model, ids, mask)
    attach(model, gen)
    batched = _rows_equal_alone(model, ids, mask)
    assert not torch.equal(batched, plain)


def test_quantize_swaps_linears():
    from mops_kernels.modules.int4_linear import Int4Linear
    model = tiny_model()
    ids, mask = left_padded()
    want = model(input_ids=ids, attention_mask=mask).logits
    attach(model, None, quantize=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.model.layers[3].mlp.down_proj, Int4Linear)
    got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    err = ((got - want)[real].norm() / want[real].norm()).item()
    assert 0 < err < 0.2                                  # 4-bit rounding, not garbage


def _untouched(model, impl):
    return "forward" not in model.__dict__ and "generate" not in model.__dict__ \
        and model.config._attn_implementation == impl and not hasattr(model, "_mops_attached")


def test_errors_leave_model_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        attach(gpt2, None)
    model = tiny_model()
    impl = model.config._attn_implementation
    other = tiny_model(layers=5)
    with pytest.raises(ValueError, match="layers"):
        attach(model, tiny_mops(other), quantize=True)
    assert _untouched(model, impl)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    bad = tiny_mops(model)
    bad.bank.kv = {l: (k[:, :, :1], v[:, :, :1]) for l, (k, v) in bad.bank.kv.items()}
    with pytest.raises(ValueError, match="Hkv"):
        attach(model, bad)
    assert _untouched(model, impl)
    with pytest.raises(ValueError, match="inject_from"):
        attach(model, tiny_mops(model, gate_layer=2, inject_from=2))
    assert _untouched(model, impl)
    attach(model, tiny_mops(model, with_gate=False))
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="out of range"):
        model.generate(input_ids=ids, attention_mask=mask, expert_index=torch.tensor([[5], [0], [1]]), **GEN)
    with pytest.raises(ValueError, match="already"):
        attach(model, None)
    detach(model)
    assert _untouched(model, impl)
    with pytest.raises(ValueError, match="nothing is attached"):
        detach(model)


# ------------------------------------------------------------------------------------------------
# The real backbone (SmolLM2-135M, 4-bit): tokens equal to the unpatched model, per-row experts.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    from mops_kernels import load_backbone
    model, tok = load_backbone()
    batch = tok(["Write a haiku about the sea.", "What is 17 * 3? Answer:", "Hi"], return_tensors="pt",
                padding=True)
    return model, batch


@pytest.mark.slow
def test_smollm_no_prompts_same_tokens(smollm):
    model, batch = smollm
    assert batch["attention_mask"][2, 0] == 0                        # left padding is exercised
    kw = dict(max_new_tokens=4, do_sample=False)
    want = model.generate(**batch, **kw)
    attach(model, None)
    try:
        assert torch.equal(model.generate(**batch, **kw), want)
    finally:
        detach(model)


@pytest.mark.slow
def test_smollm_experts_rows_equal_alone(smollm):
    from _hf_doubles import MoPs, Bank, Gate
    model, batch = smollm
    cfg = model.config
    bank = Bank(cfg.num_hidden_layers, 11, 4, 5, cfg.num_key_value_heads, cfg.head_dim, scale=1.0)
    mops = MoPs(bank, Gate(cfg.hidden_size, 4, 10, 2), 11)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    attach(model, mops)
    try:
        kw = dict(max_new_tokens=4, do_sample=False)
        both = model.generate(input_ids=ids[1:], attention_mask=mask[1:], **kw)[:, ids.shape[1]:]
        for b in (1, 2):
            i, m = row(ids, mask, b)
            assert torch.equal(model.generate(input_ids=i, attention_mask=m, **kw)[0, i.shape[1]:], both[b - 1])
    finally:
        detach(model)


# ------------------------------------------------------------------------------------------------
# transformers' StaticCache (generate(cache_implementation="static")) and sliding windows.
# ------------------------------------------------------------------------------------------------
STATIC = dict(cache_implementation="static")
# Windows of 5 keys: the prompts (13 tokens) and the answers (9 more) are longer than that.
WINDOWED = {"mistral": dict(sliding_window=5),
            "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)}


def _close_logits(got, want, tol=1e-4):
    for step, (a, b) in enumerate(zip(got, want)):
        assert ((a - b).norm() / b.norm()).item() < tol, f"step {step}"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_static_cache_same_tokens_and_logits(family):
    model = tiny_model(family)
    ids, mask = left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
              **GEN, **STATIC)
    want = model.generate(**kw)
    attach(model, None)
    got = model.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    _close_logits(got.logits, want.logits)
    assert torch.equal(got.sequences, model.generate(**{**kw, "cache_implementation": None}).sequences)


@pytest.mark.parametrize("family, prompts", [("llama", "gate"), ("llama", "slots"), ("llama", "iapt"),
                                             ("qwen2-window", "gate")])
def test_static_cache_experts_rows_equal_alone(family, prompts):
    # qwen2-window: generate() hands forward a dict of masks (full and sliding layers); the gate
    # must still read the padding of the prompt tokens from it.
    model = tiny_model("qwen2", **WINDOWED["qwen2"]) if family == "qwen2-window" else tiny_model(family)
    ids, mask = left_padded()
    kw = {}
    if prompts == "iapt":
        attached = Generator(model.config.hidden_size, [2, 3])
    else:
        attached = tiny_mops(model, with_gate=prompts == "gate")
    if prompts == "slots":
        kw = dict(expert_index=torch.tensor([[3, 0], [1, -1], [4, 2]], dtype=torch.int32),
                  expert_weight=torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, 0.8]]))
    plain = _gen_rows(model, ids, mask, **STATIC)
    attach(model, attached)
    dynamic = _gen_rows(model, ids, mask, **kw)
    batched = _gen_rows(model, ids, mask, **STATIC, **kw)
    for b in range(ids.shape[0]):
        i, m = row(ids, mask, b)
        one = {k: t[b:b + 1] for k, t in kw.items()}
        assert torch.equal(_gen_rows(model, i, m, **STATIC, **one)[0], batched[b]), f"row {b}"
    assert torch.equal(batched, dynamic)                  # the static cache changes nothing
    assert not torch.equal(batched, plain)                # the prompts reached the static-cache run
    if prompts == "gate":
        assert attached.gate.calls == 2 + ids.shape[0]    # once per generate, static ones included


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_same_tokens_as_transformers(family, cache):
    model = tiny_model(family, **WINDOWED[family])
    ids, mask = left_padded(T=13)
    kw = dict(max_new_tokens=9, **(STATIC if cache == "static" else {}))
    want = _gen_rows(model, ids, mask, **kw)
    want_logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(want, _gen_rows(tiny_model(family), ids, mask, **kw))   # the window matters
    attach(model, None)
    assert torch.equal(_gen_rows(model, ids, mask, **kw), want)
    real = mask.bool()
    got_logits = model(input_ids=ids, attention_mask=mask).logits
    assert ((got_logits - want_logits)[real].norm() / want_logits[real].norm()).item() < 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_experts_rows_equal_alone(cache):
    model = tiny_model("mistral", **WINDOWED["mistral"])
    mops = tiny_mops(model, with_gate=False)
    ids, mask = left_padded(T=13)
    idx = torch.tensor([[3, 0], [1, -1], [4, 2]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, 0.8]])
    kw = dict(max_new_tokens=9, **(STATIC if cache == "static" else {}))
    plain = _gen_rows(model, ids, mask, **kw)
    attach(model, mops)
    batched = _gen_rows(model, ids, mask, expert_index=idx, expert_weight=w, **kw)
    for b in range(3):
        i, m = row(ids, mask, b)
        alone = _gen_rows(model, i, m, expert_index=idx[b:b + 1], expert_weight=w[b:b + 1], **kw)
        assert torch.equal(alone[0], batched[b]), f"row {b}"
    assert not torch.equal(batched, plain)


def _window_oracle(q, k, v, pk, pv, idx, w, lens, mask, window, scale):
    """float64 softmax over the chosen slots (+ log w) and keys j < n = mask length with
    j <= n - T + t (causal, bottom-right) and j > n - T + t - window; 0 for a row with no key."""
    q, k, v, pk, pv, w = (t.double() for t in (q, k, v, pk, pv, w))
    B, Hq, T, D = q.shape
    n, g = mask.shape[1], Hq // k.shape[1]
    K = k[:, :, :n].repeat_interleave(g, 1)
    V = v[:, :, :n].repeat_interleave(g, 1)
    t = torch.arange(T).view(T, 1)
    j = torch.arange(n).view(1, n)
    ok = (j <= n - T + t) & (j > n - T + t - window) & mask.bool()[:, None, None, :]      # [B, 1, T, n]
    s = (q @ K.transpose(-1, -2) * scale).masked_fill(~ok, -torch.inf)
    slot = idx.clamp(min=0).long()
    kk, P = idx.shape[1], pk.shape[1]
    PK = pk[slot].permute(0, 3, 1, 2, 4).reshape(B, -1, kk * P, D).repeat_interleave(g, 1)
    PV = pv[slot].permute(0, 3, 1, 2, 4).reshape(B, -1, kk * P, D).repeat_interleave(g, 1)
    pok = ((idx >= 0) & (w > 0))[..., None] & (torch.arange(P) < lens[slot][..., None])   # [B, kk, P]
    bias = torch.where(pok, torch.log(w.clamp(min=1e-30))[..., None], -torch.inf).view(B, 1, 1, kk * P)
    ps = q @ PK.transpose(-1, -2) * scale + bias
    logits = torch.cat([ps, s], -1)
    p = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    return p @ torch.cat([PV, V], 2)


@pytest.mark.parametrize("T, S, n, window, backend", [
    (13, 13, 13, 5, None),       # prefill longer than the window
    (1, 20, 16, 5, None),        # decode in a static buffer
    (4, 20, 16, 5, None),        # continued prefill, static buffer
    (6, 11, 6, 20, None),        # window wider than the keys
    (13, 13, 13, 5, "triton"),   # the Triton kernels on the overlapping window views (interpreter)
    (4, 20, 16, 5, "triton")])
def test_attention_window_and_static_buffer_match_oracle(T, S, n, window, backend, force_backend):
    """mops_attention_forward itself: keys past the mask length ignored, per-query window, slots
    visible to every query; values and gradients against a float64 oracle."""
    from types import SimpleNamespace
    if backend is not None:
        force_backend(backend)
    from mops_kernels.integrations.attention import PrefixRouting, mops_attention_forward
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, D, E, P = 3, 6, 2, 16, 5, 7
    q = torch.randn(B, Hq, T, D, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, S, D, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, S, D, generator=g).requires_grad_()
    pk = (torch.randn(E, P, Hkv, D, generator=g) * 2).requires_grad_()
    pv = (torch.randn(E, P, Hkv, D, generator=g) * 2).requires_grad_()
    idx = torch.tensor([[3, 0], [1, -1], [4, 4]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3], [1.0, 0.5], [0.2, 0.8]]).requires_grad_()
    lens = torch.tensor([7, 6, 5, 7, 6], dtype=torch.int32)
    mask = torch.ones(B, n, dtype=torch.long)
    mask[0, :4], mask[2, :2] = 0, 0                                   # left padding
    with torch.no_grad():
        k[:, :, n:] = float("nan")                                    # unwritten static positions
        v[:, :, n:] = float("nan")
    routing = PrefixRouting([pk], [pv], idx, w, lens)
    out, _ = mops_attention_forward(SimpleNamespace(layer_idx=0), q, k, v, mask, scaling=0.3,
                                    sliding_window=window, mops_prefix=routing)
    want = _window_oracle(q, k, v, pk, pv, idx, w, lens, mask, window, 0.3).transpose(1, 2)
    assert out.shape == (B, T, Hq, D)
    assert (out.double() - want).abs().max().item() < 1e-4
    go = torch.randn(out.shape, generator=g)
    ins = (q, k, v, pk, pv, w)
    got_g = torch.autograd.grad(out, ins, go)
    want_g = torch.autograd.grad(want, ins, go.double())
    for name, a, b in zip("q k v pk pv w".split(), got_g, want_g):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-4, name


def test_beam_search_static_cache_sliding_window():
    model = tiny_model("mistral", **WINDOWED["mistral"])
    ids, mask = left_padded(T=13)
    kw = dict(max_new_tokens=8, num_beams=3, **STATIC)
    want = _gen_rows(model, ids, mask, **kw)
    attach(model, None)
    assert torch.equal(_gen_rows(model, ids, mask, **kw), want)
    detach(model)
    attach(model, tiny_mops(model))
    batched = _rows_equal_alone(model, ids, mask, **kw)
    assert not torch.equal(batched, want)

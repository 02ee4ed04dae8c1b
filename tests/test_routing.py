"""Request routing that cannot leak (issue 15 item 3): expert_index rows equal the batch exactly,
per-call request state (two threads on one attached model), deepcopy of an attached model runs the
copy's weights, `with attached(...)`, and the attention switched through set_attn_implementation."""
import copy
import threading

import pytest
import torch

import mops_kernels
from _hf_doubles import left_padded, tiny_model, tiny_mops
from mops_kernels.integrations.hf import ATTN_NAME, attach, detach

GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
IDX = torch.tensor([[3, 0], [1, -1], [4, 2]], dtype=torch.int32)


def _explicit_model():
    model = tiny_model(layers=4)
    attach(model, tiny_mops(model, with_gate=False))
    return model


@pytest.mark.parametrize("rows", [1, 2, 6])
def test_expert_index_rows_must_equal_the_batch(rows):
    """2 rows for 3 prompts (or 1 row, or 6 without beams) is an error, never a silent repeat."""
    model = _explicit_model()
    ids, mask = left_padded()
    idx = IDX.repeat(2, 1)[:rows]
    with pytest.raises(ValueError, match=rf"expert_index has {rows} rows, the batch has 3 prompts"):
        model.generate(input_ids=ids, attention_mask=mask, expert_index=idx, **GEN)
    with pytest.raises(ValueError, match=rf"expert_index has {rows} rows"):
        model(input_ids=ids, attention_mask=mask, expert_index=idx)


def test_expert_index_per_prompt_or_per_beam_row():
    """With beams, one row per prompt (repeated for its beams) or one per beam row: same answer."""
    model = _explicit_model()
    ids, mask = left_padded()
    kw = dict(GEN, num_beams=2, num_return_sequences=2)
    per_prompt = model.generate(input_ids=ids, attention_mask=mask, expert_index=IDX, **kw)
    per_row = model.generate(input_ids=ids, attention_mask=mask, expert_index=IDX.repeat_interleave(2, 0), **kw)
    assert torch.equal(per_prompt, per_row)
    with pytest.raises(ValueError, match="or 6, one per beam"):
        model.generate(input_ids=ids, attention_mask=mask, expert_index=IDX[:2], **kw)


def test_concurrent_generate_keeps_each_callers_experts():
    """Two threads generate on one attached model with different experts; both enter generate()
    before either runs its first forward (a barrier in a pre-hook), so a request stored on the
    model would be overwritten. Each must get what it gets alone."""
    model = _explicit_model()
    ids, mask = left_padded()
    idx_a, idx_b = IDX, IDX.flip(0).contiguous()
    alone_a = model.generate(input_ids=ids, attention_mask=mask, expert_index=idx_a, **GEN)
    alone_b = model.generate(input_ids=ids, attention_mask=mask, expert_index=idx_b, **GEN)
    assert not torch.equal(alone_a, alone_b)
    barrier = threading.Barrier(2, timeout=60)
    first = threading.local()

    def meet(mod, args):
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
    hook = model.register_forward_pre_hook(meet)
    out, errors = {}, []

    def run(name, idx):
        try:
            out[name] = model.generate(input_ids=ids, attention_mask=mask, expert_index=idx, **GEN)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=run, args=a) for a in (("a", idx_a), ("b", idx_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    hook.remove()
    assert not errors, errors
    assert torch.equal(out["a"], alone_a) and torch.equal(out["b"], alone_b)


def test_deepcopy_of_an_attached_model_runs_the_copys_weights():
    model = tiny_model(layers=4)
    mops = tiny_mops(model, with_gate=True)
    attach(model, mops)
    ids, mask = left_padded()
    before = model(input_ids=ids, attention_mask=mask).logits
    clone = copy.deepcopy(model)
    assert torch.equal(clone(input_ids=ids, attention_mask=mask).logits, before)
    with torch.no_grad():                               # change the copy only
        for p in clone.model.layers[3].mlp.parameters():
            p.mul_(3.0)
    changed = clone(input_ids=ids, attention_mask=mask).logits
    assert (changed - before).abs().max() > 1e-3        # the copy runs its own weights ...
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)   # ... the original its own
    ref = tiny_model(layers=4)                           # an oracle: same weights, attached afresh
    ref.load_state_dict(clone.state_dict())
    attach(ref, mops)
    assert torch.allclose(ref(input_ids=ids, attention_mask=mask).logits, changed, atol=1e-5)
    detach(clone)
    detach(model)


def test_attached_context_manager():
    model = tiny_model(layers=4)
    mops = tiny_mops(model, with_gate=False)
    ids, mask = left_padded()
    plain = model(input_ids=ids, attention_mask=mask).logits
    with mops_kernels.attached(model, mops) as m:
        assert m is model and model._mops_attached is not None
        routed = model(input_ids=ids, attention_mask=mask, expert_index=IDX).logits
        assert (routed - plain).abs().max() > 1e-3
    assert getattr(model, "_mops_attached", None) is None
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with pytest.raises(RuntimeError, match="boom"):
        with mops_kernels.attached(model, mops):
            raise RuntimeError("boom")
    assert getattr(model, "_mops_attached", None) is None     # detached on the way out


def test_attention_is_switched_through_set_attn_implementation(monkeypatch):
    model = tiny_model(layers=2)
    original = model.config._attn_implementation
    calls = []
    real = model.set_attn_implementation
    monkeypatch.setattr(model, "set_attn_implementation", lambda impl, **kw: calls.append(impl) or real(impl, **kw))
    attach(model)
    assert calls == [ATTN_NAME] and model.config._attn_implementation == ATTN_NAME
    detach(model)
    assert calls == [ATTN_NAME, original] and model.config._attn_implementation == original

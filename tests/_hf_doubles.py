"""Tiny models and small stand-ins for the prompt modules, shared by the HF integration tests.

The stand-ins have the interface the integration uses (SPEC §5): a bank with `.layer(l)` and
`.lens`, a gate with `.gate_layer`, `.top_k` and `forward(hidden, mask)`, a MixtureOfPrompts-like
holder with `.bank`, `.gate`, `.inject_from`, and an IAPT-like generator with `forward(l, H, mask)`
and `to_prefix(layer, soft)`.
"""
import torch
from torch import nn

from mops_kernels import reference as ref


def tiny_model(family="llama", layers=4, seed=0, **config):
    """A random tiny decoder (GQA 3: 6 query heads, 2 kv heads, head dim 16); `config` overrides."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                  max_position_embeddings=256, **config)
    return model_cls(cfg).eval()


class Bank:
    def __init__(self, num_layers, inject_from, E, P, Hkv, D, seed=1, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        self.num_layers = num_layers
        self.kv = {l: (torch.randn(E, P, Hkv, D, generator=g) * scale,
                       torch.randn(E, P, Hkv, D, generator=g) * scale)
                   for l in range(inject_from, num_layers)}
        self.lens = torch.tensor([P - (e % 3) for e in range(E)], dtype=torch.int32)

    def layer(self, l):
        return self.kv.get(l)


class Gate(nn.Module):
    def __init__(self, d, E, gate_layer, top_k, seed=2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1, self.b1 = torch.randn(32, d, generator=g), torch.randn(32, generator=g)
        self.w2, self.b2 = torch.randn(E, 32, generator=g), torch.randn(E, generator=g)
        self.gate_layer, self.top_k, self.calls = gate_layer, top_k, 0

    def forward(self, hidden, mask):
        self.calls += 1
        return ref.gate_topk(hidden.float(), mask, self.w1, self.b1, self.w2, self.b2, self.top_k)


class MoPs:
    def __init__(self, bank, gate, inject_from):
        self.bank, self.gate, self.inject_from = bank, gate, inject_from


def tiny_mops(model, E=5, P=7, gate_layer=1, inject_from=2, top_k=2, with_gate=True):
    cfg = model.config
    L = cfg.num_hidden_layers
    bank = Bank(L, inject_from, E, P, cfg.num_key_value_heads, cfg.head_dim)
    gate = Gate(cfg.hidden_size, E, gate_layer, top_k) if with_gate else None
    return MoPs(bank, gate, inject_from)


class Generator(nn.Module):
    """IAPT-like: 4 soft tokens per layer from the hidden states entering it."""

    def __init__(self, d, layers, seed=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inject_layers = layers
        self.w = torch.randn(d, 4, generator=g)

    def forward(self, layer_idx, H, mask):
        a = (H.float() @ self.w).masked_fill(~mask.bool()[..., None], -1e9).softmax(1)   # [B, n, 4]
        return a.transpose(1, 2) @ H.float()                                               # [B, 4, d]

    def to_prefix(self, layer, soft):
        attn = layer.self_attn
        x = layer.input_layernorm(soft)
        B = soft.shape[0]
        k = attn.k_proj(x).view(B, 4, -1, attn.head_dim)
        v = attn.v_proj(x).view(B, 4, -1, attn.head_dim)
        return k, v


def left_padded(B=3, T=11, pads=(4, 0, 2), seed=5, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads[:B]):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def row(ids, mask, b):
    """Request b alone, its left padding removed."""
    keep = mask[b].bool()
    return ids[b:b + 1, keep], mask[b:b + 1, keep]

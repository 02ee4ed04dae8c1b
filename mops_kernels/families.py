"""The one table of supported model families, and the geometry every layer reads from a model.

    FAMILIES[config.model_type] -> Family(layers, attention, gguf)
        layers     attribute path of the decoder layer list ("model.layers")
        attention  class names of the attention module of each layer (what attach() patches)
        gguf       whether a GGUF file of this architecture imports (llama.cpp's llama layout)
    family(model)          (model_type, Family), or ValueError naming the supported families
    decoder_layers(model)  the decoder layer list, found through the table
    head_dim(config)       config.head_dim, else hidden_size // num_attention_heads
    model_dims(model)      num_layers, hidden_size, num_kv_heads, head_dim of an HF model

Duck-typed on the model's `config`: nothing here imports transformers, so the modules, the
integrations and training all read the same table.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple


class Family(NamedTuple):
    layers: str
    attention: Tuple[str, ...]
    gguf: bool


FAMILIES = {
    "llama": Family("model.layers", ("LlamaAttention",), True),
    "mistral": Family("model.layers", ("MistralAttention",), True),
    "qwen2": Family("model.layers", ("Qwen2Attention",), False),
}


def get_path(obj, path: str):
    """obj.a.b.c for path "a.b.c", or None where an attribute is missing."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    if not hasattr(cfg, "num_attention_heads"):
        raise ValueError(f"model must have a Hugging Face `config`, got {type(model_or_config).__name__}")
    return cfg


def family(model_or_config) -> Tuple[str, Family]:
    """(model_type, Family) of an HF model or config; ValueError for an unsupported architecture."""
    name = getattr(_config(model_or_config), "model_type", None)
    if name not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={name!r}; supported: {sorted(FAMILIES)}")
    return name, FAMILIES[name]


def decoder_layers(model):
    """The decoder layer list of an HF model of a supported family (ValueError if absent)."""
    _, fam = family(model)
    layers = get_path(model, fam.layers)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at '{fam.layers}'")
    return layers


def decoder(model):
    """The module that holds the decoder layers (model.model for the Llama family)."""
    _, fam = family(model)
    return get_path(model, fam.layers.rsplit(".", 1)[0])


def head_dim(config) -> int:
    """The attention head size: config.head_dim when set, else hidden_size // num_attention_heads."""
    cfg = _config(config)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def model_dims(model) -> dict:
    """num_layers, hidden_size, num_kv_heads, head_dim read from an HF model's (or a config's) fields."""
    cfg = _config(model)
    return dict(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                head_dim=head_dim(cfg))

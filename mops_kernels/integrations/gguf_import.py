"""Lossless import of a llama.cpp GGUF checkpoint into the QuantizedWeight format (SPEC §3).

GGUF stores a [N, K] weight row by row in blocks of 32 columns (ggml lists the shape as [K, N]):

    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes qs     w[j] = (qs[j] & 15) * d + m,  w[j+16] = (qs[j] >> 4) * d + m
    Q4_0  18 bytes: fp16 d, 16 bytes qs             w = (q - 8) * d   ->  scale = d, min = -8 d (exact in fp16)
    Q8_0  34 bytes: fp16 d, 32 int8 q               w = q * d
    F32 / F16                                       dense, kept as float32

The blocks are repacked (numpy, whole tensor at once, never through a float copy of the weight) to
our layout: byte i of a row holds column 2i (low nibble) and 2i + 1 (high nibble), scale/min
fp16 [N, K/32]. llama.cpp permutes the rows of attn_q / attn_k per head for its RoPE; the import
undoes it exactly as transformers' GGUF loader does (LlamaTensorProcessor._reverse_permute_weights).
Permuting rows of a quantized matrix is lossless because the blocks run along K.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Union

import numpy as np
import torch

from ..families import FAMILIES
from ..ops.quant_format import QuantizedWeight

BLOCK = 32
# GGUF metadata key (after "<arch>.") -> LlamaConfig field. Same keys transformers' ggml.py maps.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
SUPPORTED_ARCHITECTURES = tuple(n for n, f in FAMILIES.items() if f.gguf)  # llama layout (Q/K permuted for RoPE)
SUPPORTED_TYPES = ("Q4_1", "Q4_0", "Q8_0", "F32", "F16")

# GGUF tensor name pieces -> Hugging Face Llama module names
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and the reason."""


@dataclass
class GGUFCheckpoint:
    path: str
    architecture: str
    config: dict                     # LlamaConfig keyword arguments
    tensors: Dict[str, object]       # GGUF tensor name -> gguf ReaderTensor (memory-mapped)
    reader: object


def read_gguf(path: str) -> GGUFCheckpoint:
    """Open `path` with gguf.GGUFReader and read the model config from its metadata."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct.error/... on bad bytes
        raise GGUFImportError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(f"{path}: unsupported architecture {arch!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    cfg = {}
    for key, name in _CONFIG_KEYS.items():
        v = field(f"{arch}.{key}")
        if v is not None:
            cfg[name] = v
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
               if k not in cfg]
    if missing:
        raise GGUFImportError(f"{path}: metadata lacks {arch}.* keys for {missing}")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = field(f"{arch}.rope.dimension_count", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["head_dim"] = int(head_dim)
    cfg["rope_parameters"] = {"rope_type": "default",
                              "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0))}
    tensors = {t.name: t for t in reader.tensors}
    if "vocab_size" not in cfg and "token_embd.weight" in tensors:
        cfg["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        v = field(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[name] = int(v)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFImportError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                                  f"supported: {', '.join(SUPPORTED_TYPES)}")
    return GGUFCheckpoint(path, arch, cfg, tensors, reader)


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise KeyError(f"no Hugging Face name for GGUF tensor {gguf_name!r}")


def rope_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's per-head RoPE permutation: hf_rows = gguf_rows[perm].

    transformers: w.reshape(n_head, dim, 2, K).swapaxes(2, 1).reshape(N, K) with dim = N // n_head // 2.
    """
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(-1)


def _rows_fp16(raw: np.ndarray, start: int) -> torch.Tensor:
    """fp16 field at byte `start` of every block: raw uint8 [N, nb, bytes] -> float16 [N, nb]."""
    return torch.from_numpy(np.ascontiguousarray(raw[..., start:start + 2]).view(np.float16)[..., 0])


def _repack_nibbles(qs: np.ndarray) -> torch.Tensor:
    """GGUF qs uint8 [N, nb, 16] (byte j: element j low, j+16 high) -> ours uint8 [N, nb*16]."""
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)               # [N, nb, 32] elements 0..31
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)                 # byte i: 2i low, 2i+1 high
    return torch.from_numpy(np.ascontiguousarray(packed).reshape(qs.shape[0], -1))


def _check_finite(path: str, name: str, what: str, t: torch.Tensor) -> None:
    """A NaN/inf scale or weight would give NaN logits at run time: refuse the file instead."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise GGUFImportError(f"{path}: tensor {name}: {what} hold {int(bad.sum())} non-finite values "
                              f"(NaN/inf), first at {tuple(int(i) for i in bad.nonzero()[0])}")


def import_tensor(t, *, row_perm: np.ndarray | None = None, path: str = "") -> Union[QuantizedWeight, torch.Tensor]:
    """One GGUF tensor -> QuantizedWeight (Q4_1/Q4_0: bits 4, Q8_0: bits 8) or a float32 tensor.

    row_perm reorders the rows (2-D tensors only), e.g. rope_row_permutation for attn_q/attn_k.
    """
    kind = t.tensor_type.name
    shape = tuple(int(s) for s in reversed(list(t.shape)))              # ggml [K, N] -> [N, K]
    data = np.asarray(t.data)
    if kind in ("F32", "F16"):
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))
        _check_finite(path, t.name, "the weight", w)
        return w[torch.from_numpy(row_perm)] if row_perm is not None else w
    if kind not in ("Q4_1", "Q4_0", "Q8_0"):
        raise GGUFImportError(f"{path}: tensor {t.name} has unsupported type {kind}")
    N, K = shape
    if K % BLOCK:
        raise GGUFImportError(f"{path}: tensor {t.name} has K={K}, not a multiple of {BLOCK}")
    nb = K // BLOCK
    raw = data.reshape(N, nb, -1)
    if row_perm is not None:
        raw = raw[row_perm]
    if kind == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(N, K))
        d = _rows_fp16(raw, 0)
        _check_finite(path, t.name, "the Q8_0 scales d", d)
        return QuantizedWeight(q, d.contiguous(), None, (N, K), BLOCK, 8)
    if kind == "Q4_1":
        d, m, qs = _rows_fp16(raw, 0), _rows_fp16(raw, 2), raw[..., 4:]
        _check_finite(path, t.name, "the Q4_1 scales d", d)
        _check_finite(path, t.name, "the Q4_1 mins m", m)
    else:  # Q4_0: w = (q - 8) d = q d + (-8 d); -8 d is exact in fp16 unless it overflows
        d, qs = _rows_fp16(raw, 0), raw[..., 2:]
        _check_finite(path, t.name, "the Q4_0 scales d", d)
        m = (d.float() * -8).half()
        bad = torch.isinf(m) & torch.isfinite(d)
        if bool(bad.any()):
            raise GGUFImportError(f"{path}: tensor {t.name}: Q4_0 scale too large, -8*d overflows fp16")
    return QuantizedWeight(_repack_nibbles(qs), d.contiguous(), m.contiguous(), (N, K), BLOCK, 4)


def import_weights(ckpt: GGUFCheckpoint) -> Dict[str, Union[QuantizedWeight, torch.Tensor]]:
    """Every tensor of the checkpoint under its Hugging Face name, Q/K rows un-permuted."""
    nh, nkv = ckpt.config["num_attention_heads"], ckpt.config["num_key_value_heads"]
    out = {}
    for name, t in ckpt.tensors.items():
        perm = None
        n_rows = int(t.shape[-1]) if len(t.shape) > 1 else 0
        if ".attn_q." in name and n_rows:
            perm = rope_row_permutation(n_rows, nh)
        elif ".attn_k." in name and n_rows:
            perm = rope_row_permutation(n_rows, nkv)
        try:
            key = hf_name(name)
        except KeyError as e:
            raise GGUFImportError(f"{ckpt.path}: unexpected tensor {name} for a {ckpt.architecture} model") from e
        out[key] = import_tensor(t, row_perm=perm, path=ckpt.path)
    return out

"""Drop-in acceleration of a transformers model the user already has (SPEC §3, §5).

    mops_kernels.quantize_(model, bits=4, group_size=32)             # in place; returns model
    model = AutoModelForCausalLM.from_pretrained(path,               # quantized while it loads
        quantization_config=mops_kernels.MopsQuantConfig(bits=4, group_size=32))
    model.save_pretrained(out)                                       # safetensors of the codes
    model = AutoModelForCausalLM.from_pretrained(out)                # read back bit for bit

On a Llama / Mistral / Qwen2 model (the families of `mops_kernels.families.FAMILIES`) in any float
dtype, on any device, `quantize_` changes exactly this:
- every nn.Linear of the decoder layers becomes an `Int4Linear`, quantized on the weight's device from
  its values in the model's dtype: bits=4 is Q4_1 (round-to-nearest per group of `group_size` in
  {32, 64, 128}, `ops.quant_format.int4_quantize`), bits=8 is Q8_0 (groups of 32);
- `quantize_head=True` (the default, as `load_backbone`): the token embedding becomes a
  `QuantEmbedding` and the output head an `Int4Linear(bits=8)`, both Q8_0. A tied model stays tied
  (the head and the embedding read one set of 8-bit tensors); an untied one gets one set each.
  `quantize_head=False` leaves the embedding and the head as they are (float, tied or not);
- the attention runs through `prefix_attention` (the "mops" attn_implementation, attention.py);
- `model.config.quantization_config` becomes a `MopsQuantConfig`, so `save_pretrained` writes it to
  config.json beside the quantized tensors, and `from_pretrained` rebuilds the same modules.
Nothing else changes: norms, biases, RoPE, activation dtype, generation config, every cache
(dynamic, static) and `attach` of prompt mixtures work as before. Everything is checked before the
first module is replaced: an unsupported architecture, bits / group_size out of range, a linear
whose in_features is not a multiple of the group (the message names the module) or an already
quantized model is a ValueError and the model is untouched. Do not `model.to(dtype)` afterwards:
it would cast the fp16 scales (the next forward then raises); `.to(device)` is fine.

The transformers quantizer ("mops" in transformers.quantizers, registered when this module is
imported, e.g. by touching `mops_kernels.MopsQuantConfig` or `mops_kernels.quantize_`):
- a float checkpoint with `quantization_config=MopsQuantConfig(...)`: before the weights load, the
  model skeleton is checked like `quantize_` checks a model; transformers then loads tensor by tensor
  (on-the-fly quantization turns off its thread pool and reads each checkpoint tensor only when it
  is converted), and each decoder linear's weight goes straight through `_QuantizeOp` into an
  `Int4Linear` that replaces the still-empty (meta) nn.Linear. At no time is more than one decoder
  linear held in float: peak memory is the quantized model + one float linear and the quantization
  temporaries + the float embedding / head, which are quantized after loading (transformers ties
  them while it loads). `benchmarks/bench_quantize.py --load-memory` measures it; tests check that
  every other decoder linear is still empty or already quantized when one is converted.
- a checkpoint saved from a quantized model (config.json carries quant_method "mops"): the skeleton
  gets empty Int4Linear / QuantEmbedding modules and the stored codes, scales and mins load into
  them as they are: no re-quantization.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..families import family
from ..modules.int4_linear import Int4Linear, replace_linears
from ..modules.quant_embedding import QuantEmbedding
from ..ops.quant_format import GROUP_SIZE_8BIT, GROUP_SIZES_4BIT, QuantizedWeight, int8_quantize, quantize
from .attention import use_mops_attention

QUANT_METHOD = "mops"
HEAD_BITS = 8           # the embedding / head format (Q8_0), as the default backbone's GGUF stores it


# -------------------------------------------------------------------------------------------
# what gets quantized, checked before anything changes
# -------------------------------------------------------------------------------------------
def _check_format(bits: int, group_size: int) -> None:
    if bits == 4:
        if group_size not in GROUP_SIZES_4BIT:
            raise ValueError(f"group_size must be one of {GROUP_SIZES_4BIT} for bits=4, got {group_size}")
    elif bits == 8:
        if group_size != GROUP_SIZE_8BIT:
            raise ValueError(f"group_size must be {GROUP_SIZE_8BIT} for bits=8, got {group_size}")
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")


def _targets(model, bits: int, group_size: int, quantize_head: bool) -> List[Tuple[str, nn.Linear]]:
    """The decoder's nn.Linears (full names), after checking that every module can be quantized."""
    _check_format(bits, group_size)
    try:
        _, fam = family(model)
    except ValueError as e:
        raise ValueError(f"quantize_: {e}") from None
    prefix = fam.layers.rsplit(".", 1)[0] + "."         # "model.": the decoder (layers + embedding)
    for name, mod in model.named_modules():
        if isinstance(mod, (Int4Linear, QuantEmbedding)):
            raise ValueError(f"quantize_: the model is already quantized ({name} is a {type(mod).__name__})")
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(prefix):
            if mod.in_features % group_size:
                raise ValueError(f"quantize_: {name} has in_features={mod.in_features}, not a multiple of "
                                 f"group_size={group_size}; the kernels cannot take it")
            out.append((name, mod))
    if not out:
        raise ValueError(f"quantize_: {type(model).__name__} has no nn.Linear under '{prefix[:-1]}'")
    if quantize_head:
        emb = model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"quantize_: the input embedding is a {type(emb).__name__}, not an nn.Embedding; "
                             f"pass quantize_head=False")
        if emb.embedding_dim % GROUP_SIZE_8BIT:
            raise ValueError(f"quantize_: the embedding dim {emb.embedding_dim} is not a multiple of "
                             f"{GROUP_SIZE_8BIT} (Q8_0 blocks); pass quantize_head=False")
        head = getattr(model, "lm_head", None)
        if type(head) is not nn.Linear or head.bias is not None:
            raise ValueError(f"quantize_: lm_head must be an nn.Linear without bias to quantize the head, "
                             f"got {head!r}; pass quantize_head=False")
    return out


def _replace(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tied(model) -> bool:
    """The config's choice, for an empty (meta) skeleton at load time."""
    return bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))


def _set_head(model, emb_qw: QuantizedWeight, head_qw: Optional[QuantizedWeight], dtype) -> None:
    """Embedding -> QuantEmbedding(emb_qw); head -> Int4Linear(head_qw), or the embedding's own
    tensors when head_qw is None (tied: one set of buffers, owned by the head)."""
    inner = model.get_decoder()
    pad = model.get_input_embeddings().padding_idx
    if head_qw is None:
        model.lm_head = Int4Linear(emb_qw)
        inner.embed_tokens = QuantEmbedding.tied(model.lm_head, padding_idx=pad, dtype=dtype)
    else:
        model.lm_head = Int4Linear(head_qw)
        inner.embed_tokens = QuantEmbedding(emb_qw, padding_idx=pad, dtype=dtype)
    # No `weight` parameters are left to tie (a tied head shares the embedding's codes already):
    # transformers' tie_weights() at load / save would look them up and fail.
    model.all_tied_weights_keys = {}


def _quantize_head(model) -> None:
    """Embedding and head of a loaded model to Q8_0; tied when they are one tensor (as loaded)."""
    emb = model.get_input_embeddings().weight
    head = None if model.lm_head.weight is emb else int8_quantize(model.lm_head.weight.detach())
    _set_head(model, int8_quantize(emb.detach()), head, emb.dtype)


def _mark(model, config: "MopsQuantConfig") -> None:
    """What transformers' own quantizers leave on a model, so save_pretrained / from_pretrained agree."""
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.hf_quantizer = MopsHfQuantizer(config, pre_quantized=True)


def quantize_(model, bits: int = 4, group_size: int = 32, *, quantize_head: bool = True):
    """Quantize a loaded Llama / Mistral / Qwen2 transformers model in place (module docstring).

    bits: 4 (Q4_1, group_size 32 / 64 / 128) or 8 (Q8_0, group_size 32) for the decoder linears.
    quantize_head: the token embedding and the output head to Q8_0 too (default True; a tied pair
        stays tied, one copy of the codes); False keeps both float.
    Returns `model`."""
    names = {name for name, _ in _targets(model, bits, group_size, quantize_head)}   # raises before any change
    replace_linears(model, bits=bits, group_size=group_size, should_replace=lambda name, _: name in names)
    if quantize_head:
        _quantize_head(model)
    use_mops_attention(model)
    _mark(model, MopsQuantConfig(bits=bits, group_size=group_size, quantize_head=quantize_head))
    return model


# -------------------------------------------------------------------------------------------
# transformers' quantizer API
# -------------------------------------------------------------------------------------------
@register_quantization_config(QUANT_METHOD)
class MopsQuantConfig(QuantizationConfigMixin):
    """`from_pretrained(..., quantization_config=MopsQuantConfig(bits=4, group_size=32))`: the
    decoder linears to Int4Linear while loading, the embedding / head to Q8_0 (quantize_head),
    the "mops" attention; the same modules and codes as `quantize_` with these arguments."""

    def __init__(self, bits: int = 4, group_size: int = 32, quantize_head: bool = True, **kwargs):
        kwargs.pop("quant_method", None)            # from_dict passes back what to_dict wrote
        if kwargs:
            raise ValueError(f"MopsQuantConfig: unknown arguments {sorted(kwargs)}")
        _check_format(bits, group_size)
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.quantize_head = int(bits), int(group_size), bool(quantize_head)


class _QuantizeOp(ConversionOps):
    """One decoder linear's float weight -> the Int4Linear that replaces its (meta) nn.Linear."""

    def __init__(self, hf_quantizer: "MopsHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        cfg = self.hf_quantizer.quantization_config
        for key, value in input_dict.items():
            w = value[0] if isinstance(value, list) else value
            name = key.rsplit(".", 1)[0]
            lin = model.get_submodule(name)
            # the bias may load before or after the weight: a meta bias is filled in by its own key later
            _replace(model, name, Int4Linear(quantize(w, bits=cfg.bits, group_size=cfg.group_size), lin.bias))
            if missing_keys is not None:
                missing_keys.discard(key)
        return {}


@register_quantizer(QUANT_METHOD)
class MopsHfQuantizer(HfQuantizer):
    """transformers side of MopsQuantConfig (module docstring: what happens at load time)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._targets = set()

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("MopsQuantConfig: device_map with 'disk' offload is not supported")

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        targets = _targets(model, cfg.bits, cfg.group_size, cfg.quantize_head)
        self._targets = {name for name, _ in targets}
        if not self.pre_quantized:
            return model                 # the linears are replaced as their weights arrive (_QuantizeOp)
        for name, lin in targets:        # empty modules of the stored layout; the checkpoint fills them
            _replace(model, name, Int4Linear(_empty(lin.out_features, lin.in_features, cfg.bits,
                                                    cfg.group_size, lin.weight.device), lin.bias))
        if cfg.quantize_head:
            emb = model.get_input_embeddings()
            dev = emb.weight.device
            head = None if _tied(model) else _empty(*model.lm_head.weight.shape, HEAD_BITS, GROUP_SIZE_8BIT, dev)
            _set_head(model, _empty(*emb.weight.shape, HEAD_BITS, GROUP_SIZE_8BIT, dev), head, emb.weight.dtype)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor == "weight" and name in self._targets

    def get_quantize_ops(self):
        return _QuantizeOp(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if not self.pre_quantized and cfg.quantize_head:
            _quantize_head(model)
        use_mops_attention(model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _empty(N: int, K: int, bits: int, group_size: int, device) -> QuantizedWeight:
    """An unfilled QuantizedWeight of the stored layout (quant_format.py) on `device` (meta at load)."""
    q = torch.empty(N, K // 2 if bits == 4 else K, dtype=torch.uint8 if bits == 4 else torch.int8, device=device)
    s = torch.empty(N, K // group_size, dtype=torch.float16, device=device)
    m = torch.empty_like(s) if bits == 4 else None
    return QuantizedWeight(q, s, m, (N, K), group_size, bits)

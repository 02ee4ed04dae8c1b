"""Import PEFT prefix-tuning adapters as prompt slots: `from_peft(model, [dir, ...])` (SPEC §5).

A PEFT prefix-tuning adapter directory holds `adapter_config.json` (peft_type PREFIX_TUNING,
num_virtual_tokens P, num_layers L, num_attention_heads = Hkv for GQA models, token_dim = Hkv*D) and
`adapter_model.safetensors` with the table `prompt_embeddings` [P, L*2*Hkv*D] (PEFT saves the output
of its prefix MLP when prefix_projection is true). Older saves hold the encoder itself
(`prompt_encoder.embedding.weight` and, with prefix_projection, the MLP `transform.0` / `transform.2`:
Linear -> tanh -> Linear), which is run once here to get the table.

PEFT's layout (peft_model.get_prompt): table.view(P, L*2, Hkv, D); layer l's keys are entry 2l and its
values entry 2l+1, used as past key/values as they are (never rotated), so slot keys carry no position.
The sequence positions start at P under PEFT (the prefix occupies cache positions 0..P-1), so the
returned prompts carry `position_offset = P`; attach() shifts position ids by it.

Slot i of the returned bank is adapter i; all adapters must share P and the model's shape. Files
are read with PEFT's own loaders (PeftConfig.from_pretrained, load_peft_weights); an adapter whose
base_model_name_or_path names another model is refused unless `strict=False`.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from ..families import model_dims
from ..modules.prompts import MixtureOfPrompts, PromptBank


def _read_table(path: str, cfg) -> torch.Tensor:
    """The flattened prefix table [P, L*2*Hkv*D] of one adapter dir, read by PEFT's own loader
    (safetensors, or a .bin through torch.load(weights_only=True))."""
    from peft.utils import load_peft_weights
    try:
        sd = load_peft_weights(path, device="cpu")
    except (OSError, ValueError) as e:
        raise ValueError(f"from_peft: {path}: PEFT cannot read the adapter weights "
                         f"(adapter_model.safetensors / .bin): {e}") from None
    if "prompt_embeddings" in sd:
        return sd["prompt_embeddings"].float()

    def get(suffix):
        hits = [v for k, v in sd.items() if k.endswith(suffix)]
        return hits[0].float() if hits else None
    emb = get("embedding.weight")
    if emb is None:
        raise ValueError(f"from_peft: {path}: no prompt_embeddings nor prompt encoder weights; keys {list(sd)}")
    if cfg.prefix_projection and get("transform.0.weight") is not None:
        h = torch.tanh(emb @ get("transform.0.weight").T + get("transform.0.bias"))
        return h @ get("transform.2.weight").T + get("transform.2.bias")
    return emb


def _model_name(name) -> str:
    """'org/Model-Name' or '/path/to/Model-Name' -> 'model-name' (what two spellings share)."""
    return os.path.basename(str(name).rstrip("/\\")).lower() if name else ""


def check_base_model(path: str, base, model, strict: bool = True) -> None:
    """The adapter's base_model_name_or_path must name the model it attaches to (compared by the last
    path component, case-insensitive). A mismatch, or a model without a name to compare, is a
    ValueError unless strict=False (then only a warning)."""
    want = _model_name(base)
    if not want:
        return                                   # the adapter does not say: nothing to compare
    have = _model_name(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    if have == want:
        return
    why = (f"was trained on {base!r} but the model is {have!r}" if have else
           f"was trained on {base!r}; the model has no name_or_path to check it against")
    msg = f"from_peft: {path} {why}"
    if strict:
        raise ValueError(msg + " (pass strict=False to load it anyway)")
    warnings.warn(msg + "; loading it because strict=False")


def load_adapter(path: str, model, strict: bool = True):
    """(P, {layer: (k [P, Hkv, D], v [P, Hkv, D])}) of one PEFT prefix-tuning adapter dir, read with
    PEFT's loaders and checked against `model` (base model name unless strict=False, geometry always)."""
    from peft import PeftConfig
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"from_peft: {path} has no adapter_config.json")
    try:
        cfg = PeftConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - PEFT raises many kinds on a bad config
        raise ValueError(f"from_peft: {path}: PEFT cannot read adapter_config.json ({type(e).__name__}: {e})") from None
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    if peft_type != "PREFIX_TUNING":
        raise ValueError(f"from_peft: {path} is a {peft_type} adapter, not PREFIX_TUNING")
    check_base_model(path, cfg.base_model_name_or_path, model, strict)
    dims = model_dims(model)
    L, Hkv, D = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
    P = int(cfg.num_virtual_tokens)
    if (cfg.num_transformer_submodules or 1) != 1:
        raise ValueError(f"from_peft: {path} has num_transformer_submodules="
                         f"{cfg.num_transformer_submodules}, only decoder-only models (1) are supported")
    shape = (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim)
    if shape != (L, Hkv, Hkv * D):
        raise ValueError(f"from_peft: {path} was trained for (num_layers, kv heads, token_dim)={shape}, "
                         f"the model has {(L, Hkv, Hkv * D)}")
    table = _read_table(path, cfg)
    if tuple(table.shape) != (P, L * 2 * Hkv * D):
        raise ValueError(f"from_peft: {path}: prefix table has shape {tuple(table.shape)}, "
                         f"expected [P={P}, L*2*Hkv*D={L * 2 * Hkv * D}]")
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"from_peft: {path}: the prefix table has non-finite values (NaN/inf)")
    t = table.view(P, L * 2, Hkv, D)
    return P, {l: (t[:, 2 * l], t[:, 2 * l + 1]) for l in range(L)}


def from_peft(model, dirs: Sequence[str], *, strict: bool = True):
    """A MixtureOfPrompts (no gate, slot i = dirs[i], position_offset = P) for `model`. Each adapter
    must name `model` as its base (strict=False: a warning instead) and match its geometry."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    if not dirs:
        raise ValueError("from_peft: give at least one adapter directory")
    adapters = [load_adapter(str(d), model, strict) for d in dirs]   # validate all before building
    Ps = {P for P, _ in adapters}
    if len(Ps) != 1:
        raise ValueError(f"from_peft: adapters have different num_virtual_tokens {[P for P, _ in adapters]}; "
                         f"one bank needs one P")
    P = Ps.pop()
    dims = model_dims(model)
    L, Hkv, D = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
    param = next(model.parameters(), None)
    dtype = torch.float32 if param is None or not param.is_floating_point() else param.dtype
    device = torch.device("cpu") if param is None else param.device
    bank = PromptBank(L, list(range(L)), len(adapters), P, Hkv, D, dtype, device)
    for slot, (_, layers) in enumerate(adapters):
        bank.set_slot(slot, {l: (k.to(device, dtype), v.to(device, dtype)) for l, (k, v) in layers.items()})
    return MixtureOfPrompts(bank, None, 0, position_offset=P)

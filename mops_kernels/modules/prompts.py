"""The prompt modules: a bank of expert prefixes, the MoPs gate, the IAPT generator, and the
MixtureOfPrompts that ties a bank and a gate to a backbone (SPEC §2, §4, §5).

    PromptBank                  keys / values [L_inj, E, P, Hkv, D], lens [E]; layer(l) -> views
    SmartGate                   w1 [h, d], b1 [h], w2 [E, h], b2 [E]; forward -> (idx [B, k], w [B, k])
    InstructionPromptGenerator  per injected layer W_down [d, m], W_sa [m, 4], a [6], b [4],
                                W_up [m, d]; forward(l, H, mask) -> soft tokens [B, 4, d]
    MixtureOfPrompts            bank + gate + placement (gate_layer < inject_from < num layers)

Nothing here imports transformers: the backbone is read through its `config` (duck-typed).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..families import model_dims
from ..ops.gate_topk import ACTIVATION_IDS, gate_topk
from ..ops.iapt_generate import iapt_generate


# --------------------------------------------------------------------------------------------
# safetensors with the module's config in the metadata
# --------------------------------------------------------------------------------------------
def save_tensors(path: str, tensors: Dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
              metadata={"config": json.dumps(config)})


# What a file may say (its constructor arguments, all required) and checks on each value.
def _is_int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


POS_INT = ("a positive int", lambda v: _is_int(v, 1))
INDEX = ("an int >= 0", lambda v: _is_int(v, 0))
LAYERS = ("a non-empty list of ints >= 0", lambda v: isinstance(v, list) and bool(v) and all(_is_int(x, 0) for x in v))
FLOAT_DTYPE = ("one of float32, float16, bfloat16, float64", lambda v: v in _FLOAT_DTYPES)
NUMBER = ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
OPT_NUMBER = ("a finite number or null", lambda v: v is None or NUMBER[1](v))
POS_NUMBER = ("a finite number > 0", lambda v: NUMBER[1](v) and v > 0)
BOOL = ("true or false", lambda v: isinstance(v, bool))
ACTIVATION = (f"one of {sorted(ACTIVATION_IDS)}", lambda v: v in ACTIVATION_IDS)
_FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}   # torch -> safetensors


def load_tensors(path: str, device=None, *, args: Optional[dict] = None, optional: Optional[dict] = None,
                 tensors: Optional[Callable[[dict], dict]] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, config) of a file written by save_tensors.

    With `args` ({name: (what, check)}: the constructor arguments a file must name), `optional`
    (the same for arguments it may name: older files lack them, the constructor's default applies)
    and `tensors` (config -> {name: (shape, safetensors dtype)}), the metadata and every tensor's
    shape and dtype are checked against each other from the file's header, before any tensor data
    is read and before the caller allocates anything: a file cannot make us build what it does
    not hold. Every error names the file and the field."""
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path}: no 'config' in the safetensors metadata (not saved by mops_kernels?)")
        try:
            cfg = json.loads(meta["config"])
        except ValueError as e:
            raise ValueError(f"{path}: the metadata 'config' is not JSON ({e})") from None
        if args is not None:
            if not isinstance(cfg, dict):
                raise ValueError(f"{path}: the metadata 'config' must be a JSON object, got {type(cfg).__name__}")
            allowed = {**args, **(optional or {})}
            unknown, missing = sorted(set(cfg) - set(allowed)), sorted(set(args) - set(cfg))
            if unknown or missing:
                raise ValueError(f"{path}: metadata config has unknown arguments {unknown} / lacks {missing}; "
                                 f"expected {sorted(args)}, optionally {sorted(optional or {})}")
            for name, (what, ok) in allowed.items():
                if name in cfg and not ok(cfg[name]):
                    raise ValueError(f"{path}: metadata {name} must be {what}, got {cfg[name]!r}")
        if tensors is not None:
            want, have = tensors(cfg), set(f.keys())
            if have != set(want):
                raise ValueError(f"{path}: holds tensors {sorted(have)}, the metadata needs {sorted(want)}")
            for name, (shape, dtype) in want.items():
                sl = f.get_slice(name)
                got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                if got_shape != tuple(shape) or got_dtype != dtype:
                    raise ValueError(f"{path}: tensor {name} is {got_dtype} {list(got_shape)}, the metadata "
                                     f"says {dtype} {list(shape)}")
        out = {k: f.get_tensor(k) for k in f.keys()}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out, cfg


def _check_finite_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name} has non-finite values (NaN/inf)")


def _load_module(cls, path: str, device=None):
    """cls(**config) with the file's parameters: cls.FILE_ARGS / cls.file_tensors checked first."""
    tensors, cfg = load_tensors(path, device, args=cls.FILE_ARGS, optional=cls.FILE_OPTIONAL,
                                tensors=cls.file_tensors)
    _check_finite_tensors(path, tensors)
    module = cls(**cfg)
    module.load_state_dict(tensors)
    return module.to(device) if device is not None else module


def _check_layers(name: str, layers: Iterable[int], num_layers: int) -> list:
    layers = [int(x) for x in layers]
    if not layers:
        raise ValueError(f"{name} must name at least one layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} has repeated layers: {layers}")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"{name} has layers {bad} outside 0..{num_layers - 1} (num_layers={num_layers})")
    return sorted(layers)


def model_placement(model) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    """(device, activation dtype) of an HF model: where its hidden states live and in which dtype.

    Prompt pools must match both (prefix_attention takes prefix_k/v in q's dtype, on q's device).
    The activation dtype is what the input embedding outputs: a 4-bit backbone (load_backbone) holds
    int4/int8 codes and fp16 scales in buffers, so the first parameter's dtype is not the answer
    there; a plain HF model's embedding outputs its weight dtype. (None, None) for a model with no
    parameters or buffers."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    if t is None:
        return None, None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return t.device, t.dtype if t.is_floating_point() else torch.float32
    with torch.no_grad():
        out = emb(torch.zeros(1, 1, dtype=torch.long, device=t.device))
    return t.device, out.dtype


# --------------------------------------------------------------------------------------------
# PromptBank
# --------------------------------------------------------------------------------------------
class PromptBank(nn.Module):
    """E expert prefixes of P tokens for each injected layer, in the layout prefix_attention reads.

    keys, values: Parameters [len(inject_layers), E, P, Hkv, D]; lens: int32 buffer [E] (valid
    tokens per slot). `layer(l)` returns views of one layer, never copies.
    """

    def __init__(self, num_layers: int, inject_layers: Sequence[int], num_experts: int, prompt_len: int,
                 num_kv_heads: int, head_dim: int, dtype=torch.float32, device=None, init_std: float = 0.02,
                 layer_log_weight: Optional[float] = None):
        super().__init__()
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts),
                        ("prompt_len", prompt_len), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_layers, self.num_experts, self.prompt_len = num_layers, num_experts, prompt_len
        self.num_kv_heads, self.head_dim, self.init_std = num_kv_heads, head_dim, float(init_std)
        self.inject_layers = _check_layers("inject_layers", inject_layers, num_layers)
        self._pos = {l: i for i, l in enumerate(self.inject_layers)}
        shape = (len(self.inject_layers), num_experts, prompt_len, num_kv_heads, head_dim)
        self.keys = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.values = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.register_buffer("lens", torch.full((num_experts,), prompt_len, dtype=torch.int32, device=device))
        # An optional learnable log-weight per injected layer, added (through prefix_weight) to the
        # logits of every prefix key of that layer. Started low (e.g. -6) it makes a fresh bank a
        # near no-op on the frozen model (training then opens it); None = weight 1 (no parameter).
        self.layer_log_weight_init = None if layer_log_weight is None else float(layer_log_weight)
        self.layer_log_weight = None if layer_log_weight is None else nn.Parameter(
            torch.full((len(self.inject_layers),), float(layer_log_weight), dtype=torch.float32, device=device))

    def config(self) -> dict:
        return dict(num_layers=self.num_layers, inject_layers=self.inject_layers,
                    num_experts=self.num_experts, prompt_len=self.prompt_len,
                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    dtype=str(self.keys.dtype).replace("torch.", ""), init_std=self.init_std,
                    layer_log_weight=self.layer_log_weight_init)

    def prefix_weight(self, layer_idx: int, weight: Optional[torch.Tensor], index: torch.Tensor):
        """The prefix_weight [B, k] fp32 of layer `layer_idx` for requests whose slots are `index`
        [B, k]: the requests' expert weights (None = 1) times exp(layer_log_weight[layer]), or
        `weight` itself when the bank has no layer weights."""
        if self.layer_log_weight is None:
            return weight
        i = self._pos[int(layer_idx)]
        w = torch.ones(index.shape, dtype=torch.float32, device=index.device) if weight is None else weight
        return w * self.layer_log_weight[i].to(w.device).exp()

    def layer(self, layer_idx: int):
        """(prefix_k, prefix_v) [E, P, Hkv, D] views of layer `layer_idx`, or None if not injected."""
        i = self._pos.get(int(layer_idx))
        if i is None:
            return None
        return self.keys[i], self.values[i]

    @torch.no_grad()
    def set_slot(self, slot: int, layer_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
                 length: Optional[int] = None) -> None:
        """Load slot `slot`: layer_kv maps every injected layer to (k, v) [P', Hkv, D], P' <= P.

        Tokens past P' are zeroed; lens[slot] = length (default P'), which must be <= P'.
        """
        if not 0 <= int(slot) < self.num_experts:
            raise ValueError(f"slot must be in 0..{self.num_experts - 1}, got {slot}")
        extra = sorted(set(int(l) for l in layer_kv) - set(self.inject_layers))
        missing = sorted(set(self.inject_layers) - set(int(l) for l in layer_kv))
        if extra or missing:
            raise ValueError(f"layer_kv must give exactly the injected layers {self.inject_layers}: "
                             f"not injected {extra}, missing {missing}")
        plen = None
        for l, kv in layer_kv.items():
            if not isinstance(kv, (tuple, list)) or len(kv) != 2:
                raise ValueError(f"layer_kv[{l}] must be a pair (k, v)")
            for name, t in zip("kv", kv):
                if t.dim() != 3 or t.shape[1:] != (self.num_kv_heads, self.head_dim) \
                        or t.shape[0] > self.prompt_len:
                    raise ValueError(f"layer_kv[{l}] {name} must have shape (P' <= {self.prompt_len}, "
                                     f"Hkv={self.num_kv_heads}, D={self.head_dim}), got {tuple(t.shape)}")
            if kv[0].shape != kv[1].shape:
                raise ValueError(f"layer_kv[{l}]: k {tuple(kv[0].shape)} and v {tuple(kv[1].shape)} differ")
            if plen is not None and kv[0].shape[0] != plen:
                raise ValueError(f"layer_kv[{l}] has {kv[0].shape[0]} tokens, other layers {plen}")
            plen = kv[0].shape[0]
        length = plen if length is None else int(length)
        if not 0 <= length <= plen:
            raise ValueError(f"length must be in 0..{plen} (the tokens given), got {length}")
        for l, (k, v) in layer_kv.items():
            i = self._pos[int(l)]
            for dst, src in ((self.keys, k), (self.values, v)):
                dst[i, slot].zero_()
                dst[i, slot, :plen].copy_(src)
        self.lens[slot] = length

    def check_compatible(self, model) -> None:
        """Raise ValueError naming the first mismatch (layers, Hkv, head dim) with an HF model."""
        dims = model_dims(model)
        for name, mine, theirs in (("num_layers", self.num_layers, dims["num_layers"]),
                                   ("num_key_value_heads", self.num_kv_heads, dims["num_kv_heads"]),
                                   ("head_dim", self.head_dim, dims["head_dim"])):
            if mine != theirs:
                raise ValueError(f"prompt bank built for {name}={mine}, model has {name}={theirs}")

    def save(self, path: str) -> None:
        tensors = {"keys": self.keys, "values": self.values, "lens": self.lens}
        if self.layer_log_weight is not None:           # trained with the prompts: it is part of them
            tensors["layer_log_weight"] = self.layer_log_weight
        save_tensors(path, tensors, self.config())

    def check_lens(self) -> None:
        """Raise ValueError unless every lens value lies in [0, P]. The bank is where slot lengths
        enter (construction, set_slot, load), so prefix_attention need not read them back on the
        host at every layer (see its docstring); call this after writing `lens` by hand."""
        lo, hi = int(self.lens.min()), int(self.lens.max())
        if lo < 0 or hi > self.prompt_len:
            raise ValueError(f"prompt bank lens must lie in [0, prompt_len={self.prompt_len}], got [{lo}, {hi}]")

    FILE_ARGS = dict(num_layers=POS_INT, inject_layers=LAYERS, num_experts=POS_INT, prompt_len=POS_INT,
                     num_kv_heads=POS_INT, head_dim=POS_INT, dtype=FLOAT_DTYPE, init_std=NUMBER)
    FILE_OPTIONAL = dict(layer_log_weight=OPT_NUMBER)

    @staticmethod
    def file_tensors(cfg: dict) -> dict:
        n = len(cfg["inject_layers"])
        shape = (n, cfg["num_experts"], cfg["prompt_len"], cfg["num_kv_heads"], cfg["head_dim"])
        dt = _FLOAT_DTYPES[cfg["dtype"]]
        out = {"keys": (shape, dt), "values": (shape, dt), "lens": ((cfg["num_experts"],), "I32")}
        if cfg.get("layer_log_weight") is not None:
            out["layer_log_weight"] = ((n,), "F32")
        return out

    @classmethod
    def load(cls, path: str, device=None, dtype=None) -> "PromptBank":
        """The bank saved at `path`, on `device` in `dtype` (default: as saved). Give the model's
        activation dtype on a GPU (`model_placement`), or use MixtureOfPrompts.load(dir, model=...).
        The metadata (a whitelist of constructor arguments) and the tensors' shapes and dtypes are
        checked before anything is allocated, then finite values and lens <= P."""
        tensors, cfg = load_tensors(path, device, args=cls.FILE_ARGS, optional=cls.FILE_OPTIONAL,
                                    tensors=cls.file_tensors)
        _check_finite_tensors(path, tensors)
        cfg["dtype"] = getattr(torch, cfg["dtype"]) if dtype is None else dtype
        bank = cls(**cfg, device=device)
        bank.load_state_dict(tensors)          # copies (and casts) into the parameters
        bank.check_lens()
        return bank


# --------------------------------------------------------------------------------------------
# SmartGate
# --------------------------------------------------------------------------------------------
class SmartGate(nn.Module):
    """MoPs gate: masked mean of the hidden state after `gate_layer`, a 2-layer MLP, top-k.

    w1 [h, d], b1 [h], w2 [E, h], b2 [E]. forward -> (indices int32 [B, k], weights fp32 [B, k]).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, gate_layer: int,
                 gate_hidden: int = 256, activation: str = "gelu", weight_scale: float = 1.0):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts),
                        ("gate_hidden", gate_hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={num_experts}, got {top_k!r}")
        if not isinstance(gate_layer, int) or gate_layer < 0:
            raise ValueError(f"gate_layer must be a layer index >= 0, got {gate_layer!r}")
        if activation not in ACTIVATION_IDS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_IDS)}, got {activation!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.gate_layer, self.gate_hidden, self.activation = gate_layer, gate_hidden, activation
        # forward's weights are gate_topk's renormalised top-k weights times weight_scale: with
        # weight_scale = top_k a uniform gate gives every selected expert weight 1, i.e. the same
        # attention as one prompt made of the k experts' tokens (MoPs vs a k*P-token prompt).
        weight_scale = float(weight_scale)
        if not weight_scale > 0 or weight_scale == float("inf"):
            raise ValueError(f"weight_scale must be a finite number > 0, got {weight_scale!r}")
        self.weight_scale = weight_scale
        self.w1 = nn.Parameter(torch.randn(gate_hidden, hidden_size) * hidden_size ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(gate_hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, gate_hidden) * gate_hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(num_experts))

    def config(self) -> dict:
        return dict(hidden_size=self.hidden_size, num_experts=self.num_experts, top_k=self.top_k,
                    gate_layer=self.gate_layer, gate_hidden=self.gate_hidden, activation=self.activation,
                    weight_scale=self.weight_scale)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor):
        """hidden [B, T, d], mask [B, T] -> (indices int32 [B, k], weights fp32 [B, k]): gate_topk's
        weights (summing to 1) times weight_scale."""
        idx, w = gate_topk(hidden, mask, self.w1, self.b1, self.w2, self.b2, self.top_k,
                           activation=self.activation)
        return idx, (w if self.weight_scale == 1.0 else w * self.weight_scale)

    def scores(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The routing head's logits s [B, E] in fp32 (differentiable)."""
        return reference.gate_scores(hidden, mask, self.w1, self.b1, self.w2, self.b2,
                                     activation=self.activation)

    def routing_loss(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the scores against task labels [B] in 0..E-1 (gate pretraining)."""
        return F.cross_entropy(self.scores(hidden, mask), labels.long())

    def save(self, path: str) -> None:
        save_tensors(path, dict(self.state_dict()), self.config())

    FILE_ARGS = dict(hidden_size=POS_INT, num_experts=POS_INT, top_k=POS_INT, gate_layer=INDEX,
                     gate_hidden=POS_INT, activation=ACTIVATION)
    FILE_OPTIONAL = dict(weight_scale=POS_NUMBER)

    @staticmethod
    def file_tensors(cfg: dict) -> dict:
        d, h, E = cfg["hidden_size"], cfg["gate_hidden"], cfg["num_experts"]
        return {"w1": ((h, d), "F32"), "b1": ((h,), "F32"), "w2": ((E, h), "F32"), "b2": ((E,), "F32")}

    @classmethod
    def load(cls, path: str, device=None) -> "SmartGate":
        """A gate saved by `save`, checked like PromptBank.load before anything is allocated."""
        return _load_module(cls, path, device)


# --------------------------------------------------------------------------------------------
# InstructionPromptGenerator (IAPT)
# --------------------------------------------------------------------------------------------
class InstructionPromptGenerator(nn.Module):
    """IAPT: 4 soft tokens per injected layer, generated from the instruction's hidden states.

    Per injected layer (stacked on dim 0): w_down [d, m], w_sa [m, 4], a [6], b [4] (GELU
    initialisation of the rational activation), w_up [m, d].

    Options of the training recipe (off by default: files saved before them load unchanged):
    - normalize_input: `prefix()` feeds the generator the hidden states through the frozen layer's
      own input norm (the raw residual stream reaches |h| ~ 1e4 in middle layers, far outside the
      rational activation's GELU fit) and takes its soft tokens as points of that normalised space,
      straight into the layer's k/v projections (not normalised a second time: SPEC §4's norm is
      applied once, to the generator's input); drop_first_token leaves each row's first real token
      out of the pooling (the attention-sink position, whose hidden state dwarfs the others);
    - layer_log_weight: a learnable log-weight per injected layer on the generated prefix keys
      (`prefix_weight`), and up_init_std=0 (zero soft tokens: keys/values k_proj/v_proj(norm(0)),
      logit 0 + log-weight): together a fresh generator is a near no-op on the frozen model.
    """

    def __init__(self, hidden_size: int, num_layers: int, inject_layers: Sequence[int],
                 bottleneck: int = 64, num_tokens: int = 4, normalize_input: bool = False,
                 drop_first_token: bool = False, layer_log_weight: Optional[float] = None,
                 up_init_std: float = 0.02):
        super().__init__()
        if num_tokens != 4:
            raise ValueError(f"num_tokens must be 4 (the fused pooling kernel has 4 heads), got {num_tokens}")
        for name, v in (("hidden_size", hidden_size), ("num_layers", num_layers), ("bottleneck", bottleneck)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.hidden_size, self.num_layers, self.bottleneck, self.num_tokens = \
            hidden_size, num_layers, bottleneck, num_tokens
        self.inject_layers = _check_layers("inject_layers", inject_layers, num_layers)
        self.inject_from = self.inject_layers[0]
        self._pos = {l: i for i, l in enumerate(self.inject_layers)}
        n, d, m = len(self.inject_layers), hidden_size, bottleneck
        self.w_down = nn.Parameter(torch.randn(n, d, m) * d ** -0.5)
        self.w_sa = nn.Parameter(torch.randn(n, m, 4) * m ** -0.5)
        self.a = nn.Parameter(torch.tensor(reference.RATIONAL_GELU_A).repeat(n, 1))
        self.b = nn.Parameter(torch.tensor(reference.RATIONAL_GELU_B).repeat(n, 1))
        # Small soft tokens at start (0: none at all; the layer's norm would restore any small
        # scale to unit RMS, so only 0 or the layer log-weight keeps a fresh generator quiet).
        self.up_init_std = float(up_init_std)
        self.w_up = nn.Parameter(torch.randn(n, m, d) * self.up_init_std)
        self.normalize_input, self.drop_first_token = bool(normalize_input), bool(drop_first_token)
        self.layer_log_weight_init = None if layer_log_weight is None else float(layer_log_weight)
        self.layer_log_weight = None if layer_log_weight is None else nn.Parameter(
            torch.full((n,), float(layer_log_weight), dtype=torch.float32))

    def config(self) -> dict:
        return dict(hidden_size=self.hidden_size, num_layers=self.num_layers,
                    inject_layers=list(self.inject_layers), bottleneck=self.bottleneck,
                    normalize_input=self.normalize_input, drop_first_token=self.drop_first_token,
                    layer_log_weight=self.layer_log_weight_init, up_init_std=self.up_init_std)

    def prefix(self, layer_module: nn.Module, layer_idx: int, H: torch.Tensor, mask: torch.Tensor):
        """(k, v) [B, 4, Hkv, D] of layer `layer_idx` from the hidden states H [B, n, d] entering it
        and the instruction mask [B, n]: the options above, forward, then to_prefix."""
        if self.drop_first_token:
            m = mask.to(torch.int32)
            mask = (m * (m.cumsum(-1) > 1)).to(mask.dtype)
        if not self.normalize_input:
            return self.to_prefix(layer_module, self(layer_idx, H, mask))
        # The generator reads and writes the layer's normalised input space: its soft tokens go
        # straight to k_proj / v_proj (normalising them again would blow any small output up to
        # unit scale in an arbitrary direction: measured on SmolLM2, two steps from a zero
        # up-projection raised the loss by 5 nats).
        x = layer_module.input_layernorm(H)
        soft = self(layer_idx, x, mask).to(x.dtype)
        attn = layer_module.self_attn
        B, n, _ = soft.shape
        D = attn.head_dim
        return attn.k_proj(soft).view(B, n, -1, D), attn.v_proj(soft).view(B, n, -1, D)

    def prefix_weight(self, layer_idx: int, batch: int, device) -> Optional[torch.Tensor]:
        """prefix_weight [B, 1] fp32 of the generated slot at layer `layer_idx` (None = weight 1)."""
        if self.layer_log_weight is None:
            return None
        w = self.layer_log_weight[self._pos[int(layer_idx)]].to(device).exp()
        return w.reshape(1, 1).expand(batch, 1).contiguous()

    def forward(self, layer_idx: int, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """H [B, n, d] entering layer `layer_idx`, mask [B, n] -> soft tokens [B, 4, d] (H's dtype)."""
        i = self._pos.get(int(layer_idx))
        if i is None:
            raise ValueError(f"layer_idx={layer_idx} is not one of the injected layers {self.inject_layers}")
        if H.dim() != 3 or H.shape[-1] != self.hidden_size:
            raise ValueError(f"H must have shape (B, n, d={self.hidden_size}), got {tuple(H.shape)}")
        return iapt_generate(H, mask, self.w_down[i], self.w_sa[i], self.a[i], self.b[i], self.w_up[i])

    @staticmethod
    def to_prefix(layer_module: nn.Module, soft: torch.Tensor):
        """Soft tokens [B, 4, d] -> (k, v) [B, 4, Hkv, D] through the frozen layer's input norm and
        k/v projections, unrotated (a per-request pool: E = B, index = arange(B)[:, None])."""
        attn = getattr(layer_module, "self_attn", None)
        norm = getattr(layer_module, "input_layernorm", None)
        if attn is None or norm is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise ValueError("layer_module must be a decoder layer with input_layernorm and "
                             "self_attn.k_proj / v_proj (Llama family)")
        B, n, _ = soft.shape
        x = norm(soft.to(getattr(norm, "weight", soft).dtype))     # the frozen layer's dtype
        D = attn.head_dim
        return attn.k_proj(x).view(B, n, -1, D), attn.v_proj(x).view(B, n, -1, D)

    FILE_ARGS = dict(hidden_size=POS_INT, num_layers=POS_INT, inject_layers=LAYERS, bottleneck=POS_INT)
    FILE_OPTIONAL = dict(normalize_input=BOOL, drop_first_token=BOOL, layer_log_weight=OPT_NUMBER,
                         up_init_std=NUMBER)

    @staticmethod
    def file_tensors(cfg: dict) -> dict:
        n, d, m = len(cfg["inject_layers"]), cfg["hidden_size"], cfg["bottleneck"]
        out = {"w_down": ((n, d, m), "F32"), "w_sa": ((n, m, 4), "F32"), "a": ((n, 6), "F32"),
               "b": ((n, 4), "F32"), "w_up": ((n, m, d), "F32")}
        if cfg.get("layer_log_weight") is not None:
            out["layer_log_weight"] = ((n,), "F32")
        return out

    def save(self, path: str) -> None:
        save_tensors(path, dict(self.state_dict()), self.config())

    @classmethod
    def load(cls, path: str, device=None) -> "InstructionPromptGenerator":
        """A generator saved by `save`, checked like PromptBank.load before anything is allocated."""
        return _load_module(cls, path, device)

    def check_compatible(self, model) -> None:
        dims = model_dims(model)
        if dims["num_layers"] != self.num_layers:
            raise ValueError(f"prompt generator built for {self.num_layers} layers, model has {dims['num_layers']}")
        if dims["hidden_size"] != self.hidden_size:
            raise ValueError(f"prompt generator built for hidden size {self.hidden_size}, model has "
                             f"{dims['hidden_size']}")


# --------------------------------------------------------------------------------------------
# MixtureOfPrompts
# --------------------------------------------------------------------------------------------
class MixtureOfPrompts(nn.Module):
    """A PromptBank of E experts injected at layers >= inject_from, chosen per request by a
    SmartGate reading the hidden state after gate_layer (< inject_from)."""

    def __init__(self, bank: PromptBank, gate: SmartGate, inject_from: int, position_offset: int = 0):
        super().__init__()
        if gate is not None:
            if inject_from <= gate.gate_layer:
                raise ValueError(f"inject_from={inject_from} must be > gate_layer={gate.gate_layer}")
            if gate.num_experts != bank.num_experts:
                raise ValueError(f"gate has {gate.num_experts} experts, bank has {bank.num_experts}")
        below = [l for l in bank.inject_layers if l < inject_from]
        if below:
            raise ValueError(f"bank injects layers {below} below inject_from={inject_from}")
        self.bank, self.gate = bank, gate
        self.inject_from = int(inject_from)
        self.position_offset = int(position_offset)     # PEFT prefix-tuning positions (SPEC §5)

    gate_layer = property(lambda self: None if self.gate is None else self.gate.gate_layer)
    top_k = property(lambda self: None if self.gate is None else self.gate.top_k)
    num_experts = property(lambda self: self.bank.num_experts)
    prompt_len = property(lambda self: self.bank.prompt_len)

    @classmethod
    def for_model(cls, model, num_experts: int = 8, prompt_len: int = 16, top_k: int = 2,
                  gate_layer: int = 10, inject_from: int = 11, gate_hidden: int = 256,
                  dtype=None) -> "MixtureOfPrompts":
        """A fresh bank + gate sized for an HF model (experts at every layer >= inject_from), on the
        model's device; the bank in the model's activation dtype (`model_placement`; `dtype`
        overrides), as prefix_attention needs. The gate stays fp32: gate_topk accumulates in fp32
        and reads a hidden state of any float dtype."""
        dims = model_dims(model)
        L = dims["num_layers"]
        if not isinstance(gate_layer, int) or not 0 <= gate_layer < L:
            raise ValueError(f"gate_layer must be in 0..{L - 1} (the model has {L} layers), got {gate_layer!r}")
        if not isinstance(inject_from, int) or not gate_layer < inject_from < L:
            raise ValueError(f"inject_from must be > gate_layer={gate_layer} and < {L} layers, got {inject_from!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={num_experts}, got {top_k!r}")
        device, act_dtype = model_placement(model)
        bank = PromptBank(L, range(inject_from, L), num_experts, prompt_len, dims["num_kv_heads"],
                          dims["head_dim"], dtype=dtype or act_dtype or torch.float32, device=device)
        gate = SmartGate(dims["hidden_size"], num_experts, top_k, gate_layer, gate_hidden).to(device)
        return cls(bank, gate, inject_from)

    @classmethod
    def from_peft(cls, model, dirs, **kwargs) -> "MixtureOfPrompts":
        """Slots from PEFT prefix-tuning adapters (slot i = dirs[i]): `mops_kernels.from_peft`, which
        lives with the other PEFT readers in integrations (modules never import integrations)."""
        import mops_kernels
        return mops_kernels.from_peft(model, dirs, **kwargs)

    def check_compatible(self, model) -> None:
        """Raise ValueError naming the first mismatch between this bank/gate and `model`."""
        self.bank.check_compatible(model)
        dims = model_dims(model)
        if self.gate is not None:
            if self.gate.hidden_size != dims["hidden_size"]:
                raise ValueError(f"gate built for hidden_size={self.gate.hidden_size}, model has "
                                 f"hidden_size={dims['hidden_size']}")
            if self.gate.gate_layer >= dims["num_layers"]:
                raise ValueError(f"gate_layer={self.gate.gate_layer} but the model has {dims['num_layers']} layers")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.bank.save(os.path.join(directory, "bank.safetensors"))
        if self.gate is not None:
            self.gate.save(os.path.join(directory, "gate.safetensors"))
        with open(os.path.join(directory, "mops.json"), "w") as f:
            json.dump(dict(inject_from=self.inject_from, position_offset=self.position_offset,
                           has_gate=self.gate is not None), f)

    @classmethod
    def load(cls, directory: str, device=None, dtype=None, model=None) -> "MixtureOfPrompts":
        """The prompts saved by `save(directory)`. With `model`: on its device, the bank in its
        activation dtype (what attach/Engine need; `device`/`dtype` override), and checked against
        it (ValueError naming the mismatch). Without: as saved, on `device`."""
        with open(os.path.join(directory, "mops.json")) as f:
            meta = json.load(f)
        for name, (what, ok) in (("inject_from", INDEX), ("position_offset", INDEX)):
            if name in meta and not ok(meta[name]):
                raise ValueError(f"{directory}/mops.json: {name} must be {what}, got {meta[name]!r}")
        if "inject_from" not in meta:
            raise ValueError(f"{directory}/mops.json: no inject_from")
        if model is not None:
            m_device, m_dtype = model_placement(model)
            device, dtype = device or m_device, dtype or m_dtype
        bank = PromptBank.load(os.path.join(directory, "bank.safetensors"), device=device, dtype=dtype)
        gate = SmartGate.load(os.path.join(directory, "gate.safetensors"), device=device) \
            if meta.get("has_gate", True) else None
        prompts = cls(bank, gate, meta["inject_from"], meta.get("position_offset", 0))
        if model is not None:
            prompts.check_compatible(model)
        return prompts

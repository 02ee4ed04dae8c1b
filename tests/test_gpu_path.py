"""The GPU path, proven on the CPU (issue 10, item 1): prompt pools in the model's activation dtype
and on its device, validate() naming a misplaced tensor, and a decode attention call that reads no
value back on the host (so it can run inside a CUDA graph, with no device sync per layer).

A 4-bit backbone on a GPU computes in bf16 (load_backbone's default there); here the same tiny
random-config backbone is loaded twice on the CPU, in bf16 and in fp32, and the bf16 run through
for_model -> attach -> generate() and the Engine must match the fp32 run within bf16 tolerance.
"""
import copy

import pytest
import torch

import mops_kernels
from _hf_doubles import left_padded
from mops_kernels.modules.prompts import InstructionPromptGenerator, MixtureOfPrompts, model_placement
from mops_kernels.ops import prefix_attention as PA
from conftest import requires_cuda
from utils import rel_err

CFG = dict(vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
           num_attention_heads=6, num_key_value_heads=2, head_dim=16, pad_token_id=0,
           max_position_embeddings=256, initializer_range=0.3)
GEN = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def backbones():
    """The same int4 weights (seeded), activations in bf16 and in fp32."""
    m16, _ = mops_kernels.load_backbone(config=CFG, dtype=torch.bfloat16)
    m32, _ = mops_kernels.load_backbone(config=CFG, dtype=torch.float32)
    return m16, m32


def _mops_pair(m16, m32):
    torch.manual_seed(11)
    p16 = MixtureOfPrompts.for_model(m16, num_experts=5, prompt_len=7, top_k=2, gate_layer=1, inject_from=2)
    with torch.no_grad():
        p16.bank.keys.mul_(100)          # prefixes that move the logits far more than bf16 noise
        p16.bank.values.mul_(500)        # (init_std is 0.02)
        p16.bank.lens.copy_(torch.tensor([7, 5, 7, 3, 6], dtype=torch.int32))
    p32 = MixtureOfPrompts.for_model(m32, num_experts=5, prompt_len=7, top_k=2, gate_layer=1, inject_from=2)
    p32.load_state_dict(p16.state_dict())      # the same values, fp32 bank
    return p16.eval(), p32.eval()


def _first_scores(model, ids, mask, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, output_scores=True,
                         return_dict_in_generate=True, **GEN, **kw)
    return out.scores[0].float()


def test_placement_follows_the_model(backbones, tmp_path):
    m16, m32 = backbones
    assert model_placement(m16) == (torch.device("cpu"), torch.bfloat16)
    assert model_placement(m32) == (torch.device("cpu"), torch.float32)
    p16, p32 = _mops_pair(m16, m32)
    assert p16.bank.keys.dtype == p16.bank.values.dtype == torch.bfloat16
    assert p32.bank.keys.dtype == torch.float32 and p16.bank.lens.dtype == torch.int32
    assert p16.gate.w1.dtype == torch.float32          # the gate accumulates in fp32 anyway
    p32.save(str(tmp_path))                             # saved fp32 ...
    back = MixtureOfPrompts.load(str(tmp_path), model=m16)
    assert back.bank.keys.dtype == torch.bfloat16       # ... loaded in the model's dtype
    assert torch.equal(back.bank.keys, p32.bank.keys.bfloat16())
    assert torch.equal(back.bank.lens, p16.bank.lens)
    assert MixtureOfPrompts.load(str(tmp_path)).bank.keys.dtype == torch.float32   # as saved
    with torch.no_grad():
        p32.bank.lens[0] = 9                            # > prompt_len: refused where it enters
    p32.save(str(tmp_path))
    with pytest.raises(ValueError, match="lens"):
        MixtureOfPrompts.load(str(tmp_path))


def test_bf16_generate_matches_fp32(backbones):
    m16, m32 = [copy.deepcopy(m) for m in backbones]
    p16, p32 = _mops_pair(m16, m32)
    ids, mask = left_padded(B=3, T=9, pads=(3, 0, 1), seed=4)
    plain16, plain32 = _first_scores(m16, ids, mask), _first_scores(m32, ids, mask)
    base = rel_err(plain16, plain32)                    # the backbone's own bf16 error
    mops_kernels.attach(m16, p16)
    mops_kernels.attach(m32, p32)
    idx = torch.tensor([[0, 3], [2, -1], [4, 1]])
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
    s16 = _first_scores(m16, ids, mask, expert_index=idx, expert_weight=w)
    s32 = _first_scores(m32, ids, mask, expert_index=idx, expert_weight=w)
    assert rel_err(s32, plain32) > 5 * base             # the prefixes matter at this tolerance
    assert not torch.isnan(s16).any()
    assert rel_err(s16, s32) <= 2 * base + 1e-5, (rel_err(s16, s32), base)
    # the gate path (fp32 gate on a bf16 hidden state) decodes several steps in bf16
    out = m16.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **GEN)
    assert out.shape == (3, 9 + 5)
    mops_kernels.detach(m16)
    mops_kernels.detach(m32)


def _decidable_rows(a16, a32, ids, mask, idx, w):
    """(rows, fp32 first tokens) of the rows whose fp32 argmax wins by more than the bf16 run's error
    there: on those bf16 tolerance implies the same first token (random-weight logits are close on
    the others). a16 may live on a GPU; a32 is the fp32 CPU model."""
    dev = next(a16.parameters()).device
    rows, first = [], []
    for b in range(ids.shape[0]):
        kw = dict(expert_index=torch.tensor(idx), expert_weight=torch.tensor(w))
        s16 = _first_scores(a16, ids[b:b + 1].to(dev), mask[b:b + 1].to(dev),
                            **{k: v.to(dev) for k, v in kw.items()})[0].cpu()
        s32 = _first_scores(a32, ids[b:b + 1], mask[b:b + 1], **kw)[0]
        assert rel_err(s16, s32) < 0.1, b
        top = s32.topk(2).values
        if top[0] - top[1] > 2 * (s16 - s32).abs().max():
            rows.append(b)
            first.append(int(s32.argmax()))
    assert len(rows) >= 2, rows
    return rows, first


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_bf16_engine_matches_fp32(backbones, device):
    """The bf16 backbone (load_backbone's default on a GPU) with pools placed by for_model: generate()
    and the Engine give the fp32 run's first tokens. On a GPU the Engine decodes through its CUDA
    graph (prefix_attention captured: no host read) and must not fall back to eager."""
    m16, m32 = backbones
    if device == "cuda":
        m16, _ = mops_kernels.load_backbone(config=CFG, device="cuda")
        assert model_placement(m16) == (torch.device("cuda", 0), torch.bfloat16)
    p16, p32 = _mops_pair(m16, m32)
    assert p16.bank.keys.device.type == p16.gate.w1.device.type == device
    ids, mask = left_padded(B=5, T=8, pads=(0,) * 5, seed=6)
    idx, w = [[1, 4]], [[0.6, 0.4]]
    a16, a32 = copy.deepcopy(m16), copy.deepcopy(m32)
    mops_kernels.attach(a16, p16)
    mops_kernels.attach(a32, p32)
    rows, first = _decidable_rows(a16, a32, ids, mask, idx, w)
    eng = mops_kernels.Engine(m16, p16, max_batch=2, max_len=32, eos_token_id=[])   # run 4 tokens
    reqs = [eng.submit(ids[b], expert_index=idx[0], expert_weight=w[0], max_new_tokens=4) for b in rows]
    eng.run_until_done()
    assert [r.tokens[0] for r in reqs] == first
    assert all(r.done and len(r.tokens) == 4 for r in reqs)
    if device == "cuda":
        assert eng.use_graph, "the Engine fell back to eager decoding (its CUDA graph capture failed)"


def test_bf16_iapt_prefixes_take_the_layer_dtype(backbones, monkeypatch):
    m16, _ = backbones
    gen = InstructionPromptGenerator(CFG["hidden_size"], CFG["num_hidden_layers"], [2, 3], bottleneck=16)
    model = copy.deepcopy(m16)
    mops_kernels.attach(model, gen)
    ids, mask = left_padded(B=2, T=7, pads=(2, 0), seed=8)
    seen = []
    orig = mops_kernels.prefix_attention

    def spy(q, k, v, pk, *a, **kw):
        if pk is not None:
            seen.append((q.dtype, pk.dtype))
        return orig(q, k, v, pk, *a, **kw)
    monkeypatch.setattr(mops_kernels, "prefix_attention", spy)     # what attention.py calls
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **GEN)
    assert out.shape == (2, 10)
    assert len(seen) == 2 * 3 and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)


def test_validate_names_a_misplaced_tensor(backbones):
    m16, m32 = backbones
    p16, p32 = _mops_pair(m16, m32)
    model = copy.deepcopy(m16)
    with pytest.raises(ValueError, match=r"prompt bank keys of layer 2 is torch.float32.*bfloat16"):
        mops_kernels.attach(model, p32)
    with pytest.raises(ValueError, match=r"prompt bank keys of layer 2 is torch.float32.*bfloat16"):
        mops_kernels.Engine(model, p32, max_batch=1, max_len=16)
    meta = copy.deepcopy(p16)
    meta.gate.to("meta")
    with pytest.raises(ValueError, match=r"gate tensor 'w1' is on meta, the model is on cpu"):
        mops_kernels.attach(model, meta)
    meta = copy.deepcopy(p16)
    meta.bank.to("meta")
    with pytest.raises(ValueError, match=r"prompt bank keys of layer 2 is on meta"):
        mops_kernels.attach(model, meta)
    gen = InstructionPromptGenerator(CFG["hidden_size"], CFG["num_hidden_layers"], [3], bottleneck=8).to("meta")
    with pytest.raises(ValueError, match=r"prompt generator tensor 'w_down' is on meta"):
        mops_kernels.attach(model, gen)
    assert getattr(model, "_mops_attached", None) is None
    mops_kernels.attach(model, p16)                     # the right placement is accepted


# ---- prefix_attention: no host read on the decode path ------------------------------------------
def _decode_inputs(dtype=torch.bfloat16, B=3, Hq=6, Hkv=2, S=13, D=16, E=5, P=7, kk=2):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    idx = torch.tensor([[0, 4], [2, -1], [3, 3]], dtype=torch.int32)
    w = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    lens = torch.tensor([7, 5, 1, 6, 0], dtype=torch.int32)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :4] = 0
    return r(B, Hq, 1, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(E, P, Hkv, D), r(E, P, Hkv, D), idx, w, lens, mask


class HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Every way Python reads a tensor's value back raises (a device sync on a GPU)."""
    def arm():
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
            def boom(self, *a, _n=name, **k):
                raise HostRead(f"host read: Tensor.{_n}")
            monkeypatch.setattr(torch.Tensor, name, boom)
    return arm


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_decode_reads_no_value_on_the_host(backend, force_backend, no_host_reads):
    if backend == "cpu" and not mops_kernels._backend.ext_has("prefix_attention_cpu"):
        pytest.skip("the compiled extension has no CPU prefix_attention kernel")
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, mask = _decode_inputs()
    with torch.no_grad():
        want = PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask,
                                   causal=False)
    ref = mops_kernels.reference.prefix_attention(q.float(), k.float(), v.float(), pk.float(), pv.float(),
                                                  idx, w, prefix_lens=lens, attention_mask=mask, causal=False)
    assert rel_err(want, ref) < 2e-2
    no_host_reads()
    with torch.no_grad():                               # the serving path: values validated upstream
        got = PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask,
                                  causal=False)
    assert torch.equal(got, want)
    with pytest.raises(HostRead):                       # grad on: the op checks values itself
        PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask, causal=False)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_unchecked_bad_values_never_read_out_of_bounds(backend, force_backend):
    if backend == "cpu" and not mops_kernels._backend.ext_has("prefix_attention_cpu"):
        pytest.skip("the compiled extension has no CPU prefix_attention kernel")
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, mask = _decode_inputs()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="prefix_index"):
            PA.prefix_attention(q, k, v, pk, pv, idx.clone().fill_(5), w, prefix_lens=lens)
        with pytest.raises(RuntimeError, match="prefix_lens"):
            PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens + 3)
    with pytest.raises(ValueError, match="^prefix_index out of range"):
        PA.prefix_attention(q, k, v, pk, pv, idx.clone().fill_(5), w, prefix_lens=lens)


def test_harmless_values_on_the_gpu_path():
    """What a GPU call without host checks hands the kernels: no slot past the pool, lens <= P."""
    idx = torch.tensor([[0, 5], [-1, 9], [-3, 4]], dtype=torch.int32)
    lens = torch.tensor([7, -2, 12, 3, 0], dtype=torch.int32)
    i2, l2 = PA.harmless_values(idx, lens, E=5, P=7)
    assert i2.dtype == torch.int32 and i2.tolist() == [[0, -1], [-1, -1], [-3, 4]]
    assert l2.tolist() == [7, 0, 7, 3, 0]


def test_expert_index_checked_where_it_enters(backbones):
    m16, m32 = backbones
    p16, _ = _mops_pair(m16, m32)
    model = copy.deepcopy(m16)
    mops_kernels.attach(model, p16)
    ids, mask = left_padded(B=2, T=5, pads=(1, 0), seed=2)
    with pytest.raises(ValueError, match=r"^expert_index out of range"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                       expert_index=torch.tensor([[5], [0]]), **GEN)
    with pytest.raises(ValueError, match=r"^expert_weight must be finite and >= 0"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                       expert_index=torch.tensor([[1], [0]]), expert_weight=torch.tensor([[-1.0], [1.0]]), **GEN)



@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_decode_is_captured_in_a_graph(backend, force_backend):
    """No host read on the GPU decode path: the public op is captured in a CUDA graph and its replay
    equals the eager call; an out-of-range slot (unchecked there) reads as an empty one, never
    outside the pool."""
    if backend == "cuda" and not mops_kernels._backend.extension_has_cuda():
        pytest.skip("the compiled extension has no CUDA kernels")
    force_backend(backend)
    q, k, v, pk, pv, idx, w, lens, mask = [t.cuda() for t in _decode_inputs(D=64)]
    with torch.no_grad():
        want = PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = PA.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
        bad, empty = idx.clone(), idx.clone()
        bad[0, 0], empty[0, 0] = 99, -1          # row 0's first slot: expert 0 (7 tokens, weight 0.2)
        got = PA.prefix_attention(q, k, v, pk, pv, bad, w, prefix_lens=lens, attention_mask=mask)
        assert torch.equal(got, PA.prefix_attention(q, k, v, pk, pv, empty, w, prefix_lens=lens,
                                                    attention_mask=mask))
        assert not torch.equal(got[0], want[0]) and torch.equal(got[1:], want[1:])

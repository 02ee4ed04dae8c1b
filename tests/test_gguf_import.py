"""GGUF import: block repacking is lossless (vs the gguf package's own dequantisation), Q/K rows
un-permuted as transformers does, and bad files fail with a message naming the file."""
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mops_kernels.integrations.gguf_import import (GGUFImportError, hf_name, import_tensor,  # noqa: E402
                                                   import_weights, read_gguf, rope_row_permutation)

Q = gguf.GGMLQuantizationType
TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=96, layers=2, vocab=97)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to attn_q / attn_k rows (the inverse of ours)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, arch="llama", types=None, seed=0, extra_tensor=None, dims=TINY):
    """A tiny random Llama GGUF: layer 0 Q4_0, layer 1 Q4_1 (attn_v of layer 1 F16), embedding Q8_0.

    Returns {hf_name: float32 weight as the HF model must see it}.
    """
    rng = np.random.default_rng(seed)
    d, nh, nkv, f, L, V = (dims[k] for k in ("hidden", "heads", "kv_heads", "ffn", "layers", "vocab"))
    hd = d // nh
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    expect = {}

    def add(name, arr, qtype):
        arr = arr.astype(np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float16 if qtype == Q.F16 else np.float32))
            deq = arr.astype(np.float16).astype(np.float32) if qtype == Q.F16 else arr
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            deq = gguf.quants.dequantize(data, qtype)
        return deq

    shapes = {"attn_q": (nh * hd, d), "attn_k": (nkv * hd, d), "attn_v": (nkv * hd, d),
              "attn_output": (d, nh * hd), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    expect["model.embed_tokens.weight"] = add("token_embd.weight", rng.standard_normal((V, d)) * 0.5, Q.Q8_0)
    for i in range(L):
        for key, shape in shapes.items():
            qtype = (types or {}).get((i, key), Q.Q4_0 if i == 0 else Q.Q4_1)
            if (i, key) == (1, "attn_v") and not types:
                qtype = Q.F16
            hf = rng.standard_normal(shape).astype(np.float32) * 0.2
            stored = hf
            if key in ("attn_q", "attn_k"):
                stored = _llama_cpp_permute(hf, nh if key == "attn_q" else nkv)
            deq = add(f"blk.{i}.{key}.weight", stored, qtype)
            if key in ("attn_q", "attn_k"):
                deq = deq[rope_row_permutation(deq.shape[0], nh if key == "attn_q" else nkv)]
            expect[hf_name(f"blk.{i}.{key}.weight")] = deq
        for key in ("attn_norm", "ffn_norm"):
            expect[hf_name(f"blk.{i}.{key}.weight")] = add(f"blk.{i}.{key}.weight",
                                                           1 + 0.1 * rng.standard_normal(d), Q.F32)
    expect["model.norm.weight"] = add("output_norm.weight", 1 + 0.1 * rng.standard_normal(d), Q.F32)
    if extra_tensor is not None:
        add(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.mark.slow
def test_default_file_import_is_exact():
    """All 211 quantized tensors of the shipped Q4_1 file: dequantize() == gguf's, bit for bit."""
    from mops_kernels.integrations.backbone import default_gguf_path

    ckpt = read_gguf(default_gguf_path())
    weights = import_weights(ckpt)
    nh, nkv = ckpt.config["num_attention_heads"], ckpt.config["num_key_value_heads"]
    n = 0
    for name, t in ckpt.tensors.items():
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in name:
            ref = ref[rope_row_permutation(ref.shape[0], nh)]
        elif ".attn_k." in name:
            ref = ref[rope_row_permutation(ref.shape[0], nkv)]
        ours = weights[hf_name(name)]
        if t.tensor_type.name == "F32":
            assert torch.equal(ours, torch.from_numpy(np.array(ref))), name
            continue
        got = ours.dequantize().numpy()
        assert got.shape == ref.shape and np.array_equal(got, ref), name
        n += 1
    assert n == 211
    assert weights["model.embed_tokens.weight"].bits == 8
    assert ckpt.config["num_hidden_layers"] == 30 and ckpt.config["hidden_size"] == 576
    assert ckpt.config["rope_parameters"]["rope_theta"] == 100000.0


def test_tiny_mixed_types_exact(tmp_path):
    """Q4_0 (scale d, min -8d), Q4_1, Q8_0, F16 and F32 tensors, permuted Q/K, against gguf."""
    path = tmp_path / "tiny.gguf"
    expect = write_tiny_gguf(path)
    ckpt = read_gguf(str(path))
    weights = import_weights(ckpt)
    assert set(weights) == set(expect)
    for name, ref in expect.items():
        got = weights[name]
        got = got.dequantize() if not isinstance(got, torch.Tensor) else got
        assert np.array_equal(got.numpy(), ref), name
    assert weights["model.layers.0.self_attn.q_proj.weight"].bits == 4
    assert isinstance(weights["model.layers.1.self_attn.v_proj.weight"], torch.Tensor)
    assert ckpt.config["vocab_size"] == TINY["vocab"] and ckpt.config["tie_word_embeddings"]


def test_repack_layout_single_block():
    """One hand-made Q4_1 block: byte j of GGUF holds elements j (low) and j+16 (high)."""
    codes = np.arange(32) % 16
    qs = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([0.5], np.float16).view(np.uint8),
                            np.array([-1.0], np.float16).view(np.uint8), qs]).reshape(1, 20)

    class T:  # the two fields of a gguf ReaderTensor that import_tensor reads
        name, tensor_type, shape, data = "blk.0.ffn_up.weight", Q.Q4_1, [32, 1], block
    qw = import_tensor(T)
    assert qw.unpack().tolist() == [codes.tolist()]
    assert torch.equal(qw.dequantize()[0], torch.tensor(codes * 0.5 - 1.0, dtype=torch.float32))


def test_rope_permutation_inverts_llama_cpp():
    w = np.arange(24 * 3).reshape(24, 3)
    for n_head in (1, 2, 3):
        assert np.array_equal(_llama_cpp_permute(w, n_head)[rope_row_permutation(24, n_head)], w)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(str(tmp_path / "nope.gguf"))


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(GGUFImportError, match="broken.gguf.*not a readable GGUF"):
        read_gguf(str(path))
    good = tmp_path / "cut.gguf"
    write_tiny_gguf(good)
    good.write_bytes(good.read_bytes()[:-1000])       # truncated tensor data
    with pytest.raises(GGUFImportError, match="cut.gguf"):
        read_gguf(str(good))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(GGUFImportError, match="gpt2.gguf.*unsupported architecture 'gpt2'"):
        read_gguf(str(path))


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    write_tiny_gguf(path, types={(0, "ffn_up"): Q.Q5_0})
    with pytest.raises(GGUFImportError, match="q5.gguf.*blk.0.ffn_up.weight.*Q5_0"):
        read_gguf(str(path))


def test_unexpected_tensor_name(tmp_path):
    path = tmp_path / "extra.gguf"
    write_tiny_gguf(path, extra_tensor=("blk.0.mystery.weight", np.ones((4, 32)), Q.F32))
    with pytest.raises(GGUFImportError, match="extra.gguf.*blk.0.mystery.weight"):
        import_weights(read_gguf(str(path)))

"""gate_topk (SPEC §2) on the Triton backend (TRITON_INTERPRET=1 here) against the fp32 reference."""
import pytest
import torch

from mops_kernels import reference
from mops_kernels.ops.gate_topk import gate_topk
from utils import HAS_NVIDIA_BACKEND, compile_for_sm90, rel_err

ACTS = sorted(reference.ACTIVATIONS)


def _inputs(B, T, d, h, E, dtype=torch.float32, p_keep=0.6):
    hidden = torch.randn(B, T, d, dtype=dtype)
    mask = (torch.rand(B, T) < p_keep).to(torch.int64)
    w1 = torch.randn(h, d) / d ** 0.5
    b1 = torch.randn(h) * 0.1
    w2 = torch.randn(E, h) / h ** 0.5 * 3      # spread the scores so top-k is well separated
    b2 = torch.randn(E) * 0.1
    return hidden, mask, w1, b1, w2, b2


def _grads(outw, params, g):
    return torch.autograd.grad((outw * g).sum(), params)


@pytest.mark.parametrize("B,T,d,h,E,k,act", [
    (3, 37, 37, 19, 5, 2, "gelu"),
    (2, 11, 576, 40, 64, 7, "gelu_tanh"),
    (17, 5, 64, 16, 8, 8, "relu"),          # k = E: dense mixing; B > BLOCK_B: two programs
    (4, 37, 37, 19, 9, 1, "silu"),
    (1, 3, 33, 21, 3, 3, "tanh"),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4)])
def test_forward_backward_matches_reference(force_backend, B, T, d, h, E, k, act, dtype, tol):
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(B, T, d, h, E, dtype)
    params = [t.requires_grad_() for t in (hidden, w1, b1, w2, b2)]
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=act)
    ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=act)
    assert idx.dtype == torch.int32 and idx.shape == (B, k)
    assert w.dtype == torch.float32 and w.shape == (B, k)
    assert torch.equal(idx, ridx)
    assert not torch.isnan(w).any()
    assert rel_err(w, rw) <= tol
    assert torch.all(w[:, :-1] >= w[:, 1:])                 # sorted descending
    assert torch.allclose(w.sum(-1), torch.ones(B), atol=1e-6)
    g = torch.randn(B, k)
    for name, got, want in zip(("hidden", "w1", "b1", "w2", "b2"), _grads(w, params, g),
                               _grads(rw, params, g)):
        assert not torch.isnan(got).any(), name
        assert rel_err(got, want) <= tol or (want.norm() < 1e-6 and got.norm() < 1e-5), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden(force_backend, dtype):
    """bf16/fp16 hidden: pooled in fp32 by both, so the result matches the reference closely."""
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(3, 37, 37, 19, 6, dtype)
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, 3)
    ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, 3)
    assert torch.equal(idx, ridx)
    assert rel_err(w, rw) <= 1e-4


def test_exact_ties_lower_index_first(force_backend):
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(4, 9, 37, 19, 8)
    # Slots 1, 4 and 6 are exact copies: their scores, and so their probabilities, tie exactly.
    w2[4] = w2[1]
    w2[6] = w2[1]
    b2[4] = b2[1]
    b2[6] = b2[1]
    b2[1] += 10.0
    b2[4] += 10.0
    b2[6] += 10.0        # make the tied triple the top three for every request
    for k in (1, 2, 3, 4):
        idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, k)
        ridx, _ = reference.gate_topk(hidden, mask, w1, b1, w2, b2, k)
        assert torch.equal(idx, ridx)
        assert idx[:, : min(k, 3)].tolist() == [[1, 4, 6][: min(k, 3)]] * 4


def test_all_tied_scores(force_backend):
    """w2 = 0 and b2 constant: every slot ties; indices must be 0..k-1, weights 1/k."""
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(3, 7, 37, 19, 10)
    w2.zero_()
    b2.fill_(0.3)
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.allclose(w, torch.full((3, 4), 0.25))


def test_few_tokens_and_empty_mask_row(force_backend):
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(4, 37, 37, 19, 7)
    mask.zero_()
    mask[0, 36] = 1            # one token, at the end
    mask[2, 0] = 1
    mask[2, 17] = 1            # two tokens
    # rows 1 and 3: no token at all -> z = 0, scores = w2 act(b1) + b2
    hidden.requires_grad_()
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, 3)
    ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, 3)
    assert torch.equal(idx, ridx)
    assert rel_err(w, rw) <= 1e-4
    assert torch.equal(idx[1], idx[3])
    z0 = torch.zeros(1, 1, 37)
    zidx, _ = reference.gate_topk(z0, torch.ones(1, 1), w1, b1, w2, b2, 3)
    assert torch.equal(idx[1], zidx[0])
    g = torch.randn(4, 3)
    (dh,) = torch.autograd.grad((w * g).sum(), [hidden])
    (rdh,) = torch.autograd.grad((rw * g).sum(), [hidden])
    assert rel_err(dh, rdh) <= 1e-4
    assert dh[1].abs().max() == 0 and dh[0, :36].abs().max() == 0


def test_non_contiguous_hidden(force_backend):
    force_backend("triton")
    base = torch.randn(3, 37, 80)
    hidden = base[:, :, 5:42]                        # d = 37, stride(1) = 80
    _, mask, w1, b1, w2, b2 = _inputs(3, 37, 37, 19, 6)
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, 2)
    ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, 2)
    assert torch.equal(idx, ridx) and rel_err(w, rw) <= 1e-4


@pytest.mark.parametrize("change,name", [
    (dict(k=6), "k"), (dict(k=0), "k"),
    (dict(mask=torch.ones(3, 5)), "mask"),
    (dict(w1=torch.randn(19, 36)), "w1"),
    (dict(b1=torch.randn(18)), "b1"),
    (dict(w2=torch.randn(5, 18)), "w2"),
    (dict(b2=torch.randn(4)), "b2"),
    (dict(hidden=torch.randn(3, 37)), "hidden"),
    (dict(activation="swish"), "activation"),
])
def test_bad_input_names_the_argument(change, name):
    hidden, mask, w1, b1, w2, b2 = _inputs(3, 37, 37, 19, 5)
    args = dict(hidden=hidden, mask=mask, w1=w1, b1=b1, w2=w2, b2=b2, k=2, activation="gelu")
    args.update(change)
    with pytest.raises(ValueError, match=name):
        gate_topk(**args)


def test_torch_backend_is_the_reference(force_backend):
    force_backend("torch")
    hidden, mask, w1, b1, w2, b2 = _inputs(2, 5, 37, 19, 5)
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, 2)
    ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, 2)
    assert torch.equal(idx, ridx) and torch.equal(w, rw)


def test_every_k_up_to_64_experts(force_backend):
    """E = 64 (the widest gate): k = 1 .. E selects and renormalises like the reference."""
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(3, 7, 37, 19, 64)
    for k in (1, 2, 5, 16, 33, 63, 64):
        idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, k)
        ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, k)
        assert torch.equal(idx, ridx), k
        assert rel_err(w, rw) <= 1e-4, k
    assert sorted(idx[0].tolist()) == list(range(64))      # k = E: every slot exactly once


def test_bf16_hidden_gradient_dtype(force_backend):
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(2, 9, 37, 19, 6, torch.bfloat16)
    hidden.requires_grad_()
    w1.requires_grad_()
    _, w = gate_topk(hidden, mask, w1, b1, w2, b2, 2)
    dh, dw1 = torch.autograd.grad(w[:, 0].sum(), [hidden, w1])
    assert dh.dtype == torch.bfloat16 and dh.shape == hidden.shape and dw1.dtype == torch.float32
    hf = hidden.detach().float().requires_grad_()           # the fp32 oracle
    _, rw = reference.gate_topk(hf, mask, w1, b1, w2, b2, 2)
    rdh, rdw1 = torch.autograd.grad(rw[:, 0].sum(), [hf, w1])
    assert rel_err(dw1, rdw1) <= 1e-4
    # dhidden is computed in fp32 and rounded once: within 2x the rounding of the oracle itself.
    assert rel_err(dh, rdh) <= 2 * rel_err(rdh.to(torch.bfloat16), rdh) + 1e-5


def test_empty_batch_and_no_tokens(force_backend):
    force_backend("triton")
    _, _, w1, b1, w2, b2 = _inputs(1, 1, 8, 3, 4)
    idx, w = gate_topk(torch.randn(0, 5, 8), torch.ones(0, 5), w1, b1, w2, b2, 2)
    assert idx.shape == (0, 2) and w.shape == (0, 2)
    idx, w = gate_topk(torch.randn(2, 0, 8), torch.ones(2, 0), w1, b1, w2, b2, 2)   # T = 0: z = 0
    ridx, rw = reference.gate_topk(torch.zeros(2, 1, 8), torch.ones(2, 1), w1, b1, w2, b2, 2)
    assert torch.equal(idx, ridx) and rel_err(w, rw) <= 1e-4


def _check_grads(w, rw, params, names, tol=1e-4):
    g = torch.randn(w.shape)
    for name, got, want in zip(names, _grads(w, params, g), _grads(rw, params, g)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert not torch.isnan(got).any(), name
        if w.shape[1] == 1:                     # k = 1: the weight is 1 whatever s, no gradient
            assert got.abs().max() == 0 and want.abs().max() < 1e-6, name
        else:
            assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@pytest.mark.parametrize("B,T,d,h,E,k,act,p_keep", [
    (17, 37, 576, 97, 64, 1, "gelu", 0.6),       # d = 576, h > BLOCK_H, two request blocks, k = 1
    (17, 5, 576, 40, 64, 33, "gelu_tanh", 0.6),  # E = 64, k = 33
    (5, 11, 37, 19, 64, 64, "silu", 0.6),        # k = E = 64: dense mixing
    (9, 37, 37, 19, 9, 4, "relu", 0.05),         # few tokens per request (some rows none)
    (3, 7, 33, 21, 3, 2, "tanh", 1.0),
])
def test_triton_backward_matches_reference_autograd(force_backend, B, T, d, h, E, k, act, p_keep):
    """The Triton backward (d hidden, d w1, d b1, d w2, d b2) against the reference's autograd."""
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(B, T, d, h, E, p_keep=p_keep)
    if p_keep < 0.5:
        mask[0].zero_()
        mask[0, T - 1] = 1                      # one token at the end
        mask[1].zero_()                         # no token: z = 0, d hidden = 0
    params = [t.requires_grad_() for t in (hidden, w1, b1, w2, b2)]
    idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=act)
    ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=act)
    assert torch.equal(idx, ridx)
    _check_grads(w, rw, params, ("hidden", "w1", "b1", "w2", "b2"))
    if p_keep < 0.5:
        _, w = gate_topk(hidden, mask, w1, b1, w2, b2, k, activation=act)
        (dh,) = torch.autograd.grad((w * torch.randn(B, k)).sum(), [hidden])
        assert dh[1].abs().max() == 0 and dh[0, : T - 1].abs().max() == 0


def test_triton_backward_with_tied_slots(force_backend):
    """Slots 1 and 4 tie exactly behind slot 2 (lower index first): k = 2 keeps 1 and drops its
    twin, k = 3 keeps both; gradients as the reference's autograd."""
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(4, 9, 37, 19, 8)
    w2 *= 0.1                                    # scores ~ b2: the order below holds per request
    w2[4] = w2[1]
    b2[4] = b2[1]
    b2[1] += 2.0
    b2[4] += 2.0
    b2[2] += 3.0
    params = [t.requires_grad_() for t in (hidden, w1, b1, w2, b2)]
    for k in (2, 3):
        idx, w = gate_topk(hidden, mask, w1, b1, w2, b2, k)
        ridx, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, k)
        assert torch.equal(idx, ridx) and idx[:, :k].tolist() == [[2, 1, 4][:k]] * 4
        _check_grads(w, rw, params, ("hidden", "w1", "b1", "w2", "b2"))


@pytest.mark.parametrize("wanted", [("hidden",), ("w2", "b2"), ("w1",), ("b1", "hidden")])
def test_triton_backward_only_the_wanted_grads(force_backend, wanted):
    force_backend("triton")
    hidden, mask, w1, b1, w2, b2 = _inputs(3, 37, 37, 19, 6)
    named = dict(hidden=hidden, w1=w1, b1=b1, w2=w2, b2=b2)
    params = [named[n].requires_grad_() for n in wanted]
    _, w = gate_topk(hidden, mask, w1, b1, w2, b2, 3)
    _, rw = reference.gate_topk(hidden, mask, w1, b1, w2, b2, 3)
    _check_grads(w, rw, params, wanted)


# ---- the kernels compile for a real GPU (no interpreter-only constructs) --------------------
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton's NVIDIA backend (ptxas)")
def test_backward_kernels_compile_for_sm90():
    from mops_kernels.ops import gate_topk as GT

    def arg_type(n):
        return ("*i32" if n == "idx_ptr" else "*bf16" if n == "dh_ptr" else "*fp32") \
            if n.endswith("_ptr") else "i32"
    compile_for_sm90(GT._gate_topk_bwd_kernel, arg_type,
                     dict(ACT=0, NEED_DH=True, BLOCK_B=16, BLOCK_T=8, BLOCK_D=64, BLOCK_H=64,
                          BLOCK_E=16))
    compile_for_sm90(GT._gate_topk_bwd_param_kernel, arg_type,
                     dict(BLOCK_R=16, BLOCK_M=64, BLOCK_N=64))

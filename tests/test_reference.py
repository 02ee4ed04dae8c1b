"""The oracle itself, checked against independent, naive formulations of SPEC §1-4."""
import math

import pytest
import torch
import torch.nn.functional as F

from mops_kernels import reference as ref
from mops_kernels.ops.quant_format import int4_quantize, int8_quantize, pack_int4, QuantizedWeight
from utils import rel_err


def _naive_prefix_attention(q, k, v, pk, pv, idx, w, lens, mask, causal, scale):
    """Row by row in float64: the key list of SPEC §1 built explicitly."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for t in range(T):
                logits, vals = [], []
                for j in range(idx.shape[1]):
                    e = int(idx[b, j])
                    if e < 0 or w[b, j] == 0:
                        continue
                    for p in range(int(lens[e])):
                        logits.append(scale * (q[b, h, t].double() @ pk[e, p, hk].double()) + math.log(w[b, j]))
                        vals.append(pv[e, p, hk].double())
                for s in range(S):
                    if mask is not None and mask[b, s] == 0:
                        continue
                    if causal and s > S - T + t:
                        continue
                    logits.append(scale * (q[b, h, t].double() @ k[b, hk, s].double()))
                    vals.append(v[b, hk, s].double())
                if logits:
                    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    out[b, h, t] = (p.unsqueeze(1) * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("T,S,causal", [(1, 7, True), (5, 9, True), (4, 4, False)])
def test_prefix_attention_matches_naive(T, S, causal):
    B, Hq, Hkv, D, E, P, kk = 3, 6, 2, 8, 4, 5, 3
    q = torch.randn(B, Hq, T, D)
    k = torch.randn(B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D)
    pk, pv = torch.randn(E, P, Hkv, D), torch.randn(E, P, Hkv, D)
    idx = torch.tensor([[0, 2, -1], [3, 3, 1], [-1, -1, -1]], dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3, 0.5], [0.5, 0.0, 2.0], [1.0, 1.0, 1.0]])
    lens = torch.tensor([5, 2, 1, 3], dtype=torch.int32)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0                      # left padding
    mask[2, :] = 0                       # nothing at all: every row of request 2 returns 0
    out = ref.prefix_attention(q, k, v, pk, pv, idx, w, prefix_lens=lens, attention_mask=mask,
                               causal=causal, scale=0.3)
    naive = _naive_prefix_attention(q, k, v, pk, pv, idx, w, lens, mask, causal, 0.3)
    assert not torch.isnan(out).any()
    assert rel_err(out, naive) < 1e-6
    assert out[2].abs().max() == 0


def test_prefix_attention_without_prefix_is_sdpa():
    B, Hq, Hkv, T, D = 2, 4, 2, 6, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    idx = torch.empty(B, 0, dtype=torch.int32)
    out = ref.prefix_attention(q, k, v, torch.zeros(1, 1, Hkv, D), torch.zeros(1, 1, Hkv, D), idx)
    sd = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert rel_err(out, sd) < 1e-5


def test_prefix_weight_scales_unnormalised_attention():
    """w multiplies the un-normalised attention on slot j: doubling w equals duplicating the slot."""
    B, Hq, Hkv, T, S, D, P = 1, 2, 1, 3, 4, 8, 3
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pk, pv = torch.randn(2, P, Hkv, D), torch.randn(2, P, Hkv, D)
    a = ref.prefix_attention(q, k, v, pk, pv, torch.tensor([[1]], dtype=torch.int32), torch.tensor([[2.0]]))
    b = ref.prefix_attention(q, k, v, pk, pv, torch.tensor([[1, 1]], dtype=torch.int32))
    assert rel_err(a, b) < 1e-6


def test_prefix_attention_gradcheck():
    B, Hq, Hkv, T, S, D, E, P = 2, 2, 1, 2, 3, 4, 3, 2
    dd = dict(dtype=torch.float64)
    q = torch.randn(B, Hq, T, D, **dd, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, **dd, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, **dd, requires_grad=True)
    pk = torch.randn(E, P, Hkv, D, **dd, requires_grad=True)
    pv = torch.randn(E, P, Hkv, D, **dd, requires_grad=True)
    w = torch.tensor([[0.6, 0.4], [1.3, 0.2]], **dd, requires_grad=True)
    idx = torch.tensor([[0, 2], [2, 2]], dtype=torch.int32)

    def f(q, k, v, pk, pv, w):
        return ref.prefix_attention(q.double(), k, v, pk, pv, idx, w).double()

    # the reference computes in fp32: compare its analytic gradient with finite differences loosely
    assert torch.autograd.gradcheck(lambda *a: f(*a), (q, k, v, pk, pv, w), eps=1e-3, atol=5e-3, rtol=5e-3)


def test_gate_topk_ties_and_renormalisation():
    B, T, d, h, E = 3, 5, 7, 6, 5
    hidden = torch.randn(B, T, d)
    mask = torch.ones(B, T)
    mask[0, 2:] = 0
    mask[2] = 0                          # no token: z = 0
    w1, b1 = torch.randn(h, d), torch.randn(h)
    w2, b2 = torch.randn(E, h), torch.randn(E)
    w2[3] = w2[1]                        # experts 1 and 3 tie exactly
    b2[3] = b2[1]
    idx, wt = ref.gate_topk(hidden, mask, w1, b1, w2, b2, k=E)
    assert idx.dtype == torch.int32 and wt.dtype == torch.float32
    for b in range(B):
        order = idx[b].tolist()
        assert order.index(1) < order.index(3)          # lower index first on a tie
    assert torch.allclose(wt.sum(-1), torch.ones(B))
    assert (wt[:, :-1] >= wt[:, 1:]).all()
    # z for an empty mask is 0: scores are the MLP at 0
    s = ref.gate_scores(hidden, mask, w1, b1, w2, b2)
    assert torch.allclose(s[2], F.gelu(b1) @ w2.t() + b2, atol=1e-6)


def test_rational_approximates_gelu():
    # SPEC §4's initial coefficients fit GELU on [-3, 3] (max error ~1e-3; it drifts beyond)
    x = torch.linspace(-3, 3, 601)
    a, b = torch.tensor(ref.RATIONAL_GELU_A), torch.tensor(ref.RATIONAL_GELU_B)
    assert (ref.rational(x, a, b) - F.gelu(x)).abs().max() < 2e-3


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_quantize_round_to_nearest(G):
    w = torch.randn(13, 4 * G) * 0.1
    qw = int4_quantize(w, G)
    q = qw.unpack()
    assert q.min() >= 0 and q.max() <= 15
    dq = qw.dequantize()
    err = (dq - w).abs().view(13, 4, G)
    assert (err <= qw.scale.float().unsqueeze(-1) / 2 + 1e-3 * w.abs().max()).all()
    # packing layout: low nibble = even column
    assert torch.equal(pack_int4(q), qw.qweight)
    assert torch.equal(qw.qweight[:, 0] & 15, q[:, 0].to(torch.uint8))


def test_int8_quantize_and_validation():
    w = torch.randn(5, 64)
    qw = int8_quantize(w)
    assert (qw.dequantize() - w).abs().max() <= qw.scale.float().max() / 2 + 1e-4
    with pytest.raises(ValueError, match="group_size"):
        int4_quantize(w, 48)
    with pytest.raises(ValueError, match="qweight"):
        QuantizedWeight(qw.qweight[:, :10], qw.scale, None, (5, 64), 32, 8)


def test_iapt_generate_shapes_and_mask():
    B, n, d, m = 2, 5, 12, 6
    H = torch.randn(B, n, d)
    mask = torch.ones(B, n)
    mask[1, :3] = 0
    args = (torch.randn(d, m), torch.randn(m, 4), torch.tensor(ref.RATIONAL_GELU_A),
            torch.tensor(ref.RATIONAL_GELU_B), torch.randn(m, d))
    S = ref.iapt_generate(H, mask, *args)
    assert S.shape == (B, 4, d)
    # masked tokens do not matter
    H2 = H.clone()
    H2[1, :3] = 100.0
    assert torch.allclose(ref.iapt_generate(H2, mask, *args)[1], S[1], atol=1e-5)

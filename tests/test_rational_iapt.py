"""rational and iapt_generate (SPEC §4) on the Triton backend against the fp32 reference."""
import pytest
import torch

from mops_kernels import reference
from mops_kernels.ops.iapt_generate import iapt_generate
from mops_kernels.ops.rational import rational
from utils import poison, rel_err


def _coeffs(jitter=0.05):
    a = torch.tensor(reference.RATIONAL_GELU_A) + jitter * torch.randn(6)
    b = torch.tensor(reference.RATIONAL_GELU_B) + jitter * torch.randn(4)
    return a.requires_grad_(), b.requires_grad_()


def _plain(x, a, b, dtype):
    """The rational formula evaluated by PyTorch in `dtype` (the SPEC §6 yardstick)."""
    x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
    num = ((((a[5] * x + a[4]) * x + a[3]) * x + a[2]) * x + a[1]) * x + a[0]
    pol = (((b[3] * x + b[2]) * x + b[1]) * x + b[0]) * x
    return num / (1 + pol.abs())


@pytest.mark.parametrize("shape", [(1111,), (3, 37, 19), (2049,)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, None),
                                       (torch.float16, None)])
def test_rational_forward_backward(force_backend, shape, dtype, tol):
    force_backend("triton")
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    a, b = _coeffs()
    y = rational(x, a, b)
    ref = reference.rational(x, a, b)
    assert y.dtype == dtype and y.shape == x.shape
    assert not torch.isnan(y).any()
    if dtype == torch.float32:
        assert rel_err(y, ref) <= tol
    else:
        # SPEC §6: within 2x the error of the same formula computed by plain PyTorch in dtype.
        assert rel_err(y, ref) <= 2 * rel_err(_plain(x, a, b, dtype), ref) + 1e-5
    g = torch.randn(shape)
    xf = x.detach().float().requires_grad_()
    got = torch.autograd.grad((y.float() * g).sum(), [x, a, b])
    want = torch.autograd.grad((reference.rational(xf, a, b) * g).sum(), [xf, a, b])
    if dtype == torch.float32:
        lims = [1e-5] * 3
    else:   # SPEC §6 yardstick: the gradients of the formula run by plain PyTorch in dtype
        xp = x.detach().requires_grad_()
        ap, bp = a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
        plain = torch.autograd.grad((_plain(xp, ap, bp, dtype) * g.to(dtype)).sum(), [xp, ap, bp])
        lims = [2 * rel_err(p, w) + 1e-5 for p, w in zip(plain, want)]
    for name, gg, ww, lim in zip("xab", got, want, lims):
        assert gg.dtype == (dtype if name == "x" else torch.float32)
        assert rel_err(gg, ww) <= lim, name


def test_rational_matches_gelu_at_init(force_backend):
    force_backend("triton")
    x = torch.linspace(-3, 3, 257)   # (the SPEC constants drift from GELU beyond |x| = 3)
    a = torch.tensor(reference.RATIONAL_GELU_A)
    b = torch.tensor(reference.RATIONAL_GELU_B)
    assert (rational(x, a, b) - torch.nn.functional.gelu(x)).abs().max() < 2e-3


def test_rational_non_contiguous(force_backend):
    force_backend("triton")
    x = torch.randn(37, 40).t()
    a, b = _coeffs()
    assert rel_err(rational(x, a, b), reference.rational(x, a, b)) <= 1e-6


def test_rational_bad_coeffs():
    x = torch.randn(5)
    with pytest.raises(ValueError, match="a must"):
        rational(x, torch.randn(5), torch.randn(4))
    with pytest.raises(ValueError, match="b must"):
        rational(x, torch.randn(6), torch.randn(3, 1))


def _iapt_inputs(B, n, d, m, dtype=torch.float32):
    H = torch.randn(B, n, d, dtype=dtype)
    mask = (torch.rand(B, n) < 0.6).to(torch.int64)
    w_down = torch.randn(d, m) / d ** 0.5
    w_sa = torch.randn(m, 4)
    w_up = torch.randn(m, d) / m ** 0.5
    a, b = _coeffs()
    return H, mask, w_down, w_sa, a.detach(), b.detach(), w_up


@pytest.mark.parametrize("B,n,d,m", [(3, 37, 40, 19), (2, 111, 64, 64), (1, 5, 33, 7), (4, 300, 24, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4)])
def test_iapt_forward_backward(force_backend, B, n, d, m, dtype, tol):
    force_backend("triton")
    args = _iapt_inputs(B, n, d, m, dtype)
    args[1][0, : n // 2] = 0            # left padding on the first request
    leaves = [args[i].requires_grad_() for i in (0, 2, 3, 4, 5, 6)]
    S = iapt_generate(*args)
    ref = reference.iapt_generate(*args)
    assert S.shape == (B, 4, d) and S.dtype == dtype
    assert not torch.isnan(S).any()
    assert rel_err(S, ref) <= tol
    g = torch.randn(B, 4, d)
    got = torch.autograd.grad((S * g).sum(), leaves)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    for name, gg, ww in zip(("H", "w_down", "w_sa", "a", "b", "w_up"), got, want):
        assert not torch.isnan(gg).any(), name
        assert rel_err(gg, ww) <= tol, name


def test_iapt_all_masked_row(force_backend):
    """A request with no instruction token: A = 0, pooled = 0, S = rational(0) w_up = a0 colsum."""
    force_backend("triton")
    args = _iapt_inputs(3, 37, 40, 19)
    args[1][1] = 0
    leaves = [args[i].requires_grad_() for i in (0, 2, 3)]
    S = iapt_generate(*args)
    ref = reference.iapt_generate(*args)
    expect = args[4][0] * args[6].sum(0)
    assert torch.allclose(S[1], expect.expand(4, -1).detach(), atol=1e-6)
    assert rel_err(S, ref) <= 1e-4
    g = torch.randn_like(S)
    dH, dwd, dws = torch.autograd.grad((S * g).sum(), leaves)
    rdH, rdwd, rdws = torch.autograd.grad((ref * g).sum(), leaves)
    assert dH[1].abs().max() == 0
    assert rel_err(dH, rdH) <= 1e-4 and rel_err(dws, rdws) <= 1e-4


def test_iapt_pool_output_is_fully_written(force_backend):
    """The fused kernel's output buffer starts as NaN: every element must be overwritten."""
    force_backend("triton")
    from mops_kernels.ops import iapt_generate as mod
    H, mask, w_down, w_sa, a, b, _ = _iapt_inputs(2, 37, 40, 19)
    hp = H @ w_down
    real_empty = torch.empty

    def poisoned_empty(*shape, **kw):
        return poison(real_empty(*shape, **kw)) if kw.get("dtype", torch.float32).is_floating_point \
            else real_empty(*shape, **kw)

    mod.torch.empty = poisoned_empty
    try:
        r, pooled, lse = mod._iapt_pool_fwd(hp, mask.float(), w_sa, a, b)
    finally:
        mod.torch.empty = real_empty
    assert not torch.isnan(r).any() and not torch.isnan(pooled).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("change,name", [
    (dict(mask=torch.ones(3, 36)), "mask"), (dict(w_down=torch.randn(39, 19)), "w_down"),
    (dict(w_sa=torch.randn(19, 3)), "w_sa"), (dict(w_up=torch.randn(19, 41)), "w_up"),
    (dict(a=torch.randn(4)), "a"), (dict(H=torch.randn(3, 40)), "H"),
])
def test_iapt_bad_input_names_the_argument(change, name):
    H, mask, w_down, w_sa, a, b, w_up = _iapt_inputs(3, 37, 40, 19)
    args = dict(H=H, mask=mask, w_down=w_down, w_sa=w_sa, a=a, b=b, w_up=w_up)
    args.update(change)
    with pytest.raises(ValueError, match=name):
        iapt_generate(**args)


def test_empty_inputs(force_backend):
    force_backend("triton")
    a, b = _coeffs()
    assert rational(torch.randn(0, 3), a, b).shape == (0, 3)
    H, mask, w_down, w_sa, a, b, w_up = _iapt_inputs(1, 5, 8, 4)
    assert iapt_generate(H[:0], mask[:0], w_down, w_sa, a, b, w_up).shape == (0, 4, 8)

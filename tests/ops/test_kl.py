"""fastppo.kernels.kl_penalty and kl_rewards against their float64 references: values and gradients,
every backend, every mask layout.

On a machine without a GPU the "triton" backend runs through Triton's interpreter (see conftest.py).
"""
import pytest
import torch

from conftest import DEVICE
from fastppo.kernels import kl_penalty, kl_rewards, reference
from op_testing import (BACKENDS, DTYPES, LAYOUTS, ROW_KINDS, assert_garbage_ignored, assert_grads,
                        assert_values, layout, make_mask, randn, upstream, views_of, with_garbage, _m,
                        _x, NAN)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter

ESTIMATORS = ["k1", "k2", "k3"]


# --------------------------------------------------------------------------- garbage in padding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_rewards_ignores_garbage_at_invalid_positions(backend, estimator):
    g = torch.Generator().manual_seed(13)
    mask = make_mask(40, ROW_KINDS[:-1], g).to(DEVICE)
    lp, ref = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    scores = randn(mask.shape[:1], g, torch.float32)
    dirty = with_garbage(lp, mask, g), with_garbage(ref, mask, g)
    fn = lambda a, b: kl_rewards(a, b, scores, mask, kl_coef=0.3, estimator=estimator,  # noqa: E731
                                 backend=backend)
    assert_garbage_ignored(fn, (lp, ref), dirty, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_rewards_padding_filled_with_large_negative_logprobs(backend):
    # A common convention fills padded log-probs with -100 or so; the k3 penalty there is exp(100),
    # which overflows float32, but it is masked out: its gradient must be 0, not 0 * inf = NaN.
    lp = torch.tensor([[-0.5, -1.0, -100.0]], device=DEVICE, requires_grad=True)
    ref = torch.tensor([[-0.7, -0.9, 0.0]], device=DEVICE, requires_grad=True)
    mask = torch.tensor([[True, True, False]], device=DEVICE)
    scores = torch.tensor([1.0], device=DEVICE)
    out = kl_rewards(lp, ref, scores, mask, kl_coef=0.1, estimator="k3", backend=backend)
    out.sum().backward()
    assert out[0, 2] == 0 and torch.isfinite(out).all()
    assert torch.isfinite(lp.grad[0, :2]).all() and torch.isfinite(ref.grad[0, :2]).all()
    assert lp.grad[0, 2] == 0 and ref.grad[0, 2] == 0, (lp.grad, ref.grad)


# ------------------------------------------------------------------------------ kl_penalty


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(), (7,), (3, 5, 401)], ids=str)
def test_kl_penalty(backend, dtype, estimator, shape):
    g = torch.Generator().manual_seed(len(shape))
    lp = randn(shape, g, dtype, scale=1.5)
    ref = randn(shape, g, dtype, scale=1.5)
    g_out = upstream(shape, 2)
    a, b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = kl_penalty(a, b, estimator=estimator, backend=backend)
    (out * g_out).sum().backward()
    a64, b64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    out64 = reference.kl_penalty(a64, b64, estimator=estimator)
    (out64 * g_out).sum().backward()
    assert out.shape == shape
    assert_values(out, out64)
    assert_grads(a.grad, a64.grad, dtype, backend)
    assert_grads(b.grad, b64.grad, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_formulas(backend):
    lp = torch.tensor([0.0, 1.0, -2.0, 0.5], device=DEVICE)
    ref = torch.tensor([0.0, 0.0, 1.0, 0.75], device=DEVICE)
    x = (lp - ref).double()
    for estimator, want in [("k1", x), ("k2", 0.5 * x ** 2), ("k3", torch.exp(-x) - 1 + x)]:
        out = kl_penalty(lp, ref, estimator=estimator, backend=backend)
        torch.testing.assert_close(out.double(), want, atol=1e-7, rtol=1e-6)
    k3 = kl_penalty(lp, ref, estimator="k3", backend=backend)
    assert (k3 >= 0).all() and k3[0] == 0  # k3 is a non-negative estimator


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_strided_and_default_estimator(backend):
    g = torch.Generator().manual_seed(15)
    big = randn((6, 50), g, torch.float32)
    lp, ref = big[:, :-1], big[:, 1:].t().contiguous().t()
    out = kl_penalty(lp, ref, backend=backend)
    torch.testing.assert_close(out, lp - ref, atol=0, rtol=0)


# ------------------------------------------------------------------------------ kl_rewards


def run_kl_rewards(lp, ref, scores, mask, backend, *, kl_coef, estimator, seed=0):
    g_out = upstream(mask.shape, seed)
    a, b, s = (t.detach().clone().requires_grad_() for t in (lp, ref, scores))
    out = kl_rewards(a, b, s, mask, kl_coef=kl_coef, estimator=estimator, backend=backend)
    (out * g_out).sum().backward()
    a64, b64, s64 = (t.detach().double().requires_grad_() for t in (lp, ref, scores))
    out64 = reference.kl_rewards(a64, b64, s64, mask, kl_coef=kl_coef, estimator=estimator)
    (out64 * g_out).sum().backward()
    return (out, a.grad, b.grad, s.grad), (out64, a64.grad, b64.grad, s64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("T,kl_coef", [(1, 0.1), (37, 0.05), (37, -0.7), (2500, 1.3)])
def test_kl_rewards_grid(backend, dtype, estimator, T, kl_coef):
    g = torch.Generator().manual_seed(T)
    kinds = ROW_KINDS[:-1] if T < 1000 else ["padded_holes", "single", "left"]
    mask = make_mask(T, kinds, g).to(DEVICE)
    lp, ref = randn(mask.shape, g, dtype, scale=1.5), randn(mask.shape, g, dtype, scale=1.5)
    scores = randn(mask.shape[:1], g, dtype, scale=3.0)
    (out, ga, gb, gs), (out64, ga64, gb64, gs64) = run_kl_rewards(
        lp, ref, scores, mask, backend, kl_coef=kl_coef, estimator=estimator, seed=T)
    assert_values(out, out64)
    for got, want in ((ga, ga64), (gb, gb64), (gs, gs64)):
        assert_grads(got, want, dtype, backend)
    assert (out[~mask] == 0).all()


def last_valid(mask):
    return [int(row.nonzero().max()) for row in mask.cpu()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_rewards_score_lands_on_last_valid_position(backend):
    # kl_coef = 0: the rewards are exactly the score at each row's last valid token, 0 elsewhere.
    T = 1500
    mask = torch.zeros(5, T, dtype=torch.bool)
    mask[0, 700:] = True                      # left padding: the last token
    mask[1, [2, 3, 9, 1200]] = True           # holes, then a valid token past the block boundary
    mask[2, 10:1024] = True                   # right padding, ending exactly at a block's end
    mask[2, 500:600] = False
    mask[3, 1024] = True                      # a single token, first of the second block
    mask[4, 0] = True                         # a single token at the very start
    mask = mask.to(DEVICE)
    g = torch.Generator().manual_seed(16)
    lp, ref = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    scores = torch.tensor([1.5, -2.25, 3.0, 0.125, -7.0], device=DEVICE)
    out = kl_rewards(lp, ref, scores, mask, kl_coef=0.0, backend=backend)
    want = torch.zeros(mask.shape, device=DEVICE)
    want[torch.arange(5), [T - 1, 1200, 1023, 1024, 0]] = scores
    assert torch.equal(out, want)
    assert last_valid(mask) == [T - 1, 1200, 1023, 1024, 0]
    # With a KL term the score is added on top of the last token's own penalty, and only there.
    for estimator in ESTIMATORS:
        out = kl_rewards(lp, ref, scores, mask, kl_coef=0.2, estimator=estimator, backend=backend)
        kl = -0.2 * reference.kl_penalty(lp.double(), ref.double(), estimator=estimator)
        assert_values(out, torch.where(mask, kl, 0.0) + want.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_rewards_score_gradient(backend):
    # d rewards / d scores[b] is 1 at row b's last valid token only; kl_coef = 0 gives no gradient to
    # the log-probs.
    mask = torch.tensor([[False, True, True, False], [True, False, True, False]], device=DEVICE)
    lp = torch.randn(2, 4, device=DEVICE, requires_grad=True)
    ref = torch.randn(2, 4, device=DEVICE, requires_grad=True)
    scores = torch.zeros(2, device=DEVICE, requires_grad=True)
    out = kl_rewards(lp, ref, scores, mask, kl_coef=0.0, estimator="k3", backend=backend)
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], device=DEVICE)
    (out * weights).sum().backward()
    assert scores.grad.tolist() == [3.0, 7.0]
    assert (lp.grad == 0).all() and (ref.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_rewards_extra_leading_dims(backend):
    g = torch.Generator().manual_seed(17)
    mask = make_mask(10, ROW_KINDS[:-1], g).reshape(2, 3, 10).to(DEVICE)
    lp, ref = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    scores = randn((2, 3), g, torch.float32)
    (out, ga, gb, gs), (out64, ga64, gb64, gs64) = run_kl_rewards(
        lp, ref, scores, mask, backend, kl_coef=0.4, estimator="k2")
    assert_values(out, out64)
    for got, want in ((ga, ga64), (gb, gb64), (gs, gs64)):
        assert_grads(got, want, torch.float32, backend)


# ------------------------------------------------------------------------------- bad input


BAD = [
    # kl_penalty
    (lambda: kl_penalty(_x(), _x((5, 2))), ValueError, "ref_logprobs must have the shape of logprobs"),
    (lambda: kl_penalty(_x(), _x(), estimator="k4"), ValueError, "estimator must be one of"),
    (lambda: kl_penalty(_x(), _x(), estimator=None), ValueError, "estimator must be one of"),
    (lambda: kl_penalty(_x().long(), _x()), TypeError, "logprobs must be a floating-point tensor"),
    (lambda: kl_penalty(_x(), _x().bool()), TypeError, "ref_logprobs must be a floating-point"),
    (lambda: kl_penalty([0.1], _x()), TypeError, "logprobs must be a torch.Tensor"),
    (lambda: kl_penalty(_x(), _x(), backend="fast"), ValueError, "backend must be one of"),
    # kl_rewards
    (lambda: kl_rewards(_x(), _x(), _x((2,)), _m((2, 4)), kl_coef=0.1), ValueError,
     "mask must have the shape of logprobs"),
    (lambda: kl_rewards(_x(), _x((2, 4)), _x((2,)), _m(), kl_coef=0.1), ValueError,
     "ref_logprobs must have the shape of logprobs"),
    (lambda: kl_rewards(_x(), _x(), _x((2, 5)), _m(), kl_coef=0.1), ValueError,
     r"scores must have the shape of logprobs.shape\[:-1\], \(2,\); got \(2, 5\)"),
    (lambda: kl_rewards(_x(), _x(), _x((3,)), _m(), kl_coef=0.1), ValueError, "scores must have the shape"),
    (lambda: kl_rewards(_x(), _x(), _x((2,)).long(), _m(), kl_coef=0.1), TypeError,
     "scores must be a floating-point tensor"),
    (lambda: kl_rewards(_x(), _x(), _x((2,)), _m().float(), kl_coef=0.1), TypeError,
     "mask must be a bool tensor"),
    (lambda: kl_rewards(_x(()), _x(()), _x(()), _m(()), kl_coef=0.1), ValueError,
     r"logprobs must have shape \(\.\.\., T\)"),
    (lambda: kl_rewards(_x(), _x(), _x((2,)), _m(), kl_coef=0.1, estimator="kl"), ValueError,
     "estimator must be one of"),
    (lambda: kl_rewards(_x(), _x(), _x((2,)), _m(), kl_coef=NAN), ValueError, "kl_coef must be a finite"),
    (lambda: kl_rewards(_x(), _x(), _x((2,)), _m(), kl_coef="0.1"), TypeError, "kl_coef must be a real"),
    (lambda: kl_rewards(_x(), _x(), _x((2,)), _m(), kl_coef=0.1, backend="gpu"), ValueError,
     "backend must be one of"),
    (lambda: kl_rewards(_x((4, 5)), _x((4, 5)), _x((4,)), _m((4, 5)).index_fill(0, torch.tensor([2]), False),
                        kl_coef=0.1), ValueError, "mask row 2 has no valid position"),
    (lambda: kl_rewards(_x((2, 3, 5)), _x((2, 3, 5)), _x((2, 3)),
                        _m((2, 3, 5)).index_fill(1, torch.tensor([1]), False), kl_coef=0.1), ValueError,
     r"mask row \(0, 1\) has no valid position"),
    (lambda: kl_rewards(_x((2, 0)), _x((2, 0)), _x((2,)), _m((2, 0)), kl_coef=0.1), ValueError,
     "mask row 0 has no valid position"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_rejected_on_every_backend(backend):
    # The checks run before the backend is chosen: the same error whichever backend was asked for.
    with pytest.raises(ValueError, match="mask row 1 has no valid position"):
        kl_rewards(_x(), _x(), _x((2,)), _m().index_fill(0, torch.tensor([1]), False), kl_coef=0.1,
                   backend=backend)


# ------------------------------------------------------------------- every view of every argument


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_kl_penalty_views_of_every_argument(backend, kind):
    # Both arguments as strided / transposed / offset / expanded views: values and the gradients
    # reaching both leaves, against the reference on contiguous copies of the same views.
    g = torch.Generator().manual_seed(22)
    inputs = dict(logprobs=randn((4, 7), g, torch.float32, scale=1.5),
                  ref_logprobs=randn((4, 7), g, torch.float32, scale=1.5))
    op, ref, leaves, leaves64 = views_of(inputs, layout(kind, list(inputs)), grads=list(inputs))
    g_out = upstream((4, 7), 6)
    out = kl_penalty(op["logprobs"], op["ref_logprobs"], estimator="k3", backend=backend)
    (out * g_out).sum().backward()
    out64 = reference.kl_penalty(ref["logprobs"], ref["ref_logprobs"], estimator="k3")
    (out64 * g_out).sum().backward()
    assert_values(out, out64)
    for name in inputs:
        assert_grads(leaves[name].grad, leaves64[name].grad, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_kl_rewards_views_of_every_argument(backend, kind):
    # logprobs, ref_logprobs, scores and mask as views (scores, 1-D: strided, a column, offset,
    # expanded); the gradients reaching the leaves of logprobs, ref_logprobs and scores.
    g = torch.Generator().manual_seed(23)
    mask = make_mask(9, ["holes", "left", "single", "padded_holes"], g).to(DEVICE)
    inputs = dict(logprobs=randn(mask.shape, g, torch.float32, scale=1.5),
                  ref_logprobs=randn(mask.shape, g, torch.float32, scale=1.5),
                  scores=randn(mask.shape[:1], g, torch.float32, scale=3.0), mask=mask)
    grads = ["logprobs", "ref_logprobs", "scores"]
    op, ref, leaves, leaves64 = views_of(inputs, layout(kind, list(inputs)), grads=grads)
    g_out = upstream(mask.shape, 7)
    out = kl_rewards(*op.values(), kl_coef=0.3, estimator="k2", backend=backend)
    (out * g_out).sum().backward()
    out64 = reference.kl_rewards(*ref.values(), kl_coef=0.3, estimator="k2")
    (out64 * g_out).sum().backward()
    assert_values(out, out64)
    for name in grads:
        assert_grads(leaves[name].grad, leaves64[name].grad, torch.float32, backend)

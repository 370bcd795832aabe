"""The rollout ops of fastppo.kernels (kl_penalty, kl_rewards, gae, reward_to_go, masked_whiten)
against their float64 references: values and gradients, every backend, every mask layout.

On a machine without a GPU the "triton" backend runs through Triton's interpreter (see conftest.py).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from fastppo.kernels import reference
from fastppo.kernels._checks import triton_interpreting
from fastppo.kernels import gae, kl_penalty, kl_rewards, masked_whiten, reward_to_go

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter

BACKENDS = ["triton", "native", "torch"]  # "native": gae/reward_to_go in C++; others run as torch
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ESTIMATORS = ["k1", "k2", "k3"]
# Inputs of every dtype are exactly representable in float32, and every op computes in float32, so
# values get float32 tolerances whatever the input dtype. Gradients are stored in the input's dtype and
# get that dtype's rounding (half an ulp: 2**-8 for bfloat16, 2**-11 for float16).
VALUE_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-6, rtol=2 ** -8),
    torch.float16: dict(atol=1e-6, rtol=2 ** -11),
}
NAN, INF = float("nan"), float("inf")


def grad_tol(dtype, backend):
    if dtype == torch.bfloat16 and backend == "triton" and triton_interpreting():
        # Triton's interpreter truncates float32 -> bfloat16 (a full ulp, 2**-7) where compiled code
        # rounds to nearest even; see test_interpreter_bf16_cast in test_token_logprobs.py.
        return dict(atol=1e-6, rtol=2 ** -7)
    return GRAD_TOL[dtype]


def scan_atol(want, T):
    """The rounding of a float32 running sum over T steps: errors of half an ulp of the largest
    partial sum random-walk to ~sqrt(T) of them. With gamma * lam = 1 and T = 4096 the advantages are
    sums of thousands of rewards (~1e2) that may cancel to ~1e-2, where 1e-5 absolute cannot hold."""
    return 2 ** -23 * math.sqrt(T) * float(want.detach().abs().max()) if want.numel() else 0.0


def assert_values(got, want, T=1):
    assert got.dtype == torch.float32
    tol = dict(VALUE_TOL, atol=max(VALUE_TOL["atol"], scan_atol(want, T)))
    torch.testing.assert_close(got.double(), want, **tol)


def assert_grads(got, want, dtype, backend, T=1):
    assert got.dtype == dtype
    tol = grad_tol(dtype, backend)
    tol = dict(tol, atol=max(tol["atol"], scan_atol(want, T)))
    torch.testing.assert_close(got.double(), want, **tol)


# ------------------------------------------------------------------------------------- inputs

ROW_KINDS = ["right", "left", "holes", "padded_holes", "single", "full", "empty"]


def make_mask(T, kinds, g):
    """One row per kind: right/left padding, holes in the middle (first and last token valid), holes
    between left and right padding, a single valid token, a full row, a row without valid tokens."""
    rows = []
    for kind in kinds:
        row = torch.zeros(T, dtype=torch.bool)
        n = int(torch.randint(1, T + 1, (), generator=g))
        if kind == "full":
            row[:] = True
        elif kind == "right":
            row[:n] = True
        elif kind == "left":
            row[T - n:] = True
        elif kind == "holes":
            row = torch.rand(T, generator=g) < 0.6
            row[0] = row[-1] = True
        elif kind == "padded_holes":
            lo, hi = T // 4, T - T // 4
            row[lo:hi] = torch.rand(hi - lo, generator=g) < 0.5
            if hi > lo:
                row[hi - 1] = True
        elif kind == "single":
            row[int(torch.randint(0, T, (), generator=g))] = True
        elif kind != "empty":
            raise ValueError(kind)
        rows.append(row)
    return torch.stack(rows)


def randn(shape, g, dtype, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def upstream(shape, seed):
    """Random upstream gradients: non-unit, of both signs."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return (torch.randn(shape, generator=g) * 1.5).to(DEVICE)


def run_gae(rewards, values, mask, backend, *, gamma, lam, seed=0):
    """(adv, ret, d rewards, d values) from the op and from the float64 reference, with random upstream
    gradients on both outputs."""
    g_adv, g_ret = upstream(mask.shape, seed), upstream(mask.shape, seed + 1)
    r = rewards.detach().clone().requires_grad_()
    v = values.detach().clone().requires_grad_()
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam, backend=backend)
    (adv * g_adv + ret * g_ret).sum().backward()
    r64 = rewards.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    adv64, ret64 = reference.gae(r64, v64, mask, gamma=gamma, lam=lam)
    (adv64 * g_adv + ret64 * g_ret).sum().backward()
    return (adv, ret, r.grad, v.grad), (adv64, ret64, r64.grad, v64.grad)


def check_gae(got, want, rdtype, vdtype, backend):
    adv, ret, gr, gv = got
    adv64, ret64, gr64, gv64 = want
    T = adv.shape[-1]
    assert_values(adv, adv64, T)
    assert_values(ret, ret64, T)
    assert_grads(gr, gr64, rdtype, backend, T)
    assert_grads(gv, gv64, vdtype, backend, T)


def run_rtg(rewards, mask, backend, *, gamma, seed=0):
    g_out = upstream(mask.shape, seed)
    r = rewards.detach().clone().requires_grad_()
    out = reward_to_go(r, mask, gamma=gamma, backend=backend)
    (out * g_out).sum().backward()
    r64 = rewards.detach().double().requires_grad_()
    out64 = reference.reward_to_go(r64, mask, gamma=gamma)
    (out64 * g_out).sum().backward()
    return (out, r.grad), (out64, r64.grad)


# ----------------------------------------------------------------------------------------- gae

GAMMA_LAM = [(1.0, 1.0), (0.95, 0.9), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (0.5, 1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 37])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_gae_grid(backend, dtype, T, gamma, lam):
    g = torch.Generator().manual_seed(T)
    mask = make_mask(T, ROW_KINDS, g).to(DEVICE)
    rewards, values = randn(mask.shape, g, dtype), randn(mask.shape, g, dtype)
    got, want = run_gae(rewards, values, mask, backend, gamma=gamma, lam=lam, seed=T)
    check_gae(got, want, dtype, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,dtype,gamma,lam,kinds", [
    # 2500: three 1024-wide blocks, the last one partial, with the carries crossing two boundaries.
    (2500, torch.float32, 0.95, 0.9, ["right", "left", "padded_holes", "empty"]),
    (2500, torch.bfloat16, 1.0, 1.0, ["holes", "single"]),
    (4096, torch.float32, 1.0, 1.0, ["full", "left", "holes"]),
    (4096, torch.float16, 0.99, 0.95, ["right", "single"]),
], ids=["2500-f32", "2500-bf16", "4096-f32", "4096-f16"])
def test_gae_long_rows(backend, T, dtype, gamma, lam, kinds):
    g = torch.Generator().manual_seed(T)
    mask = make_mask(T, kinds, g).to(DEVICE)
    rewards, values = randn(mask.shape, g, dtype), randn(mask.shape, g, dtype)
    got, want = run_gae(rewards, values, mask, backend, gamma=gamma, lam=lam, seed=1)
    check_gae(got, want, dtype, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_carry_across_block_boundary_and_hole_spanning_it(backend):
    # Valid tokens only on either side of a hole that covers the boundary between blocks 1 and 2, so
    # V_next and A_next of position 1000 must come from position 1100, carried across the boundary.
    T = 1500
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, [3, 1000, 1100, 1499]] = True
    mask[1, 1023] = mask[1, 1024] = True  # the two sides of the boundary, adjacent
    g = torch.Generator().manual_seed(5)
    rewards, values = randn((2, T), g, torch.float32), randn((2, T), g, torch.float32)
    got, want = run_gae(rewards, values, mask.to(DEVICE), backend, gamma=0.9, lam=0.8)
    check_gae(got, want, torch.float32, torch.float32, backend)
    adv, ret = got[0].double(), got[1].double()
    r, v = rewards.double(), values.double()
    # By hand: A_1100 = r_1100 + 0.9 V_1499 - V_1100 + 0.72 A_1499, A_1499 = r_1499 - V_1499.
    a1499 = r[0, 1499] - v[0, 1499]
    a1100 = r[0, 1100] + 0.9 * v[0, 1499] - v[0, 1100] + 0.72 * a1499
    a1000 = r[0, 1000] + 0.9 * v[0, 1100] - v[0, 1000] + 0.72 * a1100
    torch.testing.assert_close(adv[0, [1000, 1100, 1499]], torch.stack([a1000, a1100, a1499]),
                               **VALUE_TOL)
    a1024 = r[1, 1024] - v[1, 1024]
    a1023 = r[1, 1023] + 0.9 * v[1, 1024] - v[1, 1023] + 0.72 * a1024
    torch.testing.assert_close(adv[1, [1023, 1024]], torch.stack([a1023, a1024]), **VALUE_TOL)
    torch.testing.assert_close(ret[1, [1023, 1024]], torch.stack([a1023, a1024]) + v[1, [1023, 1024]],
                               **VALUE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_empty_rows_give_zero_and_zero_gradient(backend):
    g = torch.Generator().manual_seed(3)
    mask = make_mask(9, ["empty", "holes", "empty"], g).to(DEVICE)
    rewards, values = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    got, want = run_gae(rewards, values, mask, backend, gamma=0.9, lam=0.7)
    check_gae(got, want, torch.float32, torch.float32, backend)
    for t in got:
        assert (t[[0, 2]] == 0).all()
        assert (t[1][mask[1]] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["advantages", "returns"])
def test_gae_gradient_through_one_output(backend, which):
    g = torch.Generator().manual_seed(4)
    mask = make_mask(11, ["holes", "left", "single"], g).to(DEVICE)
    rewards, values = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    grads = []
    for fn, cast in ((lambda *a, **k: gae(*a, backend=backend, **k), lambda t: t),
                     (reference.gae, lambda t: t.double())):
        r = cast(rewards).detach().clone().requires_grad_()
        v = cast(values).detach().clone().requires_grad_()
        out = fn(r, v, mask, gamma=0.97, lam=0.93)[which == "returns"]
        (out * -1.7).sum().backward()
        grads.append((r.grad, v.grad))
    (gr, gv), (gr64, gv64) = grads
    assert_grads(gr, gr64, torch.float32, backend)
    assert_grads(gv, gv64, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_mixed_dtypes_and_extra_leading_dims(backend):
    g = torch.Generator().manual_seed(6)
    mask = make_mask(13, ROW_KINDS[:6], g).reshape(2, 3, 13).to(DEVICE)
    rewards = randn(mask.shape, g, torch.bfloat16)
    values = randn(mask.shape, g, torch.float32)
    got, want = run_gae(rewards, values, mask, backend, gamma=0.9, lam=0.95)
    check_gae(got, want, torch.bfloat16, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_strided_inputs(backend):
    g = torch.Generator().manual_seed(7)
    mask = make_mask(20, ROW_KINDS, g).to(DEVICE)
    big_r, big_v = randn((7, 40), g, torch.float32), randn((40, 7), g, torch.float32)
    rewards, values = big_r[:, ::2], big_v.t()[:, 1::2]  # neither is contiguous
    assert not rewards.is_contiguous() and not values.is_contiguous()
    got, want = run_gae(rewards, values, mask, backend, gamma=0.9, lam=0.9)
    check_gae(got, want, torch.float32, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_gae_and_reward_to_go_empty(backend, shape):
    r = torch.zeros(shape, device=DEVICE, requires_grad=True)
    v = torch.zeros(shape, device=DEVICE, requires_grad=True)
    mask = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    adv, ret = gae(r, v, mask, backend=backend)
    rtg = reward_to_go(r, mask, backend=backend)
    assert adv.shape == ret.shape == rtg.shape == shape
    assert adv.dtype == ret.dtype == rtg.dtype == torch.float32
    # Outputs stay connected to their inputs, as for any other shape, so backward works on each.
    for out in (adv, ret, rtg):
        assert out.requires_grad
    (adv.sum() + ret.sum() + rtg.sum()).backward()
    assert r.grad is not None and r.grad.shape == shape
    assert v.grad is not None and v.grad.shape == shape


# --------------------------------------------------------------------------------- reward_to_go


RTG_CASES = [(dtype, T, gamma) for dtype in DTYPES for T in (1, 37) for gamma in (1.0, 0.95, 0.0)] + [
    (torch.float32, 2500, 1.0), (torch.bfloat16, 2500, 0.95)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,T,gamma", RTG_CASES, ids=str)
def test_reward_to_go_grid(backend, dtype, T, gamma):
    g = torch.Generator().manual_seed(T)
    kinds = ROW_KINDS if T < 1000 else ["padded_holes", "empty", "left"]
    mask = make_mask(T, kinds, g).to(DEVICE)
    rewards = randn(mask.shape, g, dtype)
    (out, grad), (out64, grad64) = run_rtg(rewards, mask, backend, gamma=gamma, seed=T)
    assert_values(out, out64, T)
    assert_grads(grad, grad64, dtype, backend, T)
    assert (out[~mask] == 0).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_to_go_is_reverse_cumsum_for_right_padding(backend):
    # gamma = 1 on right-padded rows: the seed's reverse cumulative sum, sum(r_k..r_n).
    g = torch.Generator().manual_seed(8)
    T = 1300
    mask = make_mask(T, ["right", "right", "full", "single"], g)
    mask[3] = False
    mask[3, 0] = True  # a single token at the start: right padding too
    rewards = randn(mask.shape, g, torch.float32)
    out = reward_to_go(rewards, mask.to(DEVICE), backend=backend)
    masked = torch.where(mask, rewards.double().cpu(), 0.0)
    want = torch.where(mask, masked.flip(-1).cumsum(-1).flip(-1), 0.0)
    torch.testing.assert_close(out.double().cpu(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_to_go_with_gamma_is_discounted_sum_over_valid_positions(backend):
    # Holes are skipped, not read as zeros: G_k = sum_j gamma**(number of valid steps k -> j) r_j.
    mask = torch.tensor([[False, True, False, False, True, True, False]])
    rewards = torch.tensor([[9.0, 1.0, 7.0, 7.0, 2.0, 4.0, 9.0]])
    out = reward_to_go(rewards.to(DEVICE), mask.to(DEVICE), gamma=0.5, backend=backend)
    want = torch.tensor([[0.0, 1 + 0.5 * 2 + 0.25 * 4, 0, 0, 2 + 0.5 * 4, 4.0, 0]])
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [9, 1300])
def test_gae_with_unit_gamma_lam_is_reward_to_go_minus_values(backend, T):
    # The seed article's formula: A_k = sum(r_k..r_n) - V_k, R_k = sum(r_k..r_n).
    g = torch.Generator().manual_seed(9)
    mask = make_mask(T, ROW_KINDS if T < 1000 else ["holes", "left", "single", "empty"], g).to(DEVICE)
    rewards, values = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    adv, ret = gae(rewards, values, mask, backend=backend)
    rtg = reward_to_go(rewards, mask, backend=backend)
    torch.testing.assert_close(adv, torch.where(mask, rtg - values, 0.0), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret, rtg, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- garbage in padding


def with_garbage(x, mask, g):
    """x with NaN, +inf and -inf at invalid positions (cycled), the same elsewhere."""
    junk = torch.tensor([NAN, INF, -INF, NAN, 1e30])
    fill = junk[torch.randint(0, len(junk), x.shape, generator=g)].to(x.dtype).to(x.device)
    return torch.where(mask, x, fill)


def outputs_and_grads(fn, inputs, seed):
    """fn's outputs and the gradients of every input under a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    sum(((o * upstream(o.shape, seed + i)).sum() for i, o in enumerate(outs))).backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def assert_garbage_ignored(fn, clean, dirty, mask, seed=0):
    """Same outputs and same gradients at valid positions, bit for bit, with garbage in the padding;
    outputs and gradients exactly 0 at invalid positions."""
    outs, grads = outputs_and_grads(fn, clean, seed)
    outs_d, grads_d = outputs_and_grads(fn, dirty, seed)
    for o, o_d in zip(outs, outs_d):
        assert torch.equal(o_d, o)
        assert (o_d[~mask] == 0).all()
    for gr, gr_d in zip(grads, grads_d):
        assert torch.equal(gr_d[mask], gr[mask]), "garbage in the padding leaks into valid gradients"
    for gr, gr_d in zip(grads, grads_d):
        assert (gr[~mask] == 0).all()
        # The gradient of a constant 0 is 0: a NaN here would poison e.g. the logits' gradient
        # upstream of the padded log-probs.
        assert (gr_d[~mask] == 0).all(), f"gradient at invalid positions: {gr_d[~mask].unique()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_ignores_garbage_at_invalid_positions(backend):
    g = torch.Generator().manual_seed(11)
    mask = make_mask(1030, ["holes", "padded_holes", "single", "empty"], g).to(DEVICE)
    rewards, values = randn(mask.shape, g, torch.float32), randn(mask.shape, g, torch.float32)
    dirty = with_garbage(rewards, mask, g), with_garbage(values, mask, g)
    assert_garbage_ignored(lambda r, v: gae(r, v, mask, gamma=0.9, lam=0.8, backend=backend),
                           (rewards, values), dirty, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_to_go_ignores_garbage_at_invalid_positions(backend):
    g = torch.Generator().manual_seed(12)
    mask = make_mask(50, ROW_KINDS, g).to(DEVICE)
    rewards = randn(mask.shape, g, torch.bfloat16)
    assert_garbage_ignored(lambda r: reward_to_go(r, mask, gamma=0.7, backend=backend),
                           (rewards,), (with_garbage(rewards, mask, g),), mask)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_ignores_garbage_at_invalid_positions(backend):
    g = torch.Generator().manual_seed(14)
    mask = make_mask(300, ROW_KINDS, g).to(DEVICE)
    x = randn(mask.shape, g, torch.float32)
    assert_garbage_ignored(lambda t: masked_whiten(t, mask, backend=backend), (x,),
                           (with_garbage(x, mask, g),), mask)


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


# ---------------------------------------------------------------------------- masked_whiten


def run_whiten(x, mask, backend, *, shift_mean=True, eps=1e-8, seed=0):
    g_out = upstream(x.shape, seed)
    a = x.detach().clone().requires_grad_()
    out = masked_whiten(a, mask, shift_mean=shift_mean, eps=eps, backend=backend)
    (out * g_out).sum().backward()
    a64 = x.detach().double().requires_grad_()
    out64 = reference.masked_whiten(a64, mask, shift_mean=shift_mean, eps=eps)
    (out64 * g_out).sum().backward()
    return (out, a.grad), (out64, a64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape,eps", [((5, 7), 1e-8), ((3, 1000), 1e-8), ((2, 3, 4), 0.5),
                                       ((4096,), 0.0)], ids=str)
def test_masked_whiten_grid(backend, dtype, shift_mean, shape, eps):
    g = torch.Generator().manual_seed(sum(shape))
    mask = (torch.rand(shape, generator=g) < 0.7).to(DEVICE)
    x = randn(shape, g, dtype, scale=2.0) + 0.5
    (out, grad), (out64, grad64) = run_whiten(x, mask, backend, shift_mean=shift_mean, eps=eps)
    assert out.shape == shape
    assert_values(out, out64)
    assert_grads(grad, grad64, dtype, backend)
    assert (out[~mask] == 0).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_statistics(backend):
    g = torch.Generator().manual_seed(18)
    x = randn((3, 1000), g, torch.float32, scale=4.0) - 3.0  # 3000: three blocks, the last partial
    mask = make_mask(1000, ["left", "holes", "padded_holes"], g).to(DEVICE)
    out = masked_whiten(x, mask, eps=0.0, backend=backend)[mask].double()
    assert abs(out.mean().item()) < 1e-6
    assert abs(out.std(unbiased=True).item() - 1) < 1e-6
    kept = masked_whiten(x, mask, shift_mean=False, eps=0.0, backend=backend)[mask].double()
    mean = x[mask].double().mean()
    torch.testing.assert_close(kept.mean(), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(kept - mean, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_two_valid_entries(backend):
    x = torch.tensor([[3.0, 100.0, -1.0], [NAN, 5.0, 7.0]], device=DEVICE)
    mask = torch.tensor([[True, False, False], [False, False, True]], device=DEVICE)
    out = masked_whiten(x, mask, eps=0.0, backend=backend)
    # Two values: mean in the middle, Bessel variance (a - b)**2 / 2, so +-1/sqrt(2).
    want = torch.tensor([[-1 / math.sqrt(2), 0, 0], [0, 0, 1 / math.sqrt(2)]], device=DEVICE)
    torch.testing.assert_close(out, want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", [1.0, 10.0])
def test_masked_whiten_large_offset_is_stable(backend, spread):
    # x = 1e4 + noise: a one-pass variance, sum(x**2)/n - mean**2 in float32, cancels catastrophically
    # (sum x**2 ~ 3e11, where a float32 ulp is ~3e4). The two-pass statistics keep the whitened values
    # float32-accurate: the only error left is the float32 mean's, a few ulps at 1e4 (2**-10 each)
    # divided by the spread.
    g = torch.Generator().manual_seed(19)
    x = (1e4 + spread * torch.randn(3, 1000, generator=g)).to(DEVICE)
    mask = make_mask(1000, ["holes", "right", "full"], g).to(DEVICE)
    (out, grad), (out64, grad64) = run_whiten(x, mask, backend)
    tol = 2 * 2 ** -10 / spread
    torch.testing.assert_close(out.double(), out64, atol=tol, rtol=0)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-5, rtol=1e-3)
    # The tolerance is tight enough to reject the one-pass formula.
    xv = x[mask]
    n = xv.numel()
    mean = xv.sum() / n
    var = ((xv * xv).sum() - n * mean * mean) / (n - 1)
    naive = (xv - mean) * torch.rsqrt(var.clamp(min=1e-8))
    assert (naive.double() - out64[mask]).abs().max() > 10 * tol


# --------------------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 40),
    p=st.floats(0.0, 1.0),
    gamma=st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 1.0)),
    lam=st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 1.0)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2 ** 16),
)
def test_property_gae_triton(B, T, p, gamma, lam, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) < p).to(DEVICE)
    rewards, values = randn((B, T), g, dtype), randn((B, T), g, dtype)
    got, want = run_gae(rewards, values, mask, "triton", gamma=gamma, lam=lam, seed=seed)
    check_gae(got, want, dtype, dtype, "triton")
    assert all((t[~mask] == 0).all() for t in got)


# ------------------------------------------------------------------------------- bad input


def _x(shape=(2, 5), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def _m(shape=(2, 5)):
    return torch.ones(shape, dtype=torch.bool)


def _one_valid():
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[1, 3] = True
    return m


BAD = [
    # gae
    (lambda: gae(_x(), _x((2, 4)), _m()), ValueError, r"values must have the shape of rewards, \(2, 5\)"),
    (lambda: gae(_x(), _x(), _m((2, 4))), ValueError, r"mask must have the shape of rewards"),
    (lambda: gae(_x(), _x(), _m().int()), TypeError, "mask must be a bool tensor"),
    (lambda: gae(_x().long(), _x(), _m()), TypeError, "rewards must be a floating-point tensor"),
    (lambda: gae(_x(), _x().int(), _m()), TypeError, "values must be a floating-point tensor"),
    (lambda: gae(_x().tolist(), _x(), _m()), TypeError, "rewards must be a torch.Tensor"),
    (lambda: gae(_x(), _x().numpy(), _m()), TypeError, "values must be a torch.Tensor"),
    (lambda: gae(_x(), _x(), _m().numpy()), TypeError, "mask must be a torch.Tensor"),
    (lambda: gae(_x(()), _x(()), _m(())), ValueError, r"rewards must have shape \(\.\.\., T\)"),
    (lambda: gae(_x(), _x(), _m(), gamma=1.01), ValueError, "gamma must be a finite number >= 0.0"),
    (lambda: gae(_x(), _x(), _m(), gamma=-0.1), ValueError, "gamma must be"),
    (lambda: gae(_x(), _x(), _m(), gamma=NAN), ValueError, "gamma must be"),
    (lambda: gae(_x(), _x(), _m(), gamma="0.9"), TypeError, "gamma must be a real number"),
    (lambda: gae(_x(), _x(), _m(), lam=1.5), ValueError, "lam must be a finite number"),
    (lambda: gae(_x(), _x(), _m(), lam=-1e-9), ValueError, "lam must be"),
    (lambda: gae(_x(), _x(), _m(), lam=INF), ValueError, "lam must be"),
    (lambda: gae(_x(), _x(), _m(), lam=True), TypeError, "lam must be a real number"),
    (lambda: gae(_x(), _x(), _m(), backend="cuda"), ValueError, "backend must be one of"),
    (lambda: gae(_x(), _x(), _m(), backend=None), TypeError, "backend must be a str"),
    (lambda: gae(_x(), _x(), _m().to("meta")), ValueError, "mask is on meta but rewards is on cpu"),
    # reward_to_go
    (lambda: reward_to_go(_x(), _m((5, 2))), ValueError, "mask must have the shape of rewards"),
    (lambda: reward_to_go(_x(), _x()), TypeError, "mask must be a bool tensor"),
    (lambda: reward_to_go(_x().int(), _m()), TypeError, "rewards must be a floating-point tensor"),
    (lambda: reward_to_go(1.0, _m()), TypeError, "rewards must be a torch.Tensor"),
    (lambda: reward_to_go(_x(), _m(), gamma=2), ValueError, "gamma must be"),
    (lambda: reward_to_go(_x(), _m(), backend="jax"), ValueError, "backend must be one of"),
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
    # masked_whiten
    (lambda: masked_whiten(_x(), _m((5, 2))), ValueError, r"mask must have the shape of x, \(2, 5\)"),
    (lambda: masked_whiten(_x(), _x()), TypeError, "mask must be a bool tensor"),
    (lambda: masked_whiten(_x().long(), _m()), TypeError, "x must be a floating-point tensor"),
    (lambda: masked_whiten(_x().numpy(), _m()), TypeError, "x must be a torch.Tensor"),
    (lambda: masked_whiten(_x(), _m(), eps=-1e-8), ValueError, "eps must be a finite number >= 0.0"),
    (lambda: masked_whiten(_x(), _m(), eps=INF), ValueError, "eps must be"),
    (lambda: masked_whiten(_x(), _m(), shift_mean=1), TypeError, "shift_mean must be a bool"),
    (lambda: masked_whiten(_x(), _m(), backend="auto2"), ValueError, "backend must be one of"),
    (lambda: masked_whiten(_x(), _m() & False), ValueError,
     "mask must mark at least 2 valid entries to estimate a variance; got 0"),
    (lambda: masked_whiten(_x(), _one_valid()), ValueError,
     "mask must mark at least 2 valid entries to estimate a variance; got 1"),
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
    with pytest.raises(ValueError, match="got 1"):
        masked_whiten(_x(), _one_valid(), backend=backend)
    with pytest.raises(ValueError, match="lam must be"):
        gae(_x(), _x(), _m(), lam=1.1, backend=backend)

"""fastppo.kernels.gae and reward_to_go against their float64 references: values and gradients,
every backend, every mask layout.

On a machine without a GPU the "triton" backend runs through Triton's interpreter (see conftest.py).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from fastppo.kernels import gae, reference, reward_to_go
from op_testing import (BACKENDS, DTYPES, LAYOUTS, ROW_KINDS, VALUE_TOL, assert_garbage_ignored,
                        assert_grads, assert_values, layout, make_mask, randn, upstream, views_of,
                        with_garbage, _m, _x, INF, NAN)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter


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
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_rejected_on_every_backend(backend):
    # The checks run before the backend is chosen: the same error whichever backend was asked for.
    with pytest.raises(ValueError, match="lam must be"):
        gae(_x(), _x(), _m(), lam=1.1, backend=backend)


# ------------------------------------------------------------------- every view of every argument

# Row 0 (the one an "expanded" view repeats) has holes; the others other layouts.
VIEW_KINDS = ["holes", "left", "padded_holes", "right"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_gae_views_of_every_argument(backend, kind):
    # rewards, values and mask as strided / transposed / offset / expanded views: advantages, returns
    # and the gradients reaching the rewards' and values' leaves, against the reference on contiguous
    # copies of the same views.
    g = torch.Generator().manual_seed(20)
    mask = make_mask(9, VIEW_KINDS, g).to(DEVICE)
    inputs = dict(rewards=randn(mask.shape, g, torch.float32), values=randn(mask.shape, g, torch.float32),
                  mask=mask)
    op, ref, leaves, leaves64 = views_of(inputs, layout(kind, list(inputs)), grads=["rewards", "values"])
    g_adv, g_ret = upstream(mask.shape, 3), upstream(mask.shape, 4)
    adv, ret = gae(op["rewards"], op["values"], op["mask"], gamma=0.9, lam=0.8, backend=backend)
    (adv * g_adv + ret * g_ret).sum().backward()
    adv64, ret64 = reference.gae(ref["rewards"], ref["values"], ref["mask"], gamma=0.9, lam=0.8)
    (adv64 * g_adv + ret64 * g_ret).sum().backward()
    assert_values(adv, adv64)
    assert_values(ret, ret64)
    assert_grads(leaves["rewards"].grad, leaves64["rewards"].grad, torch.float32, backend)
    assert_grads(leaves["values"].grad, leaves64["values"].grad, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_reward_to_go_views_of_every_argument(backend, kind):
    g = torch.Generator().manual_seed(21)
    mask = make_mask(9, VIEW_KINDS, g).to(DEVICE)
    inputs = dict(rewards=randn(mask.shape, g, torch.float32), mask=mask)
    op, ref, leaves, leaves64 = views_of(inputs, layout(kind, list(inputs)), grads=["rewards"])
    g_out = upstream(mask.shape, 5)
    out = reward_to_go(op["rewards"], op["mask"], gamma=0.7, backend=backend)
    (out * g_out).sum().backward()
    out64 = reference.reward_to_go(ref["rewards"], ref["mask"], gamma=0.7)
    (out64 * g_out).sum().backward()
    assert_values(out, out64)
    assert_grads(leaves["rewards"].grad, leaves64["rewards"].grad, torch.float32, backend)

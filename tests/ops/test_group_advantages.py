"""group_advantages: hand-computed cases, every backend against the float64 reference (values and
gradients, odd group sizes, dtypes), degenerate groups, bad input."""
import math

import pytest
import torch

from conftest import DEVICE
from fastppo.kernels import group_advantages, reference

BACKENDS = ["triton", "torch"]
MODES = ["grpo", "dr_grpo", "rloo"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    s = torch.tensor([1.0, 2.0, 0.0, 3.0, 6.0, 7.0], device=DEVICE)
    # groups of 2: (1, 2), (0, 3), (6, 7): centred -+0.5, -+1.5, -+0.5; std 0.7071, 2.1213, 0.7071
    got = group_advantages(s, 2, mode="grpo", eps=0.0, backend=backend)
    torch.testing.assert_close(got.cpu(), torch.tensor([-1, 1, -1, 1, -1, 1.0]) / math.sqrt(2))
    got = group_advantages(s, 2, mode="dr_grpo", backend=backend)
    torch.testing.assert_close(got.cpu(), torch.tensor([-0.5, 0.5, -1.5, 1.5, -0.5, 0.5]))
    # groups of 3: (1, 2, 0) and (3, 6, 7): RLOO is the score minus the mean of the other two
    got = group_advantages(s, 3, mode="rloo", backend=backend)
    torch.testing.assert_close(got.cpu(), torch.tensor([1 - 1.0, 2 - 0.5, 0 - 1.5, 3 - 6.5, 6 - 5.0, 7 - 4.5]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_groups_of_one_and_equal_scores_give_zero_not_nan(backend, mode):
    # equal scores that are not dyadic (a float32 mean of them is not the number), odd group sizes
    cases = [(torch.tensor([0.3, -2.0, 5.0]), 1, 1e-6), (torch.tensor([4.0] * 3 + [-1.0] * 3), 3, 1e-6)]
    cases += [(torch.tensor([v] * k * 2), k, eps) for v in (10.1, 123.456, 3.3, 0.7) for k in (3, 5, 6, 7, 8)
              for eps in (1e-6, 0.0)]
    for scores, k, eps in cases:
        s = scores.to(DEVICE).requires_grad_()
        out = group_advantages(s, k, mode=mode, eps=eps, backend=backend)
        assert torch.equal(out.detach().cpu(), torch.zeros(len(scores)))
        out.mul(torch.arange(len(scores), device=DEVICE)).sum().backward()
        assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [2, 5, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_the_float64_reference(backend, mode, k, dtype):
    g = torch.Generator().manual_seed(k)
    scores = (torch.randn(4 * k, generator=g) * 3 + 1).to(dtype).to(DEVICE).requires_grad_()
    up = torch.randn(4 * k, generator=g).to(DEVICE)
    out = group_advantages(scores, k, mode=mode, backend=backend)
    (out * up).sum().backward()
    s64 = scores.detach().double().requires_grad_()
    want = reference.group_advantages(s64, k, mode=mode)
    (want * up.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == scores.shape
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # the gradient comes back in the scores' dtype
    torch.testing.assert_close(scores.grad.double(), s64.grad, rtol=tol, atol=tol)
    if mode == "grpo":  # whitened within each group
        groups = out.detach().double().view(4, k)
        torch.testing.assert_close(groups.mean(-1), torch.zeros(4, dtype=torch.float64,
                                                                device=DEVICE), atol=1e-5, rtol=0)
        torch.testing.assert_close(groups.std(-1), torch.ones(4, dtype=torch.float64, device=DEVICE),
                                   atol=1e-4, rtol=0)


def test_bad_input_is_named():
    s = torch.zeros(6)
    with pytest.raises(ValueError, match="scores must be 1-D"):
        group_advantages(s.view(2, 3), 3)
    with pytest.raises(ValueError, match="group_size must be >= 1 and divide"):
        group_advantages(s, 4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_advantages(s, 0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        group_advantages(s, 2.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        group_advantages(s, 2, mode="ppo")
    with pytest.raises(ValueError, match="eps must be"):
        group_advantages(s, 2, eps=-1.0)
    with pytest.raises(TypeError, match="scores must be"):
        group_advantages(torch.zeros(6, dtype=torch.long), 2)

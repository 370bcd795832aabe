"""fastppo.kernels.masked_whiten against its float64 reference: values and gradients, every backend.

On a machine without a GPU the "triton" backend runs through Triton's interpreter (see conftest.py).
"""
import math

import pytest
import torch

from conftest import DEVICE
from fastppo.kernels import masked_whiten, reference
from op_testing import (BACKENDS, DTYPES, LAYOUTS, ROW_KINDS, assert_garbage_ignored, assert_grads,
                        assert_values, layout, make_mask, randn, upstream, views_of, with_garbage, _m,
                        _one_valid, _x, INF, NAN)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter

# --------------------------------------------------------------------------- garbage in padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_ignores_garbage_at_invalid_positions(backend):
    g = torch.Generator().manual_seed(14)
    mask = make_mask(300, ROW_KINDS, g).to(DEVICE)
    x = randn(mask.shape, g, torch.float32)
    assert_garbage_ignored(lambda t: masked_whiten(t, mask, backend=backend), (x,),
                           (with_garbage(x, mask, g),), mask)


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


# ------------------------------------------------------------------------------- bad input


BAD = [
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
    with pytest.raises(ValueError, match="got 1"):
        masked_whiten(_x(), _one_valid(), backend=backend)


# ------------------------------------------------------------------- every view of every argument


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_views_of_every_argument(backend, kind, shift_mean):
    # x and mask as strided / transposed / offset / expanded views: values and the gradient reaching
    # x's leaf, against the reference on contiguous copies of the same views.
    g = torch.Generator().manual_seed(24)
    mask = make_mask(9, ["holes", "left", "padded_holes", "right"], g).to(DEVICE)
    inputs = dict(x=randn(mask.shape, g, torch.float32, scale=2.0) + 0.5, mask=mask)
    op, ref, leaves, leaves64 = views_of(inputs, layout(kind, list(inputs)), grads=["x"])
    g_out = upstream(mask.shape, 8)
    out = masked_whiten(op["x"], op["mask"], shift_mean=shift_mean, backend=backend)
    (out * g_out).sum().backward()
    out64 = reference.masked_whiten(ref["x"], ref["mask"], shift_mean=shift_mean)
    (out64 * g_out).sum().backward()
    assert_values(out, out64)
    assert_grads(leaves["x"].grad, leaves64["x"].grad, torch.float32, backend)


# ------------------------------------------------------------------ split over ranks (torchrun)


def test_masked_whiten_over_two_ranks_equals_one_tensor(tmp_path):
    """Two gloo ranks each whiten their own rows (1 and 2 of 3) with process_group=WORLD: outputs
    and gradients equal the float64 reference on the whole tensor (torch and triton backends,
    float32 and bf16, with and without the mean), and too few valid entries over all ranks is the
    same error on every rank."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from whiten_ranks import PARTS, global_inputs

    worker = os.path.join(os.path.dirname(__file__), "whiten_ranks.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", worker, str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # os.environ carries conftest's TRITON_INTERPRET on a machine without GPU
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(len(PARTS))]
    assert all(r["error"].item() == 1.0 for r in ranks)
    for key in [k.removesuffix("/out") for k in ranks[0] if k.endswith("/out")]:
        dtype = getattr(torch, key.split("-")[1])
        x, mask, g = global_inputs(dtype)
        a64 = x.double().requires_grad_()
        want = reference.masked_whiten(a64, mask, shift_mean=key.endswith("True"))
        (want * g).sum().backward()
        out = torch.cat([r[f"{key}/out"] for r in ranks])
        grad = torch.cat([r[f"{key}/grad"] for r in ranks])
        assert_values(out, want)
        assert_grads(grad.to(dtype), a64.grad, dtype, key.split("-")[0])

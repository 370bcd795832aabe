"""fastppo.kernels.token_logprobs against its float64 reference: values and gradients, every backend.

On a machine without a GPU the "triton" backend runs through Triton's interpreter (see conftest.py).
"""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from fastppo.kernels import _chunked as chunked, reference
from fastppo.kernels._checks import triton_interpreting
from fastppo.kernels import token_logprobs
from fastppo.kernels._layout import as_outer_inner
from op_testing import LAYOUTS, VOCAB_VIEWS, layout, upstream, views_of

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter

BACKENDS = ["triton", "native", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Outputs are accumulated in float32 whatever the logits' dtype, so values get float32 tolerances for
# every dtype; the gradient is stored in the logits' dtype and gets that dtype's rounding.
VALUE_TOL = dict(atol=3e-5, rtol=1e-5)
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-6, rtol=2 ** -8),
    torch.float16: dict(atol=1e-7, rtol=2 ** -11),
}


def make_inputs(lead, V, dtype, *, scale=3.0, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    return logits.to(DEVICE), labels.to(DEVICE)


def run_both(logits, labels, backend, *, temperature=1.0, ignore_index=-100, seed=1, **kw):
    """(logprobs, entropy, grad) from the op and from the float64 reference, with random upstream
    gradients (non-unit, of both signs) on both outputs."""
    x = logits.detach().clone().requires_grad_()
    lp, ent = token_logprobs(x, labels, temperature=temperature, ignore_index=ignore_index,
                             return_entropy=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(lp.shape, generator=g).to(lp.device)
    g_ent = torch.randn(lp.shape, generator=g).to(lp.device)
    (lp * g_lp + ent * g_ent).sum().backward()

    x64 = logits.detach().double().requires_grad_()
    lp64, ent64 = reference.token_logprobs(x64, labels, temperature=temperature,
                                           ignore_index=ignore_index, return_entropy=True)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    return (lp, ent, x.grad), (lp64, ent64, x64.grad)


def grad_tol(dtype, backend):
    if dtype == torch.bfloat16 and backend == "triton" and triton_interpreting():
        # Triton's interpreter truncates float32 -> bfloat16 (a full ulp, 2**-7) where the compiled
        # kernel rounds to nearest even (half an ulp, 2**-8); checked in test_interpreter_bf16_cast.
        return dict(atol=1e-6, rtol=2 ** -7)
    return GRAD_TOL[dtype]


def assert_matches(got, want, dtype, backend="torch"):
    (lp, ent, grad), (lp64, ent64, grad64) = got, want
    assert lp.dtype == ent.dtype == torch.float32
    assert grad.dtype == dtype
    torch.testing.assert_close(lp.double(), lp64, **VALUE_TOL)
    torch.testing.assert_close(ent.double(), ent64, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), grad64, **grad_tol(dtype, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,V", [((13,), 1), ((3, 5), 7), ((2, 9), 1000), ((5,), 32003),
                                     ((2, 2), 70001)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grid(backend, dtype, lead, V, temperature):
    logits, labels = make_inputs(lead, V, dtype)
    got, want = run_both(logits, labels, backend, temperature=temperature)
    assert_matches(got, want, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_view_of_shifted_logits(backend, dtype):
    # The usual causal-LM call: logits[:, :-1] predicts labels[:, 1:]; the view has two row strides.
    logits, labels = make_inputs((3, 11), 257, dtype)
    got, want = run_both(logits[:, :-1], labels[:, 1:], backend, temperature=1.3)
    assert_matches(got, want, dtype, backend)


def test_strided_view_is_read_in_place(monkeypatch):
    module = importlib.import_module("fastppo.kernels.token_logprobs")  # the module, not the function
    logits, labels = make_inputs((4, 9), 100, torch.float32)
    seen = []
    real = module._forward
    monkeypatch.setattr(module, "_forward", lambda x3, *a: seen.append(x3) or real(x3, *a))
    token_logprobs(logits[:, :-1], labels[:, 1:], backend="triton")
    (x3,) = seen
    assert x3.data_ptr() == logits.data_ptr() and x3.untyped_storage().data_ptr() == \
        logits.untyped_storage().data_ptr()
    assert x3.stride() == (9 * 100, 100, 1)


def test_layout_collapses_mergeable_dims():
    x = torch.zeros(2, 3, 4, 10)
    assert as_outer_inner(x).shape == (1, 24, 10)
    v = as_outer_inner(x[:, :, :-1])
    assert v.shape == (6, 3, 10) and v.data_ptr() == x.data_ptr()
    three = x[:, :-1, :-1]  # three strides: one copy
    copied = as_outer_inner(three)
    assert copied.data_ptr() != x.data_ptr() and torch.equal(copied.reshape(three.shape), three)
    y = x[1:, 1:]
    assert as_outer_inner(y).data_ptr() == y.data_ptr()  # storage offset is kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_needing_three_strides_are_copied_correctly(backend):
    logits, labels = make_inputs((3, 4, 5), 33, torch.float32)
    got, want = run_both(logits[:, :-1, :-1], labels[:, 1:, 1:], backend)
    assert_matches(got, want, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_vocab_dim_is_copied_correctly(backend):
    logits, labels = make_inputs((6,), 40, torch.float32)
    transposed = logits.t().contiguous().t()  # same values, vocabulary stride 6
    assert transposed.stride(-1) != 1
    got, want = run_both(transposed, labels, backend)
    assert_matches(got, want, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_banned_tokens(backend, dtype):
    logits, labels = make_inputs((4, 3), 5000, dtype, ignore_frac=0.0)
    logits[0, 0, :4500] = float("-inf")  # whole first block(s) banned: the running max stays -inf
    logits[1, :, ::3] = float("-inf")
    logits[2, 1, :] = float("-inf")
    logits[2, 1, 17] = 2.0  # a single allowed token: entropy 0, logprob 0 there
    labels[2, 1] = 17
    labels[3, 2] = 0
    logits[3, 2, 0] = float("-inf")  # the label itself is banned: logprob -inf, finite gradient
    got, want = run_both(logits, labels, backend, temperature=0.9)
    assert_matches(got, want, dtype, backend)
    lp, ent, grad = got
    assert lp[2, 1] == 0 and ent[2, 1] == 0 and lp[3, 2] == float("-inf")
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_magnitude_logits(backend, dtype):
    logits, labels = make_inputs((3, 4), 1000, dtype, scale=1.0)
    logits = (logits * 1e4).to(dtype)  # values near +-1e4, gaps of order 1
    logits[0, 0, 5] = 1e4
    logits[0, 0, 6] = 1e4 - 1.5
    got, want = run_both(logits, labels, backend, temperature=1.7)
    if backend == "torch":
        # The reference in float32 forms log-softmax as x - lse at magnitude 1e4, where a float32
        # ulp is ~1e-3: that is the precision loss the Triton kernel avoids (next assertion).
        torch.testing.assert_close(got[0].double(), want[0], atol=4e-3, rtol=0)
    else:
        assert_matches(got, want, dtype, backend)


@pytest.mark.skipif(not triton_interpreting(), reason="about Triton's interpreter only")
def test_interpreter_bf16_cast():
    # Documents why grad_tol() relaxes bf16 under the interpreter: its float32 -> bf16 cast truncates.
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))

    x = 1 + torch.arange(256) * 2.0 ** -12  # in [1, 1.0625): the bf16 ulp there is 2**-7
    y = torch.empty(256, dtype=torch.bfloat16)
    cast[(1,)](x, y, N=256)
    truncated = torch.floor(x.double() / 2 ** -7) * 2 ** -7
    assert torch.equal(y.double(), truncated)  # fails once the interpreter rounds: then tighten
    assert not torch.equal(x.bfloat16().double(), truncated)


def test_bf16_logits_keep_float32_precision():
    # A log-softmax done in bfloat16 is off by ~1e-2; ours must be float32-accurate from bf16 input.
    logits, labels = make_inputs((8,), 32003, torch.bfloat16, ignore_frac=0.0)
    ours = token_logprobs(logits, labels, backend="triton").double()
    truth = reference.token_logprobs(logits.double(), labels)
    in_bf16 = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0].double()
    assert (in_bf16 - truth).abs().max() > 1e-3
    assert (ours - truth).abs().max() < 3e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_is_applied_once_in_forward_and_backward(backend):
    # log softmax(x / T) with the op's temperature must equal the op at T = 1 on x / T, and the
    # gradients must relate by the chain rule: d/dx = (d/dz) / T.
    logits, labels = make_inputs((5, 3), 300, torch.float64 if backend == "torch" else torch.float32)
    T = 2.5
    x = logits.detach().clone().requires_grad_()
    z = (logits.detach() / T).requires_grad_()
    lp_t, ent_t = token_logprobs(x, labels, temperature=T, return_entropy=True, backend=backend)
    lp_1, ent_1 = token_logprobs(z, labels, return_entropy=True, backend=backend)
    torch.testing.assert_close(lp_t, lp_1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_t, ent_1, atol=1e-5, rtol=1e-5)
    (lp_t.sum() + 0.3 * ent_t.sum()).backward()
    (lp_1.sum() + 0.3 * ent_1.sum()).backward()
    torch.testing.assert_close(x.grad, z.grad.to(x.grad.dtype) / T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_positions_give_zero_and_zero_gradient(backend):
    logits, labels = make_inputs((4, 6), 50, torch.float32, ignore_frac=0.0)
    labels[1] = 7
    labels[:, 2] = 7
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, labels, ignore_index=7, return_entropy=True, backend=backend)
    (lp * 3.0 - ent * 2.0).sum().backward()
    ignored = labels == 7
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (x.grad[ignored] == 0).all()
    assert (x.grad[~ignored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_positions_ignored(backend):
    logits, _ = make_inputs((2, 3), 20, torch.bfloat16)
    labels = torch.full((2, 3), -100, device=logits.device)
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp + ent).sum().backward()
    assert (lp == 0).all() and (ent == 0).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_through_one_output(backend, which):
    logits, labels = make_inputs((3, 4), 64, torch.float32)
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, labels, temperature=0.8, return_entropy=True, backend=backend)
    (lp if which == "logprobs" else ent).mul(-1.7).sum().backward()
    x64 = logits.double().requires_grad_()
    lp64, ent64 = reference.token_logprobs(x64, labels, temperature=0.8, return_entropy=True)
    (lp64 if which == "logprobs" else ent64).mul(-1.7).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy_and_int32_labels(backend):
    logits, labels = make_inputs((2, 5), 123, torch.float16)
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, labels.int(), temperature=1.2, backend=backend)
    assert isinstance(lp, torch.Tensor) and lp.shape == labels.shape
    (lp * 0.5).sum().backward()
    x64 = logits.double().requires_grad_()
    (reference.token_logprobs(x64, labels, temperature=1.2) * 0.5).sum().backward()
    torch.testing.assert_close(lp.double(), reference.token_logprobs(logits.double(), labels,
                                                                     temperature=1.2), **VALUE_TOL)
    torch.testing.assert_close(x.grad.double(), x64.grad, **GRAD_TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_empty_batch(backend, lead):
    logits = torch.randn(*lead, 11, device=DEVICE, requires_grad=True)
    labels = torch.zeros(lead, dtype=torch.long, device=DEVICE)
    lp, ent = token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == lead and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    logits, labels = make_inputs((3, 4), 99, torch.bfloat16)
    x = logits.clone().requires_grad_()
    before = x.detach().clone()
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp + ent).sum().backward()
    assert torch.equal(x.detach(), before)


def test_torch_backend_in_many_chunks(monkeypatch):
    # Force chunks of 2 rows so both chunking branches (several outer rows; one row split) are used.
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2 * 37)
    for lead, view in [((5, 1), lambda t: t), ((2, 7), lambda t: t[:, :-1])]:
        logits, labels = make_inputs(lead, 37, torch.float32)
        got, want = run_both(view(logits), view(labels), "torch", temperature=0.6)
        assert_matches(got, want, torch.float32, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,at", [(37, 0), (37, 36), (3000, 2500)])  # 3000: past the first chunk
def test_nan_logit_gives_nan(backend, V, at):
    # NaN in, NaN out on every backend (the native kernels once returned +inf for such a row), in
    # the log-prob, the entropy and the row's gradient; the other rows are untouched.
    logits, labels = make_inputs((3,), V, torch.float32, ignore_frac=0.0)
    logits[1, at] = float("nan")
    labels[1] = (at + 1) % V  # the NaN is not the label's own logit
    x = logits.to(DEVICE).requires_grad_()
    lp, h = token_logprobs(x, labels.to(DEVICE), return_entropy=True, backend=backend)
    (lp.sum() + h.sum()).backward()
    assert lp[1].isnan() and h[1].isnan() and x.grad[1].isnan().all()
    want_lp, want_h = reference.token_logprobs(logits[[0, 2]].double(), labels[[0, 2]],
                                               return_entropy=True)
    torch.testing.assert_close(lp[[0, 2]].cpu().double(), want_lp, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(h[[0, 2]].cpu().double(), want_h, atol=3e-5, rtol=1e-5)
    assert x.grad[[0, 2]].isfinite().all()


def test_label_out_of_range_without_validation_gives_nan():
    logits, labels = make_inputs((4,), 10, torch.float32, ignore_frac=0.0)
    labels[1], labels[2] = 10, -3
    for backend in BACKENDS:
        lp = token_logprobs(logits, labels, validate=False, backend=backend)
        assert lp[1].isnan() and lp[2].isnan() and lp[[0, 3]].isfinite().all(), backend


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 6),
    V=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    temperature=st.floats(0.3, 3.0),
    scale=st.floats(0.0, 20.0),
    ignore_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2 ** 16),
)
def test_property_random_shapes(rows, V, dtype, temperature, scale, ignore_frac, seed):
    logits, labels = make_inputs((rows,), V, dtype, scale=scale, ignore_frac=ignore_frac, seed=seed)
    got, want = run_both(logits, labels, "triton", temperature=temperature, seed=seed)
    assert_matches(got, want, dtype, "triton")


# ---------------------------------------------------------------- backend choice and bad input


def test_backend_from_environment(monkeypatch):
    logits, labels = make_inputs((2,), 5, torch.float32)
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # "triton" on CPU would now be refused
    token_logprobs(logits, labels)  # resolved to torch from the environment
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            token_logprobs(logits, labels, backend="triton")
    monkeypatch.setenv("FASTPPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPPO_BACKEND must be one of"):
        token_logprobs(logits, labels)


def test_auto_backend_on_cpu_is_native_where_an_op_has_native_kernels(monkeypatch):
    # "auto" on CPU: the native kernels for an op that has them (native_dtype is its logits' dtype),
    # the chunked reference for an op without (native_dtype None) or a dtype they do not take.
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)
    from fastppo.kernels._checks import resolve_backend
    assert resolve_backend("auto", torch.device("cpu"), native_dtype=torch.float32) == "native"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), native_dtype=torch.float64) == "torch"


BAD = [
    (lambda x, y: (x.long(), y), {}, TypeError, "logits must be a floating-point tensor"),
    (lambda x, y: (x.numpy(), y), {}, TypeError, "logits must be a torch.Tensor"),
    (lambda x, y: (x, y.float()), {}, TypeError, "labels must be an integer tensor"),
    (lambda x, y: (x, y[:, :-1]), {}, ValueError, r"labels must have shape logits.shape\[:-1\]"),
    (lambda x, y: (x[..., :0], y), {}, ValueError, "empty vocabulary"),
    (lambda x, y: (x[0, 0, 0], y[0, 0]), {}, ValueError, "labels must have shape|got a scalar"),
    (lambda x, y: (x, y), {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    (lambda x, y: (x, y), {"temperature": -1}, ValueError, "temperature must be"),
    (lambda x, y: (x, y), {"temperature": float("nan")}, ValueError, "temperature must be"),
    (lambda x, y: (x, y), {"temperature": "1"}, TypeError, "temperature must be a real number"),
    (lambda x, y: (x, y), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    (lambda x, y: (x, y), {"backend": "cuda"}, ValueError, "backend must be one of"),
    (lambda x, y: (x, y), {"backend": None}, TypeError, "backend must be a str"),
    (lambda x, y: (x, y.fill_(10)), {}, ValueError, r"labels must lie in \[0, 10\)"),
    (lambda x, y: (x, y.fill_(-1)), {}, ValueError, "or equal ignore_index=-100"),
]


@pytest.mark.parametrize("make,kwargs,error,message", BAD)
def test_bad_input(make, kwargs, error, message):
    logits, labels = make_inputs((2, 3), 10, torch.float32)
    logits, labels = make(logits.cpu(), labels.cpu().clone())
    with pytest.raises(error, match=message):
        token_logprobs(logits, labels, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    logits, labels = make_inputs((2, 3), 10, torch.float32)
    with pytest.raises(ValueError, match="labels is on cpu but logits is on cuda"):
        token_logprobs(logits.cuda(), labels.cpu())


def test_tensors_on_different_devices_meta():
    logits = torch.randn(2, 10)
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        token_logprobs(logits, labels)


def test_bare_kernels_import_fails_loudly_but_lets_transformers_probe():
    # From the repository root, `kernels` shadows the PyPI package of that name. Using it fails
    # loudly; transformers, which probes for that package by importing it, must still import.
    root = Path(__file__).resolve().parents[2]
    for code in ("from kernels import token_logprobs", "import kernels; kernels.ppo_loss"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
        assert proc.returncode != 0
        assert "must be imported as `fastppo.kernels`" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import transformers; transformers.LlamaConfig"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_realistic_shape_bf16():
    # A realistic vocabulary through the kernel's multi-block loop, rows not a multiple of any block.
    # Each row is an independent program: Liger's 3 x 423 rows cost the interpreter a minute and test
    # nothing 3 x 43 do not (the row count is the GPU benchmark's business).
    logits, labels = make_inputs((3, 43), 32000, torch.bfloat16, seed=3)
    got, want = run_both(logits[:, :-1], labels[:, 1:], "triton", temperature=0.9)
    assert_matches(got, want, torch.bfloat16, "triton")


# ------------------------------------------------------------------- every view of every argument


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS + VOCAB_VIEWS)
def test_views_of_every_argument(backend, kind):
    # logits and labels as strided / transposed / offset / expanded views (and logits with a strided
    # or transposed vocabulary dim): values and the gradient reaching the logits' leaf, against the
    # reference on contiguous copies of the same views.
    logits, labels = make_inputs((3, 4), 37, torch.float32, seed=4)
    labels[0, 1] = -100  # row 0 is the one an expanded view repeats: an ignored position there too
    op, ref, leaves, leaves64 = views_of(dict(logits=logits, labels=labels),
                                         layout(kind, ["logits", "labels"]), grads=["logits"])
    g_lp, g_ent = upstream(labels.shape, 1), upstream(labels.shape, 2)
    lp, ent = token_logprobs(op["logits"], op["labels"], temperature=0.8, return_entropy=True,
                             backend=backend)
    (lp * g_lp + ent * g_ent).sum().backward()
    lp64, ent64 = reference.token_logprobs(ref["logits"], ref["labels"], temperature=0.8,
                                           return_entropy=True)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    assert_matches((lp, ent, leaves["logits"].grad), (lp64, ent64, leaves64["logits"].grad),
                   torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_column_of_an_index_tensor_regression(backend):
    # The bug report: labels = index[:, 0] has stride 2, and the Triton kernel read it as contiguous
    # ([3, 1] instead of [3, 2]), giving log(.3) for the second row.
    logits = torch.log(torch.tensor([[.1, .2, .3, .4], [.4, .3, .2, .1]])).to(DEVICE)
    labels = torch.tensor([[3, 1], [2, 0]], device=DEVICE)[:, 0]
    lp = token_logprobs(logits, labels, backend=backend)
    assert round(lp[1].item(), 4) == -1.6094
    torch.testing.assert_close(lp.cpu(), torch.log(torch.tensor([.4, .2])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("j", [0, 2])
def test_labels_from_a_b_t_k_index_tensor(backend, j):
    # labels = index[..., j] of a (B, T, k) index tensor: values and gradient; the other columns may
    # hold anything (not read, not validated); an out-of-range label in column j is an error.
    logits, _ = make_inputs((2, 5), 29, torch.float32, seed=6)
    g = torch.Generator().manual_seed(j)
    index = torch.randint(0, 29, (2, 5, 3), generator=g)
    others = [c for c in range(3) if c != j]
    index[..., others[0]] = -3  # out of range, in the columns that are not the labels
    index[..., others[1]] = 29
    index[0, 1, j] = -100
    index = index.to(DEVICE)
    labels = index[..., j]
    got, want = run_both(logits, labels, backend, temperature=1.1)
    assert_matches(got, want, torch.float32, backend)
    bad = index.clone()
    bad[1, 3, j] = 29
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 29\)"):
        token_logprobs(logits, bad[..., j], backend=backend)

"""Shared helpers of the rollout-op tests (test_gae.py, test_kl.py, test_whiten.py) and the view grid
of every op's tests: tolerances, inputs, upstream gradients, garbage in padding, bad-input builders,
non-contiguous views.

A plain module, not a conftest: pytest's default "prepend" import mode puts tests/ops on sys.path, so
the test files import it as `from op_testing import ...`.
"""
import math

import torch

from conftest import DEVICE
from fastppo.kernels._checks import triton_interpreting

BACKENDS = ["triton", "native", "torch"]  # "native": gae/reward_to_go in C++; others run as torch
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
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


# ------------------------------------------------------------------------------- bad input


def _x(shape=(2, 5), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def _m(shape=(2, 5)):
    return torch.ones(shape, dtype=torch.bool)


def _one_valid():
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[1, 3] = True
    return m


# ------------------------------------------------------------------------- non-contiguous views

# Every op is called with each of these views of every tensor argument (see view_of), on every
# backend, and compared with the float64 reference on contiguous copies of the same views.
VIEWS = ["strided", "transposed", "offset", "expanded"]
# The (..., V) logits may also have a last dimension that is not contiguous (the ops copy it then).
VOCAB_VIEWS = ["vocab_strided", "vocab_transposed"]


def view_of(values, kind):
    """(base, make): a fresh contiguous tensor `base` and a function `make` such that make(base) is a
    non-contiguous view of base holding `values` (for "expanded": values[0], repeated):
        strided           every other element of dim 1 (of dim 0 if 1-D):      x[:, ::2]
        transposed        dims 0 and 1 of a contiguous tensor swapped:         x.transpose(0, 1)
                          (1-D: a column of a 2-D tensor, x[:, 1], as in labels = index[..., j])
        offset            sliced at an offset in every dim:                    x[1:, 2:, ...]
        expanded          stride 0 in dim 0:                                   x[1:2].expand(shape)
        vocab_strided     the last dim strided:                                x[..., ::2]
        vocab_transposed  the last two dims swapped:                           x.transpose(-1, -2)
    make applies the same view to a float64 copy of base, for the reference. Everywhere outside the
    view base holds garbage (NaN, True, or the label -7), so an op that reads past its view's strides
    gets a wrong answer rather than a lucky right one."""
    shape, nd = tuple(values.shape), values.dim()
    big = list(shape)
    if kind == "strided":
        d = 1 if nd >= 2 else 0
        big[d] *= 2
        make = lambda t: t[(slice(None),) * d + (slice(None, None, 2),)]  # noqa: E731
    elif kind == "transposed" and nd >= 2:
        big[0], big[1] = shape[1], shape[0]
        make = lambda t: t.transpose(0, 1)  # noqa: E731
    elif kind == "transposed":
        big = [shape[0], 3]
        make = lambda t: t[:, 1]  # noqa: E731
    elif kind == "offset":
        big = [s + i + 1 for i, s in enumerate(shape)]
        make = lambda t: t[tuple(slice(i + 1, None) for i in range(nd))]  # noqa: E731
    elif kind == "expanded":
        big[0] = 2
        make = lambda t: t[1:2].expand(shape)  # noqa: E731
    elif kind == "vocab_strided":
        big[-1] *= 2
        make = lambda t: t[..., ::2]  # noqa: E731
    elif kind == "vocab_transposed":
        big[-1], big[-2] = shape[-2], shape[-1]
        make = lambda t: t.transpose(-1, -2)  # noqa: E731
    else:
        raise ValueError(kind)
    fill = NAN if values.is_floating_point() else True if values.dtype == torch.bool else -7
    base = torch.full(big, fill, dtype=values.dtype, device=values.device)
    view = make(base)
    if kind == "expanded":
        base[1:2].copy_(values[:1])
    else:
        view.copy_(values)
    assert view.shape == shape
    assert not view.is_contiguous() or view.storage_offset() > 0, kind
    return base, make


def layout(kind, names):
    """{argument name: view kind} for a grid entry: one of VIEWS for every argument; "mixed" and
    "mixed_rev", each argument another view (cycling through VIEWS in both directions); VOCAB_VIEWS
    for the logits, with the other arguments strided or transposed."""
    if kind in VIEWS:
        return {name: kind for name in names}
    if kind == "mixed":
        return {name: VIEWS[i % len(VIEWS)] for i, name in enumerate(names)}
    if kind == "mixed_rev":
        return {name: VIEWS[-1 - i % len(VIEWS)] for i, name in enumerate(names)}
    if kind in VOCAB_VIEWS:
        other = kind.split("_")[1]
        return {name: kind if name == "logits" else other for name in names}
    raise ValueError(kind)


LAYOUTS = VIEWS + ["mixed", "mixed_rev"]


def views_of(inputs, kinds, grads=()):
    """Views for the op and for the reference: (op_args, ref_args, leaves, leaves64).

    inputs: {name: contiguous values}; kinds: {name: view kind}, see view_of. Each view is made from a
    leaf (`base`); the names in `grads` (floating) require grad there, so that leaf.grad is the
    gradient the op passes back through its view (summed over an expanded dim by autograd). The
    reference gets make(leaf64).contiguous(): the same view of a float64 copy of the leaf, copied to
    contiguous memory (a copy autograd differentiates through, so leaf64.grad is comparable)."""
    op_args, ref_args, leaves, leaves64 = {}, {}, {}, {}
    for name, values in inputs.items():
        base, make = view_of(values, kinds[name])
        leaf64 = base.double() if base.is_floating_point() else base.clone()
        if name in grads:
            leaves[name], leaves64[name] = base.requires_grad_(), leaf64.requires_grad_()
        op_args[name] = make(base)
        ref_args[name] = make(leaf64).contiguous()
    return op_args, ref_args, leaves, leaves64

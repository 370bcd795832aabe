"""fastppo.kernels.linear_token_logprobs and linear_ppo_loss (kernels/linear.py) against the float64
reference (the logits ops on hidden @ weight.T + bias): values and gradients of hidden, weight, bias
and values, every backend, chunked and not."""
import pytest
import torch

from conftest import DEVICE
from fastppo.kernels import linear_ppo_loss, linear_token_logprobs, reference
from test_ppo_loss import OPTION_SETS, STATS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter

BACKENDS = ["triton", "native", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error relative to the largest reference magnitude. In bf16/fp16 the LM head's matmuls round their
# outputs (logits, d hidden, d weight) to that dtype, as the unfused LM head does: the reference is
# evaluated on the logits the head gives in that dtype, and the gradients carry one more rounding.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.fixture
def small_tiles(monkeypatch):
    """The CPU path's vocabulary tiles 64 columns wide: several tiles on the small test vocabularies
    (chunk_rows sets the other backends' row chunks)."""
    import fastppo.kernels.linear as linear
    monkeypatch.setattr(linear, "_vocab_tile", lambda n: 64)


def assert_near(got, want, dtype, what):
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp(min=1e-6)
    err = (got - want).abs().max() / scale
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.3g}"


def make_head(lead, H, V, dtype, *, bias=True, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(hidden), to(weight), to(b), labels.to(DEVICE)


def leaves(*tensors, double=False):
    return [None if t is None else (t.detach().double() if double else t.detach().clone())
            .requires_grad_() for t in tensors]


def head_logits64(hidden, weight, bias, dtype):
    """The logits the LM head gives in `dtype` (rounded there), as float64 leaves of a graph back to
    float64 copies of hidden, weight and bias: the reference's logits, and its gradients' path."""
    h64, w64, b64 = leaves(hidden, weight, bias, double=True)
    exact = torch.nn.functional.linear(h64, w64, b64)
    rounded = torch.nn.functional.linear(hidden, weight, bias).double()
    # value of the rounded logits, gradient of the exact product (the rounding has derivative 1)
    return exact + (rounded - exact).detach(), (h64, w64, b64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_token_logprobs_grid(backend, dtype, temperature, chunk_rows, request):
    if chunk_rows is not None:
        request.getfixturevalue("small_tiles")
    hidden, weight, bias, labels = make_head((3, 7), 19, 301, dtype, seed=int(temperature * 10))
    h, w, b = leaves(hidden, weight, bias)
    lp, ent = linear_token_logprobs(h, w, labels, bias=b, temperature=temperature,
                                    return_entropy=True, backend=backend, chunk_rows=chunk_rows)
    g = torch.Generator().manual_seed(3)
    g_lp, g_ent = (torch.randn(labels.shape, generator=g).to(DEVICE) for _ in range(2))
    (lp * g_lp + ent * g_ent).sum().backward()

    logits64, (h64, w64, b64) = head_logits64(hidden, weight, bias, dtype)
    rlp, rent = reference.token_logprobs(logits64, labels, temperature=temperature,
                                         return_entropy=True)
    (rlp * g_lp + rent * g_ent).sum().backward()
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    torch.testing.assert_close(lp.double(), rlp, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=3e-5, rtol=1e-5)
    assert (lp[labels == -100] == 0).all()
    for got, want, name in ((h.grad, h64.grad, "hidden"), (w.grad, w64.grad, "weight"),
                            (b.grad, b64.grad, "bias")):
        assert got.dtype == dtype, name
        assert_near(got, want, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_large_vocabulary_without_bias(backend):
    # V > 64k (past 16-bit indexing), no bias, the logits never whole: chunks of 2 rows.
    hidden, weight, _, labels = make_head((5,), 8, 70001, torch.float32, bias=False, seed=4)
    h, w = leaves(hidden, weight)
    lp = linear_token_logprobs(h, w, labels, backend=backend, chunk_rows=2)
    (lp * torch.linspace(-1, 2, 5, device=DEVICE)).sum().backward()
    h64, w64 = leaves(hidden, weight, double=True)
    rlp = reference.token_logprobs(h64 @ w64.T, labels)
    (rlp * torch.linspace(-1, 2, 5, device=DEVICE).double()).sum().backward()
    torch.testing.assert_close(lp.double(), rlp, atol=3e-5, rtol=1e-5)
    assert_near(h.grad, h64.grad, torch.float32, "hidden")
    assert_near(w.grad, w64.grad, torch.float32, "weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_and_head_gradients_add_up(backend, small_tiles):
    # The LM head's weight is the embedding matrix: d weight is the sum over both uses.
    g = torch.Generator().manual_seed(5)
    V, H = 53, 12
    emb = torch.randn(V, H, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (4, 6), generator=g).to(DEVICE)
    mix = torch.randn(H, H, generator=g).to(DEVICE) / H ** 0.5
    labels = torch.randint(0, V, (4, 6), generator=g).to(DEVICE)

    def run(weight, fn, **kw):
        hidden = torch.tanh(weight[ids] @ mix.to(weight.dtype))
        return fn(hidden, weight, labels, temperature=0.9, **kw)

    w = emb.clone().requires_grad_()
    (run(w, linear_token_logprobs, backend=backend, chunk_rows=5) * 1.5).sum().backward()
    w64 = emb.double().requires_grad_()
    (run(w64, reference.linear_token_logprobs) * 1.5).sum().backward()
    assert_near(w.grad, w64.grad, torch.float32, "tied weight")


def ppo_inputs(B, T, H, V, dtype, seed):
    """hidden/weight/bias and the per-token PPO inputs, old log-probs near the current ones."""
    hidden, weight, bias, labels = make_head((B, T), H, V, dtype, seed=seed, ignore_frac=0.0)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        lp = reference.token_logprobs(torch.nn.functional.linear(hidden, weight, bias).double(),
                                      labels)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, : T // 2] = False
    mask[1 % B, T // 2:] = False
    mask[2 % B, T // 3: T // 3 + 2] = False
    rnd = lambda: torch.randn(B, T, generator=g).to(DEVICE)  # noqa: E731
    per_token = dict(old_logprobs=(lp + 0.6 * rnd()).float(), advantages=rnd(), values=rnd(),
                     returns=rnd(), ref_logprobs=(lp + 0.3 * rnd()).float())
    per_token["old_values"] = per_token["values"] + 0.3 * rnd()
    per_token["sampler_logprobs"] = per_token["old_logprobs"] + 0.5 * rnd()
    return hidden, weight, bias, labels, mask.to(DEVICE), per_token


def run_ppo_both(backend, dtype, reduction, options, *, seed=0, chunk_rows=3, grad_scale=-1.7):
    options = dict(options)
    with_values = options.pop("with_values", True)
    options.pop("seed", None)
    hidden, weight, bias, labels, mask, t = ppo_inputs(4, 5, 11, 97, dtype, seed)
    kw = dict(temperature=0.8, reduction=reduction, **options)
    if options.get("kl_coef"):
        kw["ref_logprobs"] = t["ref_logprobs"]
    if options.get("tis_cap"):
        kw["sampler_logprobs"] = t["sampler_logprobs"]
    h, w, b, v = leaves(hidden, weight, bias, t["values"])
    extra = dict(values=v, old_values=t["old_values"], returns=t["returns"]) if with_values else {}
    out = linear_ppo_loss(h, w, labels, t["old_logprobs"], t["advantages"], mask, bias=b,
                          backend=backend, chunk_rows=chunk_rows, **kw, **extra)
    (out.loss * grad_scale).backward()

    logits64, (h64, w64, b64) = head_logits64(hidden, weight, bias, dtype)
    (v64,) = leaves(t["values"], double=True)
    d = lambda x: x.double()  # noqa: E731
    kw64 = {k: d(x) if torch.is_tensor(x) else x for k, x in kw.items()}
    extra64 = dict(values=v64, old_values=d(t["old_values"]), returns=d(t["returns"])) \
        if with_values else {}
    ref = reference.ppo_loss(logits64, labels, d(t["old_logprobs"]), d(t["advantages"]), mask,
                             **kw64, **extra64)
    (ref.loss * grad_scale).backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), atol=2e-5, rtol=2e-5)
    for name in STATS:
        a, r = getattr(out, name), getattr(ref, name)
        assert (a is None) == (r is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), r.double(), atol=2e-5, rtol=2e-5, msg=name)
    for got, want, name in ((h.grad, h64.grad, "hidden"), (w.grad, w64.grad, "weight"),
                            (b.grad, b64.grad, "bias")):
        assert got.dtype == dtype, name
        assert_near(got, want, dtype, name)
    if with_values:
        torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-7, rtol=1e-5)
    else:
        assert v.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "sum"])
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_ppo_loss_every_option_float32(backend, reduction, options, small_tiles):
    run_ppo_both(backend, torch.float32, reduction, OPTION_SETS[options],
                 seed=list(OPTION_SETS).index(options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ppo_loss_half_precision(backend, dtype, small_tiles):
    run_ppo_both(backend, dtype, "token-mean", OPTION_SETS["entropy+k3"], seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_one_chunk_equals_many(backend):
    run_ppo_both(backend, torch.float32, "seq-mean-token-mean", OPTION_SETS["defaults"],
                 chunk_rows=None)
    run_ppo_both(backend, torch.float32, "seq-mean-token-mean", OPTION_SETS["defaults"],
                 chunk_rows=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_head_gives_the_hidden_gradient_alone(backend):
    # weight and bias frozen (a LoRA policy's LM head): hidden's gradient is still the reference's
    hidden, weight, bias, labels, mask, t = ppo_inputs(3, 4, 9, 41, torch.float32, 2)
    h, h64 = hidden.clone().requires_grad_(), hidden.double().requires_grad_()
    out = linear_ppo_loss(h, weight, labels, t["old_logprobs"], t["advantages"], mask, bias=bias,
                          backend=backend, chunk_rows=2)
    (out.loss * 1.3).backward()
    ref = reference.linear_ppo_loss(h64, weight.double(), labels, t["old_logprobs"].double(),
                                    t["advantages"].double(), mask, bias=bias.double())
    (ref.loss * 1.3).backward()
    assert weight.grad is None and bias.grad is None
    assert_near(h.grad, h64.grad, torch.float32, "hidden")


def test_no_grad_forward_builds_no_graph():
    hidden, weight, bias, labels, mask, _ = ppo_inputs(3, 4, 9, 41, torch.float32, 2)
    weight.requires_grad_()
    with torch.no_grad():
        lp = linear_token_logprobs(hidden, weight, labels.masked_fill(~mask, -100), bias=bias)
    assert not lp.requires_grad


def test_autocast_runs_the_head_in_bf16_like_the_unfused_head():
    hidden, weight, bias, labels = make_head((4, 5), 16, 211, torch.float32, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_token_logprobs(hidden, weight, labels, bias=bias, backend="native")
        unfused = reference.token_logprobs(torch.nn.functional.linear(hidden, weight, bias)
                                           .double(), labels)
    plain = reference.token_logprobs(torch.nn.functional.linear(hidden, weight, bias).double(),
                                     labels)
    torch.testing.assert_close(fused.double(), unfused, atol=3e-5, rtol=1e-5)
    assert (fused.double() - plain).abs().max() > 1e-4  # bf16 was used


def call(**overrides):
    hidden, weight, bias, labels = make_head((2, 3), 6, 10, torch.float32)
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    args.update(overrides)
    return linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


BAD = [
    (dict(hidden=torch.randn(2, 3, 5)), ValueError, r"hidden must have shape \(..., H\) with H = "
                                                    r"weight.shape\[1\] = 6"),
    (dict(weight=torch.randn(6)), ValueError, r"weight must be the LM head's \(V, H\) matrix"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \(V,\) = \(10,\)"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     r"labels must have shape hidden.shape\[:-1\] = \(2, 3\)"),
    (dict(labels=torch.full((2, 3), 10)), ValueError, r"labels must lie in \[0, 10\)"),
    (dict(hidden=torch.zeros(2, 3, 6, dtype=torch.long)), TypeError,
     "hidden must be a floating-point tensor"),
    (dict(chunk_rows=0), ValueError, "chunk_rows must be an int >= 1"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("overrides,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_ppo_bad_input_names_the_argument():
    hidden, weight, bias, labels, mask, t = ppo_inputs(2, 3, 6, 10, torch.float32, 0)
    with pytest.raises(ValueError, match="advantages must have the shape of labels"):
        linear_ppo_loss(hidden, weight, labels, t["old_logprobs"], t["advantages"][:, :2], mask)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
        linear_ppo_loss(hidden, weight, labels, t["old_logprobs"], t["advantages"], mask,
                        kl_coef=0.1)

"""fastppo.kernels.ppo_loss against the float64 reference: loss, statistics and gradients."""
import math

import pytest
import torch

from conftest import DEVICE
from fastppo.kernels import reference
from fastppo.kernels._checks import triton_interpreting
from fastppo.kernels import ppo_loss, token_logprobs
from op_testing import LAYOUTS, VIEWS, VOCAB_VIEWS, layout, view_of, views_of

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter

BACKENDS = ["triton", "native", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATS = ["policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "value_clipfrac"]

OPTION_SETS = {
    "defaults": dict(),
    "unclipped": dict(clip_eps=None, value_clip=None),
    "asymmetric+dual": dict(clip_eps=0.1, clip_eps_high=0.3, dual_clip=1.2),
    "entropy+k3": dict(entropy_coef=0.03, kl_coef=0.2, kl_estimator="k3"),
    "k1+k2": dict(kl_coef=0.5, kl_estimator="k1", clip_eps=0.05, value_clip=0.05),
    "k2,no-values": dict(kl_coef=0.5, kl_estimator="k2", entropy_coef=-0.01, with_values=False),
    # truncated importance sampling over the sampler's log-probs, with every clip on (seed 15: a
    # batch where the dual clip caps a token)
    "tis+dual": dict(tis_cap=1.5, clip_eps=0.1, clip_eps_high=0.3, dual_clip=1.2, seed=15),
}


def grid_batch(options, dtype):
    """The batch of `options`' grid row (its own seed unless it names one) and the options."""
    opts = dict(OPTION_SETS[options])
    seed = opts.pop("seed", list(OPTION_SETS).index(options))
    return make_batch(4, 11, 301, dtype, mask="layouts", seed=seed), opts


def make_batch(B, T, V, dtype, *, mask="random", seed=0, spread=0.6):
    """A batch whose old log-probs sit near the current ones, so some ratios fall outside the clip."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T + 1, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if mask == "random":
        m = torch.rand(B, T, generator=g) < 0.75
    elif mask == "layouts":  # left padding, right padding, a hole, a single token, a full row
        m = torch.ones(B, T, dtype=torch.bool)
        m[0, : T // 2] = False
        m[1 % B, T // 2:] = False
        m[2 % B, T // 3: T // 3 + 2] = False
        m[3 % B] = False
        m[3 % B, T - 1] = True
    else:
        m = mask
    with torch.no_grad():
        lp = reference.token_logprobs(logits[:, :-1].double(), labels)
    batch = dict(
        logits=logits.to(DEVICE), labels=labels.to(DEVICE), mask=m.to(DEVICE),
        old_logprobs=(lp + spread * torch.randn(B, T, generator=g)).float().to(DEVICE),
        advantages=torch.randn(B, T, generator=g).to(DEVICE),
        values=torch.randn(B, T, generator=g).to(DEVICE),
        returns=torch.randn(B, T, generator=g).to(DEVICE),
        ref_logprobs=(lp + 0.3 * torch.randn(B, T, generator=g)).float().to(DEVICE),
    )
    # NaN in padding: a sampler gives no log-prob there, and none may leak
    batch["sampler_logprobs"] = torch.where(
        m.to(DEVICE), batch["old_logprobs"] + 0.5 * torch.randn(B, T, generator=g).to(DEVICE),
        float("nan"))
    batch["old_values"] = batch["values"] + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    return batch


def run_both(batch, backend, *, grad_scale=-1.7, temperature=1.0, **options):
    """(output, logits grad, values grad) from the op and from the float64 reference."""
    with_values = options.pop("with_values", True)
    results = []
    for kind in ("op", "reference"):
        double = kind == "reference"
        cast = (lambda t: t.double()) if double else (lambda t: t)
        logits = cast(batch["logits"]).detach().requires_grad_()
        values = cast(batch["values"]).detach().requires_grad_()
        kwargs = dict(temperature=temperature, **options)
        if with_values:
            kwargs.update(values=values, old_values=cast(batch["old_values"]),
                          returns=cast(batch["returns"]))
        if options.get("kl_coef"):
            kwargs["ref_logprobs"] = cast(batch["ref_logprobs"])
        if options.get("tis_cap"):
            kwargs["sampler_logprobs"] = cast(batch["sampler_logprobs"])
        args = (logits[:, :-1], batch["labels"], cast(batch["old_logprobs"]),
                cast(batch["advantages"]), batch["mask"])
        if double:
            out = reference.ppo_loss(*args, **kwargs)
        else:
            out = ppo_loss(*args, backend=backend, **kwargs)
        (out.loss * grad_scale).backward()
        results.append((out, logits.grad, values.grad if with_values else None))
    return results


def grad_tol(dtype, backend):
    if dtype == torch.bfloat16:
        # Triton's interpreter truncates float32 -> bfloat16 (see test_token_logprobs.py).
        interp = backend == "triton" and triton_interpreting()
        return dict(atol=1e-6, rtol=2 ** -7 if interp else 2 ** -8)
    return dict(atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 2 ** -10)


def assert_matches(got, want, dtype, backend):
    (out, g_logits, g_values), (ref, r_logits, r_values) = got, want
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), atol=2e-6, rtol=2e-5)
    for name in STATS:
        a, b = getattr(out, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert not a.requires_grad, name
            torch.testing.assert_close(a.double(), b.double(), atol=2e-6, rtol=2e-5, msg=name)
    assert g_logits.dtype == dtype
    torch.testing.assert_close(g_logits.double(), r_logits, **grad_tol(dtype, backend))
    if r_values is not None:
        torch.testing.assert_close(g_values.double(), r_values, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "sum"])
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_grid(backend, dtype, reduction, options):
    batch, opts = grid_batch(options, dtype)
    got, want = run_both(batch, backend, reduction=reduction, temperature=0.8, **opts)
    assert_matches(got, want, dtype, backend)


@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_grid_exercises_every_branch(options):
    # The grid is only meaningful if its batches clip, value-clip and dual-clip some tokens (and
    # not all of them): check that on the very batches it uses.
    batch, opts = grid_batch(options, torch.float32)
    (out, _, _), _ = run_both(batch, "torch", temperature=0.8, **opts)
    if opts.get("clip_eps", 0.2) is not None:
        assert 0.05 < out.clipfrac < 0.95
    if opts.get("with_values", True) and opts.get("value_clip", 0.2) is not None:
        assert 0.05 < out.value_clipfrac < 0.95
    if opts.get("dual_clip"):
        lp = reference.token_logprobs(batch["logits"][:, :-1].double(), batch["labels"],
                                      temperature=0.8)
        ratio = torch.exp(lp - batch["old_logprobs"].double())
        capped = (batch["advantages"] < 0) & (ratio > opts["dual_clip"]) & batch["mask"]
        assert 0 < capped.sum() < batch["mask"].sum()
    if opts.get("tis_cap"):
        w = torch.exp(batch["old_logprobs"] - batch["sampler_logprobs"])[batch["mask"]]
        assert 0 < (w > opts["tis_cap"]).sum() < w.numel()  # some weights truncated, not all


@pytest.mark.parametrize("backend", BACKENDS)
def test_tis_weighs_the_policy_gradient_of_each_token(backend):
    # With a sampler equal to the old policy every weight is 1: the plain loss. Doubling one row's
    # sampler probability halves that row's policy-gradient term (and gradient); the cap truncates.
    batch = make_batch(3, 6, 40, torch.float32, mask="layouts")
    mask, old = batch["mask"], batch["old_logprobs"]
    plain = call(batch, backend=backend, reduction="sum")
    same = call(batch, backend=backend, reduction="sum", sampler_logprobs=old, tis_cap=10.0)
    torch.testing.assert_close(same.loss, plain.loss)
    sampler = old.clone()
    sampler[1] += math.log(2.0)  # row 1 sampled twice as likely as the old policy says
    sampler[2] -= math.log(3.0)  # row 2 a third as likely: weight 3, capped at 2
    weighted = call(batch, backend=backend, reduction="sum", sampler_logprobs=sampler, tis_cap=2.0)
    rows = [call(batch, backend=backend, reduction="sum",
                 mask=mask & (torch.arange(3, device=mask.device)[:, None] == r)).policy_loss
            for r in range(3)]
    torch.testing.assert_close(weighted.policy_loss, rows[0] + rows[1] / 2 + 2 * rows[2])


# A long row: 4096 tokens, except through Triton's interpreter, where each token is a program of its
# own and 1000 tokens test what 4096 do at a quarter of the time.
SHAPES = [(b, B, T, V) for b in BACKENDS for (B, T, V) in [(1, 1, 50), (3, 1, 7), (2, 5, 32003)]
          + [(1, 1000 if b == "triton" else 4096, 16)]]


@pytest.mark.parametrize("backend,B,T,V", SHAPES)
def test_shapes(backend, B, T, V):
    batch = make_batch(B, T, V, torch.float32, seed=B + T)
    batch["mask"][:, 0] = True
    got, want = run_both(batch, backend, entropy_coef=0.01, reduction="seq-mean-token-mean")
    assert_matches(got, want, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_token_gives_zero_loss_and_gradient(backend):
    batch = make_batch(2, 4, 30, torch.float32, mask=torch.zeros(2, 4, dtype=torch.bool))
    (out, g_logits, g_values), _ = run_both(batch, backend, entropy_coef=0.1)
    assert out.loss == 0 and (g_logits == 0).all() and (g_values == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_clamp(backend):
    # lp - old_lp beyond +-20: the ratio saturates at exp(+-20) and passes no gradient.
    batch = make_batch(1, 4, 20, torch.float32, mask=torch.ones(1, 4, dtype=torch.bool))
    batch["old_logprobs"][0, :2] = torch.tensor([-60.0, 40.0])
    got, want = run_both(batch, backend, clip_eps=None, value_clip=None, with_values=False)
    assert_matches(got, want, torch.float32, backend)
    assert (got[1][0, :2] == 0).all() and (got[1][0, 2:4].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_rollout_logprobs_give_ratio_exactly_one(backend, temperature):
    # Old log-probs from token_logprobs on the same logits and temperature: the first PPO step must
    # see ratio == 1 exactly (the most reported PPO bug is a mismatch here), so nothing is clipped.
    batch = make_batch(3, 6, 500, torch.bfloat16, seed=5)
    x = batch["logits"][:, :-1]
    old = token_logprobs(x, torch.where(batch["mask"], batch["labels"], -100),
                         temperature=temperature, backend=backend)
    out = ppo_loss(x, batch["labels"], old, batch["advantages"], batch["mask"],
                   temperature=temperature, backend=backend)
    assert out.approx_kl == 0 and out.clipfrac == 0
    mean_adv = (batch["advantages"] * batch["mask"]).sum() / batch["mask"].sum()
    torch.testing.assert_close(out.policy_loss, -mean_adv, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- in-place backward


def model_logits(batch):
    """Logits produced by an op (not a leaf), as a model's head would give them."""
    weight = torch.randn(batch["logits"].shape[-1], 16, requires_grad=True, device=DEVICE)
    hidden = torch.randn(*batch["logits"].shape[:-1], 16, device=DEVICE)
    return hidden @ weight.t(), weight


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("strided", [False, True])
def test_inplace_backward_matches_and_writes_into_logits(strided, backend):
    batch = make_batch(3, 5, 64, torch.float32, seed=2)
    grads = []
    for inplace in (False, True):
        torch.manual_seed(0)
        logits, weight = model_logits(batch)
        x = logits[:, :-1] if strided else logits[:, 1:].contiguous()
        out = ppo_loss(x, batch["labels"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                       values=batch["values"].clone().requires_grad_(), returns=batch["returns"],
                       old_values=batch["old_values"], entropy_coef=0.02, inplace_backward=inplace,
                       backend=backend)
        logits.retain_grad()
        (out.loss * 2.5).backward()
        grads.append((weight.grad, logits.grad, x.detach().clone()))
    (w0, l0, x0), (w1, l1, x1) = grads
    torch.testing.assert_close(w1, w0, atol=0, rtol=0)
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    g_rows = l0[:, :-1] if strided else l0[:, 1:]
    torch.testing.assert_close(x1, g_rows, atol=0, rtol=0)  # the storage now holds the gradient


@pytest.mark.parametrize("view", [False, True])
def test_inplace_backward_refuses_a_leaf(view):
    batch = make_batch(2, 3, 10, torch.float32)
    leaf = batch["logits"].clone().requires_grad_()
    logits = leaf[:, :-1] if view else leaf[:, :-1].detach().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite a leaf"):
        ppo_loss(logits, batch["labels"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                 inplace_backward=True)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("other_first", [True, False])
def test_inplace_backward_never_feeds_gradients_to_another_user_of_the_logits(other_first, backend):
    # Another op saved the logits for its backward. If autograd runs ours first, the logits are gone
    # when that op needs them: autograd's version check must raise, never compute with gradients as
    # logits. If it runs that op first, the result must be exactly the out-of-place one.
    batch = make_batch(2, 3, 10, torch.float32)
    grads = []
    for inplace in (False, True):
        torch.manual_seed(0)
        logits, weight = model_logits(batch)
        if other_first:
            other = (logits ** 2).sum()  # pow saves its input
        out = ppo_loss(logits[:, :-1], batch["labels"], batch["old_logprobs"], batch["advantages"],
                       batch["mask"], inplace_backward=inplace, backend=backend)
        if not other_first:
            other = (logits ** 2).sum()
        if inplace and other_first:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                (out.loss + other).backward()
            return
        (out.loss + other).backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


def test_inplace_backward_on_torch_backend_is_ignored_safely():
    # The chunked reference allocates its own gradient; in-place is a Triton-path optimisation only.
    batch = make_batch(2, 3, 10, torch.float32)
    logits, _ = model_logits(batch)
    before = logits.detach().clone()
    out = ppo_loss(logits[:, :-1], batch["labels"], batch["old_logprobs"], batch["advantages"],
                   batch["mask"], inplace_backward=True, backend="torch")
    out.loss.backward()
    assert torch.equal(logits.detach(), before)


# ------------------------------------------------------------------------------------- bad input


def call(batch, **overrides):
    args = dict(logits=batch["logits"][:, :-1], labels=batch["labels"],
                old_logprobs=batch["old_logprobs"], advantages=batch["advantages"],
                mask=batch["mask"])
    args.update(overrides)
    return ppo_loss(args.pop("logits"), args.pop("labels"), args.pop("old_logprobs"),
                    args.pop("advantages"), args.pop("mask"), **args)


BAD = [
    (dict(mask="float"), TypeError, "mask must be a bool tensor"),
    (dict(mask="short"), ValueError, "mask must have the shape of labels"),
    (dict(advantages="short"), ValueError, "advantages must have the shape of labels"),
    (dict(old_logprobs="int"), TypeError, "old_logprobs must be a floating-point tensor"),
    (dict(values="values", returns=None), ValueError, "values needs returns"),
    (dict(values="values", returns="returns"), ValueError, "value_clip needs old_values"),
    (dict(returns="returns"), ValueError, "returns/old_values were given without values"),
    (dict(kl_coef=0.1), ValueError, "kl_coef > 0 needs ref_logprobs"),
    (dict(kl_coef=-0.1), ValueError, "kl_coef must be a finite number >= 0"),
    (dict(clip_eps=0.0), ValueError, "clip_eps must be a finite number > 0.0 and < 1.0"),
    (dict(clip_eps=1.5), ValueError, "clip_eps must be"),
    (dict(clip_eps=None, clip_eps_high=0.3), ValueError, "clip_eps_high needs clip_eps"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be a finite number > 1.0"),
    (dict(value_clip=-1.0), ValueError, "value_clip must be"),
    (dict(vf_coef=float("inf")), ValueError, "vf_coef must be"),
    (dict(entropy_coef="0.1"), TypeError, "entropy_coef must be a real number"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    (dict(reduction="mean"), ValueError, "reduction must be one of"),
    (dict(temperature=0), ValueError, "temperature must be a finite number > 0"),
    (dict(inplace_backward=1), TypeError, "inplace_backward must be a bool"),
    (dict(labels="out-of-range"), ValueError, r"labels must lie in \[0, 10\)"),
    (dict(logits="int"), TypeError, "logits must be a floating-point tensor"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(tis_cap=2.0), ValueError, "tis_cap and sampler_logprobs go together"),
    (dict(sampler_logprobs="old_logprobs"), ValueError, "tis_cap and sampler_logprobs go together"),
    (dict(sampler_logprobs="old_logprobs", tis_cap=0.0), ValueError, "tis_cap must be a finite number > 0"),
    (dict(sampler_logprobs="short", tis_cap=2.0), ValueError,
     "sampler_logprobs must have the shape of labels"),
]


@pytest.mark.parametrize("overrides,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(overrides, error, message):
    batch = make_batch(2, 3, 10, torch.float32)
    fixed = {}
    for key, value in overrides.items():
        if value == "float":
            value = batch[key].float()
        elif value == "short":
            value = batch[key][:, :-1]
        elif value == "int":
            value = (batch[key][:, :-1] if key == "logits" else batch[key]).long()
        elif value == "out-of-range":
            value = batch["labels"].clone()
            value[0, 0] = 10
            batch["mask"][0, 0] = True
        elif isinstance(value, str) and value in batch:
            value = batch[value]
        fixed[key] = value
    with pytest.raises(error, match=message):
        call(batch, **fixed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_counted_position_labelled_ignore_index_is_refused(backend):
    # Before: mask True with label -100 was counted in the token mean with log-prob 0.
    batch = make_batch(2, 3, 10, torch.float32)
    batch["mask"][1, 2] = True
    batch["labels"][1, 2] = -100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) wherever mask is True; "
                                         r"found -100 \(1 such labels\)"):
        call(batch, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_gives_nan_loss(backend):
    # NaN in, NaN out: a NaN logit in a counted row must not come out finite (the native kernels
    # once dropped the NaN from the row max and returned +inf log-probs).
    batch = make_batch(2, 3, 10, torch.float32, mask=torch.ones(2, 3, dtype=torch.bool))
    batch["logits"][1, 1, 4] = float("nan")
    out = call(batch, backend=backend)
    assert out.loss.isnan() and out.entropy.isnan() and out.approx_kl.isnan()


def test_labels_outside_the_mask_are_not_checked_or_read():
    batch = make_batch(2, 3, 10, torch.float32)
    batch["mask"][0, 0] = False
    batch["labels"][0, 0] = 12345  # padding garbage where the mask is False is fine
    for backend in BACKENDS:
        assert torch.isfinite(call(batch, backend=backend).loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_at_invalid_positions_never_leaks(backend):
    # Padding positions of the per-token inputs may hold anything (NaN, inf); results and gradients
    # must equal those of a batch with clean padding.
    clean = make_batch(3, 6, 40, torch.float32, seed=11)
    dirty = {k: v.clone() for k, v in clean.items()}
    pad = ~clean["mask"]
    assert pad.any()
    for key, junk in [("old_logprobs", float("nan")), ("advantages", float("inf")),
                      ("returns", float("-inf")), ("old_values", float("nan")),
                      ("ref_logprobs", float("nan"))]:
        dirty[key][pad] = junk
    dirty["values"][pad] = float("nan")  # the critic's own output at padding
    opts = dict(entropy_coef=0.01, kl_coef=0.1, dual_clip=3.0)
    (out_c, gl_c, gv_c), _ = run_both(clean, backend, **opts)
    (out_d, gl_d, gv_d), _ = run_both(dirty, backend, **opts)
    for name in ["loss"] + STATS:
        torch.testing.assert_close(getattr(out_d, name), getattr(out_c, name), atol=0, rtol=0)
    torch.testing.assert_close(gl_d, gl_c, atol=0, rtol=0)
    assert torch.isfinite(gv_d).all() and (gv_d[pad] == 0).all()
    torch.testing.assert_close(gv_d[~pad], gv_c[~pad], atol=0, rtol=0)


# ------------------------------------------------------------------- every view of every argument

ARGS = ["logits", "labels", "old_logprobs", "advantages", "mask", "values", "old_values", "returns",
        "ref_logprobs", "sampler_logprobs"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS + VOCAB_VIEWS)
def test_views_of_every_argument(backend, kind):
    # Every tensor argument as a strided / transposed / offset / expanded view (and logits with a
    # strided or transposed vocabulary dim): loss, stats and the gradients reaching the logits' and
    # the values' leaves, against the reference on contiguous copies of the same views.
    batch = make_batch(3, 5, 37, torch.float32, seed=8)
    batch["logits"] = batch["logits"][:, :-1].contiguous()
    batch["mask"][0] = torch.tensor([True, False, True, True, False])  # the row "expanded" repeats
    batch["sampler_logprobs"] = batch["old_logprobs"] + 0.3 * torch.randn(
        batch["old_logprobs"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    op, ref, leaves, leaves64 = views_of(batch, layout(kind, ARGS), grads=["logits", "values"])
    opts = dict(temperature=0.9, entropy_coef=0.02, kl_coef=0.1, dual_clip=3.0,
                reduction="seq-mean-token-mean", tis_cap=1.2)
    out = ppo_loss(*(op[k] for k in ARGS[:5]), **{k: op[k] for k in ARGS[5:]}, backend=backend,
                   **opts)
    (out.loss * -1.7).backward()
    want = reference.ppo_loss(*(ref[k] for k in ARGS[:5]), **{k: ref[k] for k in ARGS[5:]}, **opts)
    (want.loss * -1.7).backward()
    assert_matches((out, leaves["logits"].grad, leaves["values"].grad),
                   (want, leaves64["logits"].grad, leaves64["values"].grad), torch.float32, backend)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("kind", VIEWS + VOCAB_VIEWS)
def test_inplace_backward_on_views_of_the_logits(backend, kind):
    # Logits made by an op (not a leaf) and passed as a view: the in-place backward must give exactly
    # the out-of-place gradient. The rows of an expanded view share memory, where writing one row's
    # gradient in place would overwrite logits that another row has yet to read: it allocates instead.
    batch = make_batch(3, 5, 37, torch.float32, seed=9)
    base, make = view_of(batch["logits"][:, :-1].contiguous(), kind)
    base = base.nan_to_num()
    args = [batch[k] for k in ("labels", "old_logprobs", "advantages", "mask")]
    grads = []
    for inplace in (False, True):
        bias = torch.zeros_like(base, requires_grad=True)
        out = ppo_loss(make(base + bias), *args, entropy_coef=0.02, inplace_backward=inplace,
                       backend=backend)
        (out.loss * 2.5).backward()
        grads.append(bias.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)

"""fastppo.integrations.verl: verl's own functions, patched vs original, values and gradients.

verl's trainer is not run here: it needs a Ray cluster, FSDP workers and a rollout server (vLLM or
SGLang) per node; see the README. Its functions are compared on random inputs with masks instead, and
verl's own cases for the vanilla loss (tests/trainer/ppo/test_rollout_corr_integration.py: the exact
IcePop-weighted case; test_value_loss_normalization_on_cpu.py: micro-batch invariance of every
aggregation mode given the global counts) are rewritten here against the "fastppo" loss.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None,
                                reason="verl is not installed (pip install 'fastppo[verl]')")

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


@pytest.fixture(scope="module")
def verl():
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as functional
    originals = {n: getattr(functional, n) for n in ("logprobs_from_logits", "entropy_from_logits",
                                                      "entropy_from_logits_with_chunking")}
    return core_algos, functional, originals


@pytest.fixture
def fverl(verl):
    import fastppo.integrations.verl as fverl
    with fverl.patched():
        yield fverl
    assert not fverl.is_patched()


def actor_config(**global_batch_info):
    from verl.workers.config.actor import ActorConfig
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                       clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                       global_batch_info=global_batch_info)


def test_patch_and_unpatch_every_binding_and_the_registry(verl):
    import fastppo.integrations.verl as fverl
    import verl.workers.engine.fsdp.transformer_impl as fsdp_engine  # binds logprobs_from_logits by name
    core_algos, functional, originals = verl
    with fverl.patched():
        assert functional.logprobs_from_logits is fverl.logprobs_from_logits
        assert fsdp_engine.logprobs_from_logits is fverl.logprobs_from_logits
        assert functional.entropy_from_logits is fverl.entropy_from_logits
        assert core_algos.get_policy_loss_fn("fastppo") is fverl.policy_loss
    for name, original in originals.items():
        assert getattr(functional, name) is original
    assert fsdp_engine.logprobs_from_logits is originals["logprobs_from_logits"]
    assert "fastppo" not in core_algos.POLICY_LOSS_REGISTRY


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7), (21,)])
def test_logprobs_and_entropy_equal_verls(verl, fverl, dtype, shape):
    _, functional, originals = verl
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(*shape, 301, generator=g)).to(dtype)
    labels = torch.randint(0, 301, shape, generator=g)
    up = torch.randn(shape, generator=g)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for name, call in (("logprobs_from_logits", lambda f, x: f(x, labels)),
                       ("entropy_from_logits", lambda f, x: f(x)),
                       ("entropy_from_logits_with_chunking", lambda f, x: f(x.view(-1, 301), chunk_size=5))):
        if name.endswith("chunking") and dtype == torch.bfloat16:
            continue  # verl's chunked entropy upcasts each chunk: compared in float32 below
        outs = []
        for fn in (originals[name], getattr(functional, name)):
            x = logits.clone().requires_grad_()
            y = call(fn, x)
            (y.float() * up.view(y.shape)).sum().backward()
            outs.append((y, x.grad))
        (want, want_grad), (got, got_grad) = outs
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want.double(), **tol)
        torch.testing.assert_close(got_grad.double(), want_grad.double(), **tol)


def _batch(seed, B=6, T=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) * 3
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)  # ratios past the dual clip
    adv = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # a row without a valid token
    mask[0, :3] = True
    weights = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) * 2
    return old, lp, adv, mask, weights


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", [{}, dict(dp_size=2, batch_num_tokens=50, global_batch_size=12,
                                           loss_scale_factor=5)])
@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_loss_equals_verls_vanilla(verl, fverl, mode, info, with_weights):
    core_algos, _, _ = verl
    old, lp, adv, mask, weights = _batch(1)
    config = actor_config(**info)
    results = []
    for name in ("vanilla", "fastppo"):
        x = lp.clone().requires_grad_()
        loss, metrics = core_algos.get_policy_loss_fn(name)(
            old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
            config=config, rollout_is_weights=weights if with_weights else None)
        loss.backward()
        results.append((loss, metrics, x.grad))
    (want, want_m, want_g), (got, got_m, got_g) = results
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-7)
    assert set(got_m) == set(want_m)
    for key in want_m:
        assert got_m[key] == pytest.approx(want_m[key], rel=1e-6, abs=1e-7), key


def test_icepop_weighted_case(fverl):
    # verl's exact case: on-policy (ratio 1), weights [exp(-0.5), 0, exp(-0.2)] -> mean(w * -A).
    w = torch.tensor([[0.60653067, 0.0, 0.81873075]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    lp = torch.full((1, 3), -1.0)
    loss, _ = fverl.policy_loss(lp, lp.clone(), adv, torch.ones(1, 3, dtype=torch.bool),
                                config=actor_config(), rollout_is_weights=w)
    torch.testing.assert_close(loss, (w * -adv).mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro_batches", [2, 3])
def test_micro_batches_add_up_to_the_batch_given_global_counts(fverl, mode, micro_batches):
    old, lp, adv, mask, _ = _batch(2, B=6)
    info = dict(batch_num_tokens=int(mask.sum()), global_batch_size=6)
    whole, _ = fverl.policy_loss(old, lp, adv, mask, mode, actor_config(**info))
    parts = sum(fverl.policy_loss(o, x, a, m, mode, actor_config(**info))[0]
                for o, x, a, m in zip(*(t.chunk(micro_batches) for t in (old, lp, adv, mask))))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def test_bad_input_is_named(fverl):
    old, lp, adv, mask, _ = _batch(3)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        fverl.policy_loss(old, lp, adv, mask, "token-avg", actor_config())
    with pytest.raises(ValueError, match="needs batch_num_tokens"):
        fverl.policy_loss(old, lp, adv, mask, "token-mean", actor_config(dp_size=2))
    with pytest.raises(ValueError, match="config"):
        fverl.policy_loss(old, lp, adv, mask)

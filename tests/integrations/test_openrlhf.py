"""fastppo.integrations.openrlhf: OpenRLHF's own functions and Actor, patched vs original.

OpenRLHF imports flash-attn (ring attention, packing) and DeepSpeed when its `models` package loads.
flash-attn cannot be installed without CUDA, and neither is used by the functions tested here, so
the package is imported with both replaced by stand-ins, which are removed again right after (as
OpenRLHF's own CPU tests do; its `torch.compile` on `compute_entropy` is skipped the same way).
OpenRLHF's trainer is not run: it needs Ray, DeepSpeed and vLLM on GPUs (see the README). Its Actor's
forward is: tests/test_actor_entropy_temperature.py's case (a table LM, T = 0.5 and 1.5) is rewritten
here patched vs unpatched, and its PolicyLoss cases (tests/test_loss_aggregation.py: the data-parallel
split, the sequence-level exact case) against the patched PolicyLoss.
"""
from __future__ import annotations

import importlib.util
from unittest import mock

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openrlhf") is None,
                                reason="OpenRLHF is not installed (pip install 'fastppo[openrlhf]')")

@pytest.fixture(scope="module")
def orlhf():
    from fastppo.integrations.openrlhf import import_without_gpu_only_modules
    import_without_gpu_only_modules()
    import openrlhf.models
    return openrlhf.models


@pytest.fixture
def forlhf(orlhf):
    import fastppo.integrations.openrlhf as forlhf
    with forlhf.patched():
        yield forlhf
    assert not forlhf.is_patched()


def test_patch_and_unpatch_every_binding(orlhf):
    import fastppo.integrations.openrlhf as forlhf
    import openrlhf.models.actor as actor
    import openrlhf.models.loss as loss
    import openrlhf.models.utils as utils
    before = (utils.log_probs_from_logits, utils.compute_entropy, loss.PolicyLoss)
    with forlhf.patched():
        assert actor.log_probs_from_logits is utils.log_probs_from_logits is forlhf.log_probs_from_logits
        assert actor.compute_entropy is forlhf.compute_entropy
        assert orlhf.PolicyLoss is loss.PolicyLoss and issubclass(loss.PolicyLoss, before[2])
        assert loss.PolicyLoss is not before[2]
    assert (actor.log_probs_from_logits, actor.compute_entropy, orlhf.PolicyLoss) == before
    assert (utils.log_probs_from_logits, utils.compute_entropy, loss.PolicyLoss) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_log_probs_and_entropy_equal_openrlhfs(orlhf, dtype, T):
    import openrlhf.models.utils as utils
    original = (utils.log_probs_from_logits, utils.compute_entropy)
    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(3, 7, 301, generator=g)).to(dtype)
    labels = torch.randint(0, 301, (3, 7), generator=g)
    up = torch.randn(3, 7, generator=g)
    tol = dict(rtol=1e-5, atol=1e-5)
    import fastppo.integrations.openrlhf as forlhf
    runs = []
    for lp_fn, ent_fn in (original, (forlhf.log_probs_from_logits, forlhf.compute_entropy)):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1.0  # OpenRLHF's version divides its argument in place: not a leaf
        lp = lp_fn(logits, labels, temperature=T)
        ent = ent_fn(leaf / T)
        ((lp.float() + 0.3 * ent.float()) * up).sum().backward()
        runs.append((lp, ent, leaf.grad, logits))
    (lp0, ent0, g0, seen0), (lp1, ent1, g1, seen1) = runs
    for got, want in ((lp1, lp0), (ent1, ent0), (g1, g0)):
        assert got.dtype == want.dtype
        if dtype != torch.bfloat16:
            torch.testing.assert_close(got.double(), want.double(), **tol)
    if dtype == torch.bfloat16:
        # OpenRLHF divides and takes log_softmax in bf16; fastppo computes in float32 and rounds
        # once: compared with the float64 truth instead, within one bf16 unit.
        logp = torch.log_softmax(base.double() / T, -1)
        scaled = torch.log_softmax((base / T).double(), -1)  # the entropy's input: leaf / T, in bf16
        truth = (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(scaled.exp() * scaled).sum(-1))
        for got, want in zip((lp1, ent1), truth):
            assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()
    assert torch.equal(seen1.detach(), base)  # fastppo leaves the caller's logits as they were


@pytest.mark.parametrize("T", [0.5, 1.5])
def test_actor_forward_patched_equals_unpatched(orlhf, T):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class TableLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(11, 11, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
            return CausalLMOutputWithPast(logits=self.table[input_ids])

    import fastppo.integrations.openrlhf as forlhf
    sequences = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    outs = []
    for patched in (False, True):
        with forlhf.patched() if patched else mock.MagicMock():
            actor = orlhf.Actor(TableLM(), temperature=T)
            actor.packing_samples = False
            lp, out = actor(sequences, torch.ones(2, 5, dtype=torch.long),
                            attention_mask=torch.ones_like(sequences), return_output=True,
                            return_entropy=True)
            (lp.sum() + out.entropy.sum()).backward()
            outs.append((lp, out.entropy, actor.model.table.grad))
    policy = torch.log_softmax(TableLM().table.detach()[sequences].double() / T, -1)
    want_lp = policy.gather(-1, torch.roll(sequences, -1, 1).unsqueeze(-1)).squeeze(-1)[:, :-1]
    for lp, ent, grad in outs:
        torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), -(policy.exp() * policy).sum(-1)[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=1e-5, atol=1e-6)


def _batch(seed, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + torch.randn(B, T, generator=g)  # ratios past the clip and the dual clip
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    mask[0, :3] = True
    return lp, old, adv, mask


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("info", [{}, dict(dp_size=2, batch_num_tokens=50, global_batch_size=12)])
def test_policy_loss_equals_openrlhfs(orlhf, token_level, dual_clip, info):
    import fastppo.integrations.openrlhf as forlhf
    import openrlhf.models.loss as loss
    lp, old, adv, mask = _batch(1)
    results = []
    for cls in (loss.PolicyLoss, forlhf.policy_loss_class(loss.PolicyLoss)):
        x = lp.clone().requires_grad_()
        out = cls(clip_eps_low=0.15, clip_eps_high=0.28, dual_clip=dual_clip,
                  token_level_loss=token_level)(x, old, adv, action_mask=mask, **info)
        out[0].backward()
        results.append((out, x.grad))
    (want, want_g), (got, got_g) = results
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-7)
    assert got[3:] == (None, None) == want[3:]
    torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-7)


def test_openrlhfs_policy_loss_cases(forlhf):
    import openrlhf.models.loss as loss
    # Sequence level, exact: lp = log 0.5 everywhere, on-policy (ratio 1): loss = -mean over rows of
    # each row's mean advantage = -(2 + 1) / 2; gradient -A / (row tokens * rows).
    lp = torch.full((2, 2), -0.6931).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([[2.0, 2.0], [1.0, 0.0]])
    out = loss.PolicyLoss(token_level_loss=False)(lp, lp.detach(), adv, action_mask=mask)
    out[0].backward()
    torch.testing.assert_close(out[0], torch.tensor(-1.5))
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -0.5], [-0.5, 0.0]]))
    # Data-parallel split: two ranks with the global token count average to the whole batch's loss.
    lp, old, adv, mask = _batch(2, B=4)
    whole = loss.PolicyLoss()(lp, old, adv, action_mask=mask)[0]
    n = int(mask.sum())
    ranks = [loss.PolicyLoss()(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], action_mask=mask[i:i + 2],
                               dp_size=2, batch_num_tokens=n)[0] for i in (0, 2)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, whole)


def test_gspo_and_is_correction_run_openrlhfs_own_forward(forlhf):
    import openrlhf.models.loss as loss
    lp, old, adv, mask = _batch(3)
    for kwargs in (dict(policy_loss_type="gspo"), dict(is_correction_level="token")):
        new = loss.PolicyLoss(**kwargs)
        with mock.patch.object(forlhf, "reference") as ref:
            out = new(lp, old, adv, action_mask=mask, rollout_log_probs=old - 0.1)
        assert not ref.ppo_loss_from_logprobs.called and torch.isfinite(out[0])

"""The seed article's PPO step (../shared/seed/README.md, section 2), written literally, is one
configuration of fastppo's kernels away: same numbers, same gradients.

Article:  rewards = log(sft_probs) - log(probs);  rewards[-1] += score
          total_rewards[i] = sum(rewards[i:n]);   advantages = total_rewards - values
          actor_loss  = -(1/n)  * sum(advantages * new_probs / probs)
          critic_loss =  1/(2n) * sum((new_values - total_rewards) ** 2)
          loss = actor_loss + ALPHA * critic_loss
fastppo:  kl_rewards(kl_coef=1, estimator="k1"), gae(gamma=1, lam=1),
          ppo_loss(clip_eps=None, value_clip=None, vf_coef=ALPHA)
"""
import pytest
import torch

from conftest import DEVICE
from fastppo.kernels import gae, kl_rewards, ppo_loss, token_logprobs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ALPHA = 0.37


def article_step(policy_logits, sft_logits, new_logits, tokens, values, new_values, score):
    """One sequence of n response tokens, exactly as the article's pseudo-code (float64)."""
    probs = torch.softmax(policy_logits, -1).gather(-1, tokens[:, None])[:, 0]
    sft_probs = torch.softmax(sft_logits, -1).gather(-1, tokens[:, None])[:, 0]
    n = tokens.shape[0]
    rewards = torch.log(sft_probs) - torch.log(probs)
    rewards[-1] += score
    total_rewards = torch.stack([rewards[i:n].sum() for i in range(n)])
    advantages = total_rewards - values
    new_probs = torch.softmax(new_logits, -1).gather(-1, tokens[:, None])[:, 0]
    actor_loss = -(1 / n) * torch.sum(advantages.detach() * new_probs / probs)
    critic_loss = 1 / (2 * n) * torch.sum((new_values - total_rewards) ** 2)
    return actor_loss + ALPHA * critic_loss, rewards, total_rewards, advantages


def fastppo_step(policy_logits, sft_logits, new_logits, tokens, values, new_values, scores, mask,
                 backend, reduction):
    logprobs = token_logprobs(policy_logits, tokens, backend=backend)
    ref_logprobs = token_logprobs(sft_logits, tokens, backend=backend)
    rewards = kl_rewards(logprobs, ref_logprobs, scores, mask, kl_coef=1.0, estimator="k1",
                         backend=backend)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0, backend=backend)
    out = ppo_loss(new_logits, tokens, logprobs, advantages, mask, values=new_values,
                   returns=returns, clip_eps=None, value_clip=None, vf_coef=ALPHA,
                   reduction=reduction, backend=backend)
    return out.loss, rewards, returns, advantages


def random_step(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    sft = policy + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    new = policy + 0.2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    new_values = values + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    return policy, sft, new, tokens, values, new_values, scores


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lengths", [[9], [9, 4, 1, 6]])
def test_article_step_is_one_configuration_away(backend, lengths):
    # Sequences of different lengths in one right-padded batch; the article's loss is per sequence,
    # so the batch loss is the mean of per-sequence article losses: "seq-mean-token-mean" (for one
    # sequence that is also "token-mean").
    B, T, V = len(lengths), max(lengths), 53
    policy, sft, new, tokens, values, new_values, scores = random_step(B, T, V, seed=len(lengths))
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]

    new_a = new.clone().requires_grad_()
    nv_a = new_values.clone().requires_grad_()
    article = [article_step(policy[b, :n], sft[b, :n], new_a[b, :n], tokens[b, :n], values[b, :n],
                            nv_a[b, :n], scores[b]) for b, n in enumerate(lengths)]
    loss_a = torch.stack([a[0] for a in article]).mean()
    loss_a.backward()

    # fastppo runs in float32 (the kernels' precision) on the same values.
    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731
    new_f = f32(new).requires_grad_()
    nv_f = f32(new_values).requires_grad_()
    reductions = ["seq-mean-token-mean"] + (["token-mean"] if B == 1 else [])
    for reduction in reductions:
        new_f.grad = nv_f.grad = None
        loss_f, rewards, returns, advantages = fastppo_step(
            f32(policy), f32(sft), new_f, tokens.to(DEVICE), f32(values), nv_f, f32(scores),
            mask.to(DEVICE), backend, reduction)
        loss_f.backward()
        for b, n in enumerate(lengths):
            _, r_a, tr_a, adv_a = article[b]
            torch.testing.assert_close(rewards[b, :n].double().cpu(), r_a, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(returns[b, :n].double().cpu(), tr_a, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(advantages[b, :n].double().cpu(), adv_a, atol=2e-5, rtol=1e-5)
            assert (rewards[b, n:] == 0).all() and (advantages[b, n:] == 0).all()
        torch.testing.assert_close(loss_f.double().cpu(), loss_a.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(new_f.grad.double().cpu(), new_a.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(nv_f.grad.double().cpu(), nv_a.grad, atol=1e-6, rtol=1e-4)

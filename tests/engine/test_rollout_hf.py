"""The Hugging Face rollout engine: the sampler draws from the distribution the trainer scores, at
the same temperature; top-k/top-p filters; exact categorical sampling."""
import pytest
import torch

from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout, filter_logits, sample


def test_sampler_draws_from_the_distribution_the_trainer_scores():
    # The tokens the rollout engine samples at temperature T must follow exp(token_logprobs(logits, T)),
    # the log-probs PPO trains with (temperature applied in both places, the same way).
    from fastppo.kernels import token_logprobs
    from fastppo.models import ActorCritic, tiny_llama

    torch.manual_seed(0)
    V, T, n = 12, 0.5, 20000
    lm = tiny_llama(V, hidden=16, layers=1, heads=2).eval()
    with torch.no_grad():  # spread the logits so that T = 0.5 and T = 1 differ clearly
        lm.get_output_embeddings().weight.mul_(40)
    rollout = HFRollout(lm, Sampling(max_new_tokens=1, temperature=T), eos_id=3, pad_id=0,
                        device="cpu", generator=torch.Generator().manual_seed(0))
    batch = rollout.generate([[2, 5, 7]] * n)
    counts = torch.bincount(batch.responses[:, 0], minlength=V).double()

    with torch.no_grad():
        logits, _ = ActorCritic(lm)(batch.input_ids[:1], batch.attention_mask[:1],
                                    batch.response_positions)
        every_label = torch.arange(V)
        p_T = token_logprobs(logits[0, :1].expand(V, V), every_label, temperature=T).exp().double()
        p_1 = token_logprobs(logits[0, :1].expand(V, V), every_label, temperature=1.0).exp().double()
    sigma = (n * p_T * (1 - p_T)).sqrt() + 1
    assert ((counts - n * p_T).abs() <= 5 * sigma).all(), (counts / n, p_T)
    assert ((counts - n * p_1).abs() > 10 * sigma).any()  # the check can tell the temperatures apart


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    # top-p keeps the smallest set whose mass reaches p: 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 1.0)).all()


def test_sample_draws_from_the_distribution():
    # zero-probability entries first, last and in the middle; 40000 draws of one distribution
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 40000
    draws = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), counts.tolist()
    # all the mass on the last / first entry; reproducible from the seed
    one_hot = torch.zeros(3, 5)
    one_hot[0, 4], one_hot[1, 0], one_hot[2, 2] = 1.0, 1.0, 1.0
    assert sample(one_hot, torch.Generator().manual_seed(1)).tolist() == [4, 0, 2]
    again = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # an unnormalised row (total 4) samples its normalised distribution
    q = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0])
    counts = torch.bincount(sample(q.expand(n, -1), torch.Generator().manual_seed(2)),
                            minlength=len(q)).double()
    p = q / q.sum()
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1e-9).all(), counts.tolist()
    # no mass: refused, not an out-of-range token
    for row in (torch.zeros(5), torch.tensor([0.5, float("nan"), 0.5, 0.0, 0.0])):
        with pytest.raises(ValueError, match="no positive finite mass"):
            sample(torch.stack([torch.full((5,), 0.2), row]), torch.Generator())


def test_sample_never_picks_a_filtered_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 1000, generator=g) * 3
    kept = torch.isfinite(filter_logits(logits, 50, 0.9))
    draws = sample(torch.softmax(filter_logits(logits, 50, 0.9), -1), g)
    assert kept.gather(1, draws[:, None]).all()


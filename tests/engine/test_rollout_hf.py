"""The Hugging Face rollout engine: the sampler draws from the distribution the trainer scores, at
the same temperature; top-k/top-p filters; exact categorical sampling."""
import pytest
import torch

from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout, filter_logits, sample
from fastppo.rollout.uniforms import keyed_uniforms


def uniforms(n, seed):
    return torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


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
                        device="cpu", seed=0)
    batch = rollout.generate([[2, 5, 7]] * n)
    counts = torch.bincount(batch.responses[:, 0], minlength=V).double()

    with torch.no_grad():
        logits, _ = ActorCritic(lm)(batch.select(slice(0, 1)))
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
    draws = sample(p.expand(n, -1), uniforms(n, 0))
    counts = torch.bincount(draws, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), counts.tolist()
    # all the mass on the last / first entry; reproducible from the seed
    one_hot = torch.zeros(3, 5)
    one_hot[0, 4], one_hot[1, 0], one_hot[2, 2] = 1.0, 1.0, 1.0
    assert sample(one_hot, uniforms(3, 1)).tolist() == [4, 0, 2]
    again = sample(p.expand(n, -1), uniforms(n, 0))
    assert torch.equal(draws, again)
    # an unnormalised row (total 4) samples its normalised distribution
    q = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0])
    counts = torch.bincount(sample(q.expand(n, -1), uniforms(n, 2)),
                            minlength=len(q)).double()
    p = q / q.sum()
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1e-9).all(), counts.tolist()
    # no mass: refused, not an out-of-range token
    for row in (torch.zeros(5), torch.tensor([0.5, float("nan"), 0.5, 0.0, 0.0])):
        with pytest.raises(ValueError, match="no positive finite mass"):
            sample(torch.stack([torch.full((5,), 0.2), row]), uniforms(2, 0))


def test_sample_never_picks_a_filtered_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 1000, generator=g) * 3
    kept = torch.isfinite(filter_logits(logits, 50, 0.9))
    draws = sample(torch.softmax(filter_logits(logits, 50, 0.9), -1), uniforms(512, 3))
    assert kept.gather(1, draws[:, None]).all()



def test_keyed_uniforms_are_uniform_and_depend_on_every_key_alone():
    rows = torch.arange(100_000)
    u = keyed_uniforms(0, 0, rows, 0)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)  # 10000 +- 95 each
    assert ((counts - 10_000).abs() < 500).all(), counts
    assert torch.equal(keyed_uniforms(0, 0, rows[500:700], 0), u[500:700])  # a row's own number
    for other in (keyed_uniforms(1, 0, rows, 0), keyed_uniforms(0, 1, rows, 0),
                  keyed_uniforms(0, 0, rows, 1), keyed_uniforms(0, 0, rows + 1, 0)):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.02
        assert (other != u).float().mean() > 0.999


def test_a_batch_split_in_two_samples_the_same_tokens():
    # What two ranks generate for their halves of a batch (rows keyed by their global place, the
    # prompts padded to the global width) is what one process generates for the whole batch.
    from fastppo.models import tiny_llama

    torch.manual_seed(0)
    lm = tiny_llama(40, hidden=16, layers=1, heads=2).eval()
    rollout = HFRollout(lm, Sampling(max_new_tokens=6), eos_id=3, pad_id=0, device="cpu", seed=7)
    prompts = [[2] + list(range(5, 5 + n)) for n in (1, 4, 2, 6, 3, 1, 5, 2)]
    whole = rollout.generate(prompts, iteration=3)
    halves = [rollout.generate(prompts[i:i + 4], iteration=3, rows=torch.arange(i, i + 4),
                               prompt_len=whole.prompt_len) for i in (0, 4)]
    for i, half in enumerate(halves):
        R = half.responses.shape[1]
        assert torch.equal(half.input_ids, whole.input_ids[4 * i:4 * i + 4, :whole.prompt_len + R])
        assert not whole.response_mask[4 * i:4 * i + 4, R:].any()
    assert not torch.equal(whole.responses, rollout.generate(prompts, iteration=4).responses)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.6)])
def test_sampler_logprobs_are_those_of_the_distribution_it_drew_from(top_k, top_p):
    # Without filtering, the trainer's recomputed log-probs; with it, the renormalised filtered
    # distribution's (what the sampler/trainer gap metric and truncated importance sampling read).
    from fastppo.kernels import token_logprobs
    from fastppo.models import lm_logits, tiny_llama

    torch.manual_seed(0)
    lm = tiny_llama(30, hidden=16, layers=1, heads=2).eval()
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(10)
    rollout = HFRollout(lm, Sampling(max_new_tokens=6, temperature=0.8, top_k=top_k, top_p=top_p),
                        eos_id=3, pad_id=0, device="cpu", seed=0)
    batch = rollout.generate([[2, 5, 7], [2, 9], [2, 11, 12, 13]] * 2)
    mask = batch.response_mask
    with torch.no_grad():
        logits = lm_logits(lm, batch.input_ids, batch.attention_mask, batch.response_positions)
    lp = token_logprobs(logits, batch.responses.masked_fill(~mask, -100), temperature=0.8)
    filtered = torch.log_softmax(filter_logits(logits / 0.8, top_k, top_p), -1)
    want = filtered.gather(-1, batch.responses[..., None])[..., 0]
    torch.testing.assert_close(batch.sampler_logprobs[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert (batch.sampler_logprobs[~mask] == 0).all()
    if top_k == 0 and top_p == 1.0:
        torch.testing.assert_close(batch.sampler_logprobs[mask], lp[mask], atol=1e-5, rtol=1e-5)
    else:  # the kept mass: the filtered log-prob exceeds the full one
        assert (batch.sampler_logprobs[mask] >= lp[mask] - 1e-6).all()
        assert (batch.sampler_logprobs[mask] > lp[mask] + 1e-3).any()


def test_frozen_weights_cast_once_for_sampling_changes_nothing(monkeypatch):
    # Under bf16 autocast the sampler reads the frozen linear weights (LoRA's base) as bf16 copies
    # made once, not cast again at every token: the same tokens and sampler log-probs bit for bit,
    # and the float32 parameters are back in place afterwards.
    import contextlib

    import fastppo.rollout.hf as hf
    from fastppo.models import tiny_llama

    torch.manual_seed(0)
    lm = tiny_llama(50, hidden=32, layers=2, heads=2).eval()
    for name, p in lm.named_parameters():
        p.requires_grad_("layers.1" in name)  # frozen: all but the second layer's
    before = {name: p for name, p in lm.named_parameters()}
    rollout = HFRollout(lm, Sampling(max_new_tokens=8, top_p=0.9), eos_id=3, pad_id=0,
                        device="cpu", seed=1)
    prompts = [[2, 5, 9], [2, 7], [2, 11, 12, 13]]
    seen = []

    def spy(model):  # the copies the sampler runs on
        seen.extend(p.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)
                    for p in m.parameters() if not p.requires_grad)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        once = rollout.generate(prompts, iteration=2)
        with hf.frozen_weights_cast(lm):
            spy(lm)
        monkeypatch.setattr(hf, "frozen_weights_cast", lambda lm: contextlib.nullcontext())
        every_call = rollout.generate(prompts, iteration=2)
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.equal(once.input_ids, every_call.input_ids)
    assert torch.equal(once.sampler_logprobs, every_call.sampler_logprobs)
    after = dict(lm.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in before.items())

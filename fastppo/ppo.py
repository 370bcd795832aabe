"""PPO against a reward model with a KL-style penalty to the frozen SFT model.

One linear loop. Each iteration: sample prompts -> the rollout engine generates responses
(fastppo.rollout: the Hugging Face sampler with a KV cache, or vLLM with the policy's weights
loaded in place first) -> one no-grad forward of the
actor-critic (old log-probs, values), of the reference (reference log-probs, cached for the whole
iteration) and of the reward model (scores) -> kl_rewards -> gae -> masked_whiten -> ppo_epochs passes
of ppo_loss over mini-batches, with gradient clipping and AdamW. Every log-prob, reward, advantage and
loss is computed by fastppo.kernels. Scores come from the reward model, a reward function
(fastppo.rewards) or both; without a critic (advantage_estimator grpo, rloo, reinforce++) the value
head is not run, and the advantages come from groups of samples of one prompt or from whitened
returns instead of GAE.

The rollout's log-probs and values come from the same forward as training (same temperature, same
mini-batches as the first epoch), not from the sampler: the first mini-batch sees ratio = 1. The
sampler's own log-probs measure how far its distribution is from the trainer's (logged every
iteration) and, with tis_cap, reweigh the policy gradient (truncated importance sampling).

With top_k / top_p the trained policy is the one that samples: old and new log-probs, the entropy
bonus and the KL term are those of the truncated distribution at the current parameters
(fastppo.kernels' top_k / top_p); the reference model stays the full tempered distribution (a sampled
token always has positive probability under it, so the KL is finite). A sampled token the trainer's
own forward puts outside its kept set (a rounding difference at the boundary between the sampler's
logits and the trainer's) is taken out of the loss (`outside_kept_rollout` counts them); one that
leaves the kept set during the PPO epochs counts with ratio 0 (`outside_kept_train`, a fraction).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fastppo import distributed, episodes, rewards, rollout, run
from fastppo.config import PPOConfig
from fastppo.data import (Batch, ResponseTokens, limit_prompts, micro_batches,
                          read_jsonl, require_tokens, special_ids)
from fastppo.kernels import gae, group_advantages, kl_rewards, masked_whiten, reward_to_go
from fastppo.metrics import peak_memory_mib, plot, reset_peak_memory
from fastppo.models import (ActorCritic, AdaptersOff, PolicyLM, eval_mode, load_lm,
                            load_reward_model, precision, save_model)
from fastppo.prepare import freeze_and_shard, prepare
from fastppo.preflight import (check_fits_context, check_model_dir, check_reward_model_dir,
                               check_same_tokenizer, context_length)
from fastppo.rollout import Sampling

PLOT_KEYS = ["score_mean", "kl", "reward", "entropy", "value_loss", "clipfrac", "response_length"]
STATS = ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    v, r = values[mask].double(), returns[mask].double()
    var = r.var() if r.numel() > 1 else torch.tensor(0.0)
    return float("nan") if var == 0 else float(1 - (r - v).var() / var)


def sampler_gap(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor,
                suffix: str = "") -> dict:
    """How far the rollout's sampler drew from the trainer's distribution, on the sampled tokens:
    mean and max |log pi_trainer - log pi_sampler| and the k3 estimate of KL(sampler || trainer)."""
    d = (trainer - sampler)[mask].double()
    keys = [f"sampler_gap_mean{suffix}", f"sampler_gap_max{suffix}", f"sampler_kl{suffix}"]
    if not d.numel():
        return dict.fromkeys(keys, 0.0)
    return dict(zip(keys, (d.abs().mean().item(), d.abs().max().item(),
                           (d.exp() - 1 - d).mean().item())))


def truncation_metrics(old_logprobs, plain_logprobs, sampler_logprobs, mask, outside) -> dict:
    """What top-k/top-p sampling does to the scores, on the sampled tokens: kept_mass, the mean mass
    of the kept set under the untruncated policy (p_plain / p_truncated of each token; what the peers'
    ratio silently averages to, scoring truncated samples under the full softmax); the sampler gap
    against the untruncated log-probs (the kept-mass bias the truncation-aware gap removes); and
    outside_kept_rollout, the sampled tokens the trainer puts outside its kept set."""
    ratio = (plain_logprobs - old_logprobs)[mask].double().exp()
    return {"kept_mass": ratio.mean().item() if ratio.numel() else 1.0,
            **sampler_gap(plain_logprobs, sampler_logprobs, mask, suffix="_untruncated"),
            "outside_kept_rollout": int(outside.sum())}


def make_scorer(cfg: PPOConfig, reward_model, reward_fn, tokenizer):
    """score(mb, rows) -> (scores of mb's rows, rows reward_fn_error_value was given to): the
    weighted sum of the reward model's score and reward_fn's value (fastppo.rewards)."""
    def score(mb: Batch, rows: list[int]):
        total = torch.zeros(len(rows), device=cfg.device)
        if reward_model is not None:
            with precision(cfg.device, cfg.dtype):
                total += cfg.reward_model_weight * reward_model(mb).float()
        if reward_fn is None:
            return total, 0
        P = mb.prompt_len
        prompt_ids = [ids[keep].tolist() for ids, keep in zip(mb.input_ids[:, :P], mb.attention_mask[:, :P])]
        # everything after the prompt: the response, or the whole episode with its observations
        response_ids = [ids[keep].tolist() for ids, keep in
                        zip(mb.responses, mb.attention_mask[:, P:])]
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        values, errors = rewards.score(reward_fn, cfg.reward_fn, [decode(p) for p in prompt_ids],
                                       [decode(r) for r in response_ids], prompt_ids, response_ids,
                                       error_value=cfg.reward_fn_error_value, rows=rows)
        return total + cfg.reward_fn_weight * torch.tensor(values, device=cfg.device), errors
    return score


def read_prompts(cfg: PPOConfig):
    """(tokenizer, encoded prompts, reward function or None, data rows, episodes' environment
    factory and renderer or None), every input and model directory checked before any model is
    loaded: the data, the policy, the reward model (and its tokenizer), the context, the tools or
    environment, the rollout engine's own checks."""
    rows = read_jsonl(cfg.prompts, "env" if cfg.env else "ppo")  # an environment reads any row
    check_model_dir(cfg.policy, "policy")
    if cfg.reward_model:
        check_reward_model_dir(cfg.reward_model, "reward_model")
    reward_fn = rewards.load(cfg.reward_fn) if cfg.reward_fn else None
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    if cfg.reward_model:
        check_same_tokenizer(tokenizer, cfg.reward_model, "reward_model")
    make_env, renderer = (episodes.environment_factory(cfg, tokenizer) if cfg.episodic
                          else (None, episodes.Renderer(tokenizer)))
    if cfg.episodic:  # the first observations, from each row's environment
        encoded = episodes.first_prompts(cfg, make_env, renderer, rows)
    else:
        try:
            encoded = require_tokens([renderer.prompt(r["prompt"]) for r in rows],
                                     [r["prompt"] for r in rows])
        except ValueError as err:
            raise ValueError(f"prompts {cfg.prompts}: {err}") from None
    prompts = limit_prompts(encoded, cfg.max_prompt_length, cfg.truncate_prompts,
                            tokenizer.bos_token_id)
    after = cfg.max_episode_tokens if cfg.episodic else cfg.max_new_tokens
    what = "max_episode_tokens" if cfg.episodic else "max_new_tokens"
    longest = max(len(p) for p in prompts) + after
    for path in (cfg.policy, cfg.reward_model):
        if path:
            check_fits_context(path, longest, f"the longest prompt + {what}")
    if cfg.max_tokens_per_micro_batch and longest > cfg.max_tokens_per_micro_batch:
        raise ValueError(f"max_tokens_per_micro_batch={cfg.max_tokens_per_micro_batch} is less than "
                         f"the longest prompt + {what} ({longest} tokens): a sequence must "
                         "fit one micro-batch")
    rollout.preflight(cfg)  # before any model is loaded
    return tokenizer, prompts, reward_fn, rows, (make_env, renderer) if cfg.episodic else None


def build_models(cfg: PPOConfig, eos: int):
    """(actor-critic, reference, reward model or None, optimizer), prepared for the run
    (fastppo.prepare): the reference is a frozen copy of the SFT weights, or under LoRA the policy
    itself with its adapters off (no second copy). Under torchrun every model is sharded (FSDP2) and
    the policy is gathered whole for each rollout (distributed.gathered)."""
    model = ActorCritic(load_lm(cfg.policy, cfg.device, cfg.dtype)).to(cfg.device)
    reference = None if cfg.lora_rank else PolicyLM(copy.deepcopy(model.lm))  # the SFT weights
    reward_model = None
    if cfg.reward_model:
        reward_model = load_reward_model(cfg.reward_model, cfg.device, cfg.dtype)
    optimizer = prepare(model, cfg)  # with LoRA: the adapters and the value head train
    reference = AdaptersOff(model) if cfg.lora_rank else freeze_and_shard(
        reference, fused_linear=cfg.fused_linear, packed=cfg.packed)
    if reward_model is not None:
        freeze_and_shard(reward_model, packed=cfg.packed)
    if distributed.world() > 1:
        with torch.no_grad():  # FSDP2 takes the module of the first forward for its root
            ones = torch.ones(1, 2, dtype=torch.bool, device=cfg.device)
            model(Batch(torch.tensor([[eos, eos]], device=cfg.device), ones, ones[:, 1:], 1))
        model.reshard()
    return model, reference, reward_model, optimizer


def split(batch: Batch, rows: torch.Tensor, cfg: PPOConfig) -> list[torch.Tensor]:
    """This rank's share of the global mini-batch `rows`, as micro-batches of at most
    cfg.max_tokens_per_micro_batch attended tokens (fastppo.data.micro_batches), every rank with the
    same number of them (FSDP2's collectives run once per forward and backward). The rollout's
    forwards and the first epoch split the same rows alike: the same logits, bit for bit."""
    mine = distributed.my_rows(rows)
    lengths = batch.attention_mask[mine].sum(-1).tolist()
    at_least = 1
    while True:
        parts = micro_batches(lengths, cfg.max_tokens_per_micro_batch, at_least)
        most = int(distributed.max_over_ranks(len(parts), cfg.device))
        if distributed.agree(len(parts) == most):
            return [mine[torch.tensor(p, dtype=torch.long)] for p in parts]
        at_least = most


@torch.no_grad()
def rollout_forward(model, reference, score, batch: Batch, order, cfg, sampling: Sampling,
                    critic: bool):
    """Old log-probs (under the sampling distribution: temperature, top-k, top-p) and values
    (actor-critic; no values without a critic), the policy's untruncated log-probs (the kept-mass
    metric; with top-k/top-p only, else the old ones), reference log-probs (full tempered
    distribution), scores: one no-grad pass each, in the micro-batches of the first PPO epoch
    (`order`, split: each rank takes its share of each mini-batch). Every rank ends with the whole batch's: the batch
    with per-token old_logprobs, plain_logprobs, old_values, ref_logprobs, and (scores, reward_fn
    errors, timings)."""
    B, R = batch.response_mask.shape
    episodic = "turn_rewards" in batch.per_token  # environment tokens between the model's turns
    truncation = dict(top_k=sampling.top_k, top_p=sampling.top_p)
    truncated = bool(sampling.top_k) or sampling.top_p < 1.0
    old_logprobs = torch.zeros(B, R, device=cfg.device)
    plain_logprobs = torch.zeros_like(old_logprobs) if truncated else old_logprobs
    values, ref_logprobs = torch.zeros_like(old_logprobs), torch.zeros_like(old_logprobs)
    scores = torch.zeros(B, device=cfg.device)
    errors = torch.zeros((), device=cfg.device)
    timings = {"old_logprobs": 0.0, "reference": 0.0, "score": 0.0}
    for idx in (part for i in range(0, B, cfg.mini_batch_size)
                for part in split(batch, order[i:i + cfg.mini_batch_size], cfg)):
        mb = batch.select(idx)
        t_old = time.perf_counter()
        # packed, or an episode: the LM head runs on the model's tokens only
        tokens = ResponseTokens(mb.response_mask, model.packed or episodic)
        with precision(cfg.device, cfg.dtype):  # as in training: the same logits, bit for bit
            states, v = model(mb, with_values=critic, at=tokens.at)
            labels = tokens.take(mb.labels)
            old_logprobs[idx] = tokens.put(model.head.logprobs(
                states, labels, temperature=sampling.temperature, **truncation))
            if truncated:
                plain_logprobs[idx] = tokens.put(model.head.logprobs(
                    states, labels, temperature=sampling.temperature))
            if critic:
                values[idx] = tokens.put(v)
        t0 = time.perf_counter()
        timings["old_logprobs"] += t0 - t_old
        tokens = ResponseTokens(mb.response_mask, reference.packed or episodic)
        with precision(cfg.device, cfg.dtype):
            ref_logprobs[idx] = tokens.put(reference.head.logprobs(
                reference(mb, at=tokens.at), tokens.take(mb.labels),
                temperature=sampling.temperature))
        t1 = time.perf_counter()
        scores[idx], mb_errors = score(mb, idx.tolist())
        errors += mb_errors
        timings["reference"] += t1 - t0
        timings["score"] += time.perf_counter() - t1
    # each row from one rank
    distributed.sum_over_ranks(old_logprobs, values, ref_logprobs, scores, errors,
                               *([plain_logprobs] if truncated else []))
    batch = batch.with_tokens(old_logprobs=old_logprobs, plain_logprobs=plain_logprobs,
                              old_values=values, ref_logprobs=ref_logprobs)
    return batch, scores, int(errors), timings


def estimate_advantages(cfg, rewards_, old_values, mask):
    """(advantages, returns or None) of the configured estimator from the per-token rewards (the
    score on each row's last token, minus the KL penalty unless kl_in_loss)."""
    if cfg.advantage_estimator == "gae":
        advantages, returns = gae(rewards_, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        return (masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages), returns
    if cfg.advantage_estimator == "reinforce++":  # discounted returns, a batch-normalised baseline
        return masked_whiten(reward_to_go(rewards_, mask, gamma=cfg.gamma), mask), None
    # grpo / rloo: each response's total reward against its group's, on every token of it
    mode = "rloo" if cfg.advantage_estimator == "rloo" else ("grpo" if cfg.scale_by_std else "dr_grpo")
    per_row = group_advantages(rewards_.sum(-1), cfg.samples_per_prompt, mode=mode)
    return per_row[:, None] * mask, None


def loss_options(cfg: PPOConfig, sampling: Sampling, kl_coef: float, critic: bool) -> dict:
    """The iteration's ppo_loss options that do not depend on the mini-batch."""
    options = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                   entropy_coef=cfg.entropy_coef, temperature=sampling.temperature,
                   top_k=sampling.top_k, top_p=sampling.top_p,
                   # the policy moves between mini-batches: a sampled token may leave its kept set
                   allow_outside_kept=True,
                   reduction="sum" if cfg.loss_reduction == "token-mean" else "seq-mean-token-mean",
                   tis_cap=cfg.tis_cap)
    if critic:
        options.update(value_clip=cfg.value_clip, vf_coef=cfg.vf_coef)
    if cfg.kl_in_loss:
        options.update(kl_coef=kl_coef, kl_estimator=cfg.kl_loss_estimator)
    return options


def ppo_epochs(model, optimizer, batch: Batch, epoch_orders, cfg: PPOConfig, options: dict,
               critic: bool, at: str) -> tuple[dict, float, list[int]]:
    """ppo_epochs passes of ppo_loss over mini-batches of `batch` (its response_mask: the tokens in
    the loss; per-token old_logprobs, advantages, ref_logprobs, old_values and returns), with
    gradient clipping and AdamW, one step per mini-batch. Each rank takes its share of every
    mini-batch, in micro-batches (split) whose gradients accumulate; a micro-batch's loss is its
    share of the global mini-batch's mean (share_of_mean: over tokens, or over responses of their
    token means), so the step is the one-process, one-micro-batch one whatever the split. Returns
    (the mean stats of the global mini-batches, the first mini-batch's largest |ratio - 1|: 0 up to
    rounding, the tokens of each micro-batch)."""
    stats, outside_train, first_ratio_error, micro_tokens = [], [], None, []
    by_tokens = cfg.loss_reduction == "token-mean"
    episodic = "turn_rewards" in batch.per_token
    for order in epoch_orders:
        for i in range(0, cfg.batch_size, cfg.mini_batch_size):
            rows = order[i:i + cfg.mini_batch_size]
            tokens = batch.response_mask[rows].sum().clamp(min=1)
            responses = batch.response_mask[rows].any(-1).sum().clamp(min=1)
            sums = torch.zeros(5, device=cfg.device)  # the mini-batch's stats, summed over parts
            outside, errors = None, []  # outside: None without top-k/top-p

            def losses():  # one per micro-batch, each backpropagated before the next runs
                nonlocal sums, outside
                for idx in split(batch, rows, cfg):
                    mb = batch.select(idx)
                    micro_tokens.append(int(mb.attention_mask.sum()))
                    # packed, token-mean: the LM head and the loss on the loss's tokens alone (a
                    # response-mean needs the (B, R) rows)
                    on = ResponseTokens(mb.response_mask, (model.packed or episodic) and by_tokens)
                    t = {k: on.take(v) for k, v in mb.per_token.items()}
                    # the loss is a sum over my tokens (token-mean), or a mean over my responses
                    mine_of_total = (1.0, tokens) if by_tokens else (mb.response_mask.any(-1).sum(),
                                                                     responses)
                    tensors = dict(sampler_logprobs=None if cfg.tis_cap is None
                                   else on.take(mb.sampler_logprobs))
                    if critic:
                        tensors.update(old_values=t["old_values"], returns=t["returns"])
                    if cfg.kl_in_loss:
                        tensors.update(ref_logprobs=t["ref_logprobs"])
                    mask = on.take(mb.response_mask)
                    with precision(cfg.device, cfg.dtype):  # bf16 matmuls; the loss in float32
                        states, values = model(mb, with_values=critic, at=on.at)  # logits or hidden
                        out = model.head.ppo_loss(states, on.take(mb.responses), t["old_logprobs"],
                                                  t["advantages"], mask, values=values, **options,
                                                  **tensors)
                    if first_ratio_error is None:  # rollout/training agreement: ratio must be 1
                        with torch.no_grad(), precision(cfg.device, cfg.dtype):
                            lp = model.head.logprobs(states.detach(), on.take(mb.labels),
                                                     temperature=options["temperature"],
                                                     top_k=options["top_k"], top_p=options["top_p"])
                            ratio = torch.exp(lp - t["old_logprobs"])[mask]
                            errors.append((ratio - 1).abs().max().item() if ratio.numel() else 0.0)
                    mine = mb.response_mask.sum()
                    if out.outside_kept is not None:
                        outside = (0.0 if outside is None else outside) + \
                            out.outside_kept * mine / tokens
                    value_loss = out.value_loss if critic else torch.zeros_like(out.loss)
                    share = lambda x: x * mine_of_total[0] / mine_of_total[1]  # noqa: E731
                    sums = sums + torch.stack([share(out.policy_loss), share(value_loss),
                                               out.entropy * mine / tokens,
                                               out.clipfrac * mine / tokens,
                                               out.approx_kl * mine / tokens]).detach()
                    yield distributed.share_of_mean(out.loss * mine_of_total[0], mine_of_total[1])

            run.step(optimizer, losses(), cfg.out, what="PPO", at=at, max_norm=cfg.max_grad_norm,
                     model=model)
            if first_ratio_error is None:  # the global first mini-batch's, over ranks
                first_ratio_error = distributed.max_over_ranks(max(errors), cfg.device)
            stats.append(sums)
            if outside is not None:
                outside_train.append(outside)
    stats = torch.stack(stats)
    distributed.sum_over_ranks(stats)
    mean = dict(zip(STATS, stats.mean(0).tolist()))
    mean["outside_kept_train"] = 0.0
    if outside_train:
        outside_train = torch.stack(outside_train)
        distributed.sum_over_ranks(outside_train)
        mean["outside_kept_train"] = outside_train.mean().item()
    return mean, first_ratio_error, micro_tokens


def metrics_row(cfg: PPOConfig, iteration: int, batch: Batch, loss_mask, outside, token_rewards,
                scores, kl_coef, critic, mean, first_ratio_error, reward_fn_errors, times,
                memory_at_start, micro_tokens, outcomes) -> dict:
    """The iteration's row of metrics.jsonl (docs/engine.md says what each means). kl is
    kl_truncation + kl_untruncated: with top-k/top-p the policy that samples is the truncated one and
    the reference the full distribution, so kl starts at the kept mass's -log before any update."""
    mask, t = batch.response_mask, batch.per_token
    old, plain, ref = t["old_logprobs"], t["plain_logprobs"], t["ref_logprobs"]
    lengths = mask.sum(-1).float()
    per_row = lambda x: (x * mask).sum(-1).mean().item()  # noqa: E731
    t_start, t_sync, t_generate, t_end, timings = times
    return {
        "step": iteration, "score_mean": scores.mean().item(), "score_std": scores.std().item(),
        "reward": per_row(token_rewards), "kl": per_row(old - ref), "kl_coef": kl_coef,
        "entropy": mean["entropy"], "policy_loss": mean["policy_loss"],
        "logprob_mean": old[loss_mask].mean().item() if loss_mask.any() else 0.0,
        "value_loss": mean["value_loss"], "clipfrac": mean["clipfrac"],
        "approx_kl": mean["approx_kl"], "first_ratio_max_error": first_ratio_error,
        "explained_variance": (explained_variance(t["old_values"], t["returns"], mask) if critic
                               else float("nan")),
        "reward_fn_errors": reward_fn_errors,
        "response_length": lengths.mean().item(),
        "tokens_per_s": lengths.sum().item() * (1 + cfg.ppo_epochs) / (t_end - t_start),
        "time_sync": t_sync - t_start, "time_generate": t_generate - t_sync,
        "time_old_logprobs": timings["old_logprobs"], "time_reference": timings["reference"],
        "time_score": timings["score"], "time_train": t_end - t_generate - sum(timings.values()),
        # the largest rank's (under torchrun)
        "peak_memory_mib": distributed.max_over_ranks(peak_memory_mib(cfg.device), cfg.device),
        "iteration_memory_mib": distributed.max_over_ranks(
            peak_memory_mib(cfg.device) - memory_at_start, cfg.device),
        "world_size": distributed.world(),
        # the padded layout's share of padding, which packed rows (cfg.packed) do not compute
        "padding_fraction": 1 - batch.attention_mask.float().mean().item(),
        "tokens_per_micro_batch": sum(micro_tokens) / max(len(micro_tokens), 1),
        "micro_batches": len(micro_tokens),
        **sampler_gap(old, batch.sampler_logprobs, loss_mask),
        **truncation_metrics(old, plain, batch.sampler_logprobs, loss_mask, outside),
        "outside_kept_train": mean["outside_kept_train"],
        "kl_truncation": per_row(torch.where(outside, 0.0, old - plain)),
        "kl_untruncated": per_row(torch.where(outside, old - ref, plain - ref)),
        **episodes.metrics(batch, outcomes),
    }


@run.owns_output  # cfg.out: checked, locked for this run, resume/overwrite handled, config.yaml saved
def train_ppo(cfg: PPOConfig) -> Path:
    """Returns the final checkpoint directory (the policy as a Hugging Face directory + value head)."""
    tokenizer, prompts, reward_fn, rows, episodic = read_prompts(cfg)
    pad, eos = special_ids(tokenizer)
    generator = run.setup(cfg.seed, cfg.device)
    model, reference, reward_model, optimizer = build_models(cfg, eos)
    score = make_scorer(cfg, reward_model, reward_fn, tokenizer)
    critic = cfg.advantage_estimator == "gae"  # the others neither run nor train the value head
    # The engine samples from the live policy (or a synced copy); the trainer scores its samples
    # under the engine's own distribution (temperature, top-k/p), so the two cannot disagree.
    after = cfg.max_episode_tokens if cfg.episodic else cfg.max_new_tokens
    engine = rollout.make(cfg, model, eos_id=eos, pad_id=pad,
                          max_model_len=max(len(p) for p in prompts) + after)
    # what the engine was sized for (a later reset's longer first observation is refused, named)
    sized_for = min(max(len(p) for p in prompts) + after, context_length(model.lm.config) or 1 << 62)
    limits = episodes.Limits(cfg.max_turns, cfg.max_new_tokens, cfg.max_episode_tokens,
                             cfg.strict_env, sized_for)
    sampling = engine.sampling
    saved, log, progress = run.begin(cfg, model, optimizer, generator, name="ppo",
                                     total=cfg.iterations, iteration=int, kl_coef=float)
    kl_coef = saved.get("kl_coef", cfg.kl_coef)
    for iteration in progress:
        memory_at_start = reset_peak_memory(cfg.device)  # peak_memory_mib is per iteration
        t_start = time.perf_counter()
        # 1. Rollout: sample prompts and generate with the current policy. The model stays in eval
        # mode throughout, training included: dropout would make the rollout's log-probs disagree
        # with training's (gradients flow all the same).
        eval_mode(model)
        k = cfg.samples_per_prompt  # each prompt k times, in consecutive rows (a group)
        pick = torch.randint(len(prompts), (cfg.batch_size // k,), generator=generator)
        pick = pick.repeat_interleave(k).tolist()
        engine.sync(model)  # the trained weights into the engine (nothing for the built-in one)
        t_sync = time.perf_counter()
        outcomes = {}
        with distributed.gathered(model), precision(cfg.device, cfg.dtype):
            if episodic:  # multi-turn: the model's turns, the environment's replies between them
                batch, outcomes = episodes.collect(engine, episodic[1], episodic[0],
                                                   [rows[i] for i in pick], iteration, limits,
                                                   cfg.device)
            else:
                batch = rollout.collect(engine, [prompts[i] for i in pick], iteration)
        t_generate = time.perf_counter()
        mask = batch.response_mask

        # 2. Old log-probs and values, reference log-probs (cached for every epoch), scores.
        epoch_orders = [torch.randperm(cfg.batch_size, generator=generator)
                        for _ in range(cfg.ppo_epochs)]
        batch, scores, reward_fn_errors, timings = rollout_forward(
            model, reference, score, batch, epoch_orders[0], cfg, sampling, critic)
        t = batch.per_token
        # A sampled token outside the trainer's kept set (probability 0 to it: the sampler's logits
        # and the trainer's differ by rounding at the boundary, or vLLM broke a tie otherwise) has no
        # finite ratio: out of the loss (loss_mask). It stays in the response (rewards, advantages,
        # the score's place) with no KL penalty: its old log-prob is set to the reference's.
        outside = mask & (t["old_logprobs"] == float("-inf"))
        old_logprobs = torch.where(outside, t["ref_logprobs"], t["old_logprobs"])
        loss_mask = mask & ~outside

        # 3. Rewards (the KL penalty in them, or in the loss: kl_in_loss) and advantages.
        token_rewards = kl_rewards(old_logprobs, t["ref_logprobs"], scores, mask,
                                   kl_coef=0.0 if cfg.kl_in_loss else kl_coef,
                                   estimator=cfg.kl_estimator)
        if "turn_rewards" in t:  # the environment's, on each turn's last token
            token_rewards = token_rewards + cfg.env_reward_weight * t["turn_rewards"]
        advantages, returns = estimate_advantages(cfg, token_rewards, t["old_values"], mask)
        batch = batch.with_tokens(old_logprobs=old_logprobs, advantages=advantages,
                                  **({"returns": returns} if critic else {}))

        # 4. PPO epochs over mini-batches (the loss on loss_mask's tokens).
        mean, first_ratio_error, micro_tokens = ppo_epochs(
            model, optimizer, batch.with_tokens(response_mask=loss_mask), epoch_orders, cfg,
            loss_options(cfg, sampling, kl_coef, critic), critic, at=f"iteration {iteration}")
        t_end = time.perf_counter()

        # 5. Log; adapt the KL coefficient; checkpoint.
        row = metrics_row(cfg, iteration, batch, loss_mask, outside, token_rewards, scores, kl_coef,
                          critic, mean, first_ratio_error, reward_fn_errors,
                          (t_start, t_sync, t_generate, t_end, timings), memory_at_start,
                          micro_tokens, outcomes)
        log.write(row)
        progress.set_postfix(score=f"{row['score_mean']:+.3f}", kl=f"{row['kl']:.3f}",
                             clipfrac=f"{row['clipfrac']:.3f}")
        if cfg.adaptive_kl:
            error = max(-0.2, min(0.2, row["kl"] / cfg.kl_target - 1))
            kl_coef *= 1 + error / cfg.kl_horizon
        if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations:
            run.save(cfg.out, lambda directory, state: save_model(model, tokenizer, directory, state),
                     optimizer, generator, model=model, iteration=iteration + 1, kl_coef=kl_coef)
    progress.close()
    plot(log.path, Path(cfg.out) / "ppo.png", PLOT_KEYS, "PPO")
    return Path(cfg.out) / "checkpoint"

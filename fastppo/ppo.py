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
import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fastppo import distributed, rewards, run
from fastppo.config import PPOConfig
from fastppo.data import Batch, encode_prompts, limit_prompts, read_jsonl, special_ids
from fastppo.kernels import (gae, group_advantages, kl_rewards, linear_ppo_loss, masked_whiten,
                             ppo_loss, reward_to_go)
from fastppo.metrics import MetricsLog, peak_memory_mib, plot, reset_peak_memory
from fastppo.models import (ADAPTER, ActorCritic, LogitsAt, adapters_off, add_lora,
                            check_fits_context, check_model_dir, check_reward_model_dir,
                            check_same_tokenizer, enable_gradient_checkpointing, eval_mode,
                            fusable_head, head_logprobs, load_adapter, load_lm, load_reward_model,
                            plain_state, precision, save_model, value_head_state)
from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout

PLOT_KEYS = ["score_mean", "kl", "reward", "entropy", "value_loss", "clipfrac", "response_length"]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    v, r = values[mask].double(), returns[mask].double()
    var = r.var() if r.numel() > 1 else torch.tensor(0.0)
    return float("nan") if var == 0 else float(1 - (r - v).var() / var)


def generate_global(rollout, prompts, iteration, cfg) -> Batch:
    """The iteration's rollout as one global batch on every rank: each rank generates its rows
    (sampled from uniforms keyed by their global row, prompts padded to the global width), then the
    ranks exchange them (tokens and masks only: B x (P + R) integers)."""
    rows = distributed.my_rows(torch.arange(len(prompts)))
    P = max(len(p) for p in prompts)
    local = rollout.generate([prompts[i] for i in rows.tolist()], iteration=iteration, rows=rows,
                             prompt_len=P)
    if distributed.world() == 1:
        return local
    width = P + cfg.max_new_tokens  # the widest a rank's batch can be; trimmed after the exchange
    grow = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)  # noqa: E731
    ids = distributed.gather_rows(grow(local.input_ids, rollout.pad_id))
    attention = distributed.gather_rows(grow(local.attention_mask.long(), 0)).bool()
    sampler = distributed.gather_rows(torch.nn.functional.pad(
        local.sampler_logprobs, (0, cfg.max_new_tokens - local.sampler_logprobs.shape[1])))
    R = int(attention[:, P:].any(0).nonzero().max()) + 1 if attention[:, P:].any() else 1
    return Batch(ids[:, :P + R], attention[:, :P + R], attention[:, P:P + R].clone(), P,
                 sampler[:, :R])


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


def make_rollout(cfg: PPOConfig, model: ActorCritic, *, eos: int, pad: int, longest: int):
    """The configured rollout engine (fastppo.rollout) at the config's sampling settings."""
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.rollout_engine == "hf":
        return HFRollout(model.lm, sampling, eos_id=eos, pad_id=pad, device=cfg.device,
                         seed=cfg.seed)
    from fastppo.rollout.vllm import VLLMRollout
    return VLLMRollout(cfg.policy, sampling, eos_id=eos, pad_id=pad, device=cfg.device,
                       seed=cfg.seed, dtype=cfg.dtype, max_model_len=longest,
                       max_rows=cfg.batch_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                       sleep=cfg.vllm_sleep)


def without_adapters(model: ActorCritic):
    """PPO's reference under LoRA: the policy's own forward with every adapter off (through the
    actor-critic, so that FSDP2 gathers its root), its logits (or hidden states) only."""
    def logits(input_ids, attention_mask, positions, hidden_only=False):
        with adapters_off(model.lm):
            return model(input_ids, attention_mask, positions, hidden_only=hidden_only)[0]
    return logits


def make_scorer(cfg: PPOConfig, reward_model, reward_fn, tokenizer):
    """score(mb, rows) -> (scores of mb's rows, rows reward_fn_error_value was given to): the
    weighted sum of the reward model's score and reward_fn's value (fastppo.rewards)."""
    def score(mb: Batch, rows: list[int]):
        total = torch.zeros(len(rows), device=cfg.device)
        if reward_model is not None:
            with precision(cfg.device, cfg.dtype):
                total += cfg.reward_model_weight * reward_model(mb.input_ids, mb.attention_mask).float()
        if reward_fn is None:
            return total, 0
        P = mb.prompt_len
        prompt_ids = [ids[keep].tolist() for ids, keep in zip(mb.input_ids[:, :P], mb.attention_mask[:, :P])]
        response_ids = [ids[keep].tolist() for ids, keep in zip(mb.responses, mb.response_mask)]
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        values, errors = rewards.score(reward_fn, cfg.reward_fn, [decode(p) for p in prompt_ids],
                                       [decode(r) for r in response_ids], prompt_ids, response_ids,
                                       error_value=cfg.reward_fn_error_value, rows=rows)
        return total + cfg.reward_fn_weight * torch.tensor(values, device=cfg.device), errors
    return score


@torch.no_grad()
def rollout_forward(model, reference, score, batch, order, cfg, sampling, heads, critic):
    """Old log-probs (under the sampling distribution: temperature, top-k, top-p) and values
    (actor-critic; no values without a critic), the policy's untruncated log-probs (the kept-mass
    metric; with top-k/top-p only, else the old ones), reference log-probs (full tempered
    distribution), scores: one no-grad pass each, in the mini-batches of the first PPO epoch
    (`order`; each rank takes its share of each). Every rank ends with the whole batch's.
    heads: the policy's and the reference's fusable LM heads (None: from logits)."""
    B, R = batch.response_mask.shape
    temperature = sampling.temperature
    truncated = bool(sampling.top_k) or sampling.top_p < 1.0
    old_logprobs = torch.zeros(B, R, device=cfg.device)
    plain_logprobs = torch.zeros_like(old_logprobs) if truncated else old_logprobs
    values, ref_logprobs = torch.zeros_like(old_logprobs), torch.zeros_like(old_logprobs)
    scores = torch.zeros(B, device=cfg.device)
    errors = torch.zeros((), device=cfg.device)
    timings = {"reference": 0.0, "score": 0.0}
    for i in range(0, B, cfg.mini_batch_size):
        idx = distributed.my_rows(order[i:i + cfg.mini_batch_size])
        mb = batch.select(idx)
        labels = mb.responses.masked_fill(~mb.response_mask, -100)
        with precision(cfg.device, cfg.dtype):  # as in training: the same logits, bit for bit
            states, v = model(mb.input_ids, mb.attention_mask, mb.response_positions,
                              hidden_only=heads[0] is not None, with_values=critic)
            old_logprobs[idx] = head_logprobs(states, heads[0], labels, temperature=temperature,
                                              top_k=sampling.top_k, top_p=sampling.top_p)
            if truncated:
                plain_logprobs[idx] = head_logprobs(states, heads[0], labels,
                                                    temperature=temperature)
            if critic:
                values[idx] = v
        t0 = time.perf_counter()
        with precision(cfg.device, cfg.dtype):
            ref = reference(mb.input_ids, mb.attention_mask, mb.response_positions,
                            hidden_only=heads[1] is not None)
            ref_logprobs[idx] = head_logprobs(ref, heads[1], labels, temperature=temperature)
        t1 = time.perf_counter()
        scores[idx], mb_errors = score(mb, idx.tolist())
        errors += mb_errors
        timings["reference"] += t1 - t0
        timings["score"] += time.perf_counter() - t1
    # each row from one rank
    distributed.sum_over_ranks(old_logprobs, values, ref_logprobs, scores, errors,
                               *([plain_logprobs] if truncated else []))
    return old_logprobs, plain_logprobs, values, ref_logprobs, scores, int(errors), timings


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


@run.owns_output  # cfg.out: locked for this run, resume/overwrite checked, config.yaml saved
def train_ppo(cfg: PPOConfig) -> Path:
    """Returns the final checkpoint directory (the policy as a Hugging Face directory + value head)."""
    cfg.check()
    rows = read_jsonl(cfg.prompts, "ppo")
    check_model_dir(cfg.policy, "policy")
    if cfg.reward_model:
        check_reward_model_dir(cfg.reward_model, "reward_model")
    reward_fn = rewards.load(cfg.reward_fn) if cfg.reward_fn else None
    out = Path(cfg.out)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    if cfg.reward_model:
        check_same_tokenizer(tokenizer, cfg.reward_model, "reward_model")
    pad, eos = special_ids(tokenizer)
    prompts = limit_prompts(encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                            cfg.max_prompt_length, cfg.truncate_prompts, tokenizer.bos_token_id)
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    for path in (cfg.policy, cfg.reward_model):
        if path:
            check_fits_context(path, longest, "the longest prompt + max_new_tokens")
    if cfg.rollout_engine == "vllm":
        if distributed.world() > 1:
            raise ValueError("rollout_engine='vllm' runs in one process for now (one vLLM engine "
                             "per rank is not built yet); under torchrun use rollout_engine='hf'")
        from fastppo.rollout.vllm import check_servable
        check_servable(cfg.policy, cfg.device)  # before any model is loaded
    generator = run.setup(cfg.seed, cfg.device)
    model = ActorCritic(load_lm(cfg.policy, cfg.device)).to(cfg.device)
    if cfg.lora_rank:  # the reference is the policy with its adapters off: no second copy
        add_lora(model.lm, cfg)
        reference = without_adapters(model)
    else:
        reference = LogitsAt(copy.deepcopy(model.lm)).eval().requires_grad_(False)  # SFT weights
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model.lm)
    reward_model = None
    if cfg.reward_model:
        reward_model = load_reward_model(cfg.reward_model, cfg.device)
        reward_model.eval().requires_grad_(False)
    score = make_scorer(cfg, reward_model, reward_fn, tokenizer)
    critic = cfg.advantage_estimator == "gae"  # the others neither run nor train the value head
    # The rollout engine samples from the live policy; the trainer scores its samples at the
    # engine's own temperature, so the two cannot disagree. Under torchrun every model is sharded
    # (FSDP2) and the policy is gathered whole for each rollout (distributed.gathered).
    if distributed.world() > 1:
        distributed.shard(model, model.lm)
        if not cfg.lora_rank:
            distributed.shard(reference, reference.lm)
        if reward_model is not None:
            distributed.shard(reward_model, reward_model.model)
    # Built on the sharded parameters, before any forward: after one, FSDP2's root holds whole ones.
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA: adapters, value head
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, fused=True)  # one pass per step
    if distributed.world() > 1:
        with torch.no_grad():  # FSDP2 takes the module of the first forward for its root
            model(torch.tensor([[eos]], device=cfg.device),
                  torch.ones(1, 1, dtype=torch.bool, device=cfg.device))
        model.reshard()
    rollout = make_rollout(cfg, model, eos=eos, pad=pad, longest=longest)
    sampling = rollout.sampling  # the trained distribution is the sampled one (temperature, top-k/p)
    temperature, truncation = sampling.temperature, dict(top_k=sampling.top_k, top_p=sampling.top_p)
    # Log-probs and the loss straight from hidden states where the LM heads allow (no logits); under
    # torchrun FSDP2 shards the heads, and the logits path runs.
    fused = cfg.fused_linear and distributed.world() == 1
    head = fusable_head(model.lm, fused)
    heads = (head, head if cfg.lora_rank else fusable_head(reference.lm, fused))

    def write_model(directory, state):
        save_model(model, tokenizer, directory, state)

    def load_model(directory):
        if cfg.lora_rank:  # the frozen base is cfg.policy's, loaded above; the adapter is saved
            adapter = load_adapter(Path(directory) / ADAPTER, model.lm)
            lm = {k: v.to(cfg.device) for k, v in adapter.items()}
        else:
            lm = load_lm(directory, cfg.device).state_dict()
        state = {f"lm.{k}": v for k, v in lm.items()}
        state.update({f"value_head.{k}": v.to(cfg.device)
                      for k, v in value_head_state(directory).items()})
        distributed.load_full_state_dict(model, state, strict=not cfg.lora_rank)

    kl_coef, start_iteration = cfg.kl_coef, 0
    if cfg.resume:
        saved = run.resume(out, load_model, optimizer, generator, model=model, iteration=int,
                           kl_coef=float)
        kl_coef, start_iteration = saved["kl_coef"], saved["iteration"]
    log = MetricsLog(out, resume_step=start_iteration if cfg.resume else None)

    progress = tqdm(range(start_iteration, cfg.iterations), desc="ppo", initial=start_iteration,
                    total=cfg.iterations, disable=None)
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
        if cfg.rollout_engine == "vllm":  # the trained weights into vLLM, in place
            rollout.load_weights(plain_state(model.lm))
        t_sync = time.perf_counter()
        with distributed.gathered(model), precision(cfg.device, cfg.dtype):
            batch = generate_global(rollout, [prompts[i] for i in pick], iteration, cfg)
        t_generate = time.perf_counter()
        mask = batch.response_mask

        # 2. Old log-probs and values, reference log-probs (cached for every epoch), scores.
        epoch_orders = [torch.randperm(cfg.batch_size, generator=generator)
                        for _ in range(cfg.ppo_epochs)]
        (old_logprobs, plain_logprobs, old_values, ref_logprobs, scores, reward_fn_errors,
         timings) = rollout_forward(model, reference, score, batch, epoch_orders[0], cfg, sampling,
                                    heads, critic)
        # A sampled token outside the trainer's kept set (probability 0 to it: the sampler's logits
        # and the trainer's differ by rounding at the boundary, or vLLM broke a tie otherwise) has no
        # finite ratio: out of the loss (loss_mask). It stays in the response (rewards, advantages,
        # the score's place) with no KL penalty: its old log-prob is set to the reference's.
        outside = mask & (old_logprobs == float("-inf"))
        old_logprobs = torch.where(outside, ref_logprobs, old_logprobs)
        loss_mask = mask & ~outside
        train_batch = dataclasses.replace(batch, response_mask=loss_mask)

        # 3. Rewards (the KL penalty in them, or in the loss: kl_in_loss) and advantages.
        token_rewards = kl_rewards(old_logprobs, ref_logprobs, scores, mask,
                                   kl_coef=0.0 if cfg.kl_in_loss else kl_coef,
                                   estimator=cfg.kl_estimator)
        advantages, returns = estimate_advantages(cfg, token_rewards, old_values, mask)

        # 4. PPO epochs over mini-batches. Each rank takes its share of every mini-batch; its loss
        # is its share of the global mini-batch's mean (share_of_mean: over tokens, or over
        # responses of their token means), so the gradient FSDP averages is the one-process one.
        stats, outside_train, first_ratio_error = [], [], None
        by_tokens = cfg.loss_reduction == "token-mean"
        for order in epoch_orders:
            for i in range(0, cfg.batch_size, cfg.mini_batch_size):
                tokens = loss_mask[order[i:i + cfg.mini_batch_size]].sum().clamp(min=1)
                responses = loss_mask[order[i:i + cfg.mini_batch_size]].any(-1).sum().clamp(min=1)
                idx = distributed.my_rows(order[i:i + cfg.mini_batch_size])
                mb = train_batch.select(idx)
                # the loss is a sum over my tokens (token-mean), or a mean over my responses
                mine_of_total = (1.0, tokens) if by_tokens else (
                    mb.response_mask.any(-1).sum(), responses)
                options = dict(
                    clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                    entropy_coef=cfg.entropy_coef, temperature=temperature, **truncation,
                    # the policy moves between mini-batches: a sampled token may leave its kept set
                    allow_outside_kept=True,
                    reduction="sum" if by_tokens else "seq-mean-token-mean", tis_cap=cfg.tis_cap,
                    sampler_logprobs=None if cfg.tis_cap is None else mb.sampler_logprobs)
                if critic:
                    options.update(old_values=old_values[idx], returns=returns[idx],
                                   value_clip=cfg.value_clip, vf_coef=cfg.vf_coef)
                if cfg.kl_in_loss:
                    options.update(ref_logprobs=ref_logprobs[idx], kl_coef=kl_coef,
                                   kl_estimator=cfg.kl_loss_estimator)
                with precision(cfg.device, cfg.dtype):  # bf16 matmuls; the loss in float32
                    # logits, or the last hidden states for the fused LM head
                    states, values = model(mb.input_ids, mb.attention_mask, mb.response_positions,
                                           hidden_only=head is not None, with_values=critic)
                    if head is None:
                        out_loss = ppo_loss(states, mb.responses, old_logprobs[idx],
                                            advantages[idx], mb.response_mask, values=values,
                                            **options)
                    else:  # no logits: hidden states through the LM head's weight, fused
                        out_loss = linear_ppo_loss(states, head.weight, mb.responses,
                                                   old_logprobs[idx], advantages[idx],
                                                   mb.response_mask, bias=head.bias, values=values,
                                                   **options)
                loss = distributed.share_of_mean(out_loss.loss * mine_of_total[0], mine_of_total[1])
                if first_ratio_error is None:  # rollout/training agreement: ratio must be 1 here
                    with torch.no_grad(), precision(cfg.device, cfg.dtype):
                        lp = head_logprobs(states.detach(), head, mb.responses.masked_fill(
                            ~mb.response_mask, -100), temperature=temperature, **truncation)
                        ratio = torch.exp(lp - old_logprobs[idx])[mb.response_mask]
                        first_ratio_error = distributed.max_over_ranks(
                            (ratio - 1).abs().max().item() if ratio.numel() else 0.0, cfg.device)
                mine = mb.response_mask.sum()  # the global mini-batch's stats, summed over ranks
                if out_loss.outside_kept is not None:
                    outside_train.append(out_loss.outside_kept * mine / tokens)
                value_loss = out_loss.value_loss if critic else torch.zeros_like(out_loss.loss)
                share = lambda x: x * mine_of_total[0] / mine_of_total[1]  # noqa: E731  (x / tokens, bit for bit)
                stats.append(torch.stack([share(out_loss.policy_loss), share(value_loss),
                                          out_loss.entropy * mine / tokens,
                                          out_loss.clipfrac * mine / tokens,
                                          out_loss.approx_kl * mine / tokens]))
                run.stop_if_not_finite(distributed.summed(loss.detach()) / distributed.world(),
                                       out, what="PPO loss", at=f"iteration {iteration}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                run.stop_if_not_finite(norm, out, what="PPO gradient norm",
                                       at=f"iteration {iteration}")
                optimizer.step()
        t_end = time.perf_counter()
        stats = torch.stack(stats)
        distributed.sum_over_ranks(stats)
        mean = dict(zip(("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl"),
                        stats.mean(0).tolist()))
        if outside_train:
            outside_train = torch.stack(outside_train)
            distributed.sum_over_ranks(outside_train)
            mean["outside_kept_train"] = outside_train.mean().item()

        # 5. Log; adapt the KL coefficient; checkpoint.
        lengths = mask.sum(-1).float()
        kl = ((old_logprobs - ref_logprobs) * mask).sum(-1).mean().item()
        row = {
            "step": iteration, "score_mean": scores.mean().item(), "score_std": scores.std().item(),
            "reward": (token_rewards * mask).sum(-1).mean().item(), "kl": kl, "kl_coef": kl_coef,
            "entropy": mean["entropy"], "policy_loss": mean["policy_loss"],
            "logprob_mean": old_logprobs[loss_mask].mean().item() if loss_mask.any() else 0.0,
            "value_loss": mean["value_loss"], "clipfrac": mean["clipfrac"],
            "approx_kl": mean["approx_kl"], "first_ratio_max_error": first_ratio_error,
            "explained_variance": (explained_variance(old_values, returns, mask) if critic
                                   else float("nan")),
            "reward_fn_errors": reward_fn_errors,
            "response_length": lengths.mean().item(),
            "tokens_per_s": lengths.sum().item() * (1 + cfg.ppo_epochs) / (t_end - t_start),
            "time_sync": t_sync - t_start, "time_generate": t_generate - t_sync,
            "time_reference": timings["reference"],
            "time_score": timings["score"],
            "time_train": t_end - t_generate - timings["reference"] - timings["score"],
            # the largest rank's (under torchrun)
            "peak_memory_mib": distributed.max_over_ranks(peak_memory_mib(cfg.device), cfg.device),
            "iteration_memory_mib": distributed.max_over_ranks(
                peak_memory_mib(cfg.device) - memory_at_start, cfg.device),
            "world_size": distributed.world(),
            **sampler_gap(old_logprobs, batch.sampler_logprobs, loss_mask),
            **truncation_metrics(old_logprobs, plain_logprobs, batch.sampler_logprobs, loss_mask,
                                 outside),
            "outside_kept_train": mean.get("outside_kept_train", 0.0),
        }
        log.write(row)
        progress.set_postfix(score=f"{row['score_mean']:+.3f}", kl=f"{kl:.3f}",
                             clipfrac=f"{row['clipfrac']:.3f}")
        if cfg.adaptive_kl:
            error = max(-0.2, min(0.2, kl / cfg.kl_target - 1))
            kl_coef *= 1 + error / cfg.kl_horizon
        if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations:
            run.save(out, write_model, optimizer, generator, model=model,
                     iteration=iteration + 1, kl_coef=kl_coef)
    progress.close()
    plot(log.path, out / "ppo.png", PLOT_KEYS, "PPO")
    return out / "checkpoint"

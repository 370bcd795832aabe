"""Padding-free (packed rows) vs padded: the phases packing changes, on the same rollouts, side by side.

    python bench/packing.py [--repeat 3] [--hidden 256 --layers 4 --vocab 32000 --response 256]

Three workloads of 16 rollouts each, built directly (random tokens, each response ending at EOS), so
that the lengths are what they say whatever a random policy would sample:
  variable   prompts of 8-64 tokens, responses of 1..256 tokens (uniform): the mixed lengths of real
             responses that stop at EOS;
  grpo       2 prompts x 8 samples (GRPO groups share their prompt), responses of 1..256 tokens;
  standard   prompts of 16 tokens, every response 256 tokens: nothing to pack (the 0.95x check).
For each workload and layout (packed false / true), from the same initial weights: the rollout's
no-grad forwards as the loop runs them (fastppo.ppo.rollout_forward: old log-probs and values, the
reference, the reward model) and the PPO epochs (fastppo.ppo.ppo_epochs: 2 epochs of 2 mini-batches,
fused LM head, GAE with a critic; GRPO without). Generation is not timed: the rollout engine samples
the same way in both layouts. Reports the median of `repeat` runs after one warm-up, the two layouts
alternating: seconds and tokens/s (attended tokens per second) of each phase and of the two together,
peak RSS growth, the padding fraction, and the FLOPs each layout spends against the useful FLOPs
(dense layers per token, attention per sequence, the LM head on the response tokens), as a fraction
of the matmul peak measured in the same run. Rows go to bench/results/packing.csv.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from common import append_csv, device_name, git_revision, matmul_gflops, today
from fastppo.config import PPOConfig
from fastppo.data import PackedRows, pack
from fastppo.kernels import kl_rewards
from fastppo.metrics import peak_memory_mib, reset_peak_memory
from fastppo.models import ActorCritic, PolicyLM, RewardModel
from fastppo.ppo import (estimate_advantages, loss_options, make_scorer, ppo_epochs,
                         rollout_forward)
from fastppo.prepare import freeze_and_shard, prepare
from fastppo.rollout import Sampling

EOS, PAD, B = 3, 0, 16


def rollouts(kind: str, response: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rand = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=g))  # noqa: E731
    tokens = lambda n: torch.randint(4, vocab, (n,), generator=g).tolist()  # noqa: E731
    if kind == "standard":
        prompts = [tokens(16) for _ in range(B)]
        lengths = [response] * B
    elif kind == "grpo":
        prompts = [p for p in (tokens(rand(8, 64)) for _ in range(B // 8)) for _ in range(8)]
        lengths = [rand(1, response) for _ in range(B)]
    else:
        prompts = [tokens(rand(8, 64)) for _ in range(B)]
        lengths = [rand(1, response) for _ in range(B)]
    return pack(prompts, [tokens(n - 1) + [EOS] for n in lengths], PAD)


def flops(batch, hidden: int, layers: int, intermediate: int, vocab: int, rows_T=None):
    """Forward FLOPs of one model over the batch: the dense layers per token, causal attention per
    sequence, the LM head on the (B, R) response grid when padded, on the response tokens alone
    when packed (token-mean loss, fastppo.data.ResponseTokens). rows_T: (rows, T) of a packed
    layout."""
    dense = 2 * layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    attn = lambda L: 2 * layers * hidden * L * (L + 1)  # noqa: E731 (QK^T and AV, causal half)
    lengths = batch.attention_mask.sum(-1).tolist()
    head = 2 * hidden * vocab * batch.response_mask.shape[1] * len(lengths)
    useful_head = 2 * hidden * vocab * int(batch.response_mask.sum())
    if rows_T is None:  # padded: every row at the full width
        L = batch.attention_mask.shape[1]
        return dense * L * len(lengths) + attn(L) * len(lengths) + head
    if rows_T == "useful":
        return dense * sum(lengths) + sum(attn(n) for n in lengths) + useful_head
    rows, T = rows_T
    return dense * rows * T + attn(T) * rows + useful_head  # sdpa computes each row's whole square


def config_for(packed: bool, kind: str, estimator: str, args) -> PPOConfig:
    return PPOConfig(prompts="-", policy="-", reward_model="-", out="-", batch_size=B,
                     mini_batch_size=B // 2, ppo_epochs=2, max_new_tokens=args.response, lr=1e-7,
                     device=args.device, packed=packed, advantage_estimator=estimator,
                     samples_per_prompt=8 if kind == "grpo" else 1)


def one_iteration(lm, rm, batch, cfg, critic: bool, packed: bool, seed: int, args):
    """Seconds and peak memory (MiB) of the rollout's no-grad forwards and of the PPO epochs, from
    fresh copies of the initial weights."""
    sampling = Sampling(max_new_tokens=args.response, temperature=1.0, top_k=0, top_p=1.0)
    model = ActorCritic(copy.deepcopy(lm))
    optimizer = prepare(model, cfg)
    reference = freeze_and_shard(PolicyLM(copy.deepcopy(lm)), fused_linear=True, packed=packed)
    reward = freeze_and_shard(RewardModel(copy.deepcopy(rm)), packed=packed)
    score = make_scorer(cfg, reward, None, None)
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(B, generator=g) for _ in range(cfg.ppo_epochs)]
    reset_peak_memory(args.device)
    start = time.perf_counter()
    out, scores, _, _ = rollout_forward(model, reference, score, batch, orders[0], cfg, sampling,
                                        critic)
    t_forwards, m_forwards = time.perf_counter() - start, peak_memory_mib(args.device)
    t = out.per_token
    rewards = kl_rewards(t["old_logprobs"], t["ref_logprobs"], scores, out.response_mask,
                         kl_coef=0.05)
    advantages, returns = estimate_advantages(cfg, rewards, t["old_values"], out.response_mask)
    out = out.with_tokens(advantages=advantages, **({"returns": returns} if critic else {}))
    reset_peak_memory(args.device)
    start = time.perf_counter()
    ppo_epochs(model, optimizer, out, orders, cfg, loss_options(cfg, sampling, 0.05, critic),
               critic, at="bench")
    return t_forwards, m_forwards, time.perf_counter() - start, peak_memory_mib(args.device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--workloads", default="variable,grpo,standard")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    H, I = args.hidden, 2 * args.hidden
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=H, intermediate_size=I,
                         num_hidden_layers=args.layers, num_attention_heads=H // 64,
                         num_key_value_heads=H // 64, max_position_embeddings=1024,
                         pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(args.device)
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").to(
        args.device)
    peak = matmul_gflops(args.device)
    device = device_name(args.device)
    print(f"{device}: float32 matmul peak {peak:.0f} GFLOP/s (2048^3, same run)")
    results = []
    for kind in args.workloads.split(","):
        batch = rollouts(kind, args.response, args.vocab, seed=1).to(args.device)
        estimator = "grpo" if kind == "grpo" else "gae"
        padding = 1 - batch.attention_mask.float().mean().item()
        tokens = int(batch.attention_mask.sum())
        times = {(p, phase): [] for p in (False, True) for phase in ("forwards", "train")}
        memory = {key: [] for key in times}
        for r in range(args.repeat + 1):  # the first is a warm-up; the layouts alternate, so
            for packed in (False, True):  # that the box's drift hits both alike
                cfg = config_for(packed, kind, estimator, args)
                t_forwards, m_forwards, t_train, m_train = one_iteration(
                    lm, rm, batch, cfg, estimator == "gae", packed, r, args)
                if r:
                    for phase, t, m in (("forwards", t_forwards, m_forwards),
                                        ("train", t_train, m_train)):
                        times[packed, phase].append(t)
                        memory[packed, phase].append(m)
        for packed in (False, True):
            cfg = config_for(packed, kind, estimator, args)
            rows = PackedRows.of(batch.input_ids, batch.attention_mask)
            layout = rows.input_ids.shape if packed else None
            # the policy, reference and reward model forward once each; the policy 2 epochs x 3
            # (forward + backward) = 9 policy-sized forwards in all
            spent = 9 * flops(batch, H, args.layers, I, args.vocab, layout)
            useful = 9 * flops(batch, H, args.layers, I, args.vocab, "useful")
            padded = 9 * flops(batch, H, args.layers, I, args.vocab)
            tf, tt = (statistics.median(times[packed, p]) for p in ("forwards", "train"))
            row = dict(date=today(), rev=git_revision(), device=device, torch=torch.__version__,
                       workload=kind, layout="packed" if packed else "padded",
                       shape=f"h{H}-l{args.layers}-v{args.vocab}-r{args.response}", tokens=tokens,
                       padding_fraction=f"{padding:.3f}", forwards_s=f"{tf:.3f}",
                       train_s=f"{tt:.3f}", forwards_tokens_per_s=f"{tokens / tf:.0f}",
                       train_tokens_per_s=f"{tokens * cfg.ppo_epochs / tt:.0f}",
                       iteration_tokens_per_s=f"{tokens / (tf + tt):.0f}",
                       forwards_peak_mib=f"{statistics.median(memory[packed, 'forwards']):.0f}",
                       train_peak_mib=f"{statistics.median(memory[packed, 'train']):.0f}",
                       gflop_spent=f"{spent / 1e9:.1f}", gflop_useful=f"{useful / 1e9:.1f}",
                       gflop_padded=f"{padded / 1e9:.1f}",
                       useful_fraction_of_peak=f"{useful / (tf + tt) / 1e9 / peak:.3f}",
                       matmul_peak_gflops=f"{peak:.0f}", repeat=args.repeat)
            results.append(row)
            print(", ".join(f"{k} {v}" for k, v in row.items() if k not in ("date", "rev", "torch",
                                                                          "device")))
        a, b = results[-2], results[-1]
        speedup = float(a["forwards_s"]) + float(a["train_s"])
        speedup /= float(b["forwards_s"]) + float(b["train_s"])
        print(f"{kind}: packed / padded iteration (forwards + training) tokens/s = {speedup:.2f}x; "
              f"forwards {float(a['forwards_s']) / float(b['forwards_s']):.2f}x, "
              f"training {float(a['train_s']) / float(b['train_s']):.2f}x")
    append_csv("packing.csv", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

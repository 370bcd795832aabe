"""Multi-turn episodes: rollout throughput of both engines, and training with or without logits on the
environment's tokens, side by side.

    python bench/episodes.py [--repeat 3] [--engines hf vllm]

Policy: bench/e2e.py's (Llama-style, hidden 256, 4 layers, vocabulary 32000, random init), with EOS
given a logit of up to +9 at every position (one residual dimension held constant and read by EOS's
row of the LM head, as tests/engine/chat_testing.py does), so that a random policy's turns end at EOS
after about 9 tokens, as a real model's do (without it, a turn of a random policy over 32000 tokens
never ends and every episode stops, truncated, after its first turn).
Episodes: 16 rows of 16 prompt tokens; an environment that answers every turn with a 16-token
observation (plain text: this tokenizer has no chat template) for up to 4 turns of at most 32 tokens
(max_episode_tokens 224; the policy has 256 positions).

1. Rollout: episodes/s and tokens/s (the model's sampled tokens, and every token of the episodes) of
   each engine, median of `repeat` runs after a warm-up; the single-turn baseline generates the same
   rows once (one turn of 32 tokens), to show what the turns cost (each turn prefills its whole
   context again in the built-in engine; vLLM's prefix cache may keep it).
2. Training on the episodes of one rollout: one forward + backward of a token-mean policy-gradient
   loss on the model's tokens, with the LM head run (a) on every token after the prompt (the model's
   and the environment's: what a trainer that masks only the loss computes) and (b) on the model's
   tokens alone (fastppo: data.ResponseTokens over response_mask), logits path and fused head; the
   same loss and gradient (checked), seconds and peak RSS growth.
Rows go to bench/results/episodes.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_csv, device_name, git_revision, matmul_gflops, sync, today
from e2e import workload
from fastppo import episodes
from fastppo.data import ResponseTokens, encode_prompts, read_jsonl
from fastppo.heads import TokenHead
from fastppo.metrics import peak_memory_mib, reset_peak_memory
from fastppo.models import PolicyLM, load_lm
from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout

ROWS, TURNS, TURN_TOKENS, OBSERVATION, EPISODE = 16, 4, 32, 16, 224
EOS_LOGIT = 9.0


class Reply:
    """Answers each turn with OBSERVATION words; done after TURNS turns."""

    def __init__(self):
        self.turns = 0

    def reset(self, row):
        return row["prompt"]

    def step(self, turn: str):
        self.turns += 1
        return " ".join(f"w{(self.turns * 7 + i) % 1000}" for i in range(OBSERVATION)), 0.0, \
            self.turns >= TURNS


def ending_policy(policy: Path) -> None:
    """The saved random policy, rewritten so that EOS has a logit of about EOS_LOGIT everywhere."""
    lm = load_lm(policy, "cpu")
    with torch.no_grad():
        lm.model.embed_tokens.weight[:, 0] = 10.0
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        lm.lm_head.weight[3, 0] = EOS_LOGIT / lm.config.hidden_size ** 0.5
    lm.save_pretrained(policy)


def make_engine(kind: str, policy: Path, lm, new_tokens: int, device: str):
    sampling = Sampling(max_new_tokens=new_tokens)
    if kind == "hf":
        return HFRollout(lm, sampling, eos_id=3, pad_id=0, device=device, seed=0)
    from fastppo.rollout.vllm import VLLMRollout
    return VLLMRollout(policy, sampling, eos_id=3, pad_id=0, device=device, seed=0,
                       dtype="float32", max_model_len=16 + EPISODE, max_rows=ROWS)


def rollout_rows(kind, engine, tokenizer, rows, repeat, device):
    limits = episodes.Limits(TURNS, TURN_TOKENS, EPISODE)
    renderer = episodes.Renderer(tokenizer)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    out = []
    for name in ("single-turn", "episodes"):
        times, batch = [], None
        for r in range(repeat + 1):  # the first is a warm-up
            sync(device)
            start = time.perf_counter()
            if name == "episodes":
                batch, _ = episodes.run_episodes(
                    lambda c, rows, turn: engine.generate(c, iteration=r, rows=rows, turn=turn),
                    Reply, rows, renderer, limits, global_rows=torch.arange(len(rows)), pad_id=0)
            else:
                batch = engine.generate(prompts, iteration=r)
            sync(device)
            if r:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        model = int(batch.response_mask.sum())
        region = int(batch.attention_mask[:, batch.prompt_len:].sum())
        turns = batch.per_row["turns"].mean().item() if "turns" in batch.per_row else 1.0
        out.append(dict(part="rollout", engine=kind, workload=name, seconds=f"{seconds:.4f}",
                        model_tokens=model, episode_tokens=region, turns_per_episode=f"{turns:.2f}",
                        model_tokens_per_s=f"{model / seconds:.1f}",
                        episode_tokens_per_s=f"{region / seconds:.1f}"))
        print(", ".join(f"{k} {v}" for k, v in out[-1].items()))
    return out, batch


def train_step(policy: PolicyLM, batch, everything: bool):
    """One forward + backward of -sum(advantage x log-prob) over the model's tokens; the LM head on
    every token after the prompt (everything) or on the model's tokens alone."""
    policy.zero_grad(set_to_none=True)
    region = batch.attention_mask[:, batch.prompt_len:]
    on = ResponseTokens(region if everything else batch.response_mask, True)
    states = policy(batch, at=on.at)
    labels = batch.responses.masked_fill(~region, -100)  # the environment's tokens too
    logprobs = policy.head.logprobs(states, on.take(labels))
    weights = on.take(batch.response_mask.float() * batch.per_token["advantages"])
    loss = -(logprobs * weights).sum() / batch.response_mask.sum()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in policy.parameters()
                                     if p.grad is not None])


def training_rows(lm, batch, repeat, device):
    g = torch.Generator().manual_seed(0)
    batch = batch.to(device).with_tokens(advantages=torch.randn(batch.response_mask.shape,
                                                                generator=g).to(device))
    out = []
    for fused in (False, True):
        policy = PolicyLM(lm)
        policy.head, policy.packed = TokenHead(lm, fused=fused), True  # the defaults of a run
        assert (policy.head.linear is not None) == fused
        results = {}
        times = {True: [], False: []}
        memory = {True: [], False: []}
        for r in range(repeat + 1):
            for everything in (True, False):  # alternating, so that drift hits both alike
                reset_peak_memory(device)
                sync(device)
                start = time.perf_counter()
                results[everything] = train_step(policy, batch, everything)
                sync(device)
                if r:
                    times[everything].append(time.perf_counter() - start)
                    memory[everything].append(peak_memory_mib(device))
        (l0, g0), (l1, g1) = results[True], results[False]
        assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6), (l0, l1)
        assert torch.allclose(g0, g1, rtol=1e-3, atol=1e-6), (g0 - g1).abs().max()
        for everything in (True, False):
            n = int((batch.attention_mask[:, batch.prompt_len:] if everything
                     else batch.response_mask).sum())
            head_gflop = 6 * lm.config.hidden_size * lm.config.vocab_size * n / 1e9
            out.append(dict(part="training", engine="-", head="fused" if fused else "logits",
                            workload="head on every episode token" if everything
                            else "head on the model's tokens", head_tokens=n,
                            head_gflop=f"{head_gflop:.1f}",
                            seconds=f"{statistics.median(times[everything]):.4f}",
                            peak_mib=f"{statistics.median(memory[everything]):.0f}",
                            max_grad_difference=f"{(g0 - g1).abs().max().item():.2e}"))
            print(", ".join(f"{k} {v}" for k, v in out[-1].items()))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = []
    peak = matmul_gflops(args.device)
    print(f"{device_name(args.device)}: float32 matmul peak {peak:.0f} GFLOP/s (2048^3, same run)")
    with tempfile.TemporaryDirectory() as tmp:
        policy, _, prompts_file = workload(Path(tmp), seed=0)
        ending_policy(policy)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(policy)
        data = read_jsonl(prompts_file, "ppo")[:ROWS]
        lm = load_lm(policy, args.device).eval()
        for kind in args.engines:
            engine = make_engine(kind, policy, lm, TURN_TOKENS, args.device)
            out, batch = rollout_rows(kind, engine, tokenizer, data, args.repeat, args.device)
            rows += out
            if kind == args.engines[0]:  # before vLLM starts its engine process beside this one
                rows += training_rows(lm.train(), batch, args.repeat, args.device)
                lm.eval()
            del engine
    common = dict(date=today(), rev=git_revision(), device=device_name(args.device),
                  torch=torch.__version__, repeat=args.repeat, matmul_peak_gflops=f"{peak:.0f}")
    append_csv("episodes.csv", [{**common, **row} for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())

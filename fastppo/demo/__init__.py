"""`fastppo demo`: the whole pipeline (SFT -> reward model -> PPO) on the built-in task
(fastppo.demo.sentiment: "make the continuation positive") with a tiny Llama trained from scratch, and
the oracle evaluation that tells whether PPO learned the hidden preference.

`fastppo demo --task arithmetic`: SFT on a few single-digit additions, then GRPO with a verifiable
reward (fastppo.demo.arithmetic: a Python function, no reward model, no critic), and the fraction of
correct answers before and after.

`fastppo demo --task tools`: SFT on a few conversations (half answer directly, half call a
calculator tool first), then GRPO on multi-turn episodes with the tool (fastppo.demo.calculator: two-
digit sums the tiny model cannot compute itself), and the accuracy, tool-call rate and turns per
episode on held-out problems before and after.

The tasks themselves (data, tokenizer, oracle or verifier) are the modules beside this one; this one
runs them."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from transformers import AutoTokenizer

from fastppo.config import PPOConfig, SFTConfig, check_choices, check_fields
from fastppo.data import encode_prompts, special_ids, write_jsonl
from fastppo import episodes
from fastppo.demo import arithmetic, calculator, sentiment
from fastppo.kernels import token_logprobs
from fastppo.models import lm_logits, load_lm, tiny_llama
from fastppo.pipeline import PipelineConfig, run_pipeline
from fastppo.ppo import train_ppo
from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout
from fastppo.sft import train_sft

# Per task: SFT steps, reward-model steps (none for arithmetic), PPO iterations.
DEFAULTS = {"sentiment": (250, 250, 30), "arithmetic": (100, 0, 60), "tools": (300, 0, 30)}
Task = Literal[tuple(DEFAULTS)]  # "sentiment", "arithmetic", "tools"


@dataclass
class DemoConfig:
    SEEDS: ClassVar[tuple[int, int]] = PPOConfig.SEEDS  # the seed of every stage, PPO's included
    SEEDS_WHY: ClassVar[str] = PPOConfig.SEEDS_WHY

    out: str = "runs/demo"
    """Output folder (the base model, the data, one folder per stage, summary.json)."""
    seed: int = 0
    """Seed of the data, the model and every stage."""
    task: Task = "sentiment"
    """"sentiment" (SFT -> reward model -> PPO with a critic, "make the continuation positive"),
    "arithmetic" (SFT -> GRPO with a reward function that checks single-digit sums) or "tools"
    (SFT on conversations -> GRPO on multi-turn episodes with a calculator tool)."""
    sft_steps: int | None = None
    """SFT optimizer steps (None: the task's, 250 for sentiment, 100 for arithmetic, 300 for
    tools)."""
    rm_steps: int | None = None
    """Reward-model optimizer steps (None: 250; the arithmetic task has no reward model)."""
    ppo_iterations: int | None = None
    """PPO iterations (None: the task's, 30 for sentiment, 60 for arithmetic, 30 for tools)."""

    def check(self) -> "DemoConfig":
        check_choices(self)
        check_fields(self)
        for name, default in zip(("sft_steps", "rm_steps", "ppo_iterations"), DEFAULTS[self.task]):
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        return self


MAX_WORDS = 6  # longest demonstration; responses get one more token for EOS


@torch.no_grad()
def evaluate(policy_dir, reference_dir, prompts: list[str], *, max_new_tokens: int, seed: int,
             device: str = "cpu") -> tuple[float, float]:
    """(mean oracle score of sampled responses, mean per-sequence KL to the reference)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy, reference = load_lm(policy_dir, device).eval(), load_lm(reference_dir, device).eval()
    pad, eos = special_ids(tokenizer)
    rollout = HFRollout(policy, Sampling(max_new_tokens), eos_id=eos, pad_id=pad, device=device,
                        seed=seed)
    batch = rollout.generate(encode_prompts(tokenizer, prompts))
    labels = batch.responses.masked_fill(~batch.response_mask, -100)
    at = batch.response_positions
    lp = token_logprobs(lm_logits(policy, batch.input_ids, batch.attention_mask, at), labels)
    ref = token_logprobs(lm_logits(reference, batch.input_ids, batch.attention_mask, at), labels)
    texts = tokenizer.batch_decode(batch.responses.masked_fill(~batch.response_mask, pad),
                                   skip_special_tokens=True)
    score = sum(sentiment.oracle(t) for t in texts) / len(texts)
    return score, (lp - ref).sum(-1).mean().item()


def seeded_base_model(out_dir: Path, seed: int, tokenizer) -> Path:
    """Seed torch and random; write a tiny random Llama for the tokenizer, and the tokenizer, to
    out_dir/base (the demo's starting point)."""
    torch.manual_seed(seed)
    random.seed(seed)
    base = out_dir / "base"
    tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
               ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def demo(cfg: DemoConfig | None = None, *, device: str = "cpu", quiet: bool = False) -> dict:
    """Build the task, its tokenizer and a tiny Llama; run SFT -> RM -> PPO; compare the oracle score
    of the SFT and PPO policies. Writes summary.json beside the stages' folders."""
    cfg = (cfg or DemoConfig()).check()
    if cfg.task == "arithmetic":
        return demo_arithmetic_task(cfg, device=device, quiet=quiet)
    if cfg.task == "tools":
        return demo_tools_task(cfg, device=device, quiet=quiet)
    start = time.perf_counter()
    out_dir, seed = Path(cfg.out), cfg.seed
    base = seeded_base_model(out_dir, seed, sentiment.build_tokenizer())
    data = out_dir / "data"
    write_jsonl(data / "sft.jsonl", sentiment.sft_rows(2000, seed, MAX_WORDS))
    write_jsonl(data / "rm.jsonl", sentiment.rm_rows(2000, seed + 1, MAX_WORDS))
    write_jsonl(data / "prompts.jsonl", sentiment.ppo_rows(500, seed + 2))
    pipeline = PipelineConfig(
        model=str(base), sft_data=str(data / "sft.jsonl"), rm_data=str(data / "rm.jsonl"),
        prompts=str(data / "prompts.jsonl"), out=str(out_dir), sft_steps=cfg.sft_steps,
        rm_steps=cfg.rm_steps, ppo_iterations=cfg.ppo_iterations, seed=seed, device=device,
        # The demo owns its folder: each stage starts clean (a second `fastppo demo` redoes it all).
        sft=dict(overwrite=True), rm=dict(overwrite=True),
        ppo=dict(max_new_tokens=MAX_WORDS + 1, batch_size=64, mini_batch_size=32, kl_coef=0.05,
                 lr=2e-3, save_every=10, overwrite=True))
    stages = run_pipeline(pipeline)
    eval_prompts = [r["prompt"] for r in sentiment.ppo_rows(256, seed + 3)]
    kwargs = dict(max_new_tokens=MAX_WORDS + 1, seed=seed + 4, device=device)
    oracle_sft, _ = evaluate(stages["sft"], stages["sft"], eval_prompts, **kwargs)
    oracle_ppo, kl = evaluate(stages["ppo"], stages["sft"], eval_prompts, **kwargs)
    summary = {"rm_accuracy": stages["rm_accuracy"], "oracle_sft": oracle_sft,
               "oracle_ppo": oracle_ppo, "kl": kl, "seconds": time.perf_counter() - start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(f"fastppo demo ({out_dir}): SFT -> reward model -> PPO on 'make the continuation "
              f"positive'")
        print(f"  reward model held-out pairwise accuracy  {summary['rm_accuracy']:.3f}")
        print(f"  oracle score, SFT policy                 {oracle_sft:+.3f}")
        print(f"  oracle score, PPO policy                 {oracle_ppo:+.3f}")
        print(f"  KL(PPO || SFT) per response              {kl:.3f}")
        print(f"  seconds                                  {summary['seconds']:.0f}")
    return summary


@torch.no_grad()
def accuracy(policy_dir, *, seed: int, samples: int = 4, device: str = "cpu") -> float:
    """The fraction of correct answers of the policy sampled (T = 1) `samples` times on every one of
    the 100 problems."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pad, eos = special_ids(tokenizer)
    rollout = HFRollout(load_lm(policy_dir, device).eval(), Sampling(3), eos_id=eos, pad_id=pad,
                        device=device, seed=seed)
    prompts = [row["prompt"] for row in arithmetic.ppo_rows()] * samples
    batch = rollout.generate(encode_prompts(tokenizer, prompts))
    texts = tokenizer.batch_decode(batch.responses.masked_fill(~batch.response_mask, pad),
                                   skip_special_tokens=True)
    return sum(arithmetic.is_correct(p, t) for p, t in zip(prompts, texts)) / len(prompts)


def demo_arithmetic_task(cfg: DemoConfig, *, device: str = "cpu", quiet: bool = False) -> dict:
    """SFT on 50 of the 100 single-digit additions, then GRPO on all of them with the verifier as
    the reward (8 samples per problem, no reward model, no critic, no KL); summary.json holds the
    fraction of correct answers of the SFT and the GRPO policies."""
    start = time.perf_counter()
    out_dir, seed = Path(cfg.out), cfg.seed
    base = seeded_base_model(out_dir, seed, arithmetic.build_tokenizer())
    data = out_dir / "data"
    write_jsonl(data / "sft.jsonl", arithmetic.sft_rows(50, seed))
    write_jsonl(data / "prompts.jsonl", arithmetic.ppo_rows())
    sft = train_sft(SFTConfig(data=str(data / "sft.jsonl"), model=str(base), out=str(out_dir / "sft"),
                              steps=cfg.sft_steps, batch_size=32, lr=3e-3, seed=seed, device=device,
                              overwrite=True))
    ppo = train_ppo(PPOConfig(
        prompts=str(data / "prompts.jsonl"), policy=str(sft), out=str(out_dir / "ppo"),
        reward_fn="fastppo.demo.arithmetic:reward", advantage_estimator="grpo",
        samples_per_prompt=8, batch_size=128, mini_batch_size=64, max_new_tokens=3, kl_coef=0.0,
        loss_reduction="seq-mean-token-mean", lr=5e-4, iterations=cfg.ppo_iterations, seed=seed,
        save_every=20, device=device, overwrite=True))
    summary = {"task": "arithmetic",
               "accuracy_sft": accuracy(sft, seed=seed + 4, device=device),
               "accuracy_ppo": accuracy(ppo, seed=seed + 4, device=device),
               "seconds": time.perf_counter() - start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(f"fastppo demo --task arithmetic ({out_dir}): SFT -> GRPO with a verifier as the reward")
        print(f"  correct answers, SFT policy    {summary['accuracy_sft']:.3f}")
        print(f"  correct answers, GRPO policy   {summary['accuracy_ppo']:.3f}")
        print(f"  seconds                        {summary['seconds']:.0f}")
    return summary


TOOL_LIMITS = episodes.Limits(max_turns=2, max_new_tokens=10, max_episode_tokens=40)


@torch.no_grad()
def tool_use(policy_dir, pairs, *, seed: int, device: str = "cpu") -> dict:
    """The policy's episodes (T = 1, the calculator offered) on the problems `pairs`: the fraction
    answered correctly, the fraction of episodes that called the tool, and the mean model turns."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pad, eos = special_ids(tokenizer)
    engine = HFRollout(load_lm(policy_dir, device).eval(),
                       Sampling(TOOL_LIMITS.max_new_tokens), eos_id=eos, pad_id=pad,
                       device=device, seed=seed)
    renderer = episodes.Renderer(tokenizer, episodes.tool_schemas([calculator.add]))
    calls = []

    def make_env():
        calls.append(episodes.ToolEnvironment({"add": calculator.add}, timeout=10.0))
        return calls[-1]
    rows = calculator.ppo_rows(pairs)
    batch, _ = episodes.run_episodes(
        lambda contexts, rows, turn: engine.generate(contexts, rows=rows, turn=turn), make_env,
        rows, renderer, TOOL_LIMITS, global_rows=torch.arange(len(rows)), pad_id=pad)
    P = batch.prompt_len
    texts = [tokenizer.decode(ids[keep], skip_special_tokens=True)
             for ids, keep in zip(batch.input_ids[:, P:], batch.attention_mask[:, P:])]
    questions = [f"{a} + {b}" for a, b in pairs]
    return {"accuracy": sum(map(calculator.is_correct, questions, texts)) / len(pairs),
            "tool_call_rate": sum(env.counts.get("tool_calls", 0) > 0 for env in calls) / len(pairs),
            "turns_per_episode": batch.per_row["turns"].mean().item()}


def demo_tools_task(cfg: DemoConfig, *, device: str = "cpu", quiet: bool = False) -> dict:
    """SFT on 400 conversations (half call the calculator), then GRPO on multi-turn episodes with the
    tool offered (8 episodes per problem, the final answer checked, no reward model, no critic, no
    KL); summary.json holds accuracy, tool-call rate and turns per episode on 256 held-out problems
    for the SFT and the GRPO policies."""
    start = time.perf_counter()
    out_dir, seed = Path(cfg.out), cfg.seed
    base = seeded_base_model(out_dir, seed, calculator.build_tokenizer())
    sft_pairs, ppo_pairs, held_out = calculator.problems(seed)
    data = out_dir / "data"
    write_jsonl(data / "sft.jsonl", calculator.sft_rows(sft_pairs, seed))
    write_jsonl(data / "prompts.jsonl", calculator.ppo_rows(ppo_pairs))
    sft = train_sft(SFTConfig(data=str(data / "sft.jsonl"), model=str(base), out=str(out_dir / "sft"),
                              steps=cfg.sft_steps, batch_size=32, lr=3e-3, seed=seed, device=device,
                              overwrite=True))
    ppo = train_ppo(PPOConfig(
        prompts=str(data / "prompts.jsonl"), policy=str(sft), out=str(out_dir / "ppo"),
        tools="fastppo.demo.calculator:add", reward_fn="fastppo.demo.calculator:reward",
        advantage_estimator="grpo", samples_per_prompt=8, batch_size=64, mini_batch_size=32,
        max_new_tokens=TOOL_LIMITS.max_new_tokens, max_turns=TOOL_LIMITS.max_turns,
        max_episode_tokens=TOOL_LIMITS.max_episode_tokens, kl_coef=0.0, lr=5e-4, iterations=cfg.ppo_iterations, seed=seed,
        save_every=10, device=device, overwrite=True))
    before = tool_use(sft, held_out, seed=seed + 4, device=device)
    after = tool_use(ppo, held_out, seed=seed + 4, device=device)
    summary = {"task": "tools", **{f"{k}_sft": v for k, v in before.items()},
               **{f"{k}_ppo": v for k, v in after.items()}, "seconds": time.perf_counter() - start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(f"fastppo demo --task tools ({out_dir}): SFT on conversations -> GRPO on episodes with "
              "a calculator tool (256 held-out two-digit sums)")
        for key, label in (("accuracy", "correct answers"), ("tool_call_rate", "episodes calling the tool"),
                           ("turns_per_episode", "model turns per episode")):
            print(f"  {label:<27} SFT {before[key]:.3f}   GRPO {after[key]:.3f}")
        print(f"  seconds                     {summary['seconds']:.0f}")
    return summary

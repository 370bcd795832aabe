"""Shared by the engine tests: what a metrics row may vary in, and a PPO config on the small run."""
from dataclasses import replace
from pathlib import Path

from fastppo.config import PPOConfig

PHASES = ("time_sync", "time_generate", "time_old_logprobs", "time_reference", "time_score",
          "time_train")  # they add up to the iteration's seconds
TIMING = ("tokens_per_s", *PHASES, "peak_memory_mib", "iteration_memory_mib")


def ppo_config(out: Path, target: Path, **overrides) -> PPOConfig:
    cfg = PPOConfig(prompts=str(out / "data" / "prompts.jsonl"), policy=str(out / "sft" / "checkpoint"),
                    reward_model=str(out / "rm" / "checkpoint"), out=str(target), iterations=4,
                    batch_size=16, mini_batch_size=8, max_new_tokens=7, save_every=2, seed=3)
    return replace(cfg, **overrides)

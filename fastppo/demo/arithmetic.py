"""The demo's second task: single-digit addition with a verifiable reward (`fastppo demo --task
arithmetic`), self-contained.

A prompt is "a + b =" (a, b in 0..9, one token per symbol), a response the sum's digits and EOS. The
reward is a program: 1 when the response parses to a + b, else 0 (`reward`, the reward function the
PPO stage names as "fastppo.demo.arithmetic:reward"). SFT sees a few demonstrations, a fraction of
the 100 problems; GRPO (no critic, no reward model) then trains on every problem with 8 samples each.
"""
from __future__ import annotations

import random
import re

from transformers import PreTrainedTokenizerFast

from fastppo.demo.sentiment import word_tokenizer

SYMBOLS = [str(d) for d in range(10)] + ["+", "="]
PROBLEMS = [(a, b) for a in range(10) for b in range(10)]
PROMPT = re.compile(r"^\s*(\d)\s*\+\s*(\d)\s*=\s*$")


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(SYMBOLS)  # one token per digit and sign


def prompt(a: int, b: int) -> str:
    return f"{a} + {b} ="


def answer(a: int, b: int) -> str:
    return " ".join(str(a + b))  # one token per digit


def is_correct(prompt_text: str, response: str) -> bool:
    found = PROMPT.match(prompt_text)
    digits = "".join(response.split())
    return bool(found) and digits.isdigit() and int(digits) == int(found[1]) + int(found[2])


def reward(prompts, responses, prompt_ids, response_ids) -> list[float]:
    """The verifier: 1.0 for a correct sum, else 0.0 (fastppo.rewards' signature)."""
    return [float(is_correct(p, r)) for p, r in zip(prompts, responses)]


def sft_rows(n_problems: int, seed: int) -> list[dict]:
    """Demonstrations of `n_problems` of the 100 problems (chosen by the seed)."""
    rng = random.Random(seed)
    return [{"prompt": prompt(a, b), "response": answer(a, b)}
            for a, b in rng.sample(PROBLEMS, n_problems)]


def ppo_rows() -> list[dict]:
    return [{"prompt": prompt(a, b)} for a, b in PROBLEMS]

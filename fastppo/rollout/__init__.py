"""Rollout engines: where the PPO loop gets its samples.

The loop asks a rollout object for a batch, `rollout.generate(prompts, ...) -> Batch`, and never calls a
sampler itself. Two engines, one file each: the Hugging Face sampler with a KV cache over the live
policy (`hf.py`, the default and the reference) and vLLM in the same process, its weights loaded
from the policy before each rollout (`vllm.py`). An engine picks tokens and reports the log-prob it
drew each with; the trainer recomputes every log-prob with its own forward under the same
distribution (temperature, top-k, top-p; fastppo.ppo), which is what makes the first PPO mini-batch
see ratio = 1 whatever the engine's numerics, and compares the two (the sampler/trainer gap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fastppo.data import Batch


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn. The trainer scores them under this same distribution: `temperature`,
    then top-k and top-p (fastppo.kernels.reference.truncation_mask), renormalised."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class Rollout(Protocol):
    """What the PPO loop needs of a rollout engine."""

    sampling: Sampling

    def generate(self, prompts: list[list[int]], *, iteration: int = 0,
                 rows: torch.Tensor | None = None, prompt_len: int | None = None) -> Batch:
        """Responses for `prompts` (token ids, as the tokenizer encodes them), packed with them into
        one Batch (prompts left-padded to `prompt_len` or their longest, right-padded responses,
        tokens after EOS masked out) on the training device, with `sampler_logprobs`. `rows` are the prompts' places in the
        iteration's global batch (default 0, 1, ...): an engine draws a row's tokens from (its seed,
        iteration, row) alone, so a batch split over devices samples what one device would."""
        ...

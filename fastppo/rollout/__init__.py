"""Rollout engines: where the PPO loop gets its samples.

An engine owns its lifecycle: its pre-flight checks (before any model is loaded), its construction
from the run's config, taking the trained weights in place before each rollout (`sync`), and
generating (`generate(prompts, ...) -> Batch`). The loop never names an engine: it calls `preflight`,
`make` and `collect` here, and `engine.sync`. A new engine is one file and one line of ENGINES.

Two engines, one file each: the Hugging Face sampler with a KV cache over the live policy (`hf.py`,
the default and the reference) and vLLM in the same process, its weights loaded from the policy
before each rollout (`vllm.py`). An engine picks tokens and reports the log-prob it drew each with;
the trainer recomputes every log-prob with its own forward under the same distribution (temperature,
top-k, top-p; fastppo.ppo), which is what makes the first PPO mini-batch see ratio = 1 whatever the
engine's numerics, and compares the two (the sampler/trainer gap).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

from fastppo import distributed
from fastppo.data import Batch

# The lazy registry: name -> "module:class". An engine's module is imported only when it is chosen.
ENGINES = {"hf": "fastppo.rollout.hf:HFRollout", "vllm": "fastppo.rollout.vllm:VLLMRollout"}


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn. The trainer scores them under this same distribution: `temperature`,
    then top-k and top-p (fastppo.kernels.reference.truncation_mask), renormalised."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, cfg) -> "Sampling":
        """The sampling settings of a PPO config."""
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)


class Rollout(Protocol):
    """What the PPO loop needs of a rollout engine."""

    sampling: Sampling
    pad_id: int

    @classmethod
    def preflight(cls, cfg) -> None:
        """A ValueError, before any model is loaded, if this engine cannot run the config (its
        model, its device, the number of processes)."""
        ...

    @classmethod
    def from_config(cls, cfg, model, *, eos_id: int, pad_id: int, max_model_len: int) -> "Rollout":
        """The engine for a PPO config (fastppo.config.PPOConfig) sampling from `model` (the
        actor-critic); `max_model_len`: the longest prompt + max_new_tokens."""
        ...

    def sync(self, model) -> None:
        """Take the actor-critic's current weights before a rollout (nothing for an engine that
        samples from the live policy)."""
        ...

    def generate(self, prompts: list[list[int]], *, iteration: int = 0,
                 rows: torch.Tensor | None = None, prompt_len: int | None = None,
                 turn: int = 0) -> Batch:
        """Responses for `prompts` (token ids, as the tokenizer encodes them), packed with them into
        one Batch (prompts left-padded to `prompt_len` or their longest, right-padded responses,
        tokens after EOS masked out) on the training device, with `sampler_logprobs`. `rows` are the
        prompts' places in the iteration's global batch (default 0, 1, ...): an engine draws a row's
        tokens from (its seed, iteration, row, turn) alone, so a batch split over devices samples
        what one device would. `turn`: the episode's turn (fastppo.episodes), whose prompt is the
        episode so far as ids, continued as they are."""
        ...


def engine_class(name: str) -> type[Rollout]:
    """The engine registered as `name` (its module imported now)."""
    if name not in ENGINES:
        raise ValueError(f"rollout_engine must be one of {tuple(ENGINES)}; got {name!r}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def preflight(cfg) -> None:
    """The configured engine's checks, before any model is loaded."""
    engine_class(cfg.rollout_engine).preflight(cfg)


def make(cfg, model, *, eos_id: int, pad_id: int, max_model_len: int) -> Rollout:
    """The configured engine (cfg.rollout_engine) at the config's sampling settings."""
    return engine_class(cfg.rollout_engine).from_config(cfg, model, eos_id=eos_id, pad_id=pad_id,
                                                        max_model_len=max_model_len)


def collect(engine: Rollout, prompts: list[list[int]], iteration: int) -> Batch:
    """The iteration's rollout as one global batch on every rank: each rank generates its rows
    (sampled from uniforms keyed by their global row, prompts padded to the global width), then the
    ranks exchange them (tokens and masks only: B x (P + R) integers)."""
    rows = distributed.my_rows(torch.arange(len(prompts)))
    P = max(len(p) for p in prompts)
    local = engine.generate([prompts[i] for i in rows.tolist()], iteration=iteration, rows=rows,
                            prompt_len=P)
    return gather_batch(local, engine.sampling.max_new_tokens, engine.pad_id)


def gather_batch(local: Batch, longest: int, pad_id: int) -> Batch:
    """Every rank's rows of a rollout (responses of at most `longest` tokens) as the global batch,
    in rank order: each rank's prompts left-padded to the widest rank's, its responses
    right-padded to `longest` for the exchange, then trimmed to the longest response of all."""
    if distributed.world() == 1:
        return local
    P = int(distributed.max_over_ranks(local.prompt_len, local.input_ids.device))
    local = local.widened(P, longest, pad_id)
    responses = distributed.gather_rows(local.response_mask.long()).bool()
    attention = distributed.gather_rows(local.attention_mask.long()).bool()
    R = int(attention[:, P:].any(0).nonzero().max()) + 1 if attention[:, P:].any() else 1
    return Batch(distributed.gather_rows(local.input_ids)[:, :P + R], attention[:, :P + R],
                 responses[:, :R], P, distributed.gather_rows(local.sampler_logprobs)[:, :R],
                 {k: distributed.gather_rows(v)[:, :R] for k, v in local.per_token.items()},
                 {k: distributed.gather_rows(v) for k, v in local.per_row.items()})

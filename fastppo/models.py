"""Models: the actor-critic on one backbone, the reward model, and their checkpoints.

Both wrap a local Hugging Face decoder (Llama, Qwen2, GPT-2, ...): `lm.base_model` is the backbone
and `lm.get_output_embeddings()` the LM head, so one backbone forward gives the hidden states from
which the logits (actor) and the values (critic) are both read. The reward model is the standard
`AutoModelForSequenceClassification` with one label (its backbone and its `score` head), as the
peers and the Hub store reward models; fastppo reads its score at the last attended token.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          LlamaConfig, PretrainedConfig)
from transformers.utils import logging as hf_logging

from fastppo.kernels import linear_token_logprobs, token_logprobs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def attention_implementation(device: torch.device | str) -> str:
    """flash_attention_2 where flash-attn is installed and the model runs on CUDA, else sdpa."""
    cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
               pad_token_id: int = 0, bos_token_id: int = 2, eos_token_id: int = 3):
    """A small random Llama built from a config (the demo trains it from scratch)."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=128,
                         pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def check_model_dir(path, what: str) -> None:
    """`path` is a local Hugging Face causal-LM directory with its tokenizer, else a ValueError that
    names `what` (the config field) and says what is wrong. Nothing is downloaded, ever."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} {path}: no such directory (fastppo loads local model directories "
                         "only; nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{what} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save "
                         "the tokenizer beside the model (tokenizer.save_pretrained(directory))")
    try:
        config = AutoConfig.from_pretrained(p)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"{what} {path}: unreadable config.json ({e})") from None
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    # BERT-like encoders are registered for causal LM too (as decoders they need is_decoder=True).
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if config.is_encoder_decoder or encoder or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = ("an encoder-decoder, not a causal language model" if config.is_encoder_decoder
                else "an encoder, not a causal language model" if encoder
                else "not a causal language model")
        raise ValueError(f"{what} {path}: a {config.model_type!r} model is {kind}; fastppo trains "
                         "decoder-only causal LMs (Llama, Qwen2, GPT-2, ...)")


def check_reward_model_dir(path, what: str) -> None:
    """check_model_dir, and a scalar score head: an AutoModelForSequenceClassification directory
    with num_labels=1 (what `fastppo rm` writes, and how the peers and the Hub store reward models),
    or a causal LM with fastppo's older head.safetensors beside it."""
    check_model_dir(path, what)
    if (Path(path) / HEAD_FILE).is_file():
        return
    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{what} {path}: not a fastppo reward model (an SFT checkpoint?): its "
                         f"architectures are {architectures}, not a sequence classifier; train one "
                         "with `fastppo rm`, or give a directory saved by "
                         "AutoModelForSequenceClassification with num_labels=1")
    if config.num_labels != 1:
        raise ValueError(f"{what} {path}: a sequence classifier with num_labels={config.num_labels};"
                         " a reward model gives one score (num_labels=1)")


def check_fits_context(path, length: int, what: str) -> None:
    """`length` tokens fit the context of the model in `path`, else a ValueError before any work
    (past it, position embeddings run out: an IndexError mid-run, or a silent run past the context)."""
    context = context_length(AutoConfig.from_pretrained(path))
    if context is not None and length > context:
        raise ValueError(f"{what} is {length} tokens, more than the {context} positions of {path} "
                         "(max_position_embeddings)")


def check_same_tokenizer(tokenizer, path, what: str) -> None:
    """The tokenizer in `path` is `tokenizer` (same vocabulary and special tokens), else a
    ValueError: fastppo hands the policy's token ids to the reward model as they are, so a
    different tokenizer would score other text than the one sampled, silently."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(path)
    for name, mine, theirs in (
            ("vocabulary", tokenizer.get_vocab(), other.get_vocab()),
            ("EOS token", tokenizer.eos_token_id, other.eos_token_id),
            ("BOS token", tokenizer.bos_token_id, other.bos_token_id),
            ("pad token", tokenizer.pad_token_id, other.pad_token_id)):
        if mine != theirs:
            detail = f"{len(mine)} vs {len(theirs)} entries" if name == "vocabulary" else \
                f"{mine} vs {theirs}"
            raise ValueError(f"{what} {path}: its tokenizer differs from the policy's ({name}: "
                             f"{detail}); the reward model must share the policy's tokenizer")


def stored_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def context_length(config) -> int | None:
    """The most positions the model takes (max_position_embeddings; n_positions for GPT-2)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


_DTYPE_ARG = "dtype" if "dtype" in inspect.signature(PretrainedConfig.__init__).parameters \
    else "torch_dtype"  # transformers < 4.56 calls it torch_dtype
_told_float32 = set()


@contextlib.contextmanager
def _quiet_transformers():
    """Silences transformers' loading report: the callers check its findings themselves."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _from_pretrained(auto, path, device, **kwargs):
    """(model, loading info) of `auto` in `path`, in float32 whatever dtype it is stored in
    (training in bf16 is not supported yet: a checkpoint stored in bf16 or fp16 is upcast, with a
    notice, and saved back in float32)."""
    with _quiet_transformers():
        model, info = auto.from_pretrained(
            path, attn_implementation=attention_implementation(device), output_loading_info=True,
            **{_DTYPE_ARG: torch.float32}, **kwargs)
    stored = stored_dtype(AutoConfig.from_pretrained(path))
    if stored not in (None, torch.float32) and str(path) not in _told_float32:
        _told_float32.add(str(path))
        warnings.warn(f"{path} is stored in {str(stored).removeprefix('torch.')}; fastppo trains in "
                      "float32 for now (the weights are upcast, checkpoints are written in float32)",
                      UserWarning, stacklevel=3)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {', '.join(missing[:5])}")
    return model.to(device), info


def load_lm(path, device="cpu"):
    """The causal LM in `path`, in float32 (see _from_pretrained)."""
    return _from_pretrained(AutoModelForCausalLM, path, device)[0]


def new_reward_model(path, pad_id: int | None, device="cpu") -> RewardModel:
    """A reward model on the backbone of the causal LM in `path` (the SFT model): the LM head is
    dropped and the score head is new, initialised as the model's family initialises a head.
    `pad_id` goes into its config for Hugging Face's own pooling (see RewardModel)."""
    model, _ = _from_pretrained(AutoModelForSequenceClassification, path, device, num_labels=1,
                                pad_token_id=pad_id)
    return RewardModel(model)


def load_reward_model(path, device="cpu") -> RewardModel:
    """The reward model in `path` (check_reward_model_dir's two kinds), in float32."""
    model, info = _from_pretrained(AutoModelForSequenceClassification, path, device, num_labels=1)
    if (Path(path) / HEAD_FILE).is_file():  # fastppo's older layout: a causal LM, the head beside
        model.score = nn.Linear(model.score.in_features, 1).to(device)
        model.score.load_state_dict(load_file(Path(path) / HEAD_FILE))
    elif info["missing_keys"]:
        raise ValueError(f"{path}: the reward model has no trained score head in its weights "
                         f"(missing: {', '.join(info['missing_keys'])})")
    return RewardModel(model)


def precision(device, dtype: str):
    """The model forwards' precision: for "bfloat16", torch.autocast (the matmuls in bf16, cast from
    the float32 weights; the optimizer steps the float32 weights); nothing for "float32". Every
    forward of a run, rollout and training alike, runs under it, so they agree bit for bit."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=dtype == "bfloat16")


def in_float32(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """A scalar head (value, score) in float32, outside autocast: a bf16 value or reward has 3
    significant digits, too few for returns, advantages and ranking margins."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float())


# Config fields of families whose LM head output is transformed before use (Gemma 2's soft-capping,
# Cohere's logit scale, ...): the fused linear path would skip the transformation.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale",
                     "logits_scaling", "mup_width_multiplier")


def fusable_head(lm, enabled: bool = True) -> nn.Linear | None:
    """The LM head when log-probs can come straight from hidden states and its weight
    (fastppo.kernels.linear_*, no (N, V) logits): a plain nn.Linear whose output the model uses as
    it is, with unsharded parameters (FSDP2 shards them under torchrun). None: use the logits."""
    head = lm.get_output_embeddings()
    if not enabled or type(head) is not nn.Linear:
        return None
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    if any(type(p) is not nn.Parameter or type(p.data) is not torch.Tensor
           for p in head.parameters()):  # a DTensor: sharded
        return None
    return head


def head_logprobs(out, head: nn.Linear | None, labels, *, temperature: float = 1.0,
                  return_entropy: bool = False, top_k: int = 0, top_p: float = 1.0):
    """Per-token log-probs (float32) of `labels` from a model's output: logits (head None), or
    hidden states through the fused head (call it under the forward's precision context: the head's
    matmul runs at autocast's dtype as the LM head would); with top_k / top_p under the sampler's
    truncated distribution (-inf for a label outside its kept set)."""
    options = dict(temperature=temperature, return_entropy=return_entropy, top_k=top_k,
                   top_p=top_p, validate=False)
    if head is None:
        return token_logprobs(out, labels, **options)
    return linear_token_logprobs(out, head.weight, labels, bias=head.bias, **options)


def enable_gradient_checkpointing(lm) -> None:
    """transformers' own gradient checkpointing on `lm`'s decoder layers (non-reentrant)."""
    if not lm.supports_gradient_checkpointing:
        raise ValueError(f"gradient_checkpointing: {type(lm).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def eval_mode(model: nn.Module) -> nn.Module:
    """model.eval(): dropout off in every forward, which the rollout/training agreement (ratio = 1)
    needs. transformers checkpoints a layer only when the layer is in training mode, so layers with
    gradient checkpointing on are flagged as training again; their dropout submodules stay off."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
    return model


@contextlib.contextmanager
def without_checkpointing(model: nn.Module):
    """Layers flagged for gradient checkpointing run plain for the block (sampling: no gradient, and
    transformers < 5.20 drops the KV cache of a checkpointed layer in training mode)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and m.training]
    for m in layers:
        m.training = False
    try:
        yield model
    finally:
        for m in layers:
            m.training = True


# ------------------------------------------------------------------------------------------ LoRA

ADAPTER = "adapter"  # a checkpoint's LoRA adapter, in peft's format (adapter_config.json + weights)


def add_lora(model: nn.Module, cfg, *, keep: tuple[str, ...] = ()) -> None:
    """LoRA adapters (peft) on the linear layers of `model` named by cfg.lora_target_modules, in place:
    the module tree, the backbone and the heads stay where they are; every base weight is frozen.
    `keep`: modules left fully trainable (a reward model's score head)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError("lora_rank > 0 needs peft, which is not installed: pip install "
                         "'fastppo[lora]'") from None
    targets = cfg.lora_target_modules
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
                        exclude_modules=list(keep) or None, bias="none")
    try:
        with warnings.catch_warnings():  # peft asks transformers by a name it deprecates
            warnings.simplefilter("ignore", FutureWarning)
            inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_target_modules {targets!r}: {e}") from None
    for name in keep:
        getattr(model, name).requires_grad_(True)
    model.fastppo_lora = config  # saved beside the adapter


def lora_config(model: nn.Module):
    """The LoRA config of the causal LM or classifier inside `model`, None without adapters."""
    return next((m.fastppo_lora for m in model.modules() if hasattr(m, "fastppo_lora")), None)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """`model` computes as its frozen base for the block: every LoRA adapter disabled (PPO's
    reference is the policy without its adapters, no second copy of the model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _lora_parts(state: dict[str, torch.Tensor]) -> set[str]:
    return {k[:-len(".base_layer.weight")] for k in state if k.endswith(".base_layer.weight")}


def merged_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict as the plain model's: W + scale * B A for every adapted layer,
    under the layer's own name (what from_pretrained and vLLM load)."""
    merged = {}
    for name in _lora_parts(state):
        a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
        weight = state[f"{name}.base_layer.weight"]
        merged[f"{name}.weight"] = (weight.double() + scale * (b.double() @ a.double())).to(weight.dtype)
        if f"{name}.base_layer.bias" in state:
            merged[f"{name}.bias"] = state[f"{name}.base_layer.bias"]
    merged.update({k: v for k, v in state.items()
                   if ".lora_" not in k and ".base_layer." not in k})
    return merged


def plain_state(lm) -> dict[str, torch.Tensor]:
    """The causal LM's weights under the plain model's names (merged, under LoRA): what a rollout
    engine loads."""
    lora = lora_config(lm)
    state = lm.state_dict()
    return state if lora is None else merged_state(state, lora.lora_alpha / lora.r)


def save_adapter(state: dict[str, torch.Tensor], config, directory) -> None:
    """The adapter of a LoRA model's state dict in peft's format: `PeftModel.from_pretrained(base,
    directory)` loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k.replace('.default.', '.')}": v.detach().contiguous()
               for k, v in state.items() if ".lora_" in k}, directory / "adapter_model.safetensors")
    config.save_pretrained(str(directory))


def load_adapter(directory, model: nn.Module) -> dict[str, torch.Tensor]:
    """save_adapter's weights under the parameter names of `model` (the LoRA causal LM or classifier
    they are for); an adapter of other layers than `model`'s is a ValueError."""
    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{directory}: no LoRA adapter (adapter_model.safetensors) to resume")
    state = {k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.")
             .replace(".lora_B.", ".lora_B.default."): v for k, v in load_file(path).items()}
    want = {k for k in model.state_dict() if ".lora_" in k}
    if set(state) != want:
        odd = sorted(set(state) ^ want)
        raise ValueError(f"{path}: the adapter does not fit this model's LoRA layers ({len(odd)} "
                         f"names differ, e.g. {odd[0]})")
    return state


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (the same in generation, rollout and training)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(lm, input_ids, attention_mask, **kwargs):
    """The backbone's forward; attention_mask covers the cached tokens too when a KV cache is passed,
    and the position ids of input_ids are its last columns."""
    position_ids = positions(attention_mask)[:, -input_ids.shape[1]:]
    return lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)


def hidden_at(lm, input_ids, attention_mask, positions: slice = slice(None)):
    """The backbone's last hidden states at `positions`, contiguous: a strided (B, R, H) slice sends
    the LM head to a batched matmul against an expanded weight, ~2x slower on CPU."""
    return backbone(lm, input_ids, attention_mask,
                    use_cache=False).last_hidden_state[:, positions].contiguous()


class ActorCritic(nn.Module):
    """The policy (the causal LM) and a value head on the same last hidden states."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, positions: slice = slice(None),
                hidden_only: bool = False, with_values: bool = True):
        """(logits, values) at `positions` only: the LM head, the largest matmul of a small model,
        is not spent on prompt positions nobody reads. hidden_only: (last hidden states, values),
        for the fused linear ops (fusable_head). with_values=False (critic-free estimators): values
        is None, the value head is not run."""
        hidden = hidden_at(self.lm, input_ids, attention_mask, positions)
        values = None
        if with_values:  # a copy, not a view: FSDP2 hooks outputs
            values = in_float32(self.value_head, hidden).squeeze(-1).clone()
        if hidden_only:
            return hidden, values
        return self.lm.get_output_embeddings()(hidden), values


class RewardModel(nn.Module):
    """A one-label sequence classifier (AutoModelForSequenceClassification) read at each sequence's
    last attended token: the response's EOS, or its last token when it was cut at max_new_tokens.

    Positions follow the attention mask (left padding skipped), as everywhere in fastppo. Hugging
    Face's own forward reads the last token whose id is not the pad id, with positions counted from
    the first column; on right-padded rows the two agree unless the pad id is the EOS id (there it
    reads the token before the EOS). So `fastppo rm` writes pad_token_id into the config only for a
    tokenizer with its own pad token; without one, Hugging Face scores a batch of one unpadded
    sequence (as fastppo does) and refuses larger batches."""

    def __init__(self, model):
        super().__init__()
        score = getattr(model, "score", None)
        if not (isinstance(score, nn.Linear) and score.out_features == 1):
            raise ValueError(f"{type(model).__name__} has no one-output `score` head; fastppo reads "
                             "reward models of the decoder families (Llama, Qwen2, GPT-2, ...)")
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = backbone(self.model, input_ids, attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
        # not a view: FSDP2 hooks a module's outputs for backward
        return in_float32(self.model.score, hidden[torch.arange(len(last)), last]).squeeze(-1).clone()


HEAD_FILE = "head.safetensors"  # the older layout's value head / RM score head, beside the model
VALUE_HEAD = "trainer/value_head.safetensors"  # out of a model loader's way (fastppo.checkpoint)


def save_model(model: ActorCritic | RewardModel | LogitsAt, tokenizer, directory,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """A Hugging Face directory that loads as it is: a policy with AutoModelForCausalLM (an
    actor-critic's value head in trainer/value_head.safetensors, where neither from_pretrained nor
    vLLM looks for weights), the reward model with
    AutoModelForSequenceClassification. `state`: the model's whole state dict, gathered from its
    shards under torchrun (fastppo.distributed.full_state_dict); None: the model's own."""
    hf_model, prefix = (model.model, "model.") if isinstance(model, RewardModel) else (model.lm, "lm.")
    part = None if state is None else {k[len(prefix):]: v for k, v in state.items()
                                       if k.startswith(prefix)}
    lora = lora_config(hf_model)
    if lora is not None:  # the merged model at the top, the adapter in peft's format beside it
        part = hf_model.state_dict() if part is None else part
        save_adapter(part, lora, Path(directory) / ADAPTER)
        part = merged_state(part, lora.lora_alpha / lora.r)
    hf_model.save_pretrained(directory, safe_serialization=True, state_dict=part)
    tokenizer.save_pretrained(directory)
    if isinstance(model, ActorCritic):
        head = model.value_head.state_dict() if state is None else {
            k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")}
        (Path(directory) / VALUE_HEAD).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in head.items()}, Path(directory) / VALUE_HEAD)


def value_head_state(directory) -> dict[str, torch.Tensor]:
    """The value head's state dict saved in the PPO checkpoint `directory`."""
    path = Path(directory) / VALUE_HEAD
    if not path.is_file():  # a checkpoint of the older layout
        path = Path(directory) / HEAD_FILE
    return load_file(path)


def lm_logits(lm, input_ids, attention_mask, positions: slice = slice(None)):
    """The causal LM's logits at `positions`, with the position ids every fastppo forward uses."""
    return lm.get_output_embeddings()(hidden_at(lm, input_ids, attention_mask, positions))


class LogitsAt(nn.Module):
    """lm_logits as a module: the SFT policy and PPO's reference, which FSDP2 shards under torchrun
    (it hooks a module's forward, so the call must go through one)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, positions: slice = slice(None),
                hidden_only: bool = False):
        if hidden_only:  # for the fused linear ops (fusable_head)
            return hidden_at(self.lm, input_ids, attention_mask, positions)
        return lm_logits(self.lm, input_ids, attention_mask, positions)

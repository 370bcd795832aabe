"""Models: loading (float32 master weights, whatever the checkpoint's dtype), the actor-critic on one
backbone, the SFT policy / PPO reference, the reward model, and their checkpoints (save and restore).

Each wraps a local Hugging Face decoder (Llama, Qwen2, GPT-2, ...): `lm.base_model` is the backbone
and `lm.get_output_embeddings()` the LM head, so one backbone forward gives the hidden states from
which the logits (actor) and the values (critic) are both read. The reward model is the standard
`AutoModelForSequenceClassification` with one label (its backbone and its `score` head), as the
peers and the Hub store reward models; fastppo reads its score at the last attended token.

Every model call takes a Batch (fastppo.data): a new layout of the rows changes data.py and the
wrappers here, not the trainers. Beside this module: lora.py (adapters), heads.py (log-probs from
logits or hidden states), preflight.py (checks before work), prepare.py (what a trainer trains).
"""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          LlamaConfig)
from transformers.utils import logging as hf_logging

from fastppo import distributed
from fastppo.data import Batch, PackedRows
from fastppo.heads import TokenHead, in_float32
from fastppo.lora import (ADAPTER, adapters_off, load_adapter, lora_config, merged_state,
                          save_adapter)


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


def stored_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


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


def _from_pretrained(auto, path, device, compute: str = "float32", **kwargs):
    """(model, loading info) of `auto` in `path`, as float32 master weights whatever dtype it is
    stored in (a checkpoint stored in bf16 or fp16 is upcast, with a notice that says what the run
    does with it, and written back in float32). `compute`: the run's dtype option, the precision of
    its forwards (fastppo.models.precision)."""
    with _quiet_transformers():
        model, info = auto.from_pretrained(
            path, attn_implementation=attention_implementation(device), output_loading_info=True,
            dtype=torch.float32, **kwargs)
    stored = stored_dtype(AutoConfig.from_pretrained(path))
    if stored not in (None, torch.float32) and str(path) not in _told_float32:
        _told_float32.add(str(path))
        stored = str(stored).removeprefix("torch.")
        forwards = ("the forwards run their matmuls in bfloat16 (dtype bfloat16)" if
                    compute == "bfloat16" else "the forwards run in float32 (dtype float32; "
                    "dtype bfloat16 runs their matmuls in bfloat16)")
        warnings.warn(f"{path} is stored in {stored}: its weights are loaded as float32 master "
                      f"weights, which the optimizer steps and checkpoints are written in; {forwards}",
                      UserWarning, stacklevel=3)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {', '.join(missing[:5])}")
    return model.to(device), info


def load_lm(path, device="cpu", compute: str = "float32"):
    """The causal LM in `path`, as float32 master weights (see _from_pretrained)."""
    return _from_pretrained(AutoModelForCausalLM, path, device, compute)[0]


def new_reward_model(path, pad_id: int | None, device="cpu", compute: str = "float32") -> RewardModel:
    """A reward model on the backbone of the causal LM in `path` (the SFT model): the LM head is
    dropped and the score head is new, initialised as the model's family initialises a head.
    `pad_id` goes into its config for Hugging Face's own pooling (see RewardModel)."""
    model, _ = _from_pretrained(AutoModelForSequenceClassification, path, device, compute,
                                num_labels=1, pad_token_id=pad_id)
    return RewardModel(model)


def load_reward_model(path, device="cpu", compute: str = "float32") -> RewardModel:
    """The reward model in `path` (check_reward_model_dir's two kinds), in float32."""
    model, info = _from_pretrained(AutoModelForSequenceClassification, path, device, compute,
                                   num_labels=1)
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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (the same in generation, rollout and training)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(lm, input_ids, attention_mask, **kwargs):
    """The backbone's forward; attention_mask covers the cached tokens too when a KV cache is passed,
    and the position ids of input_ids are its last columns."""
    position_ids = positions(attention_mask)[:, -input_ids.shape[1]:]
    return lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)


def hidden_at(lm, input_ids, attention_mask, positions: slice | torch.Tensor = slice(None), *,
              packed: bool = False, at: torch.Tensor | None = None):
    """The backbone's last hidden states at `positions` (a slice of columns, or one column per row:
    a (B,) tensor), contiguous: a strided (B, R, H) slice sends the LM head to a batched matmul
    against an expanded weight, ~2x slower on CPU. packed=True: the forward runs on the batch's
    attended tokens packed into rows without padding (fastppo.data.PackedRows), the same outputs
    within float32 rounding; zeros at positions that are not attended. at: a bool (B, n) mask over
    the positions; only those, as (N, H) in row-major order (the heads then run on them alone)."""
    if isinstance(positions, torch.Tensor):
        positions = positions[:, None]
        pick = lambda h: h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))  # noqa: E731
    else:
        pick = lambda h: h[:, positions].contiguous()  # noqa: E731
    if not packed or bool(attention_mask.all()):  # (nothing to pack: the padded path is the same)
        hidden = pick(backbone(lm, input_ids, attention_mask, use_cache=False).last_hidden_state)
        return hidden if at is None else hidden[at]
    rows = PackedRows.of(input_ids, attention_mask)
    hidden = lm.base_model(input_ids=rows.input_ids, position_ids=rows.position_ids,
                           use_cache=False).last_hidden_state
    index = pick(rows.where[..., None]).squeeze(-1)
    if at is None:
        return rows.gather(hidden, index)
    return hidden.reshape(-1, hidden.shape[-1])[index[at]]  # (every position in `at` is attended)


def packs_exactly(lm) -> bool:
    """Whether `lm` confines attention to each sequence of a packed row (transformers does, from the
    position ids, for the families whose masks go through its masking utilities): two short sequences
    packed into one row give the hidden states each gives alone. Checked once per model, in float32,
    before it is sharded."""
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad(), torch.autocast(next(lm.parameters()).device.type, enabled=False):
            device = next(lm.parameters()).device
            ids = torch.tensor([[5, 9, 7, 4, 11], [3, 8, 6, 0, 0]], device=device) % \
                lm.config.vocab_size
            mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool, device=device)
            alone = torch.cat([hidden_at(lm, ids[:1], mask[:1])[0],
                               hidden_at(lm, ids[1:, :3], mask[1:, :3])[0]])
            rows = PackedRows.of(ids, mask, row_length=8)  # both in one row
            hidden = lm.base_model(input_ids=rows.input_ids, position_ids=rows.position_ids,
                                   use_cache=False).last_hidden_state
            packed = rows.gather(hidden, rows.where)[mask]
            return rows.input_ids.shape[0] == 1 and bool(torch.allclose(packed, alone, atol=1e-4,
                                                                        rtol=1e-4))
    except Exception:  # noqa: BLE001 (a family that cannot take position ids alone)
        return False
    finally:
        lm.train(was_training)


_told_padded = set()


def packing(lm, enabled: bool) -> bool:
    """The run's choice (cfg.packed) where the model packs exactly (packs_exactly), else padding,
    with a notice the first time a model class falls back."""
    if not enabled:
        return False
    if packs_exactly(lm):
        return True
    name = type(lm).__name__
    if name not in _told_padded:
        _told_padded.add(name)
        warnings.warn(f"{name} does not confine attention to each sequence of a packed row (checked "
                      "on two short sequences): its forwards run on padded rows (packed false)",
                      UserWarning, stacklevel=2)
    return False


class ActorCritic(nn.Module):
    """The policy (the causal LM) and a value head on the same last hidden states. `head` (a
    fastppo.heads.TokenHead, logits until fastppo.prepare sets the run's) decides what its states
    are: logits or hidden states."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.head = TokenHead(lm)
        self.packed = False  # forwards on packed rows (fastppo.prepare sets the run's)

    def forward(self, batch: Batch, with_values: bool = True, at: torch.Tensor | None = None):
        """(states, values) at the batch's response positions only: the LM head, the largest matmul
        of a small model, is not spent on prompt positions nobody reads. with_values=False
        (critic-free estimators): values is None, the value head is not run. at: a (B, R) bool mask
        of the response tokens wanted; (N, ...) states and values of those alone (response_tokens)."""
        hidden = hidden_at(self.lm, batch.input_ids, batch.attention_mask, batch.response_positions,
                           packed=self.packed, at=at)
        values = None
        if with_values:  # a copy, not a view: FSDP2 hooks outputs
            values = in_float32(self.value_head, hidden).squeeze(-1).clone()
        return self.head.states(hidden), values


class PolicyLM(nn.Module):
    """A causal LM alone, called with a Batch: the SFT policy and PPO's frozen reference, which FSDP2
    shards under torchrun (it hooks a module's forward, so the call must go through one). Its states
    are what `head` says (logits, or hidden states for the fused head)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head = TokenHead(lm)
        self.packed = False  # forwards on packed rows (fastppo.prepare sets the run's)

    def forward(self, batch: Batch, at: torch.Tensor | None = None):
        hidden = hidden_at(self.lm, batch.input_ids, batch.attention_mask, batch.response_positions,
                           packed=self.packed, at=at)
        return self.head.states(hidden)


class AdaptersOff:
    """PPO's reference under LoRA: the policy's own forward with every adapter off (through the
    actor-critic, so that FSDP2 gathers its root), its states only; the policy's head."""

    def __init__(self, model: ActorCritic):
        self.model = model

    @property
    def head(self) -> TokenHead:
        return self.model.head

    @property
    def packed(self) -> bool:
        return self.model.packed

    def __call__(self, batch: Batch, at: torch.Tensor | None = None):
        with adapters_off(self.model.lm):
            return self.model(batch, with_values=False, at=at)[0]


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
        self.packed = False  # forwards on packed rows (fastppo.prepare sets the run's)

    def forward(self, batch: Batch):
        """One float32 score per row of the batch."""
        mask = batch.attention_mask
        last = mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
        hidden = hidden_at(self.model, batch.input_ids, mask, last, packed=self.packed)[:, 0]
        # not a view: FSDP2 hooks a module's outputs for backward
        return in_float32(self.model.score, hidden).squeeze(-1).clone()


HEAD_FILE = "head.safetensors"  # the older layout's value head / RM score head, beside the model
VALUE_HEAD = "trainer/value_head.safetensors"  # out of a model loader's way (fastppo.checkpoint)


def _hf_part(model: ActorCritic | RewardModel | PolicyLM) -> tuple[nn.Module, str]:
    """The Hugging Face model inside a trainer's model, and its prefix in the state dict."""
    return (model.model, "model.") if isinstance(model, RewardModel) else (model.lm, "lm.")


def save_model(model: ActorCritic | RewardModel | PolicyLM, tokenizer, directory,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """A Hugging Face directory that loads as it is: a policy with AutoModelForCausalLM (an
    actor-critic's value head in trainer/value_head.safetensors, where neither from_pretrained nor
    vLLM looks for weights), the reward model with AutoModelForSequenceClassification; under LoRA
    the merged model, and the adapter in peft's format in adapter/. `state`: the model's whole state
    dict, gathered from its shards under torchrun (fastppo.distributed.full_state_dict); None: the
    model's own."""
    hf_model, prefix = _hf_part(model)
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


def restore_model(model: ActorCritic | RewardModel | PolicyLM, directory, device) -> None:
    """save_model's weights in `directory` back into `model` (sharded or not), for a resume. Under
    LoRA the frozen base is the one `model` was built on: only the adapter and the heads that train
    whole (the value head, a reward model's score head) are read; otherwise every weight."""
    directory = Path(directory)
    hf_model, prefix = _hf_part(model)
    lora = lora_config(hf_model) is not None
    if isinstance(model, RewardModel):  # its score head (and, without LoRA, everything) from there
        saved = load_reward_model(directory).state_dict()
        state = {k: v for k, v in saved.items() if not lora or k.startswith("model.score.")}
    elif lora:
        state = {}
    else:
        state = {prefix + k: v for k, v in load_lm(directory, device).state_dict().items()}
    if lora:
        state.update({prefix + k: v for k, v in load_adapter(directory / ADAPTER, hf_model).items()})
    if isinstance(model, ActorCritic):
        state.update({f"value_head.{k}": v for k, v in value_head_state(directory).items()})
    distributed.load_full_state_dict(model, {k: v.to(device) for k, v in state.items()},
                                     strict=not lora)


def lm_logits(lm, input_ids, attention_mask, positions: slice = slice(None)):
    """The causal LM's logits at `positions`, with the position ids every fastppo forward uses."""
    return lm.get_output_embeddings()(hidden_at(lm, input_ids, attention_mask, positions))

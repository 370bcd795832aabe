"""LoRA (peft) on a trainer's model: adding adapters, the reference as the policy with its adapters
off, the merged weights a rollout engine or from_pretrained loads, and the adapter's own files."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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

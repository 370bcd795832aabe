"""Model preparation, written once for the three trainers: LoRA adapters, gradient checkpointing,
FSDP2 sharding under torchrun, the LM head's path (fastppo.heads.TokenHead, decided on the sharded
model) and the optimizer over what trains."""
from __future__ import annotations

import torch

from fastppo import distributed
from fastppo.heads import TokenHead
from fastppo.lora import add_lora
from fastppo.models import (ActorCritic, PolicyLM, RewardModel, enable_gradient_checkpointing,
                            packing)


def prepare(model: ActorCritic | PolicyLM | RewardModel, cfg, *,
            keep: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """Makes `model` what the run trains, in place, and returns its optimizer: LoRA adapters of
    cfg.lora_rank (`keep`: modules of the Hugging Face model that train whole, a reward model's score
    head), cfg.gradient_checkpointing, one FSDP2 unit per decoder layer under torchrun, then the
    TokenHead of cfg.fused_linear and the layout of cfg.packed. The optimizer is built on the sharded parameters, before any
    forward (after one, FSDP2's root holds whole ones); AdamW's fused step, one pass per step."""
    hf_model = model.model if isinstance(model, RewardModel) else model.lm
    if cfg.lora_rank:
        add_lora(hf_model, cfg, keep=keep)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(hf_model)
    freeze_and_shard(model, fused_linear=cfg.fused_linear, packed=cfg.packed, frozen=False)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                             fused=True)


def freeze_and_shard(model: ActorCritic | PolicyLM | RewardModel, *, fused_linear: bool = False,
                     packed: bool = False, frozen: bool = True):
    """`model` sharded under torchrun (FSDP2) and given its TokenHead and its layout (`packed`: rows
    without padding where the model packs exactly, fastppo.models.packing; checked before sharding);
    `frozen`: in eval mode with no gradients (PPO's reference and reward model)."""
    if frozen:
        model.eval().requires_grad_(False)
    hf_model = model.model if isinstance(model, RewardModel) else model.lm
    model.packed = packing(hf_model, packed)
    if distributed.world() > 1:
        distributed.shard(model, hf_model)
    if not isinstance(model, RewardModel):
        model.head = TokenHead(hf_model, fused_linear)
    return model

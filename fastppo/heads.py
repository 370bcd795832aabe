"""The heads on a model's last hidden states, and the one place that decides how per-token log-probs
and the PPO loss are computed: from logits (the LM head's output), or from the hidden states and the
LM head's weight through the fused linear ops (fastppo.kernels.linear_*: no (tokens, vocabulary)
logits, forward or backward). A model wrapper (fastppo.models) returns whatever its TokenHead says its
states are; the trainers call the TokenHead on them and never branch on the path."""
from __future__ import annotations

import torch
from torch import nn

from fastppo import distributed
from fastppo.kernels import linear_ppo_loss, linear_token_logprobs, ppo_loss, token_logprobs


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
    """The LM head when log-probs can come straight from hidden states and its weight: a plain
    nn.Linear whose output the model uses as it is, with unsharded parameters (FSDP2 shards them
    under torchrun). None: use the logits."""
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


class TokenHead:
    """Per-token log-probs and the PPO loss of a causal LM's outputs. `fused` (the config's
    fused_linear) asks for the fused path; it runs where the LM head allows it (fusable_head) in one
    process (under torchrun FSDP2 shards the head), else the logits path. Decide after sharding."""

    def __init__(self, lm, fused: bool = False):
        self.output = lm.get_output_embeddings()
        self.linear = fusable_head(lm, fused and distributed.world() == 1)

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a model returns for its last hidden states: the logits, or the hidden states
        themselves on the fused path (call inside the model's forward: FSDP2 hooks it)."""
        return hidden if self.linear is not None else self.output(hidden)

    def logprobs(self, states, labels, *, temperature: float = 1.0, return_entropy: bool = False,
                 top_k: int = 0, top_p: float = 1.0):
        """Per-token log-probs (float32) of `labels` (-100: ignored); with top_k / top_p under the
        sampler's truncated distribution (-inf for a label outside its kept set). Call it under the
        forward's precision context: the fused head's matmul runs at autocast's dtype as the LM head
        would."""
        options = dict(temperature=temperature, return_entropy=return_entropy, top_k=top_k,
                       top_p=top_p, validate=False)
        if self.linear is None:
            return token_logprobs(states, labels, **options)
        return linear_token_logprobs(states, self.linear.weight, labels, bias=self.linear.bias,
                                     **options)

    def ppo_loss(self, states, labels, old_logprobs, advantages, mask, **options):
        """fastppo.kernels.ppo_loss on the states (linear_ppo_loss on the fused path)."""
        if self.linear is None:
            return ppo_loss(states, labels, old_logprobs, advantages, mask, **options)
        return linear_ppo_loss(states, self.linear.weight, labels, old_logprobs, advantages, mask,
                               bias=self.linear.bias, **options)

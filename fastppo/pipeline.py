"""The whole pipeline of the seed article: SFT -> reward model on ranked pairs -> PPO, and the embedded
demo that runs it on the built-in task (fastppo.task) with a tiny Llama trained from scratch."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fastppo import task
from fastppo.config import PPOConfig, RMConfig, SFTConfig
from fastppo.data import encode_prompts, pack_prompts, read_jsonl, write_jsonl
from fastppo.generate import generate
from fastppo.kernels import token_logprobs
from fastppo.models import lm_logits, load_lm, tiny_llama
from fastppo.ppo import train_ppo
from fastppo.rm import train_rm
from fastppo.sft import train_sft


@dataclass
class PipelineConfig:
    model: str
    """A Hugging Face causal-LM directory (with tokenizer) to start from."""
    sft_data: str
    """JSONL of {"prompt", "response"}."""
    rm_data: str
    """JSONL of {"prompt", "chosen", "rejected"}."""
    prompts: str
    """JSONL of {"prompt"} for PPO."""
    out: str = "runs/pipeline"
    """Output folder; the stages write to out/sft, out/rm, out/ppo."""
    sft_steps: int = 300
    """SFT optimizer steps."""
    rm_steps: int = 300
    """Reward-model optimizer steps."""
    ppo_iterations: int = 40
    """PPO iterations."""
    seed: int = 0
    """Seed of every random choice."""
    device: str = "cpu"
    """Torch device."""
    sft: dict = field(default_factory=dict)
    """Other SFTConfig fields for the SFT stage, e.g. {"lr": 0.001, "batch_size": 16}."""
    rm: dict = field(default_factory=dict)
    """Other RMConfig fields for the reward-model stage."""
    ppo: dict = field(default_factory=dict)
    """Other PPOConfig fields for the PPO stage, e.g. {"kl_coef": 0.1, "top_p": 0.9}."""


def _stage(cls, overrides: dict, stage: str, **wired):
    """The stage's config: what the pipeline wires, plus the user's overrides of other fields."""
    names = {f.name for f in fields(cls)}
    for key in overrides:
        if key not in names or key in wired:
            raise ValueError(f"{stage}: {key!r} is not a {cls.__name__} field the pipeline lets you "
                             f"set (the pipeline sets {', '.join(sorted(wired))})")
    try:
        return cls(**wired, **overrides).check()
    except TypeError as e:
        raise ValueError(f"{stage}: {e}") from None


def run_pipeline(cfg: PipelineConfig) -> dict:
    """SFT -> RM -> PPO. All three stage configs are built and checked before any work starts."""
    out = Path(cfg.out)
    common = dict(seed=cfg.seed, device=cfg.device)
    sft_checkpoint, rm_checkpoint = out / "sft" / "checkpoint", out / "rm" / "checkpoint"
    sft_cfg = _stage(SFTConfig, cfg.sft, "sft", data=cfg.sft_data, model=cfg.model,
                     out=str(out / "sft"), steps=cfg.sft_steps, **common)
    rm_cfg = _stage(RMConfig, cfg.rm, "rm", data=cfg.rm_data, model=str(sft_checkpoint),
                    out=str(out / "rm"), steps=cfg.rm_steps, **common)
    ppo_cfg = _stage(PPOConfig, cfg.ppo, "ppo", prompts=cfg.prompts, policy=str(sft_checkpoint),
                     reward_model=str(rm_checkpoint), out=str(out / "ppo"),
                     iterations=cfg.ppo_iterations, **common)
    for path, kind in ((cfg.sft_data, "sft"), (cfg.rm_data, "rm"), (cfg.prompts, "ppo")):
        read_jsonl(path, kind)  # a malformed line stops the pipeline before SFT, not after it
    sft = train_sft(sft_cfg)
    rm, accuracy = train_rm(rm_cfg)
    ppo = train_ppo(ppo_cfg)
    return {"sft": sft, "rm": rm, "ppo": ppo, "rm_accuracy": accuracy}


@torch.no_grad()
def evaluate(policy_dir, reference_dir, prompts: list[str], *, max_new_tokens: int, seed: int,
             device: str = "cpu") -> tuple[float, float]:
    """(mean oracle score of sampled responses, mean per-sequence KL to the reference)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy, reference = load_lm(policy_dir, device).eval(), load_lm(reference_dir, device).eval()
    batch = generate(policy, pack_prompts(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id)
                     .to(device), max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                     eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(seed))
    labels = batch.responses.masked_fill(~batch.response_mask, -100)
    at = batch.response_positions
    lp = token_logprobs(lm_logits(policy, batch.input_ids, batch.attention_mask, at), labels)
    ref = token_logprobs(lm_logits(reference, batch.input_ids, batch.attention_mask, at), labels)
    texts = tokenizer.batch_decode(batch.responses.masked_fill(~batch.response_mask,
                                                               tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    score = sum(task.oracle(t) for t in texts) / len(texts)
    return score, (lp - ref).sum(-1).mean().item()


def demo(out: str = "runs/demo", *, seed: int = 0, sft_steps: int = 250, rm_steps: int = 250,
         ppo_iterations: int = 30, device: str = "cpu", quiet: bool = False) -> dict:
    """Build the task, its tokenizer and a tiny Llama; run SFT -> RM -> PPO; compare the oracle score
    of the SFT and PPO policies. Writes summary.json beside the stages' folders."""
    start = time.perf_counter()
    out_dir = Path(out)
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = task.build_tokenizer()
    base = out_dir / "base"
    tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
               ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = out_dir / "data"
    max_words = 6
    write_jsonl(data / "sft.jsonl", task.sft_rows(2000, seed, max_words))
    write_jsonl(data / "rm.jsonl", task.rm_rows(2000, seed + 1, max_words))
    write_jsonl(data / "prompts.jsonl", task.ppo_rows(500, seed + 2))
    cfg = PipelineConfig(model=str(base), sft_data=str(data / "sft.jsonl"),
                         rm_data=str(data / "rm.jsonl"), prompts=str(data / "prompts.jsonl"),
                         out=str(out_dir), sft_steps=sft_steps, rm_steps=rm_steps,
                         ppo_iterations=ppo_iterations, seed=seed, device=device)
    cfg.ppo = dict(max_new_tokens=max_words + 1, batch_size=64, mini_batch_size=32, kl_coef=0.05,
                   lr=2e-3, save_every=10)
    stages = run_pipeline(cfg)
    eval_prompts = [r["prompt"] for r in task.ppo_rows(256, seed + 3)]
    kwargs = dict(max_new_tokens=max_words + 1, seed=seed + 4, device=device)
    oracle_sft, _ = evaluate(stages["sft"], stages["sft"], eval_prompts, **kwargs)
    oracle_ppo, kl = evaluate(stages["ppo"], stages["sft"], eval_prompts, **kwargs)
    summary = {"rm_accuracy": stages["rm_accuracy"], "oracle_sft": oracle_sft,
               "oracle_ppo": oracle_ppo, "kl": kl, "seconds": time.perf_counter() - start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(f"fastppo demo ({out_dir}): SFT -> reward model -> PPO on 'make the continuation "
              f"positive'")
        print(f"  reward model held-out pairwise accuracy  {summary['rm_accuracy']:.3f}")
        print(f"  oracle score, SFT policy                 {oracle_sft:+.3f}")
        print(f"  oracle score, PPO policy                 {oracle_ppo:+.3f}")
        print(f"  KL(PPO || SFT) per response              {kl:.3f}")
        print(f"  seconds                                  {summary['seconds']:.0f}")
    return summary

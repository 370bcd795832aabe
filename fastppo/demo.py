"""`fastppo demo`: the whole pipeline (SFT -> reward model -> PPO) on the built-in task
(fastppo.demo_task: "make the continuation positive") with a tiny Llama trained from scratch, and the
oracle evaluation that tells whether PPO learned the hidden preference."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fastppo import demo_task as task
from fastppo.data import encode_prompts, special_ids, write_jsonl
from fastppo.kernels import token_logprobs
from fastppo.models import lm_logits, load_lm, tiny_llama
from fastppo.pipeline import PipelineConfig, run_pipeline
from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Output folder (the base model, the data, one folder per stage, summary.json)."""
    seed: int = 0
    """Seed of the data, the model and every stage."""
    sft_steps: int = 250
    """SFT optimizer steps."""
    rm_steps: int = 250
    """Reward-model optimizer steps."""
    ppo_iterations: int = 30
    """PPO iterations."""

    def check(self) -> "DemoConfig":
        for name in ("sft_steps", "rm_steps", "ppo_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        return self


MAX_WORDS = 6  # longest demonstration; responses get one more token for EOS


@torch.no_grad()
def evaluate(policy_dir, reference_dir, prompts: list[str], *, max_new_tokens: int, seed: int,
             device: str = "cpu") -> tuple[float, float]:
    """(mean oracle score of sampled responses, mean per-sequence KL to the reference)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy, reference = load_lm(policy_dir, device).eval(), load_lm(reference_dir, device).eval()
    pad, eos = special_ids(tokenizer)
    rollout = HFRollout(policy, Sampling(max_new_tokens), eos_id=eos, pad_id=pad, device=device,
                        seed=seed)
    batch = rollout.generate(encode_prompts(tokenizer, prompts))
    labels = batch.responses.masked_fill(~batch.response_mask, -100)
    at = batch.response_positions
    lp = token_logprobs(lm_logits(policy, batch.input_ids, batch.attention_mask, at), labels)
    ref = token_logprobs(lm_logits(reference, batch.input_ids, batch.attention_mask, at), labels)
    texts = tokenizer.batch_decode(batch.responses.masked_fill(~batch.response_mask, pad),
                                   skip_special_tokens=True)
    score = sum(task.oracle(t) for t in texts) / len(texts)
    return score, (lp - ref).sum(-1).mean().item()


def demo(cfg: DemoConfig | None = None, *, device: str = "cpu", quiet: bool = False) -> dict:
    """Build the task, its tokenizer and a tiny Llama; run SFT -> RM -> PPO; compare the oracle score
    of the SFT and PPO policies. Writes summary.json beside the stages' folders."""
    cfg = (cfg or DemoConfig()).check()
    start = time.perf_counter()
    out_dir, seed = Path(cfg.out), cfg.seed
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = task.build_tokenizer()
    base = out_dir / "base"
    tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
               ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = out_dir / "data"
    write_jsonl(data / "sft.jsonl", task.sft_rows(2000, seed, MAX_WORDS))
    write_jsonl(data / "rm.jsonl", task.rm_rows(2000, seed + 1, MAX_WORDS))
    write_jsonl(data / "prompts.jsonl", task.ppo_rows(500, seed + 2))
    pipeline = PipelineConfig(
        model=str(base), sft_data=str(data / "sft.jsonl"), rm_data=str(data / "rm.jsonl"),
        prompts=str(data / "prompts.jsonl"), out=str(out_dir), sft_steps=cfg.sft_steps,
        rm_steps=cfg.rm_steps, ppo_iterations=cfg.ppo_iterations, seed=seed, device=device,
        # The demo owns its folder: each stage starts clean (a second `fastppo demo` redoes it all).
        sft=dict(overwrite=True), rm=dict(overwrite=True),
        ppo=dict(max_new_tokens=MAX_WORDS + 1, batch_size=64, mini_batch_size=32, kl_coef=0.05,
                 lr=2e-3, save_every=10, overwrite=True))
    stages = run_pipeline(pipeline)
    eval_prompts = [r["prompt"] for r in task.ppo_rows(256, seed + 3)]
    kwargs = dict(max_new_tokens=MAX_WORDS + 1, seed=seed + 4, device=device)
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

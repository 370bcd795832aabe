"""Supervised fine-tuning: cross-entropy on the response tokens, through fastppo.kernels."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fastppo import run
from fastppo.config import SFTConfig
from fastppo.data import (encode_prompts, encode_responses, limit_prompts, pack, read_jsonl,
                          special_ids)
from fastppo.kernels import token_logprobs
from fastppo.metrics import MetricsLog, plot
from fastppo.models import check_fits_context, check_model_dir, lm_logits, load_lm


@run.owns_output  # cfg.out: locked for this run, resume/overwrite checked, config.yaml saved
def train_sft(cfg: SFTConfig) -> Path:
    """Returns the checkpoint directory (a Hugging Face model directory)."""
    cfg.check()
    rows = read_jsonl(cfg.data, "sft")
    check_model_dir(cfg.model, "model")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad, _ = special_ids(tokenizer)
    prompts = limit_prompts(encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                            cfg.max_prompt_length, cfg.truncate_prompts, tokenizer.bos_token_id)
    responses = encode_responses(tokenizer, [r["response"] for r in rows])
    check_fits_context(cfg.model, max(len(p) + len(r) for p, r in zip(prompts, responses)),
                       f"the longest prompt + response of {cfg.data}")
    generator = run.setup(cfg.seed, cfg.device)
    lm = load_lm(cfg.model, cfg.device).train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, fused=True)

    def write_model(directory):
        lm.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    def load_model(directory):
        lm.load_state_dict(load_lm(directory, cfg.device).state_dict())

    start_step = 0
    if cfg.resume:
        start_step = run.resume(cfg.out, load_model, optimizer, generator, step=int)["step"]
    log = MetricsLog(cfg.out, resume_step=start_step if cfg.resume else None)

    progress = tqdm(range(start_step, cfg.steps), desc="sft", initial=start_step, total=cfg.steps,
                    disable=None)  # a progress line on a terminal, nothing in logs
    for step in progress:
        start = time.perf_counter()
        pick = torch.randint(len(rows), (cfg.batch_size,), generator=generator).tolist()
        batch = pack([prompts[i] for i in pick], [responses[i] for i in pick],
                     pad).to(cfg.device)
        logits = lm_logits(lm, batch.input_ids, batch.attention_mask, batch.response_positions)
        labels = batch.responses.masked_fill(~batch.response_mask, -100)
        logprobs = token_logprobs(logits, labels, validate=False)
        loss = -logprobs.sum() / batch.response_mask.sum()
        run.stop_if_not_finite(loss, cfg.out, what="SFT loss", at=f"step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.stop_if_not_finite(run.gradient_norm(optimizer), cfg.out, what="SFT gradient norm",
                               at=f"step {step}")
        optimizer.step()
        tokens = int(batch.response_mask.sum())
        log.write({"step": step, "loss": loss.item(),
                   "tokens_per_s": tokens / (time.perf_counter() - start)})
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            run.save(cfg.out, write_model, optimizer, generator, step=step + 1)
    progress.close()
    plot(log.path, Path(cfg.out) / "sft.png", ["loss"], "SFT")
    return Path(cfg.out) / "checkpoint"

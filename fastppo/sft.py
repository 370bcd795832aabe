"""Supervised fine-tuning: cross-entropy on the response tokens, through fastppo.kernels."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fastppo.checkpoint import resume_from, rng_state, save_atomic, set_rng_state
from fastppo.config import SFTConfig
from fastppo.data import encode_prompts, encode_responses, pack, read_jsonl
from fastppo.kernels import token_logprobs
from fastppo.metrics import MetricsLog, plot
from fastppo.models import lm_logits, load_lm


def train_sft(cfg: SFTConfig) -> Path:
    """Returns the checkpoint directory (a Hugging Face model directory)."""
    cfg.check()
    rows = read_jsonl(cfg.data, "sft")
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    lm = load_lm(cfg.model, cfg.device).train()
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    responses = encode_responses(tokenizer, [r["response"] for r in rows])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, fused=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    checkpoint, start_step = Path(cfg.out) / "checkpoint", 0
    if cfg.resume:
        found, state = resume_from(cfg.out)
        lm.load_state_dict(load_lm(found, cfg.device).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        start_step = state["step"]
    log = MetricsLog(cfg.out, resume_step=start_step if cfg.resume else None)

    def save(step):
        def write(directory):
            lm.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
            torch.save({"step": step, "optimizer": optimizer.state_dict(),
                        "rng": rng_state(generator)}, directory / "trainer_state.pt")
        save_atomic(checkpoint, write)

    for step in range(start_step, cfg.steps):
        start = time.perf_counter()
        pick = torch.randint(len(rows), (cfg.batch_size,), generator=generator).tolist()
        batch = pack([prompts[i] for i in pick], [responses[i] for i in pick],
                     tokenizer.pad_token_id).to(cfg.device)
        logits = lm_logits(lm, batch.input_ids, batch.attention_mask, batch.response_positions)
        labels = batch.responses.masked_fill(~batch.response_mask, -100)
        logprobs = token_logprobs(logits, labels, validate=False)
        loss = -logprobs.sum() / batch.response_mask.sum()
        if not torch.isfinite(loss):
            raise RuntimeError(f"SFT loss is not finite at step {step} ({loss.item()}); stopping. "
                               f"The last good checkpoint is in {checkpoint}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens = int(batch.response_mask.sum())
        log.write({"step": step, "loss": loss.item(),
                   "tokens_per_s": tokens / (time.perf_counter() - start)})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    plot(log.path, Path(cfg.out) / "sft.png", ["loss"], "SFT")
    return checkpoint

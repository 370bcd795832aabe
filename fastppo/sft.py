"""Supervised fine-tuning: cross-entropy on the response tokens, through fastppo.kernels.

A row is {"prompt", "response"} (trained on the response and its EOS) or {"messages": [...]}, a
conversation rendered with the tokenizer's chat template and trained on the assistant turns only
(fastppo.episodes.Renderer.conversation): the system, user and tool turns and the template's own
tokens are context."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fastppo import distributed, run
from fastppo.config import SFTConfig
from fastppo.data import (ResponseTokens, encode_prompts, encode_responses, limit_prompts, pack,
                          read_jsonl, special_ids)
from fastppo.episodes import Renderer
from fastppo.metrics import plot
from fastppo.models import PolicyLM, load_lm, precision, save_model
from fastppo.prepare import prepare
from fastppo.preflight import check_fits_context, check_model_dir


@run.owns_output  # cfg.out: checked, locked for this run, resume/overwrite handled, config.yaml saved
def train_sft(cfg: SFTConfig) -> Path:
    """Returns the checkpoint directory (a Hugging Face model directory)."""
    rows = read_jsonl(cfg.data, "sft")
    check_model_dir(cfg.model, "model")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad, _ = special_ids(tokenizer)
    prompts, responses, trained = encode_rows(tokenizer, rows, cfg.data)
    prompts = limit_prompts(prompts, cfg.max_prompt_length, cfg.truncate_prompts,
                            tokenizer.bos_token_id)
    check_fits_context(cfg.model, max(len(p) + len(r) for p, r in zip(prompts, responses)),
                       f"the longest prompt + response of {cfg.data}")
    generator = run.setup(cfg.seed, cfg.device)
    policy = PolicyLM(load_lm(cfg.model, cfg.device, cfg.dtype).train())
    optimizer = prepare(policy, cfg)  # LoRA, checkpointing, FSDP2 under torchrun, the LM head's path
    _, log, progress = run.begin(cfg, policy, optimizer, generator, name="sft", total=cfg.steps,
                                 step=int)
    for step in progress:
        start = time.perf_counter()
        pick = torch.randint(len(rows), (cfg.batch_size,), generator=generator).tolist()
        batch = pack([prompts[i] for i in pick], [responses[i] for i in pick], pad,
                     trained=[trained[i] for i in pick]).to(cfg.device)
        tokens = batch.response_mask.sum()  # the global batch's; each rank sums its share of them
        mb = batch.select(distributed.my_rows(torch.arange(cfg.batch_size)))
        on = ResponseTokens(mb.response_mask, policy.packed)  # packed: the response tokens only
        with precision(cfg.device, cfg.dtype):  # bf16 matmuls; log-probs in float32, from logits
            logprobs = policy.head.logprobs(policy(mb, at=on.at), on.take(mb.labels))  # or hidden
        loss = distributed.share_of_mean(-logprobs.sum(), tokens)
        loss_value = run.step(optimizer, loss, cfg.out, what="SFT", at=f"step {step}")
        log.write({"step": step, "loss": loss_value.item(),
                   "tokens_per_s": int(tokens) / (time.perf_counter() - start)})
        progress.set_postfix(loss=f"{loss_value.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            run.save(cfg.out, lambda directory, state: save_model(policy, tokenizer, directory, state),
                     optimizer, generator, model=policy, step=step + 1)
    progress.close()
    plot(log.path, Path(cfg.out) / "sft.png", ["loss"], "SFT")
    return Path(cfg.out) / "checkpoint"


def encode_rows(tokenizer, rows: list[dict], path) -> tuple[list, list, list]:
    """(prompt ids, response ids, which response tokens are trained) per row: a prompt/response row
    trains its whole response; a conversation its assistant tokens (an error naming the file and the
    row when the tokenizer has no chat template, or a conversation gives nothing to train on)."""
    plain = [i for i, r in enumerate(rows) if "messages" not in r]
    prompts, responses, trained = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    if plain:
        for i, p, r in zip(plain, encode_prompts(tokenizer, [rows[i]["prompt"] for i in plain]),
                           encode_responses(tokenizer, [rows[i]["response"] for i in plain])):
            prompts[i], responses[i], trained[i] = p, r, [True] * len(r)
    renderer = None
    for i, row in enumerate(rows):
        if "messages" not in row:
            continue
        try:
            renderer = renderer or Renderer(tokenizer, where="messages")
            prompts[i], responses[i], trained[i] = renderer.conversation(row["messages"])
        except ValueError as err:
            raise ValueError(f"{path} row {i}: {err}") from None
    return prompts, responses, trained

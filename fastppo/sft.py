"""Supervised fine-tuning: cross-entropy on the response tokens, through fastppo.kernels."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fastppo import distributed, run
from fastppo.config import SFTConfig
from fastppo.data import (encode_prompts, encode_responses, limit_prompts, pack, read_jsonl,
                          special_ids)
from fastppo.metrics import MetricsLog, plot
from fastppo.models import (ADAPTER, LogitsAt, add_lora, check_fits_context, check_model_dir,
                            enable_gradient_checkpointing, fusable_head, head_logprobs,
                            load_adapter, load_lm, precision, save_model)


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
    policy = LogitsAt(load_lm(cfg.model, cfg.device).train())
    if cfg.lora_rank:
        add_lora(policy.lm, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy.lm)
    if distributed.world() > 1:  # torchrun: FSDP2, each rank takes its share of every batch
        distributed.shard(policy, policy.lm)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  fused=True)
    # None: log-probs from logits (under torchrun FSDP2 shards the LM head)
    head = fusable_head(policy.lm, cfg.fused_linear and distributed.world() == 1)

    def write_model(directory, state):
        save_model(policy, tokenizer, directory, state)

    def load_model(directory):
        if cfg.lora_rank:  # the frozen base is cfg.model's, loaded above; the adapter is saved
            adapter = load_adapter(Path(directory) / ADAPTER, policy.lm)
            distributed.load_full_state_dict(policy, {f"lm.{k}": v.to(cfg.device)
                                                      for k, v in adapter.items()}, strict=False)
        else:
            distributed.load_full_state_dict(policy, LogitsAt(load_lm(directory)).state_dict())

    start_step = 0
    if cfg.resume:
        start_step = run.resume(cfg.out, load_model, optimizer, generator, model=policy,
                                step=int)["step"]
    log = MetricsLog(cfg.out, resume_step=start_step if cfg.resume else None)

    progress = tqdm(range(start_step, cfg.steps), desc="sft", initial=start_step, total=cfg.steps,
                    disable=None)  # a progress line on a terminal, nothing in logs
    for step in progress:
        start = time.perf_counter()
        pick = torch.randint(len(rows), (cfg.batch_size,), generator=generator).tolist()
        batch = pack([prompts[i] for i in pick], [responses[i] for i in pick],
                     pad).to(cfg.device)
        tokens = batch.response_mask.sum()  # the global batch's; each rank sums its share of them
        mb = batch.select(distributed.my_rows(torch.arange(cfg.batch_size)))
        labels = mb.responses.masked_fill(~mb.response_mask, -100)
        with precision(cfg.device, cfg.dtype):  # bf16 matmuls; log-probs in float32
            # logits, or the last hidden states for the fused LM head (no logits)
            states = policy(mb.input_ids, mb.attention_mask, mb.response_positions,
                            hidden_only=head is not None)
            logprobs = head_logprobs(states, head, labels)
        loss = distributed.share_of_mean(-logprobs.sum(), tokens)
        loss_value = distributed.summed(loss.detach()) / distributed.world()
        run.stop_if_not_finite(loss_value, cfg.out, what="SFT loss", at=f"step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.stop_if_not_finite(run.gradient_norm(optimizer), cfg.out, what="SFT gradient norm",
                               at=f"step {step}")
        optimizer.step()
        log.write({"step": step, "loss": loss_value.item(),
                   "tokens_per_s": int(tokens) / (time.perf_counter() - start)})
        progress.set_postfix(loss=f"{loss_value.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            run.save(cfg.out, write_model, optimizer, generator, model=policy, step=step + 1)
    progress.close()
    plot(log.path, Path(cfg.out) / "sft.png", ["loss"], "SFT")
    return Path(cfg.out) / "checkpoint"

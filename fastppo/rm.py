"""Reward model: the SFT backbone plus a scalar head, trained on ranked pairs with
-log sigmoid(r_chosen - r_rejected); reports held-out pairwise accuracy. The checkpoint is a standard
AutoModelForSequenceClassification directory (num_labels=1)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fastppo import distributed, run
from fastppo.config import RMConfig
from fastppo.data import (encode_prompts, encode_responses, limit_prompts, pack, read_jsonl,
                          special_ids)
from fastppo.metrics import MetricsLog, plot
from fastppo.models import (ADAPTER, add_lora, check_fits_context, check_model_dir,
                            enable_gradient_checkpointing, load_adapter, load_reward_model,
                            new_reward_model, precision, save_model)


def _scores(rm, tokenizer, prompts, responses, device):
    batch = pack(prompts, responses, special_ids(tokenizer)[0]).to(device)
    return rm(batch.input_ids, batch.attention_mask)


@torch.no_grad()
def pairwise_accuracy(rm, tokenizer, prompts, chosen, rejected, device, batch_size=256) -> float:
    wins = 0
    for i in range(0, len(prompts), batch_size):
        sl = slice(i, i + batch_size)
        wins += int((_scores(rm, tokenizer, prompts[sl], chosen[sl], device)
                     > _scores(rm, tokenizer, prompts[sl], rejected[sl], device)).sum())
    return wins / len(prompts)


@run.owns_output  # cfg.out: locked for this run, resume/overwrite checked, config.yaml saved
def train_rm(cfg: RMConfig) -> tuple[Path, float]:
    """Returns (checkpoint directory, held-out pairwise accuracy)."""
    cfg.check()
    rows = read_jsonl(cfg.data, "rm")
    check_model_dir(cfg.model, "model")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    prompts = limit_prompts(encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                            cfg.max_prompt_length, cfg.truncate_prompts, tokenizer.bos_token_id)
    chosen = encode_responses(tokenizer, [r["chosen"] for r in rows])
    rejected = encode_responses(tokenizer, [r["rejected"] for r in rows])
    check_fits_context(cfg.model, max(len(p) + max(len(c), len(r))
                                      for p, c, r in zip(prompts, chosen, rejected)),
                       f"the longest prompt + response of {cfg.data}")
    generator = run.setup(cfg.seed, cfg.device)
    pad, eos = special_ids(tokenizer)
    # Hugging Face's pooling finds the last token by its id: only a pad token of its own is safe.
    rm = new_reward_model(cfg.model, pad if pad != eos else None, cfg.device).train()
    if cfg.lora_rank:  # adapters on the backbone; the new score head trains whole
        add_lora(rm.model, cfg, keep=("score",))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(rm.model)
    if distributed.world() > 1:  # torchrun: FSDP2, each rank takes its share of every batch
        distributed.shard(rm, rm.model)
    order = torch.randperm(len(rows), generator=generator).tolist()
    n_eval = max(1, int(len(rows) * cfg.eval_fraction))
    held, train = order[:n_eval], order[n_eval:]
    if not train:
        raise ValueError(f"{cfg.data}: too few pairs to hold out {cfg.eval_fraction:.0%} and train")
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=cfg.lr,
                                  fused=True)

    def write_model(directory, state):
        save_model(rm, tokenizer, directory, state)

    def load_model(directory):
        saved = load_reward_model(directory).state_dict()
        if cfg.lora_rank:  # the frozen base is cfg.model's, loaded above: the adapter and score head
            adapter = load_adapter(Path(directory) / ADAPTER, rm.model)
            state = {f"model.{k}": v for k, v in adapter.items()}
            state.update({k: v for k, v in saved.items() if k.startswith("model.score.")})
            distributed.load_full_state_dict(rm, {k: v.to(cfg.device) for k, v in state.items()},
                                             strict=False)
        else:
            distributed.load_full_state_dict(rm, saved)

    start_step = 0
    if cfg.resume:
        start_step = run.resume(cfg.out, load_model, optimizer, generator, model=rm,
                                step=int)["step"]
    log = MetricsLog(cfg.out, resume_step=start_step if cfg.resume else None)

    progress = tqdm(range(start_step, cfg.steps), desc="rm", initial=start_step, total=cfg.steps,
                    disable=None)  # a progress line on a terminal, nothing in logs
    for step in progress:
        start = time.perf_counter()
        pick = [train[i] for i in torch.randint(len(train), (cfg.batch_size,),
                                                generator=generator).tolist()]
        pick = [pick[i] for i in distributed.my_rows(torch.arange(cfg.batch_size)).tolist()]
        p = [prompts[i] for i in pick]
        with precision(cfg.device, cfg.dtype):  # the scores themselves are float32
            margin = (_scores(rm, tokenizer, p, [chosen[i] for i in pick], cfg.device)
                      - _scores(rm, tokenizer, p, [rejected[i] for i in pick], cfg.device))
        # mean over the global batch: each rank's share of the sum (FSDP averages over the ranks)
        loss = distributed.share_of_mean(-F.logsigmoid(margin).sum(), cfg.batch_size)
        loss_value = distributed.summed(loss.detach()) / distributed.world()
        wins = distributed.summed((margin > 0).sum()).item()
        run.stop_if_not_finite(loss_value, cfg.out, what="RM loss", at=f"step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.stop_if_not_finite(run.gradient_norm(optimizer), cfg.out, what="RM gradient norm",
                               at=f"step {step}")
        optimizer.step()
        log.write({"step": step, "loss": loss_value.item(), "train_accuracy": wins / cfg.batch_size,
                   "pairs_per_s": cfg.batch_size / (time.perf_counter() - start)})
        progress.set_postfix(loss=f"{loss_value.item():.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            run.save(cfg.out, write_model, optimizer, generator, model=rm, step=step + 1,
                     eval_accuracy=None)
    progress.close()
    rm.eval()
    with precision(cfg.device, cfg.dtype):
        accuracy = pairwise_accuracy(rm, tokenizer, [prompts[i] for i in held],
                                     [chosen[i] for i in held], [rejected[i] for i in held],
                                     cfg.device)
    log.write({"step": cfg.steps, "eval_accuracy": accuracy})
    run.save(cfg.out, write_model, optimizer, generator, model=rm, step=cfg.steps,
             eval_accuracy=accuracy)
    plot(log.path, Path(cfg.out) / "rm.png", ["loss", "train_accuracy", "eval_accuracy"],
         "reward model")
    return Path(cfg.out) / "checkpoint", accuracy

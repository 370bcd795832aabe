"""Reward model: the SFT backbone plus a scalar head, trained on ranked pairs with
-log sigmoid(r_chosen - r_rejected); reports held-out pairwise accuracy. The checkpoint is a standard
AutoModelForSequenceClassification directory (num_labels=1).

A pair is a prompt and two responses (text), or a conversation (the prompt as chat messages) and two
replies of the assistant (text or messages): each side is rendered whole with the tokenizer's chat
template and scored at its last assistant token (fastppo.episodes.Renderer.conversation), as the PPO
scorer scores a rendered episode."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from fastppo import distributed, run
from fastppo.config import RMConfig
from fastppo.data import (encode_prompts, encode_responses, limit_prompts, pack, read_jsonl,
                          special_ids)
from fastppo.episodes import Renderer
from fastppo.metrics import plot
from fastppo.models import new_reward_model, precision, save_model
from fastppo.prepare import prepare
from fastppo.preflight import check_fits_context, check_model_dir


def _scores(rm, tokenizer, sequences: list[tuple[list[int], list[int]]], device):
    """The reward model's score of each (prompt ids, response ids)."""
    return rm(pack([p for p, _ in sequences], [r for _, r in sequences],
                   special_ids(tokenizer)[0]).to(device))


@torch.no_grad()
def pairwise_accuracy(rm, tokenizer, chosen, rejected, device, batch_size=256) -> float:
    """The fraction of pairs whose chosen (prompt, response) ids score above the rejected ones."""
    wins = 0
    for i in range(0, len(chosen), batch_size):
        sl = slice(i, i + batch_size)
        wins += int((_scores(rm, tokenizer, chosen[sl], device)
                     > _scores(rm, tokenizer, rejected[sl], device)).sum())
    return wins / len(chosen)


def encode_pairs(tokenizer, rows: list[dict], cfg: RMConfig) -> tuple[list, list]:
    """(chosen, rejected): each row's two sides as (prompt ids, response ids). Text rows: the prompt
    as PPO encodes it, each response + EOS; conversations: prompt + reply rendered by the chat
    template, cut after the reply's last token (its end-of-turn EOS)."""
    text = [i for i, r in enumerate(rows) if isinstance(r["prompt"], str)]
    chosen, rejected = [None] * len(rows), [None] * len(rows)
    if text:
        prompts = limit_prompts(encode_prompts(tokenizer, [rows[i]["prompt"] for i in text]),
                                cfg.max_prompt_length, cfg.truncate_prompts, tokenizer.bos_token_id)
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            for i, p, r in zip(text, prompts, encode_responses(tokenizer,
                                                                [rows[i][side] for i in text])):
                out[i] = (p, r)
    renderer = None
    for i, row in enumerate(rows):
        if isinstance(row["prompt"], str):
            continue
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            reply = row[side]
            reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
            try:
                renderer = renderer or Renderer(tokenizer, where="prompt")
                prompt, response, _ = renderer.conversation(row["prompt"] + reply)
            except ValueError as err:
                raise ValueError(f"{cfg.data} row {i} ({side}): {err}") from None
            out[i] = (prompt, response)
    return chosen, rejected


@run.owns_output  # cfg.out: checked, locked for this run, resume/overwrite handled, config.yaml saved
def train_rm(cfg: RMConfig) -> tuple[Path, float]:
    """Returns (checkpoint directory, held-out pairwise accuracy)."""
    rows = read_jsonl(cfg.data, "rm")
    check_model_dir(cfg.model, "model")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    chosen, rejected = encode_pairs(tokenizer, rows, cfg)
    check_fits_context(cfg.model, max(len(p) + len(r) for p, r in chosen + rejected),
                       f"the longest prompt + response of {cfg.data}")
    generator = run.setup(cfg.seed, cfg.device)
    pad, eos = special_ids(tokenizer)
    # Hugging Face's pooling finds the last token by its id: only a pad token of its own is safe.
    rm = new_reward_model(cfg.model, pad if pad != eos else None, cfg.device, cfg.dtype).train()
    optimizer = prepare(rm, cfg, keep=("score",))  # under LoRA the new score head trains whole
    order = torch.randperm(len(rows), generator=generator).tolist()
    n_eval = max(1, int(len(rows) * cfg.eval_fraction))
    held, train = order[:n_eval], order[n_eval:]
    if not train:
        raise ValueError(f"{cfg.data}: too few pairs to hold out {cfg.eval_fraction:.0%} and train")
    _, log, progress = run.begin(cfg, rm, optimizer, generator, name="rm", total=cfg.steps,
                                 step=int)

    def save(step, accuracy):
        run.save(cfg.out, lambda directory, state: save_model(rm, tokenizer, directory, state),
                 optimizer, generator, model=rm, step=step, eval_accuracy=accuracy)

    for step in progress:
        start = time.perf_counter()
        pick = [train[i] for i in torch.randint(len(train), (cfg.batch_size,),
                                                generator=generator).tolist()]
        pick = [pick[i] for i in distributed.my_rows(torch.arange(cfg.batch_size)).tolist()]
        with precision(cfg.device, cfg.dtype):  # the scores themselves are float32
            margin = (_scores(rm, tokenizer, [chosen[i] for i in pick], cfg.device)
                      - _scores(rm, tokenizer, [rejected[i] for i in pick], cfg.device))
        # mean over the global batch: each rank's share of the sum (FSDP averages over the ranks)
        loss = distributed.share_of_mean(-F.logsigmoid(margin).sum(), cfg.batch_size)
        wins = distributed.summed((margin > 0).sum()).item()
        loss_value = run.step(optimizer, loss, cfg.out, what="RM", at=f"step {step}")
        log.write({"step": step, "loss": loss_value.item(), "train_accuracy": wins / cfg.batch_size,
                   "pairs_per_s": cfg.batch_size / (time.perf_counter() - start)})
        progress.set_postfix(loss=f"{loss_value.item():.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1, None)
    progress.close()
    rm.eval()
    with precision(cfg.device, cfg.dtype):
        accuracy = pairwise_accuracy(rm, tokenizer, [chosen[i] for i in held],
                                     [rejected[i] for i in held], cfg.device)
    log.write({"step": cfg.steps, "eval_accuracy": accuracy})
    save(cfg.steps, accuracy)
    plot(log.path, Path(cfg.out) / "rm.png", ["loss", "train_accuracy", "eval_accuracy"],
         "reward model")
    return Path(cfg.out) / "checkpoint", accuracy

"""End-to-end benchmark: PPO iterations on the fixed standard workload.

    python bench/e2e.py [--iterations 3] [--device cpu] [--dtype bfloat16] [--gradient_checkpointing]
                        [--lora_rank 16] [--rollout_engine vllm] [--vocab 151936] [--no-fused_linear]
                        [--advantage_estimator grpo --samples_per_prompt 4]
    python bench/e2e.py --hidden 1024 --layers 8 --response 64      # a larger workload
    torchrun --standalone --nproc_per_node 2 bench/e2e.py      # the same global batch on 2 ranks

Workload: a Llama-style policy (hidden 256, 4 layers, 4 heads, intermediate 512, vocabulary 32000,
random init) and a reward model of the same shape; 16 prompts of 16 tokens, responses of 32 tokens,
4 PPO epochs, 2 mini-batches. Reports tokens/s, the time split (sync / generate / reference / score /
train), the sampler/trainer gap
and peak memory (per-iteration peak RSS on CPU, and that peak minus the RSS at the iteration's
start) per iteration (the first iteration is a warm-up and is not reported), appended to
bench/results/e2e.csv. bench/e2e_trl.py runs TRL's PPOTrainer on the same workload and prints the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                          PreTrainedTokenizerFast)

from common import allocator_env, append_csv, device_name, git_revision, today
from fastppo.config import PPOConfig
from fastppo.data import write_jsonl
from fastppo.ppo import train_ppo

VOCAB, PROMPT, RESPONSE, PROMPTS = 32000, 16, 32, 16


def workload(root: Path, seed: int, hidden: int = 256, layers: int = 4,
             vocab: int = VOCAB) -> tuple[Path, Path, Path]:
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(vocab - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", 2)])  # as Llama's
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    config.num_labels = 1  # the reward model: a standard one-label sequence classifier
    AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").save_pretrained(
        root / "rm")
    tok.save_pretrained(root / "rm")
    rng = random.Random(seed)
    # 15 words + <bos> = 16 prompt tokens
    rows = [{"prompt": " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(PROMPT - 1))}
            for _ in range(PROMPTS)]
    write_jsonl(root / "prompts.jsonl", rows)
    return root / "policy", root / "rm", root / "prompts.jsonl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters of this rank (0: off)")
    parser.add_argument("--hidden", type=int, default=256, help="policy and RM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="policy and RM decoder layers")
    parser.add_argument("--response", type=int, default=RESPONSE, help="response tokens")
    parser.add_argument("--rollout_engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size")
    parser.add_argument("--advantage_estimator", default="gae",
                        choices=["gae", "grpo", "rloo", "reinforce++"],
                        help="gae (critic) or a critic-free estimator (no value forward or loss)")
    parser.add_argument("--samples_per_prompt", type=int, default=1,
                        help="responses per prompt (the group estimators need >= 2)")
    parser.add_argument("--no-fused_linear", dest="fused_linear", action="store_false",
                        help="log-probs and loss from (tokens, vocabulary) logits, not fused")
    args = parser.parse_args(argv)
    shape = f"h{args.hidden}-l{args.layers}-r{args.response}" + (
        f"-v{args.vocab}" if args.vocab != VOCAB else "")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # under torchrun: one identical copy per rank
        policy, rm, prompts = workload(root, args.seed, args.hidden, args.layers, args.vocab)
        out = root / "run"
        if "TORCHELASTIC_RUN_ID" in os.environ:  # the ranks' one output folder
            out = Path(tempfile.gettempdir()) / f"fastppo-e2e-{os.environ['TORCHELASTIC_RUN_ID']}"
        cfg = PPOConfig(prompts=str(prompts), policy=str(policy), reward_model=str(rm),
                        out=str(out), iterations=args.iterations, batch_size=PROMPTS,
                        mini_batch_size=PROMPTS // 2, ppo_epochs=4, max_new_tokens=args.response,
                        save_every=10**6, seed=args.seed, device=args.device, dtype=args.dtype,
                        gradient_checkpointing=args.gradient_checkpointing,
                        lora_rank=args.lora_rank, rollout_engine=args.rollout_engine,
                        fused_linear=args.fused_linear,
                        advantage_estimator=args.advantage_estimator,
                        samples_per_prompt=args.samples_per_prompt)
        train_ppo(cfg)
        if os.environ.get("RANK", "0") != "0":
            return 0  # under torchrun every rank trains; rank 0 reports
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if out.parent != root:
            shutil.rmtree(out)
    measured = rows[1:] or rows
    keys = ["tokens_per_s", "time_sync", "time_generate", "time_old_logprobs", "time_reference", "time_score",
            "time_train", "peak_memory_mib", "iteration_memory_mib", "response_length",
            "sampler_gap_max", "sampler_kl"]
    result = {k: statistics.median(r[k] for r in measured) for k in keys}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"fastppo, world {world}, {shape}, {args.dtype}"
          f"{', checkpointing' if args.gradient_checkpointing else ''}"
          f"{f', LoRA rank {args.lora_rank}' if args.lora_rank else ''}"
          f"{'' if args.fused_linear else ', logits (not fused)'}, "
          f"{args.advantage_estimator} x{args.samples_per_prompt}, rollout "
          f"{args.rollout_engine}, {device_name(args.device)}: "
          + ", ".join(f"{k} {v:.3g}" if k.startswith("sampler") else f"{k} {v:.3f}"
                      for k, v in result.items()))
    figures = {k: f"{v:.3e}" if k.startswith("sampler") else f"{v:.4f}" for k, v in result.items()}
    append_csv("e2e.csv", [dict(date=today(), rev=git_revision(), device=device_name(args.device),
                                torch=torch.__version__, provider="fastppo", world_size=world,
                                workload=shape, dtype=args.dtype,
                                gradient_checkpointing=int(args.gradient_checkpointing),
                                lora_rank=args.lora_rank, rollout_engine=args.rollout_engine,
                                fused_linear=int(args.fused_linear),
                                advantage_estimator=args.advantage_estimator,
                                samples_per_prompt=args.samples_per_prompt,
                                iterations=len(measured), **figures, allocator=allocator_env())])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The peer side of the end-to-end benchmark: TRL's PPOTrainer on bench/e2e.py's standard workload.

    python bench/e2e_trl.py [--iterations 3]

Creates bench/.venv-trl (once) with the CPU torch pinned in constraints-dev.txt and trl==1.11.0 (the
last release that ships PPOTrainer, under trl.experimental.ppo), then runs the worker below in it:
the same model shapes (Llama hidden 256, 4 layers, 4 heads, intermediate 512, vocabulary 32000, random
init; policy, reference, reward and value models), 16 prompts of 16 tokens, 32-token responses,
4 PPO epochs, 2 mini-batches. Reports the median over PPO updates 2.. of the same tokens/s definition
as fastppo's (response tokens x (1 + epochs) / update time), of the per-update peak RSS and of that
peak minus the RSS at the update's start, appends a row to
bench/results/e2e.csv, and prints the ratio to the newest fastppo row of the same device.
The worker runs in TRL's virtual environment, which has no fastppo but has torch: it reads the RSS
with bench/common.py (stdlib and torch only), found from the path it is given, as the other bench
scripts do; its timer is the trainer's per-update callback.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from common import RESULTS, allocator_env, append_csv, device_name, git_revision, today

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(__file__).with_name(".venv-trl")

WORKER = textwrap.dedent('''
    import json, statistics, sys, tempfile, time
    from pathlib import Path
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                              PreTrainedTokenizerFast, TrainerCallback)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    iterations, seed, bench = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, bench)  # bench/common.py, as for the scripts run from bench/
    from common import _rss_kib
    VOCAB, PROMPT, RESPONSE, PROMPTS = 32000, 16, 32, 16
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>", padding_side="left")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, num_labels=1)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    ref = AutoModelForCausalLM.from_config(config)
    ref.load_state_dict(policy.state_dict())
    reward = AutoModelForSequenceClassification.from_config(config)
    value = AutoModelForSequenceClassification.from_config(config)
    g = torch.Generator().manual_seed(seed)
    prompts = [[2] + torch.randint(4, VOCAB, (PROMPT - 1,), generator=g).tolist() for _ in range(PROMPTS)]
    data = Dataset.from_dict({"input_ids": prompts})

    class Clock(TrainerCallback):  # per-update time and peak RSS (the window is reset each update)
        stamps, peaks, added, rss_at_reset = [], [], [], 0.0
        def reset(self):  # as common.peak_mib: the peak (VmHWM) restarts at the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            Clock.rss_at_reset = _rss_kib("VmRSS") / 1024
        def on_train_begin(self, args, state, control, **kw):
            self.reset()
        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())
            self.peaks.append(_rss_kib("VmHWM") / 1024)
            self.added.append(self.peaks[-1] - Clock.rss_at_reset)
            self.reset()

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1,
                         num_mini_batches=2, num_ppo_epochs=4, total_episodes=PROMPTS * iterations,
                         response_length=RESPONSE, learning_rate=1e-5, report_to=[],
                         num_sample_generations=0, save_strategy="no", logging_steps=1, seed=seed,
                         use_cpu=True, bf16=False,
                         stop_token_id=None, missing_eos_penalty=None, local_rollout_forward_batch_size=PROMPTS // 2)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=data,
                             callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    stamps = [start] + Clock.stamps
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    measured = durations[1:] or durations
    seconds = statistics.median(measured)
    print(json.dumps({"updates": len(durations), "seconds_per_update": seconds,
                      "tokens_per_s": PROMPTS * RESPONSE * (1 + 4) / seconds,
                      "peak_memory_mib": statistics.median(Clock.peaks[1:] or Clock.peaks),
                      "iteration_memory_mib": statistics.median(Clock.added[1:] or Clock.added)}))
''')


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints-dev.txt")]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["trl==1.11.0", "datasets", "accelerate"], check=True)
        (VENV / ".installed").write_text("trl==1.11.0\n")
    return python


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    python = ensure_venv()
    proc = subprocess.run([str(python), "-c", WORKER, str(args.iterations), str(args.seed),
                           str(Path(__file__).resolve().parent)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"TRL worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    device = device_name("cpu")
    # The same columns as bench/e2e.py's rows; TRL does not report a time split.
    append_csv("e2e.csv", [dict(date=today(), rev=git_revision(), device=device, torch="2.13.0+cpu",
                                provider="trl-1.11.0", iterations=result["updates"] - 1,
                                tokens_per_s=f"{result['tokens_per_s']:.4f}", time_generate="",
                                time_reference="", time_score="", time_train="",
                                peak_memory_mib=f"{result['peak_memory_mib']:.4f}",
                                iteration_memory_mib=f"{result['iteration_memory_mib']:.4f}",
                                allocator=allocator_env(),
                                response_length=32)])
    print(f"trl 1.11.0 PPOTrainer: {result}")
    rows = [r for r in csv.DictReader(open(RESULTS / "e2e.csv"))
            if r["provider"] == "fastppo" and r["device"] == device]
    if rows:
        ours = rows[-1]
        print(f"fastppo / TRL tokens/s: {float(ours['tokens_per_s']) / result['tokens_per_s']:.2f}x; "
              f"peak memory {float(ours['peak_memory_mib']):.0f} vs {result['peak_memory_mib']:.0f} MiB; "
              f"added by an iteration {float(ours.get('iteration_memory_mib') or 'nan'):.0f} vs "
              f"{result['iteration_memory_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

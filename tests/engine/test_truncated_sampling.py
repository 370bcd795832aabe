"""Top-k / top-p sampling trains the distribution that was sampled: through the CLI, the rollout's and
the training's log-probs, entropy and KL are the truncated policy's (first mini-batch ratio 1, the
sampler's log-probs equal the trainer's), and the kept-mass bias the peers carry is logged."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def ppo(small_run, out, *flags):
    data = small_run / "data"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["ppo", "--prompts", data / "prompts.jsonl", "--policy", small_run / "sft" / "checkpoint",
            "--reward_model", small_run / "rm" / "checkpoint", "--out", out, "--iterations", 2,
            "--batch_size", 8, "--mini_batch_size", 4, "--max_new_tokens", 6, "--lr", 1e-3, *flags]
    proc = subprocess.run([sys.executable, "-m", "fastppo.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_top_k_1_is_greedy_with_entropy_and_log_probs_0(small_run, tmp_path):
    # Before truncation-aware scoring, both were the full softmax's: non-zero.
    out, _ = small_run
    rows = ppo(out, tmp_path / "k1", "--top_k", 1, "--entropy_coef", 0.01)
    for row in rows:
        assert row["entropy"] == 0.0 and row["logprob_mean"] == 0.0, row
        assert 0.0 < row["kept_mass"] <= 1.0 and row["first_ratio_max_error"] <= 1e-5
        assert row["sampler_gap_max"] == 0.0  # the sampler drew each token with probability 1


def test_top_k_top_p_run_trains_what_it_samples(small_run, tmp_path):
    out, _ = small_run
    rows = ppo(out, tmp_path / "kp", "--top_k", 8, "--top_p", 0.8, "--temperature", 0.9,
               "--kl_in_loss", "true", "--kl_coef", 0.05)
    for row in rows:
        assert row["first_ratio_max_error"] <= 1e-5
        # the sampler's log-probs are the trainer's truncated ones; against the full softmax they
        # are off by the log of the kept mass (what a truncation-unaware trainer's ratio carries)
        assert row["sampler_gap_max"] < 1e-4, row
        assert 0.0 < row["kept_mass"] < 0.99, row
        assert row["sampler_gap_mean_untruncated"] > 1e-3, row
        assert row["outside_kept_rollout"] == 0 and 0.0 <= row["outside_kept_train"] < 0.5
        assert row["entropy"] > 0.0 and row["logprob_mean"] < 0.0
        # kl is taken from the truncated policy to the full reference: the truncation's part
        # (-log of the kept mass per token) and the untruncated policy's KL add up to it
        assert row["kl"] == pytest.approx(row["kl_truncation"] + row["kl_untruncated"], abs=1e-5)
        assert row["kl_truncation"] > 0.05, row
    # before any update the policy is the reference: all of the first kl is the truncation's
    assert rows[0]["kl_untruncated"] == 0.0 and rows[0]["kl"] == rows[0]["kl_truncation"] > 0
    assert rows[-1]["approx_kl"] > 0  # it trained

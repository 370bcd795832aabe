"""The `fastppo` command end to end, and its answers to bad input."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def fastppo(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastppo.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_commands(small_run, tmp_path):
    out, _ = small_run
    data = out / "data"
    proc = fastppo("sft", "--data", data / "sft.jsonl", "--model", out / "base", "--out",
                   tmp_path / "sft", "--steps", 3, "--batch_size", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "rm.yaml").write_text(f"data: {data / 'rm.jsonl'}\nmodel: {tmp_path / 'sft' / 'checkpoint'}\n"
                                      f"out: {tmp_path / 'rm'}\nsteps: 3\nbatch_size: 4\n")
    proc = fastppo("rm", "--config", tmp_path / "rm.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out pairwise accuracy" in proc.stdout
    proc = fastppo("ppo", "--prompts", data / "prompts.jsonl", "--policy", tmp_path / "sft" / "checkpoint",
                   "--reward_model", tmp_path / "rm" / "checkpoint", "--out", tmp_path / "ppo",
                   "--iterations", 2, "--batch_size", 4, "--mini_batch_size", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    proc = fastppo("pipeline", "--model", out / "base", "--sft_data", data / "sft.jsonl", "--rm_data",
                   data / "rm.jsonl", "--prompts", data / "prompts.jsonl", "--out", tmp_path / "pipe",
                   "--sft_steps", 2, "--rm_steps", 2, "--ppo_iterations", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = fastppo("demo", "--out", tmp_path / "demo", "--sft_steps", 5, "--rm_steps", 5,
                   "--ppo_iterations", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle score, PPO policy" in proc.stdout
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["seconds"] > 0


@pytest.mark.parametrize("args,message", [
    (["ppo", "--prompts", "p", "--policy", "x", "--reward_model", "y", "--batch_size", "4",
      "--mini_batch_size", "8"], "mini_batch_size (8) must not exceed batch_size (4)"),
    (["ppo", "--prompts", "p", "--policy", "x", "--reward_model", "y", "--top_p", "0"],
     "top_p must be in (0, 1]"),
    (["sft", "--data", "d", "--model", "m", "--learning_rate", "1"], "unrecognized arguments"),
    (["sft", "--data", "d", "--model", "m", "--steps", "two"], 'Parser key "steps"'),
    (["rm", "--data", "missing.jsonl", "--model", "m"], "rm data file missing.jsonl does not exist"),
    (["demo", "--ppo_iterations", "0"], "ppo_iterations must be >= 1; got 0"),
])
def test_cli_bad_input(tmp_path, args, message):
    proc = fastppo(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_unknown_yaml_key(tmp_path):
    (tmp_path / "c.yaml").write_text("data: d\nmodel: m\nlearning_rate: 0.1\n")
    proc = fastppo("sft", "--config", tmp_path / "c.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "learning_rate" in proc.stderr


"""torchrun: PPO on 2 gloo ranks equals PPO on 1 process (same config and seed), checkpoints resume
at the other world size, and a config error stops every rank with one line naming its rank.

Two ranks on the 2-core machine: tiny shapes, a collective timeout of 60 s, and every torchrun in
its own process group, killed whole if it overruns."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastppo.checkpoint import load_state
from fastppo.models import VALUE_HEAD

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SETTINGS = ["--batch_size", "8", "--mini_batch_size", "4", "--max_new_tokens", "6",
            "--save_every", "1", "--allow_config_change", "true",
            # the adaptive KL controller moves every iteration: it must agree and resume too
            "--adaptive_kl", "true", "--kl_target", "0.5", "--kl_horizon", "2"]


def fastppo(small_run, out, *args, world=1, iterations=2, timeout=240):
    """`python -m fastppo ppo ...` on one process, or under torchrun on `world` gloo ranks."""
    run_dir, _ = small_run
    command = ["ppo", "--prompts", str(run_dir / "data" / "prompts.jsonl"),
               "--policy", str(run_dir / "sft" / "checkpoint"),
               "--reward_model", str(run_dir / "rm" / "checkpoint"), "--out", str(out),
               "--iterations", str(iterations), *SETTINGS, *args]
    return launch(command, world, timeout)


def launch(command, world, timeout=240):
    """`python -m fastppo COMMAND` on one process, or under torchrun on `world` gloo ranks."""
    launcher = [sys.executable, "-m", "fastppo"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--standalone", "-m", "fastppo"]
    env = dict(os.environ, FASTPPO_COLLECTIVE_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(launcher + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: nothing left behind
        proc.communicate()
        raise
    return proc.returncode, stdout, stderr


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    """Metrics within 1e-4 relative, the sampled lengths exactly; weights within 1e-4 absolute.
    Two ranks sum the same terms in another order (each rank's share of a mini-batch, FSDP's
    reduce-scatter) and run the forward at half the batch: float32 rounding, ~1e-6 relative."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["response_length"] == y["response_length"]
        for key in ("score_mean", "score_std", "reward", "kl", "kl_coef", "entropy",
                    "policy_loss", "value_loss", "clipfrac", "approx_kl", "first_ratio_max_error"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (key, x[key], y[key])
    for name in ("model.safetensors", VALUE_HEAD):
        wa, wb = load_file(str(a / "checkpoint" / name)), load_file(str(b / "checkpoint" / name))
        assert set(wa) == set(wb)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def two_ranks(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("world2") / "run"
    code, stdout, stderr = fastppo(small_run, out, world=2)
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert stdout.count("PPO checkpoint:") == 1  # rank 0 prints
    assert "Traceback" not in stderr and "UserWarning" not in stderr
    return out


def test_two_ranks_equal_one_process(small_run, two_ranks, tmp_path):
    one = tmp_path / "world1"
    code, _, stderr = fastppo(small_run, one)
    assert code == 0, stderr[-3000:]
    assert_same_run(one, two_ranks)
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows(two_ranks))
    # the ranks' sampler log-probs were exchanged with their rows (else the gap would be large)
    assert all(r["sampler_gap_max"] < 1e-4 for r in rows(two_ranks))
    # each rank wrote its shards (DCP, safetensors); the optimizer's groups name their parameters
    checkpoint = two_ranks / "checkpoint"
    assert len(list((checkpoint / "trainer" / "shards").glob("*.safetensors"))) == 2
    optimizer = load_state(checkpoint)["optimizer"]
    assert set(optimizer) == {"param_groups"}  # the moments are in the shards, not gathered
    names = optimizer["param_groups"][0]["params"]
    assert names[0].startswith("lm.") and "value_head.weight" in names
    # beside them, the consolidated model: from_pretrained (and vLLM) load the directory as it is
    assert [f.name for f in checkpoint.glob("*.safetensors")] == ["model.safetensors"]
    _, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info.values()), info


def test_critic_free_grpo_on_two_ranks_equals_one_process(small_run, tmp_path):
    # groups of 4 samples split over the ranks, the loss averaged per response (each rank's share
    # of the global responses), the KL in the loss, no value head run (FSDP2 with unused parameters);
    # the two ranks split their shares into token-budget micro-batches (packed rows, 12 tokens at
    # most): the one process runs one micro-batch per mini-batch, padded
    grpo = ("--advantage_estimator", "grpo", "--samples_per_prompt", "4", "--kl_in_loss", "true",
            "--loss_reduction", "seq-mean-token-mean", "--clip_eps_high", "0.28")
    runs = {}
    for world, layout in ((1, ("--packed", "false")), (2, ("--max_tokens_per_micro_batch", "12"))):
        runs[world] = tmp_path / f"world{world}"
        code, stdout, stderr = fastppo(small_run, runs[world], *grpo, *layout, world=world)
        assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert_same_run(runs[1], runs[2])
    assert all(r["value_loss"] == 0 and r["first_ratio_max_error"] <= 1e-5 for r in rows(runs[2]))
    assert all(r["micro_batches"] > x["micro_batches"] for r, x in zip(rows(runs[2]), rows(runs[1])))


def test_checkpoints_resume_at_the_other_world_size(small_run, two_ranks, tmp_path):
    straight = tmp_path / "straight"
    assert fastppo(small_run, straight, iterations=3)[0] == 0
    # 2 ranks -> 1 process
    down = tmp_path / "down"
    subprocess.run(["cp", "-r", str(two_ranks), str(down)], check=True)
    code, _, stderr = fastppo(small_run, down, "--resume", "true", iterations=3)
    assert code == 0, stderr[-3000:]
    # 1 process -> 2 ranks
    up = tmp_path / "up"
    assert fastppo(small_run, up, iterations=2)[0] == 0
    code, _, stderr = fastppo(small_run, up, "--resume", "true", iterations=3, world=2)
    assert code == 0, stderr[-3000:]
    for resumed in (down, up):
        assert_same_run(straight, resumed)


def test_lora_on_two_ranks_equals_one_process(small_run, tmp_path):
    """LoRA composes with FSDP2: frozen base and adapters sharded together, the reference is the
    policy with its adapters off on every rank, the merged model and the adapter saved by rank 0."""
    pytest.importorskip("peft")
    runs = {}
    for world in (1, 2):
        runs[world] = tmp_path / f"world{world}"
        code, _, stderr = fastppo(small_run, runs[world], "--lora_rank", "4", world=world)
        assert code == 0, stderr[-3000:]
    assert_same_run(runs[1], runs[2])
    assert rows(runs[2])[0]["kl"] == 0.0
    assert (runs[2] / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()


def test_bf16_on_two_ranks_matches_one_process_to_bf16_rounding(small_run, tmp_path):
    """bf16 composes with FSDP2 (autocast over float32 shards, the same as one process). It is
    world-size invariant only to bf16's rounding: a rank's matmuls run on half the rows, and the bf16
    result of a row can round differently with the other blocking (measured: losses 0.5%, KL 2%
    apart after one update; the same sampled tokens here, though a rounding could move a sampling
    boundary across a row's uniform). float32 runs stay within 1e-4 (above)."""
    runs = {}
    for world in (1, 2):
        runs[world] = tmp_path / f"world{world}"
        code, _, stderr = fastppo(small_run, runs[world], "--dtype", "bfloat16", world=world)
        assert code == 0, stderr[-3000:]
    one, two = rows(runs[1]), rows(runs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert one[0]["kl"] == two[0]["kl"] == 0.0
    for x, y in zip(one, two):
        assert x["first_ratio_max_error"] <= 1e-5 and y["first_ratio_max_error"] <= 1e-5
        for key in ("score_mean", "response_length", "entropy", "policy_loss", "value_loss"):
            assert x[key] == pytest.approx(y[key], rel=5e-2, abs=1e-3), (key, x[key], y[key])


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_on_two_ranks_equal_one_process(small_run, tmp_path, stage):
    run_dir, _ = small_run
    data, model = (("sft.jsonl", run_dir / "base") if stage == "sft"
                   else ("rm.jsonl", run_dir / "sft" / "checkpoint"))
    outs = {}
    for world in (1, 2):
        outs[world] = tmp_path / f"world{world}"
        code, stdout, stderr = launch([stage, "--data", str(run_dir / "data" / data),
                                       "--model", str(model), "--out", str(outs[world]),
                                       "--steps", "4", "--batch_size", "8", "--save_every", "2"],
                                      world)
        assert code == 0, stderr[-3000:]
        assert stdout.count("checkpoint:") == 1
        assert "Traceback" not in stderr and "UserWarning" not in stderr
    ra, rb = rows(outs[1]), rows(outs[2])
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "train_accuracy", "eval_accuracy"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4), (key, x, y)
    assert_same_weights(outs[1], outs[2])
    # resume at the other world size: 2 ranks' shards on 1 process, 1 process's checkpoint on 2
    down, up = tmp_path / "down", outs[1]
    subprocess.run(["cp", "-r", str(outs[2]), str(down)], check=True)
    for out, world in ((down, 1), (up, 2)):
        code, _, stderr = launch([stage, "--data", str(run_dir / "data" / data), "--model",
                                  str(model), "--out", str(out), "--steps", "6", "--batch_size", "8",
                                  "--save_every", "2", "--resume", "true", "--allow_config_change", "true"], world)
        assert code == 0, stderr[-3000:]
    assert [r["step"] for r in rows(down)] == [r["step"] for r in rows(up)]
    assert [r["step"] for r in rows(down) if "loss" in r] == list(range(6))
    for x, y in zip(rows(down), rows(up)):
        assert x.keys() == y.keys()
        for key in {"loss", "eval_accuracy"} & x.keys():
            assert x[key] == pytest.approx(y[key], rel=1e-4), (key, x, y)
    assert_same_weights(down, up)


def assert_same_weights(a, b):
    wa = load_file(str(a / "checkpoint" / "model.safetensors"))
    wb = load_file(str(b / "checkpoint" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)


def test_a_config_error_stops_every_rank_with_one_line(small_run, tmp_path):
    code, _, stderr = fastppo(small_run, tmp_path / "run", "--batch_size", "7",
                              "--mini_batch_size", "7", world=2, timeout=120)
    assert code != 0
    for rank in (0, 1):
        assert (f"fastppo ppo (rank {rank}): error: batch_size (7) must be a multiple of the number "
                "of processes (2)") in stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_rank_that_dies_stops_the_others_and_the_run_resumes(small_run, tmp_path):
    # Kill rank 1 once a checkpoint exists: torchrun stops rank 0 (and a rank blocked in a
    # collective would give up after FASTPPO_COLLECTIVE_TIMEOUT_S), the checkpoint is intact, and
    # `--resume true` continues it.
    run_dir, _ = small_run
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "fastppo", "ppo",
               "--prompts", str(run_dir / "data" / "prompts.jsonl"),
               "--policy", str(run_dir / "sft" / "checkpoint"),
               "--reward_model", str(run_dir / "rm" / "checkpoint"), "--out", str(out),
               "--iterations", "200", *SETTINGS]
    env = dict(os.environ, FASTPPO_COLLECTIVE_TIMEOUT_S="20", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "trainer" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in ranks.stdout.split()]
        assert len(pids) == 2, pids
        os.kill(max(pids), signal.SIGKILL)  # the second rank started
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    for pid in pids:  # nothing left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    saved = load_state(out / "checkpoint")["iteration"]
    assert 1 <= saved < 200
    code, stdout, stderr = fastppo(small_run, out, "--resume", "true", iterations=saved + 1)
    assert code == 0, stderr[-3000:]
    assert load_state(out / "checkpoint")["iteration"] == saved + 1


def test_the_pipeline_runs_under_torchrun(small_run, tmp_path):
    # One process group for the three stages; rank 0 prints the JSON once.
    run_dir, _ = small_run
    data = run_dir / "data"
    code, stdout, stderr = launch(
        ["pipeline", "--model", str(run_dir / "base"), "--sft_data", str(data / "sft.jsonl"),
         "--rm_data", str(data / "rm.jsonl"), "--prompts", str(data / "prompts.jsonl"),
         "--out", str(tmp_path), "--sft_steps", "2", "--rm_steps", "2", "--ppo_iterations", "1",
         "--sft", '{"batch_size": 4}', "--rm", '{"batch_size": 4}',
         "--ppo", '{"batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 4}'], world=2)
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout[stdout.index("{"):])
    assert result["ppo"] == str(tmp_path / "ppo" / "checkpoint") and stdout.count("{") == 1
    for stage in ("sft", "rm", "ppo"):
        assert (tmp_path / stage / "checkpoint" / "trainer" / "trainer_state.json").is_file()


def test_share_of_mean_gives_the_single_process_gradient(monkeypatch):
    """The loss normalisation of every trainer: two ranks' share_of_mean losses over their halves of
    a mini-batch, their gradients averaged as FSDP does, equal the single-process token-mean
    gradient (float64, a ppo_loss over a shared LM head)."""
    from fastppo import distributed
    from fastppo.kernels import ppo_loss

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 6, 5, 8, 11
    hidden, head = torch.randn(B, T, H, generator=g, dtype=torch.float64), \
        torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    old, adv = torch.randn(B, T, generator=g, dtype=torch.float64), \
        torch.randn(B, T, generator=g, dtype=torch.float64)

    def grad(rows, reduction, scale):
        w = head.clone().requires_grad_()
        out = ppo_loss(hidden[rows] @ w.T, labels[rows], old[rows], adv[rows], mask[rows],
                       reduction=reduction)
        scale(out.loss).backward()
        return w.grad

    want = grad(slice(None), "token-mean", lambda loss: loss)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    tokens = mask.sum()
    ranks = [grad(rows, "sum", lambda loss: distributed.share_of_mean(loss, tokens))
             for rows in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, want, rtol=1e-12, atol=1e-12)

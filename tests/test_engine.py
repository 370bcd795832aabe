"""The engine: the demo learns, checkpoints load with transformers and resume exactly, the rollout's
log-probs agree with training's, every CLI command runs, and bad input is refused clearly."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastppo import checkpoint, ppo
from fastppo.config import PPOConfig
from fastppo.data import read_jsonl
from fastppo.pipeline import demo

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SMALL = dict(sft_steps=120, rm_steps=120, ppo_iterations=4)
TIMING = ("tokens_per_s", "time_generate", "time_reference", "time_score", "time_train",
          "peak_memory_mib", "iteration_memory_mib")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = demo(str(out), quiet=True, **SMALL)
    return out, summary


def ppo_config(out: Path, target: Path, **overrides) -> PPOConfig:
    cfg = PPOConfig(prompts=str(out / "data" / "prompts.jsonl"), policy=str(out / "sft" / "checkpoint"),
                    reward_model=str(out / "rm" / "checkpoint"), out=str(target), iterations=4,
                    batch_size=16, mini_batch_size=8, max_new_tokens=7, save_every=2, seed=3)
    return replace(cfg, **overrides)


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_learns_the_hidden_preference(tmp_path, seed):
    # The convergence tier: default demo settings, two seeds.
    summary = demo(str(tmp_path), seed=seed, quiet=True)
    assert summary["rm_accuracy"] >= 0.8
    assert summary["oracle_ppo"] - summary["oracle_sft"] >= 0.3
    assert summary["kl"] > 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written) == {"rm_accuracy", "oracle_sft", "oracle_ppo", "kl", "seconds"}
    assert (tmp_path / "ppo" / "ppo.png").stat().st_size > 1000


def test_checkpoints_load_with_transformers(small_run):
    out, _ = small_run
    for stage in ("sft", "rm", "ppo"):
        path = out / stage / "checkpoint"
        lm = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer("the film was good", return_tensors="pt").input_ids
        assert lm(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
        assert (path / "model.safetensors").exists() and (path / "head.safetensors").exists() \
            or stage == "sft"


def test_first_minibatch_sees_ratio_one(small_run):
    out, _ = small_run
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == SMALL["ppo_iterations"]
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows), [r["first_ratio_max_error"]
                                                                   for r in rows]
    for key in ("score_mean", "score_std", "reward", "kl", "entropy", "policy_loss", "value_loss",
                "clipfrac", "approx_kl", "explained_variance", "response_length") + TIMING:
        assert key in rows[0], key


def test_first_minibatch_sees_ratio_one_at_temperature(small_run, tmp_path):
    # at T = 1 a trainer that forgot the temperature somewhere would still see ratio 1
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "hot", iterations=1, temperature=0.6))
    row = json.loads((tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["first_ratio_max_error"] <= 1e-5


def test_sampler_draws_from_the_distribution_the_trainer_scores():
    # The tokens generate() samples at temperature T must follow exp(token_logprobs(logits, T)),
    # the log-probs PPO trains with (temperature applied in both places, the same way).
    from fastppo.data import pack_prompts
    from fastppo.generate import generate
    from fastppo.kernels import token_logprobs
    from fastppo.models import ActorCritic, tiny_llama

    torch.manual_seed(0)
    V, T, n = 12, 0.5, 20000
    lm = tiny_llama(V, hidden=16, layers=1, heads=2).eval()
    with torch.no_grad():  # spread the logits so that T = 0.5 and T = 1 differ clearly
        lm.get_output_embeddings().weight.mul_(40)
    prompts = pack_prompts([[2, 5, 7]] * n, pad_id=0)
    batch = generate(lm, prompts, max_new_tokens=1, temperature=T, top_k=0, top_p=1.0, eos_id=3,
                     pad_id=0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(batch.responses[:, 0], minlength=V).double()

    with torch.no_grad():
        logits, _ = ActorCritic(lm)(batch.input_ids[:1], batch.attention_mask[:1],
                                    batch.response_positions)
        every_label = torch.arange(V)
        p_T = token_logprobs(logits[0, :1].expand(V, V), every_label, temperature=T).exp().double()
        p_1 = token_logprobs(logits[0, :1].expand(V, V), every_label, temperature=1.0).exp().double()
    sigma = (n * p_T * (1 - p_T)).sqrt() + 1
    assert ((counts - n * p_T).abs() <= 5 * sigma).all(), (counts / n, p_T)
    assert ((counts - n * p_1).abs() > 10 * sigma).any()  # the check can tell the temperatures apart


def test_resumed_run_equals_uninterrupted_run(small_run, tmp_path):
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "straight"))
    ppo.train_ppo(ppo_config(out, tmp_path / "resumed", iterations=2))
    ppo.train_ppo(ppo_config(out, tmp_path / "resumed", resume=True))
    rows = {}
    for name in ("straight", "resumed"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]
    assert [r["step"] for r in rows["resumed"]] == [0, 1, 2, 3]
    assert rows["resumed"] == rows["straight"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoint").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_refused(small_run, tmp_path):
    out, _ = small_run
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        ppo.train_ppo(ppo_config(out, tmp_path / "nothing", resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_run, tmp_path, monkeypatch):
    out, _ = small_run
    calls = {"n": 0}
    real = ppo.ppo_loss

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 2:  # iterations 0 and 1 (2 epochs x 2 mini-batches) are fine
            return replace(result, loss=result.loss * float("nan"))
        return result
    monkeypatch.setattr(ppo, "ppo_loss", poisoned)
    with pytest.raises(RuntimeError, match="PPO loss is not finite at iteration 2"):
        ppo.train_ppo(ppo_config(out, tmp_path / "nan"))
    state = torch.load(tmp_path / "nan" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["iteration"] == 2


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "ckpt"
    checkpoint.save_atomic(target, lambda d: (d / "trainer_state.pt").write_text("first"))

    def crash(directory):
        (directory / "trainer_state.pt").write_text("half")
        raise KeyboardInterrupt("killed mid-save")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(target, crash)
    assert (target / "trainer_state.pt").read_text() == "first"
    # A crash between the two renames leaves the previous checkpoint at .old: latest() finds it.
    target.rename(tmp_path / "ckpt.old")
    assert checkpoint.latest(target) == tmp_path / "ckpt.old"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'response' must be a string"):
        read_jsonl(path, "sft")
    path.write_text('{"prompt": "a"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(path, "ppo")


# ------------------------------------------------------------------------------ the CLI, end to end


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
    (["demo", "--ppo_iterations", "0"], "--ppo_iterations must be >= 1"),
])
def test_cli_bad_input(tmp_path, args, message):
    proc = fastppo(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_unknown_yaml_key(tmp_path):
    (tmp_path / "c.yaml").write_text("data: d\nmodel: m\nlearning_rate: 0.1\n")
    proc = fastppo("sft", "--config", tmp_path / "c.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "learning_rate" in proc.stderr


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_model_families(small_run, tmp_path, family):
    # Any local causal-LM directory: a tiny GPT-2 and Qwen2 go through SFT and a PPO iteration (with
    # the Llama reward model of the same tokenizer), and the rollout still agrees with training.
    from transformers import AutoConfig

    from fastppo.config import SFTConfig
    from fastppo.sft import train_sft

    out, _ = small_run
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids)
    else:
        config = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, **ids)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    sft = train_sft(SFTConfig(data=str(out / "data" / "sft.jsonl"), model=str(tmp_path / "base"),
                              out=str(tmp_path / "sft"), steps=2, batch_size=4))
    ppo.train_ppo(ppo_config(out, tmp_path / "ppo", policy=str(sft), iterations=1))
    row = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["first_ratio_max_error"] <= 1e-5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "checkpoint").config.model_type == family


def test_sampling_filters():
    from fastppo.generate import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    # top-p keeps the smallest set whose mass reaches p: 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 1.0)).all()


def test_sample_draws_from_the_distribution():
    from fastppo.generate import sample

    # zero-probability entries first, last and in the middle; 40000 draws of one distribution
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 40000
    draws = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), counts.tolist()
    # all the mass on the last / first entry; reproducible from the seed
    one_hot = torch.zeros(3, 5)
    one_hot[0, 4], one_hot[1, 0], one_hot[2, 2] = 1.0, 1.0, 1.0
    assert sample(one_hot, torch.Generator().manual_seed(1)).tolist() == [4, 0, 2]
    again = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # an unnormalised row (total 4) samples its normalised distribution
    q = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0])
    counts = torch.bincount(sample(q.expand(n, -1), torch.Generator().manual_seed(2)),
                            minlength=len(q)).double()
    p = q / q.sum()
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1e-9).all(), counts.tolist()
    # no mass: refused, not an out-of-range token
    for row in (torch.zeros(5), torch.tensor([0.5, float("nan"), 0.5, 0.0, 0.0])):
        with pytest.raises(ValueError, match="no positive finite mass"):
            sample(torch.stack([torch.full((5,), 0.2), row]), torch.Generator())


def test_sample_never_picks_a_filtered_token():
    from fastppo.generate import filter_logits, sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 1000, generator=g) * 3
    kept = torch.isfinite(filter_logits(logits, 50, 0.9))
    draws = sample(torch.softmax(filter_logits(logits, 50, 0.9), -1), g)
    assert kept.gather(1, draws[:, None]).all()


def test_adaptive_kl_controller_moves_the_coefficient(small_run, tmp_path):
    # Proportional controller: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) / horizon.
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "akl", iterations=3, adaptive_kl=True, kl_target=0.5,
                             kl_horizon=2))
    rows = [json.loads(line) for line in (tmp_path / "akl" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_coef"] == PPOConfig.kl_coef
    for before, after in zip(rows, rows[1:]):
        error = max(-0.2, min(0.2, before["kl"] / 0.5 - 1))
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error / 2), rel=1e-12)
        assert after["kl_coef"] != before["kl_coef"]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_resume_equal_uninterrupted(small_run, tmp_path, stage):
    from fastppo.config import RMConfig, SFTConfig
    from fastppo.rm import train_rm
    from fastppo.sft import train_sft

    out, _ = small_run
    if stage == "sft":
        make = lambda target, **kw: SFTConfig(  # noqa: E731
            data=str(out / "data" / "sft.jsonl"), model=str(out / "base"), out=str(target),
            batch_size=4, save_every=3, **kw)
        train = train_sft
    else:
        make = lambda target, **kw: RMConfig(  # noqa: E731
            data=str(out / "data" / "rm.jsonl"), model=str(out / "sft" / "checkpoint"),
            out=str(target), batch_size=4, save_every=3, **kw)
        train = train_rm
    train(make(tmp_path / "straight", steps=6))
    train(make(tmp_path / "resumed", steps=3))
    train(make(tmp_path / "resumed", steps=6, resume=True))
    rows = {}
    for name in ("straight", "resumed"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
                      for line in lines]
    assert rows["resumed"] == rows["straight"]


def test_pipeline_stage_overrides_are_checked(small_run, tmp_path):
    from fastppo.pipeline import PipelineConfig, run_pipeline

    out, _ = small_run
    data = out / "data"
    base = dict(model=str(out / "base"), sft_data=str(data / "sft.jsonl"),
                rm_data=str(data / "rm.jsonl"), prompts=str(data / "prompts.jsonl"),
                out=str(tmp_path), sft_steps=1, rm_steps=1, ppo_iterations=1)
    with pytest.raises(ValueError, match="ppo: 'klcoef' is not a PPOConfig field"):
        run_pipeline(PipelineConfig(**base, ppo={"klcoef": 0.1}))
    with pytest.raises(ValueError, match="sft: 'data' is not a SFTConfig field the pipeline lets"):
        run_pipeline(PipelineConfig(**base, sft={"data": "x"}))
    with pytest.raises(ValueError, match="mini_batch_size \\(128\\) must not exceed"):
        run_pipeline(PipelineConfig(**base, ppo={"mini_batch_size": 128}))
    assert not (tmp_path / "sft").exists()  # refused before any work

"""The trainers: the demo learns, checkpoints load with transformers and resume exactly, the first PPO
mini-batch sees ratio 1, a non-finite loss stops the run, other model families train."""
import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import SMALL
from engine_testing import PHASES, TIMING, ppo_config
from fastppo import ppo
from fastppo.checkpoint import load_state
from fastppo.models import HEAD_FILE, VALUE_HEAD
from fastppo.config import PPOConfig
from fastppo.data import read_jsonl
from fastppo.demo import DemoConfig, demo

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_learns_the_hidden_preference(tmp_path, seed):
    # The convergence tier: default demo settings, two seeds.
    summary = demo(DemoConfig(str(tmp_path), seed=seed), quiet=True)
    assert summary["rm_accuracy"] >= 0.8
    assert summary["oracle_ppo"] - summary["oracle_sft"] >= 0.3
    assert summary["kl"] > 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written) == {"rm_accuracy", "oracle_sft", "oracle_ppo", "kl", "seconds"}
    assert (tmp_path / "ppo" / "ppo.png").stat().st_size > 1000


@pytest.mark.parametrize("seed", [0, 1])
def test_arithmetic_demo_learns_from_a_verifier(tmp_path, seed):
    # `fastppo demo --task arithmetic`: GRPO on a reward function, no reward model, no critic.
    # Measured (2-core AMD EPYC): 0.305 -> 0.570 (seed 0), 0.302 -> 0.615 (seed 1); on a 2-core
    # Intel Xeon (avx512_bf16, 2026-12-06) seed 1 went 0.383 -> 0.47-0.49 (another CPU's matmul
    # rounding, another trajectory; the same with the native kernels' previous exp).
    summary = demo(DemoConfig(str(tmp_path), seed=seed, task="arithmetic"), quiet=True)
    assert summary["accuracy_ppo"] - summary["accuracy_sft"] >= 0.08, summary
    with pytest.raises(ValueError, match="task must be one of"):
        DemoConfig(task="chess").check()


@pytest.mark.parametrize("seed", [0, 1])
def test_tools_demo_learns_to_call_the_calculator(tmp_path, seed):
    # `fastppo demo --task tools`: GRPO on multi-turn episodes with a tool, rewarded on the final
    # answer. Measured (2-core AMD EPYC, 2026-12-06), held-out accuracy / tool-call rate:
    # seed 0 0.445 -> 0.973 / 0.461 -> 1.000; seed 1 0.266 -> 0.840 / 0.352 -> 0.996.
    summary = demo(DemoConfig(str(tmp_path), seed=seed, task="tools"), quiet=True)
    assert summary["tool_call_rate_ppo"] - summary["tool_call_rate_sft"] >= 0.25, summary
    assert summary["accuracy_ppo"] - summary["accuracy_sft"] >= 0.25, summary
    assert summary["turns_per_episode_ppo"] > summary["turns_per_episode_sft"], summary
    metrics = [json.loads(line) for line in
               (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["first_ratio_max_error"] <= 1e-5 and r["env_errors"] == 0 for r in metrics)
    assert metrics[-1]["tool_calls"] > metrics[0]["tool_calls"]


def test_checkpoints_load_with_transformers(small_run):
    # the policies as causal LMs (PPO's value head beside), the reward model as a sequence
    # classifier (tests/engine/test_reward_models.py checks its scores)
    out, _ = small_run
    for stage in ("sft", "rm", "ppo"):
        path = out / stage / "checkpoint"
        auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        model, info = auto.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (stage, info)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer("the film was good", return_tensors="pt").input_ids
        width = 1 if stage == "rm" else len(tokenizer)
        assert model(ids).logits.shape[-1] == width
        # vLLM takes every top-level *.safetensors for a weight shard: the model's file alone
        assert [f.name for f in path.glob("*.safetensors")] == ["model.safetensors"]
        assert (path / VALUE_HEAD).exists() == (stage == "ppo")


def test_first_minibatch_sees_ratio_one(small_run):
    out, _ = small_run
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == SMALL["ppo_iterations"]
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows), [r["first_ratio_max_error"]
                                                                   for r in rows]
    for key in ("score_mean", "score_std", "reward", "kl", "entropy", "policy_loss", "value_loss",
                "clipfrac", "approx_kl", "explained_variance", "response_length", "sampler_gap_mean",
                "sampler_gap_max", "sampler_kl") + TIMING:
        assert key in rows[0], key
    cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    for r in rows:  # the phases add up to the iteration (tokens_per_s: its response tokens x 3)
        assert all(r[k] >= 0 for k in PHASES) and r["time_old_logprobs"] > 0, r
        tokens = r["response_length"] * cfg["batch_size"] * (1 + cfg["ppo_epochs"])
        assert sum(r[k] for k in PHASES) == pytest.approx(tokens / r["tokens_per_s"], rel=1e-4), r
    # the built-in sampler drew from the distribution the trainer scores (float32 rounding apart:
    # its KV-cached forward sums in another order than the trainer's)
    assert all(r["sampler_gap_max"] < 1e-4 and abs(r["sampler_kl"]) < 1e-7 for r in rows), rows


def test_first_minibatch_sees_ratio_one_at_temperature(small_run, tmp_path):
    # at T = 1 a trainer that forgot the temperature somewhere would still see ratio 1
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "hot", iterations=1, temperature=0.6))
    row = json.loads((tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["first_ratio_max_error"] <= 1e-5


@pytest.mark.parametrize("layout", ["current", "older"])
def test_resumed_run_equals_uninterrupted_run(small_run, tmp_path, layout):
    out, _ = small_run
    # the current layout's run also adapts its KL coefficient: the controller resumes too
    kl = dict(adaptive_kl=True, kl_target=0.5, kl_horizon=2) if layout == "current" else {}
    ppo.train_ppo(ppo_config(out, tmp_path / "straight", **kl))
    ppo.train_ppo(ppo_config(out, tmp_path / "resumed", iterations=2, **kl))
    if layout == "older":  # before trainer/: the state and value head beside the model
        found = tmp_path / "resumed" / "checkpoint"
        (found / VALUE_HEAD).rename(found / HEAD_FILE)
        for f in (found / "trainer").iterdir():
            f.rename(found / f.name)
        (found / "trainer").rmdir()
    ppo.train_ppo(ppo_config(out, tmp_path / "resumed", resume=True, **kl))
    rows = {}
    for name in ("straight", "resumed"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]
    assert [r["step"] for r in rows["resumed"]] == [0, 1, 2, 3]
    assert rows["resumed"] == rows["straight"]
    if kl:  # the coefficient moved before the resume and went on moving after it
        coefs = [r["kl_coef"] for r in rows["resumed"]]
        assert len(set(coefs)) == 4, coefs
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoint").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


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


def test_resume_without_checkpoint_is_refused(small_run, tmp_path):
    out, _ = small_run
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        ppo.train_ppo(ppo_config(out, tmp_path / "nothing", resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_run, tmp_path, monkeypatch):
    out, _ = small_run
    calls = {"n": 0}

    def poison(real):
        def poisoned(*args, **kwargs):
            result = real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] > 2 * 2 * 2:  # iterations 0 and 1 (2 epochs x 2 mini-batches) are fine
                return replace(result, loss=result.loss * float("nan"))
            return result
        return poisoned
    from fastppo.heads import TokenHead

    monkeypatch.setattr(TokenHead, "ppo_loss", poison(TokenHead.ppo_loss))  # either LM head path
    with pytest.raises(RuntimeError, match="PPO loss is not finite at iteration 2"):
        ppo.train_ppo(ppo_config(out, tmp_path / "nan"))
    state = load_state(tmp_path / "nan" / "checkpoint")
    assert state["iteration"] == 2


class NaNGradient(torch.autograd.Function):
    """The identity forward (a finite loss), NaN backward: a gradient that diverged on its own."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def sft_run(small_run, target, **overrides):
    from fastppo.config import SFTConfig
    from fastppo.sft import train_sft

    out, _ = small_run
    settings = dict(steps=4, batch_size=4, save_every=1) | overrides
    return train_sft(SFTConfig(data=str(out / "data" / "sft.jsonl"), model=str(out / "base"),
                               out=str(target), **settings))


def assert_last_good_checkpoint(directory, step):
    assert load_state(directory)["step"] == step
    weights = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_gradient_stops_before_the_step(small_run, tmp_path, monkeypatch):
    # A finite loss whose gradient is NaN at step 2: the run stops before the optimizer step, so no
    # NaN weight is ever written (before: step 2 wrote NaN weights into the checkpoint of step 3).
    from fastppo.heads import TokenHead

    calls, real = {"n": 0}, TokenHead.logprobs

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        lp = real(*args, **kwargs)
        return NaNGradient.apply(lp) if calls["n"] == 3 else lp
    monkeypatch.setattr(TokenHead, "logprobs", poisoned)
    with pytest.raises(RuntimeError, match="SFT gradient norm is not finite at step 2"):
        sft_run(small_run, tmp_path / "run")
    assert_last_good_checkpoint(tmp_path / "run" / "checkpoint", 2)


def test_non_finite_weights_are_never_saved(small_run, tmp_path, monkeypatch):
    # The optimizer step itself overflows (finite gradients, NaN weights after step 2): the save
    # refuses, and the checkpoint of step 2 stays.
    calls, real = {"n": 0}, torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    with pytest.raises(RuntimeError, match="the weights are not finite at step 3; stopping without"):
        sft_run(small_run, tmp_path / "run")
    assert_last_good_checkpoint(tmp_path / "run" / "checkpoint", 2)


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


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'response' must be a string"):
        read_jsonl(path, "sft")
    path.write_text('{"prompt": "a"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(path, "ppo")



def test_prompts_are_limited_from_the_left_keeping_bos():
    from fastppo.data import limit_prompts

    prompts = [[2, 10, 11, 12, 13], [2, 10], [10, 11, 12]]
    assert limit_prompts(prompts, 0, False, 2) == prompts
    assert limit_prompts(prompts, 3, True, 2) == [[2, 12, 13], [2, 10], [10, 11, 12]]
    assert limit_prompts([[10, 11, 12, 13]], 2, True, 2) == [[12, 13]]  # no BOS to keep
    with pytest.raises(ValueError, match="prompt 0 has 5 tokens, more than max_prompt_length=4"):
        limit_prompts(prompts, 4, False, 2)


def test_truncated_prompts_train(small_run, tmp_path):
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "cut", iterations=1, max_prompt_length=3,
                             truncate_prompts=True))
    row = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["first_ratio_max_error"] <= 1e-5


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_limit_prompts_as_ppo_does(small_run, tmp_path, stage):
    # A prompt longer than the model's 128 positions: refused by the context check, or by
    # max_prompt_length, or cut from the left to fit, keeping the BOS.
    from fastppo.config import RMConfig, SFTConfig
    from fastppo.rm import train_rm
    from fastppo.sft import train_sft

    out, _ = small_run
    kind = "sft" if stage == "sft" else "rm"
    rows = read_jsonl(out / "data" / f"{kind}.jsonl", kind)[:16]
    rows[0]["prompt"] = " ".join(["the film was"] * 60)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    make, train = ((SFTConfig, train_sft) if stage == "sft" else (RMConfig, train_rm))
    model = out / "base" if stage == "sft" else out / "sft" / "checkpoint"

    def config(name, **kw):
        return make(data=str(data), model=str(model), out=str(tmp_path / name), steps=1,
                    batch_size=4, **kw)
    with pytest.raises(ValueError, match="prompt \\+ response of .* more than the 128 positions"):
        train(config("plain"))
    with pytest.raises(ValueError, match="prompt 0 has 181 tokens, more than max_prompt_length=16"):
        train(config("refused", max_prompt_length=16))
    train(config("cut", max_prompt_length=16, truncate_prompts=True))
    assert (tmp_path / "cut" / "checkpoint").is_dir()


def test_fused_linear_path_equals_the_logits_path(small_run, tmp_path, monkeypatch):
    # PPO with log-probs and the loss from hidden states (the default) against the logits path: the
    # same run up to float32 rounding, and no (tokens, vocabulary) logits in the fused one (the LM
    # head runs only on the sampler's last positions, 2-D inputs).
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "logits", iterations=2, fused_linear=False))
    head_inputs, real = [], torch.nn.Linear.forward
    vocab = AutoTokenizer.from_pretrained(out / "sft" / "checkpoint").__len__()

    def watched(self, x):
        if self.out_features == vocab:  # the LM head
            head_inputs.append(x.dim())
        return real(self, x)
    monkeypatch.setattr(torch.nn.Linear, "forward", watched)
    ppo.train_ppo(ppo_config(out, tmp_path / "fused", iterations=2))
    assert head_inputs and set(head_inputs) == {2}
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
                   .splitlines()] for name in ("logits", "fused")}
    for a, b in zip(rows["logits"], rows["fused"]):
        assert a["response_length"] == b["response_length"]
        assert b["first_ratio_max_error"] <= 1e-5
        for key in ("score_mean", "reward", "kl", "entropy", "policy_loss", "value_loss",
                    "clipfrac", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = load_file(str(tmp_path / "logits" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "fused" / "checkpoint" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4)

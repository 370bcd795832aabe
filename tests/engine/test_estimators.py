"""Rewards from Python functions, groups of samples per prompt, the critic-free estimators (grpo,
rloo, reinforce++), the KL in the loss, the loss reductions: hand-computed cases and short runs on
the small demo run's checkpoints."""
import json
from collections import Counter
import math
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from engine_testing import ppo_config
from fastppo import ppo, rewards
from fastppo.kernels import masked_whiten

REWARDS_MODULE = textwrap.dedent('''
    import math
    SEEN = []

    def words(prompts, responses, prompt_ids, response_ids):
        SEEN.append(list(prompts))
        return [float(len(r.split())) / 7 for r in responses]

    def one(prompts, responses, prompt_ids, response_ids):
        return [1.0] * len(responses)

    def nan_first(prompts, responses, prompt_ids, response_ids):
        return [math.nan] + [0.5] * (len(responses) - 1)

    def short(prompts, responses, prompt_ids, response_ids):
        return [0.0] * (len(responses) - 1)

    def scalar(prompts, responses, prompt_ids, response_ids):
        return 1.0

    def text(prompts, responses, prompt_ids, response_ids):
        return ["10"] * len(responses)

    def flaky(prompts, responses, prompt_ids, response_ids):
        if len(responses) > 1:
            raise TimeoutError("the verifier timed out")
        return [0.25]

    def boom_on_film(prompts, responses, prompt_ids, response_ids):
        if any("film" in p for p in prompts):
            raise RuntimeError("no films")
        return [0.0] * len(responses)
''')


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# --- the estimators on hand-computed cases ----------------------------------------------------------

def test_estimators_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    token_rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    cfg = SimpleNamespace(advantage_estimator="grpo", samples_per_prompt=2, scale_by_std=False,
                          gamma=0.5)
    # groups (rows 0, 1) totals 1, 3 and (rows 2, 3) totals 2, 1: Dr. GRPO centres them
    adv, returns = ppo.estimate_advantages(cfg, token_rewards, None, mask)
    want = torch.tensor([-1.0, 1.0, 0.5, -0.5])[:, None] * mask
    assert returns is None and torch.equal(adv, want)
    cfg.scale_by_std = True  # std of (1, 3) is sqrt(2), of (2, 1) sqrt(0.5)
    adv, _ = ppo.estimate_advantages(cfg, token_rewards, None, mask)
    torch.testing.assert_close(adv, torch.tensor([-1, 1, 1, -1.0])[:, None] / math.sqrt(2) * mask,
                               rtol=1e-5, atol=1e-5)
    cfg.advantage_estimator = "rloo"  # groups of 2: the score minus the other sample's
    adv, _ = ppo.estimate_advantages(cfg, token_rewards, None, mask)
    torch.testing.assert_close(adv, torch.tensor([-2.0, 2.0, 1.0, -1.0])[:, None] * mask)
    cfg.advantage_estimator = "reinforce++"  # returns at gamma 0.5, whitened over the batch
    adv, _ = ppo.estimate_advantages(cfg, token_rewards, None, mask)
    returns = torch.tensor([[0.5, 1.0, 0.0], [0.75, 1.5, 3.0], [2.0, 0.0, 0.0], [0.75, 0.5, 0.0]])
    torch.testing.assert_close(adv, masked_whiten(returns, mask))


# --- reward functions --------------------------------------------------------------------------------

def test_reward_function_errors_name_the_function_and_the_row(reward_module):
    args = (["the film was", "a plot"], ["good", "bad"], [[1], [2]], [[3], [4]])
    with pytest.raises(ValueError, match=r"my_rewards:nan_first' returned nan for row 10"):
        rewards.score(rewards.load("my_rewards:nan_first"), "my_rewards:nan_first", *args, rows=[10, 11])
    with pytest.raises(ValueError, match=r"returned 1 values for 2 responses"):
        rewards.score(rewards.load("my_rewards:short"), "my_rewards:short", *args)
    with pytest.raises(ValueError, match=r"raised RuntimeError: no films on row 0"):
        rewards.score(rewards.load("my_rewards:boom_on_film"), "my_rewards:boom_on_film", *args)
    values, errors = rewards.score(rewards.load("my_rewards:boom_on_film"), "my_rewards:boom_on_film",
                                   *args, error_value=-1.0)
    assert (values, errors) == ([-1.0, 0.0], 1)
    # no row to blame: fatal even with reward_fn_error_value (never a silent constant reward)
    with pytest.raises(ValueError, match="returned float, not a list of one float per response"):
        rewards.score(rewards.load("my_rewards:scalar"), "my_rewards:scalar", *args, error_value=-1.0)
    with pytest.raises(ValueError, match="returned str '10' for row 0, not a number"):
        rewards.score(rewards.load("my_rewards:text"), "my_rewards:text", *args)
    with pytest.raises(ValueError, match="on none of them alone"):
        rewards.score(rewards.load("my_rewards:flaky"), "my_rewards:flaky", *args)
    assert rewards.score(rewards.load("my_rewards:flaky"), "my_rewards:flaky", *args,
                         error_value=-1.0) == ([0.25, 0.25], 0)
    with pytest.raises(ValueError, match="must be 'module:function'"):
        rewards.load("my_rewards.words")
    with pytest.raises(ValueError, match="has no function 'nothing'"):
        rewards.load("my_rewards:nothing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        rewards.load("no_such_module:f")


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_critic_free_runs_keep_ratio_one_and_leave_the_value_head(small_run, tmp_path, reward_module,
                                                                estimator):
    out, _ = small_run
    target = tmp_path / estimator
    ppo.train_ppo(ppo_config(out, target, iterations=2, reward_model=None,
                             reward_fn="my_rewards:words", advantage_estimator=estimator,
                             samples_per_prompt=4, kl_in_loss=estimator == "grpo",
                             loss_reduction="seq-mean-token-mean", clip_eps_high=0.28))
    rows = metrics(target)
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows)
    assert all(r["value_loss"] == 0 and math.isnan(r["explained_variance"]) for r in rows)
    assert all(r["reward_fn_errors"] == 0 for r in rows)
    from safetensors.torch import load_file
    from fastppo.models import VALUE_HEAD
    head = load_file(str(target / "checkpoint" / VALUE_HEAD))
    assert all(not t.any() for t in head.values()), "the value head was trained"
    # each drawn prompt was sampled 4 times (the reward function sees them in mini-batch order)
    for call_pairs in (sys.modules[reward_module].SEEN[:2], sys.modules[reward_module].SEEN[2:]):
        seen = Counter(p for call in call_pairs for p in call)
        assert sum(seen.values()) == 16 and all(n % 4 == 0 for n in seen.values()), seen


def test_reward_function_and_model_add_with_their_weights(small_run, tmp_path, reward_module):
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "rm", iterations=1))
    ppo.train_ppo(ppo_config(out, tmp_path / "both", iterations=1, reward_fn="my_rewards:one",
                             reward_fn_weight=2.0, reward_model_weight=0.5))
    rm, both = metrics(tmp_path / "rm")[0], metrics(tmp_path / "both")[0]
    assert both["score_mean"] == pytest.approx(0.5 * rm["score_mean"] + 2.0, abs=1e-5)


def test_kl_in_loss_keeps_it_out_of_the_rewards(small_run, tmp_path):
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "kl", iterations=2, kl_in_loss=True, kl_coef=0.5))
    rows = metrics(tmp_path / "kl")
    assert all(r["reward"] == pytest.approx(r["score_mean"], abs=1e-5) for r in rows)
    assert rows[1]["kl"] != 0


def test_a_failing_reward_function_stops_the_run_or_is_counted(small_run, tmp_path, reward_module):
    out, _ = small_run
    with pytest.raises(ValueError, match=r"my_rewards:nan_first' returned nan for row \d+"):
        ppo.train_ppo(ppo_config(out, tmp_path / "stop", iterations=1, reward_fn="my_rewards:nan_first"))
    ppo.train_ppo(ppo_config(out, tmp_path / "count", iterations=1, reward_fn="my_rewards:nan_first",
                             reward_fn_error_value=-1.0))
    assert metrics(tmp_path / "count")[0]["reward_fn_errors"] == 2  # one per mini-batch call


@pytest.mark.parametrize("overrides, message", [
    (dict(reward_model=None), "give reward_model, reward_fn, env or several"),
    (dict(samples_per_prompt=3), r"samples_per_prompt \(3\) must divide batch_size \(16\)"),
    (dict(advantage_estimator="grpo"), "samples_per_prompt must be >= 2"),
    (dict(advantage_estimator="ppo"), "advantage_estimator must be one of"),
    (dict(loss_reduction="sum"), "loss_reduction must be one of"),
    (dict(reward_fn="my_rewards.words"), "reward_fn must be 'module:function'"),
    (dict(kl_loss_estimator="k4"), "kl_loss_estimator must be one of"),
])
def test_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ppo_config(tmp_path, tmp_path / "x", **overrides).check()

"""The seams the next features land on: the loop never names a rollout engine (engines come from the
lazy registry and own their checks, construction and weight sync), model calls take a Batch, and the
loop does not branch on logits vs hidden states."""
import ast
import json
import re
from pathlib import Path

import pytest
import torch

from engine_testing import ppo_config
from fastppo import ppo, rollout
from fastppo.data import Batch
from fastppo.rollout.hf import HFRollout

FASTPPO = Path(__file__).resolve().parents[2] / "fastppo"


def sources(exclude: str):
    return [(p, p.read_text()) for p in FASTPPO.rglob("*.py") if exclude not in p.parts]


def test_no_engine_is_named_outside_fastppo_rollout():
    # The config inherits an engine's own settings (VLLMOptions) and the demo samples with the
    # built-in engine to evaluate a policy; no module branches on the engine's name, and the loops
    # reach engines through the registry only.
    for path, text in sources("rollout"):
        assert not re.search(r"rollout_engine\s*(==|!=|\bin\b)", text), path
    for loop in ("ppo.py", "sft.py", "rm.py", "pipeline.py", "cli.py", "prepare.py", "models.py"):
        text = (FASTPPO / loop).read_text()
        assert not re.search(r"fastppo\.rollout\.(hf|vllm)|VLLMRollout|HFRollout", text), loop


def test_the_loop_does_not_branch_on_the_lm_head_path():
    tree = ast.parse((FASTPPO / "ppo.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for name in ("fusable_head", "linear_ppo_loss", "linear_token_logprobs", "hidden_only"):
        assert name not in names | attributes, name


def test_every_registered_engine_has_the_interface():
    for name in rollout.ENGINES:
        cls = rollout.engine_class(name)
        for method in ("preflight", "from_config", "sync", "generate"):
            assert callable(getattr(cls, method, None)), (name, method)
    with pytest.raises(ValueError, match=r"rollout_engine must be one of \('hf', 'vllm'\); got 'x'"):
        rollout.engine_class("x")


class CountingRollout(HFRollout):
    """The built-in engine, counting its lifecycle calls: registered under "hf" by the test."""
    calls = []

    @classmethod
    def preflight(cls, cfg):
        cls.calls.append("preflight")

    def sync(self, model):
        self.calls.append("sync")

    def generate(self, prompts, **kwargs):
        self.calls.append("generate")
        return super().generate(prompts, **kwargs)


def test_the_loop_takes_its_engine_from_the_registry(small_run, tmp_path, monkeypatch):
    out, _ = small_run
    monkeypatch.setitem(rollout.ENGINES, "hf", f"{__name__}:CountingRollout")
    CountingRollout.calls.clear()
    ppo.train_ppo(ppo_config(out, tmp_path / "run", iterations=2, save_every=2))
    assert CountingRollout.calls == ["preflight", "sync", "generate", "sync", "generate"]
    # without top-k/top-p the whole KL is the untruncated policy's
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["kl_truncation"] == 0.0 and row["kl_untruncated"] == row["kl"], row


def test_model_calls_take_a_batch_and_per_token_tensors_follow_the_rows():
    from fastppo.models import ActorCritic, PolicyLM, tiny_llama

    torch.manual_seed(0)
    lm = tiny_llama(30, hidden=16, layers=1, heads=2).eval()
    ids = torch.randint(4, 30, (3, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    batch = Batch(ids, mask, mask[:, 2:], 2).with_tokens(advantages=torch.arange(12.0).view(3, 4))
    states, values = ActorCritic(lm)(batch)
    assert states.shape == (3, 4, 30) and values.shape == (3, 4)
    torch.testing.assert_close(PolicyLM(lm)(batch), states)
    picked = batch.select(torch.tensor([2, 0]))
    assert torch.equal(picked.per_token["advantages"], torch.tensor([[8.0, 9, 10, 11], [0, 1, 2, 3]]))
    torch.testing.assert_close(PolicyLM(lm)(picked), states[[2, 0]])

"""bf16 mixed precision and gradient checkpointing: every forward of a run at one precision (the
first PPO mini-batch sees ratio 1 and the KL to the reference starts at 0 in bf16 too), the heads in
float32, and checkpointing that recomputes the layers without changing a single number."""
import json

import pytest
import torch

from engine_testing import TIMING, ppo_config
from fastppo import ppo
from fastppo.config import RMConfig, SFTConfig
from fastppo.data import Batch
from fastppo.models import (ActorCritic, enable_gradient_checkpointing, eval_mode, precision,
                            tiny_llama)
from fastppo.rm import train_rm
from fastppo.sft import train_sft

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.endswith("_per_s")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_bf16_runs_the_matmuls_in_bf16_and_the_heads_in_float32():
    torch.manual_seed(0)
    model = eval_mode(ActorCritic(tiny_llama(40)))
    ids = torch.randint(4, 40, (2, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with precision("cpu", "bfloat16"):
        logits, values = model(Batch.sequences(ids, mask))
    assert logits.dtype == torch.bfloat16 and values.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights
    with precision("cpu", "float32"):
        logits32, values32 = model(Batch.sequences(ids, mask))
    assert logits32.dtype == torch.float32
    assert not torch.equal(logits.float(), logits32)  # bf16 did change the numbers...
    torch.testing.assert_close(logits.float(), logits32, atol=0.05, rtol=0.05)  # ...by rounding


def test_bf16_ppo_sees_ratio_one_and_starts_at_zero_kl(small_run, tmp_path):
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "bf16", iterations=2, dtype="bfloat16"))
    ppo.train_ppo(ppo_config(out, tmp_path / "fp32", iterations=2))
    bf16, fp32 = metrics(tmp_path / "bf16"), metrics(tmp_path / "fp32")
    # the rollout's log-probs and training's come from the same bf16 forward: ratio exactly 1
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in bf16), bf16
    # the reference runs at the policy's precision: identical weights give identical log-probs
    assert bf16[0]["kl"] == 0.0
    assert bf16[0]["score_mean"] != fp32[0]["score_mean"]  # bf16 was used...
    assert bf16[0]["score_mean"] == pytest.approx(fp32[0]["score_mean"], rel=0.05)  # ...rounding only


def one_layer_calls(model):
    """Counts the calls of the first decoder layer's attention: one per forward, and one more per
    backward when the layer is checkpointed (recomputed)."""
    calls = []
    model.lm.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ActorCritic(tiny_llama(40))
        if checkpointing:
            enable_gradient_checkpointing(model.lm)
        eval_mode(model)  # as the PPO loop runs it: dropout off, checkpointing still on
        counted = one_layer_calls(model)
        ids = torch.randint(4, 40, (3, 11))
        mask = torch.ones_like(ids, dtype=torch.bool)
        logits, values = model(Batch(ids, mask, mask[:, 5:], 5))  # positions 4 .. 9
        (logits.logsumexp(-1).mean() + values.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(len(counted))
    assert calls == [1, 2]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


def test_gradient_checkpointing_leaves_ppo_unchanged(small_run, tmp_path):
    out, _ = small_run
    ppo.train_ppo(ppo_config(out, tmp_path / "plain", iterations=2))
    ppo.train_ppo(ppo_config(out, tmp_path / "ckpt", iterations=2, gradient_checkpointing=True))
    assert metrics(tmp_path / "ckpt") == metrics(tmp_path / "plain")


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_train_in_bf16_with_checkpointing(small_run, tmp_path, stage):
    out, _ = small_run
    data = out / "data"
    rows = {}
    for name, extra in (("fp32", {}), ("bf16", {"dtype": "bfloat16", "gradient_checkpointing": True})):
        if stage == "sft":
            train_sft(SFTConfig(data=str(data / "sft.jsonl"), model=str(out / "base"),
                                out=str(tmp_path / name), steps=3, batch_size=8, **extra))
        else:
            train_rm(RMConfig(data=str(data / "rm.jsonl"), model=str(out / "sft" / "checkpoint"),
                              out=str(tmp_path / name), steps=3, batch_size=8, **extra))
        rows[name] = metrics(tmp_path / name)
    losses = [[r["loss"] for r in rows[name] if "loss" in r] for name in ("fp32", "bf16")]
    assert losses[0] != losses[1]
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


@pytest.mark.parametrize("dtype", ["float16", "bf16", "fp32"])
def test_unknown_dtype_is_refused_before_any_work(small_run, tmp_path, dtype):
    out, _ = small_run
    with pytest.raises(ValueError, match=rf"dtype must be one of \('float32', 'bfloat16'\); "
                                         rf"got '{dtype}'"):
        ppo.train_ppo(ppo_config(out, tmp_path / "run", dtype=dtype))
    assert not (tmp_path / "run").exists()

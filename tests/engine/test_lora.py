"""LoRA (peft): PPO's reference is the policy with its adapters off (equal to the frozen base, no
second copy), only the adapters and heads train, checkpoints hold the merged model (what
from_pretrained and vLLM load) and the adapter in peft's format, and runs resume exactly."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_testing import TIMING, ppo_config
from fastppo import ppo
from fastppo.checkpoint import load_state
from fastppo.config import RMConfig, SFTConfig
from fastppo.data import Batch
from fastppo.lora import ADAPTER, adapters_off, add_lora
from fastppo.models import ActorCritic, eval_mode, load_reward_model, save_model, tiny_llama
from fastppo.rm import train_rm
from fastppo.sft import train_sft

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
LORA = SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                       lora_target_modules=["all-linear"])


def metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.endswith("_per_s")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


class NoTokenizer:
    def save_pretrained(self, directory):
        pass


@torch.no_grad()
def test_adapters_off_is_the_base_model_and_the_merged_save_is_the_adapted_one(tmp_path):
    torch.manual_seed(0)
    lm = tiny_llama(60)
    base = tiny_llama(60)
    base.load_state_dict(lm.state_dict())
    add_lora(lm, LORA)
    for name, p in lm.named_parameters():
        assert p.requires_grad == (".lora_" in name), name  # the base frozen
        if "lora_B" in name:  # B starts at 0 (adapted == base); give it a trained-like value
            torch.nn.init.normal_(p, std=0.1)
    model = eval_mode(ActorCritic(lm))
    ids = torch.randint(4, 60, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    adapted, _ = model(Batch.sequences(ids, mask))  # positions 0 .. L-2
    with adapters_off(model.lm):
        reference, _ = model(Batch.sequences(ids, mask))
    want = base.eval()(ids, attention_mask=mask).logits[:, :-1]
    assert torch.equal(reference, want)
    assert not torch.allclose(adapted, want, atol=1e-3)
    adapted, _ = model(Batch.sequences(ids, mask))  # the adapters are back on after the block
    save_model(model, NoTokenizer(), tmp_path)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert [f.name for f in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    torch.testing.assert_close(merged.eval()(ids, attention_mask=mask).logits[:, :-1], adapted,
                               rtol=1e-5, atol=1e-5)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, tmp_path / ADAPTER).eval()
    assert torch.equal(peft_model(ids, attention_mask=mask).logits[:, :-1], adapted)


def test_lora_ppo_trains_adapters_against_the_adapter_free_reference(small_run, tmp_path):
    out, _ = small_run
    lora = dict(lora_rank=4, lora_alpha=8.0)
    ppo.train_ppo(ppo_config(out, tmp_path / "straight", **lora))
    rows = metrics(tmp_path / "straight")
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows)
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0  # B = 0 at the start: the policy is the base
    checkpoint = tmp_path / "straight" / "checkpoint"
    trained = load_state(checkpoint)["optimizer"]["param_groups"][0]["params"]
    policy = AutoModelForCausalLM.from_pretrained(checkpoint)
    adapted = [m for m in policy.modules() if isinstance(m, torch.nn.Linear)][:-1]  # not the head
    assert len(trained) == 2 * len(adapted) + 2  # A and B per linear layer, the value head's 2
    # resume with adapters: the same run
    ppo.train_ppo(ppo_config(out, tmp_path / "resumed", iterations=2, **lora))
    ppo.train_ppo(ppo_config(out, tmp_path / "resumed", resume=True, **lora))
    assert metrics(tmp_path / "resumed") == rows


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_lora_sft_and_rm_train_and_resume(small_run, tmp_path, stage):
    out, _ = small_run
    data = out / "data"
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, batch_size=8, save_every=2)
    if stage == "sft":
        run = lambda target, **kw: train_sft(SFTConfig(  # noqa: E731
            data=str(data / "sft.jsonl"), model=str(out / "base"), out=str(target), **lora, **kw))
    else:
        run = lambda target, **kw: train_rm(RMConfig(  # noqa: E731
            data=str(data / "rm.jsonl"), model=str(out / "sft" / "checkpoint"), out=str(target),
            **lora, **kw))
    run(tmp_path / "straight", steps=4)
    run(tmp_path / "resumed", steps=2)
    run(tmp_path / "resumed", steps=4, resume=True)
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint"
    assert (checkpoint / ADAPTER / "adapter_config.json").is_file()
    if stage == "rm":  # a standard classifier, its score head trained whole
        trained = load_state(checkpoint)["optimizer"]["param_groups"][0]["params"]
        assert len(trained) == 2 * 14 + 1  # A and B on the 7 linear layers of 2 decoder layers, score
        assert load_reward_model(checkpoint).model.score.weight.abs().sum() > 0


def test_bad_lora_settings_are_refused(small_run, tmp_path, monkeypatch):
    out, _ = small_run
    with pytest.raises(ValueError, match=r"lora_target_modules \['nope'\]: .*not found"):
        ppo.train_ppo(ppo_config(out, tmp_path / "a", lora_rank=4, lora_target_modules=["nope"]))
    with pytest.raises(ValueError, match="lora_dropout must be 0 for PPO"):
        ppo.train_ppo(ppo_config(out, tmp_path / "b", lora_rank=4, lora_dropout=0.1))
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        ppo.train_ppo(ppo_config(out, tmp_path / "c", lora_rank=-1))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ValueError, match=r"needs peft.*pip install 'fastppo\[lora\]'"):
        ppo.train_ppo(ppo_config(out, tmp_path / "d", lora_rank=4))


def test_resume_refuses_an_adapter_of_other_layers(small_run, tmp_path):
    out, _ = small_run
    settings = dict(data=str(out / "data" / "sft.jsonl"), model=str(out / "base"),
                    out=str(tmp_path / "run"), batch_size=8, lora_rank=4)
    train_sft(SFTConfig(steps=1, lora_target_modules=["q_proj", "k_proj"], **settings))
    # as many adapted layers (the optimizer's groups fit), other ones
    with pytest.raises(ValueError, match="the adapter does not fit this model's LoRA layers"):
        train_sft(SFTConfig(steps=2, resume=True, allow_config_change=True,
                            lora_target_modules=["v_proj", "o_proj"], **settings))

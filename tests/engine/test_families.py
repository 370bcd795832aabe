"""SFT -> RM -> PPO on tiny checkpoints shaped like real GPT-2, Llama and Qwen2 ones (tests/engine/
families.py): byte-level BPE tokenizers with each family's special tokens (no pad token, BOS or no BOS
added, pad == eos, a chat template), and weights stored in float32, bfloat16 or float16."""
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import DEVICE
from families import CHATML, FAMILIES, build, check_tokenizer, data
from fastppo.data import Batch, encode_prompts, pack_prompts
from fastppo.models import load_reward_model
from fastppo.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

STAGES = ("sft", "rm", "ppo")
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TEXT = "the film was good"


def stored_dtypes(directory: Path) -> set[str]:
    """The dtypes of the tensors in model.safetensors, read from the file's header only."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def pipeline(model: Path, out: Path) -> dict:
    return run_pipeline(PipelineConfig(
        model=str(model), **data(out / "data"), out=str(out / "run"), device=DEVICE,
        sft_steps=3, rm_steps=3, ppo_iterations=2,
        ppo={"batch_size": 8, "mini_batch_size": 4, "max_new_tokens": 6},
        sft={"batch_size": 8}, rm={"batch_size": 8}))


def check_run(out: Path, model: Path) -> None:
    """Every stage's checkpoint loads with transformers and tokenizes as the starting model did; the
    first PPO mini-batch of every iteration saw ratio 1."""
    original = AutoTokenizer.from_pretrained(model)
    for stage in STAGES:
        checkpoint = out / "run" / stage / "checkpoint"
        auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        model, info = auto.from_pretrained(checkpoint, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (stage, info)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        assert tokenizer(TEXT).input_ids == original(TEXT).input_ids, stage
        assert tokenizer.eos_token_id == original.eos_token_id, stage
        assert tokenizer.bos_token_id == original.bos_token_id, stage
        ids = torch.tensor([tokenizer(TEXT).input_ids + [tokenizer.eos_token_id]])
        if stage != "rm":
            assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size), stage
            continue
        # No pad token of their own (Qwen2's is its EOS): no pad id in the config, so Hugging Face
        # scores an unpadded sequence at its last token, the EOS, as fastppo does.
        assert model.config.num_labels == 1 and model.config.pad_token_id is None
        with torch.no_grad():
            torch.testing.assert_close(load_reward_model(checkpoint)(Batch.sequences(ids)),
                                       model(ids).logits[:, 0], rtol=1e-5, atol=1e-5)
    rows = [json.loads(line) for line in
            (out / "run" / "ppo" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows), [r["first_ratio_max_error"]
                                                                   for r in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_conventions_survive_saving(tmp_path, family):
    model = build(family, tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(model)
    check_tokenizer(family, tokenizer)
    config = json.loads((model / "config.json").read_text())
    eos = tokenizer.convert_tokens_to_ids("</s>" if family == "llama" else "<|endoftext|>")
    assert config["eos_token_id"] == eos
    assert config.get("pad_token_id") is None
    assert config.get("bos_token_id") == {"gpt2": eos, "llama": tokenizer.bos_token_id,
                                          "qwen2": None}[family]
    assert config["tie_word_embeddings"] == (family == "gpt2")
    assert config["vocab_size"] == len(tokenizer)
    assert config["n_positions" if family == "gpt2" else "max_position_embeddings"] == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES)
def test_weights_stored_in_the_dtype_asked(tmp_path, family, dtype):
    model = build(family, tmp_path / family, dtype=dtype)
    assert stored_dtypes(model) == {SAFETENSORS_DTYPE[dtype]}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_tokenized_as_the_model_tokenizer_does(tmp_path, family):
    tokenizer = AutoTokenizer.from_pretrained(build(family, tmp_path / family))
    encoded = encode_prompts(tokenizer, ["the film was"])
    assert encoded == [tokenizer("the film was").input_ids]
    batch = pack_prompts(encoded, tokenizer.eos_token_id)  # one prompt: no padding column
    first = batch.input_ids[0, 0].item()
    if family == "llama":
        assert first == tokenizer.bos_token_id
    else:  # nothing prepended: GPT-2's BOS is its <|endoftext|>, Qwen2 has none
        assert first == tokenizer("the", add_special_tokens=False).input_ids[0]
        assert first not in tokenizer.all_special_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_runs_on_family(tmp_path, family):
    model = build(family, tmp_path / family)
    pipeline(model, tmp_path)
    check_run(tmp_path, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_pipeline_trains_in_float32_from_a_half_precision_checkpoint(tmp_path, dtype, recwarn,
                                                                     capsys, caplog):
    model = build("llama", tmp_path / "llama", dtype=dtype)
    assert stored_dtypes(model) == {SAFETENSORS_DTYPE[dtype]}
    with caplog.at_level(logging.INFO):
        pipeline(model, tmp_path)
    check_run(tmp_path, model)
    assert stored_dtypes(tmp_path / "run" / "sft" / "checkpoint") == {"F32"}
    captured = capsys.readouterr()
    notices = ([str(w.message) for w in recwarn] + captured.err.splitlines()
               + captured.out.splitlines() + [r.getMessage() for r in caplog.records])
    assert any("float32" in line for line in notices), notices


def test_pipeline_runs_on_qwen2_with_chat_template(tmp_path):
    model = build("qwen2", tmp_path / "qwen2", chat_template=True)
    assert AutoTokenizer.from_pretrained(model).chat_template == CHATML
    pipeline(model, tmp_path)
    check_run(tmp_path, model)
    for stage in STAGES:
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / stage / "checkpoint")
        check_tokenizer("qwen2", tokenizer, chat_template=True)


REWARD_MODULE = '''
import json, os

def seen(prompts, responses, prompt_ids, response_ids):
    with open(os.environ["FASTPPO_TEST_SEEN"], "a") as fh:
        fh.write(json.dumps({"texts": responses, "ids": response_ids}) + "\\n")
    return [float(len(r) % 2) for r in responses]
'''


def test_a_model_vocabulary_larger_than_the_tokenizer_trains_and_decodes(tmp_path, monkeypatch):
    """Qwen ships embeddings for 151,936 ids and a tokenizer of 151,665: the ids past the tokenizer
    are sampled like any other (the trained policy is the sampling one), trained on with ratio = 1,
    and decoded as the model family's tokenizer decodes them (to nothing)."""
    from fastppo.config import PPOConfig
    from fastppo.models import tiny_llama
    from fastppo.ppo import train_ppo

    from chat_testing import chat_tokenizer

    tok = chat_tokenizer()
    extra = 27
    torch.manual_seed(0)
    lm = tiny_llama(len(tok) + extra, hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():  # the ids past the tokenizer: likely enough to be sampled often
        lm.lm_head.weight[len(tok):] += 0.5 * lm.lm_head.weight[len(tok):].sign()
    lm.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "seen_rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p}) + "\n" for p in ("count", "go on", "hi", "more")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FASTPPO_TEST_SEEN", str(tmp_path / "seen.jsonl"))
    cfg = PPOConfig(prompts=str(tmp_path / "prompts.jsonl"), policy=str(tmp_path / "policy"),
                    reward_fn="seen_rewards:seen", out=str(tmp_path / "run"), iterations=2,
                    batch_size=8, mini_batch_size=4, samples_per_prompt=2,
                    advantage_estimator="grpo", max_new_tokens=12, save_every=100).check()
    train_ppo(cfg)
    calls = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    past = [(ids, text) for call in calls for ids, text in zip(call["ids"], call["texts"])
            if any(i >= len(tok) for i in ids)]
    assert past, "no id past the tokenizer was sampled: the test would prove nothing"
    for ids, text in past:
        assert text == tok.decode([i for i in ids if i < len(tok)], skip_special_tokens=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["first_ratio_max_error"] <= 1e-5 for r in rows)

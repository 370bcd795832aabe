"""Reward models as the peers and the Hub store them: a one-label AutoModelForSequenceClassification
directory. fastppo's own RM checkpoint loads as one and scores as Hugging Face's forward does; a
Hub-style one of each family is read by fastppo exactly as Hugging Face reads it, and PPO trains
against it; fastppo's older layout (a causal LM with head.safetensors) still loads."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import DEVICE
from families import FAMILIES, build, build_config, build_tokenizer, data
from fastppo.config import PPOConfig
from fastppo.data import Batch, encode_prompts, encode_responses, pack, read_jsonl, special_ids
from fastppo.models import HEAD_FILE, VALUE_HEAD, load_reward_model
from fastppo.preflight import check_reward_model_dir
from fastppo.ppo import train_ppo

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def rows_of(tokenizer, path, n=6):
    rows = read_jsonl(path, "rm")[:n]
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    responses = encode_responses(tokenizer, [r["chosen"] for r in rows])
    return prompts, responses


def right_padded(sequences, pad_id):
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


@torch.no_grad()
def test_rm_checkpoint_scores_as_hugging_face_does(small_run):
    # The demo's tokenizer has a pad token of its own, so `fastppo rm` writes it into the config and
    # Hugging Face's forward pools at the same token as fastppo on right-padded batches.
    out, _ = small_run
    path = out / "rm" / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad, eos = special_ids(tokenizer)
    assert pad != eos
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == pad
    assert hf.score.bias is None  # the pairwise loss cannot train a bias: there is none
    ours = load_reward_model(path).eval()
    prompts, responses = rows_of(tokenizer, out / "data" / "rm.jsonl")
    ids, mask = right_padded([p + r for p, r in zip(prompts, responses)], pad)
    expected = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert expected.std() > 0
    torch.testing.assert_close(ours(Batch.sequences(ids, mask)), expected, rtol=1e-5, atol=1e-5)
    # fastppo's own layout (left-padded prompts, right-padded responses) scores the same
    batch = pack(prompts, responses, pad)
    torch.testing.assert_close(ours(batch), expected, rtol=1e-5, atol=1e-5)


def hub_reward_model(family, directory, seed=0):
    """A one-label sequence classifier of `family`, saved as the Hub stores reward models."""
    tokenizer = build_tokenizer(family)
    config = build_config(family, tokenizer)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far enough apart to compare
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_hub_reward_model_scores_as_hugging_face_does(tmp_path, family):
    # These families ship without a pad token of their own (Qwen2's is its EOS), so their configs
    # have none and Hugging Face scores one unpadded sequence at a time, at its last token.
    path = hub_reward_model(family, tmp_path / "rm")
    check_reward_model_dir(path, "reward_model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert hf.config.pad_token_id is None
    ours = load_reward_model(path).eval()
    prompts, responses = rows_of(tokenizer, data(tmp_path / "data")["rm_data"])
    expected = torch.cat([hf(input_ids=torch.tensor([p + r])).logits[:, 0]
                          for p, r in zip(prompts, responses)])
    assert expected.std() > 0
    batch = pack(prompts, responses, special_ids(tokenizer)[0])
    torch.testing.assert_close(ours(batch), expected, rtol=1e-5, atol=1e-5)


def test_ppo_trains_against_a_hub_reward_model(tmp_path):
    policy = build("qwen2", tmp_path / "policy")
    reward = hub_reward_model("qwen2", tmp_path / "rm")
    prompts = data(tmp_path / "data")["prompts"]
    out = train_ppo(PPOConfig(prompts=prompts, policy=str(policy), reward_model=str(reward),
                              out=str(tmp_path / "ppo"), iterations=2, batch_size=8,
                              mini_batch_size=4, max_new_tokens=6, device=DEVICE))
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["first_ratio_max_error"] <= 1e-5 for r in rows)
    assert all(r["score_std"] > 0 for r in rows)  # the random head scores differently per sample
    assert (out / VALUE_HEAD).is_file()


@torch.no_grad()
def test_older_fastppo_reward_model_still_loads(small_run, tmp_path):
    # Before the sequence-classifier checkpoints, `fastppo rm` wrote the causal LM with a biased
    # score head beside it in head.safetensors; such a directory scores as it did.
    out, _ = small_run
    lm = AutoModelForCausalLM.from_pretrained(out / "sft" / "checkpoint").eval()
    path = tmp_path / "old_rm"
    lm.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(out / "sft" / "checkpoint")
    tokenizer.save_pretrained(path)
    torch.manual_seed(1)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    check_reward_model_dir(path, "reward_model")
    ours = load_reward_model(path).eval()
    prompts, responses = rows_of(tokenizer, out / "data" / "rm.jsonl")
    batch = pack(prompts, responses, special_ids(tokenizer)[0])
    position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    last = batch.attention_mask.shape[1] - 1 - batch.attention_mask.flip(-1).long().argmax(-1)
    hidden = lm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=position_ids).last_hidden_state[torch.arange(len(last)), last]
    torch.testing.assert_close(ours(batch),
                               hidden @ head.weight[0] + head.bias[0], rtol=1e-5, atol=1e-5)


def test_reward_model_without_its_score_weights_is_refused(small_run, tmp_path):
    # A directory that says "sequence classifier" but lacks the head's weights would otherwise get
    # a freshly initialised head: random rewards, silently.
    out, _ = small_run
    path = tmp_path / "rm"
    shutil.copytree(out / "rm" / "checkpoint", path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "score.weight"},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no trained score head in its weights "
                                         r"\(missing: score.weight\)"):
        load_reward_model(path)

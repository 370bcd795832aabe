"""Tiny, realistically-shaped Hugging Face model directories of three families (GPT-2, Llama, Qwen2),
built here from nothing (no hub download), for the engine tests.

Each directory holds a random tiny model (config + safetensors weights via save_pretrained, stored in
the `dtype` asked for) and a byte-level BPE tokenizer trained on the demo task's words, with the
special-token conventions of the family's real checkpoints:

  family  bos              eos              pad              unk              encoding adds
  gpt2    <|endoftext|>    <|endoftext|>    (none)           <|endoftext|>    nothing (ByteLevel only)
  llama   <s>              </s>             (none)           <unk>            <s> in front (TemplateProcessing)
  qwen2   (none)           <|endoftext|>    <|endoftext|>    (none)           nothing; + <|im_start|>, <|im_end|>

Token ids sit where the families put them: GPT-2's <|endoftext|> is the last id of the vocabulary
(50256 in the real one), Llama's <unk>, <s>, </s> are 0, 1, 2, Qwen2's specials follow the BPE vocabulary.
The configs carry the ids as the families ship them: gpt2 bos = eos = <|endoftext|>, no pad; llama
bos/eos, pad None; qwen2 eos only (bos None, pad None). Word embeddings: gpt2 ties them (its default);
llama and qwen2 set tie_word_embeddings=False explicitly (the default of both configs).
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from fastppo.data import write_jsonl
from fastppo.demo import sentiment

FAMILIES = ("gpt2", "llama", "qwen2")
VOCAB_SIZE = 400  # the BPE trainer's target: 256 bytes + specials + merges
HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 32, 2, 2, 64, 64

# Qwen2-instruct's ChatML template (what the real tokenizer_config.json ships, system default kept).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred sentences of the demo task's words: prompts, continuations, some punctuation."""
    rng = random.Random(seed)
    words = sentiment.NEUTRAL + sentiment.POSITIVE + sentiment.NEGATIVE
    lines = []
    for _ in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        lines.append(f"{sentiment.prompt(rng)} {body}{rng.choice(['.', '!', ',', ''])}")
    lines += [" ".join(group) for group in (sentiment.POSITIVE, sentiment.NEGATIVE,
                                            sentiment.NEUTRAL, sentiment.PROMPT_NOUNS)]
    return lines


def _bpe(leading_specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained on corpus(); `leading_specials` get the first ids (Llama's layout).
    A fresh object each call (the callers change it); the training itself is done once."""
    return Tokenizer.from_str(_trained(tuple(leading_specials)))


@functools.lru_cache(maxsize=None)
def _trained(leading_specials: tuple[str, ...]) -> str:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2,
                                  special_tokens=list(leading_specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(corpus(), trainer=trainer)
    return core.to_str()


def build_tokenizer(family: str, *, chat_template: bool = False) -> PreTrainedTokenizerFast:
    if family == "gpt2":
        core = _bpe([])
        core.add_special_tokens(["<|endoftext|>"])  # the last id, as 50256 is in GPT-2
        core.post_processor = processors.ByteLevel(trim_offsets=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    elif family == "llama":
        core = _bpe(["<unk>", "<s>", "</s>"])  # ids 0, 1, 2 as in Llama
        core.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                          special_tokens=[("<s>", core.token_to_id("<s>"))]),
        ])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    elif family == "qwen2":
        core = _bpe([])
        core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # after the BPE vocab
        core.post_processor = processors.ByteLevel(trim_offsets=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>",
                                      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        if chat_template:
            tok.chat_template = CHATML
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    tok.model_max_length = POSITIONS
    check_tokenizer(family, tok, chat_template=chat_template)
    return tok


def check_tokenizer(family: str, tok, *, chat_template: bool = False) -> None:
    """The family's conventions, on a freshly built or a reloaded tokenizer."""
    ids = tok("the film was good").input_ids
    plain = tok("the film was good", add_special_tokens=False).input_ids
    assert tok.decode(plain) == "the film was good", tok.decode(plain)
    assert 300 <= len(tok) <= 500, len(tok)
    if family == "gpt2":
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        assert eot == len(tok) - 1
        assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == eot
        assert tok.pad_token is None and tok.pad_token_id is None
        assert ids == plain  # no BOS added
    elif family == "llama":
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
        assert tok.pad_token is None and tok.pad_token_id is None
        assert tok("a b").input_ids[0] == tok.bos_token_id
        assert ids == [tok.bos_token_id] + plain
    elif family == "qwen2":
        assert tok.bos_token is None and tok.bos_token_id is None
        assert tok.eos_token == tok.pad_token == "<|endoftext|>"
        assert tok.pad_token_id == tok.eos_token_id
        for special in ("<|im_start|>", "<|im_end|>"):
            assert special in tok.all_special_tokens, tok.all_special_tokens
            assert tok(special, add_special_tokens=False).input_ids == [
                tok.convert_tokens_to_ids(special)]
        assert ids == plain  # no BOS added
        if chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": "the film was"}],
                                           tokenize=False, add_generation_prompt=True)
            assert text.endswith("<|im_start|>assistant\n") and "<|im_end|>" in text, text
        else:
            assert not tok.chat_template


def build_config(family: str, tok):
    common = dict(vocab_size=len(tok))
    if family == "gpt2":
        eot = tok.eos_token_id
        return GPT2Config(**common, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
                          n_positions=POSITIONS, bos_token_id=eot, eos_token_id=eot)  # ties (default)
    llama_like = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS,
                      tie_word_embeddings=False, pad_token_id=None)
    if family == "llama":
        return LlamaConfig(**common, **llama_like, num_key_value_heads=HEADS,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "qwen2":  # grouped-query attention, as Qwen2 ships (2 query heads, 1 KV head)
        return Qwen2Config(**common, **llama_like, num_key_value_heads=1, bos_token_id=None,
                           eos_token_id=tok.eos_token_id)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def build(family: str, directory: Path, *, dtype=torch.float32, chat_template: bool = False) -> Path:
    """A Hugging Face model directory of `family` (weights stored in `dtype`) at `directory`."""
    directory = Path(directory)
    tok = build_tokenizer(family, chat_template=chat_template)
    config = build_config(family, tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (
        family == "gpt2")
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def data(directory: Path, *, sft: int = 64, rm: int = 64, prompts: int = 32,
         max_words: int = 6) -> dict:
    """Small sft/rm/prompts JSONL files of the demo task; their paths by name."""
    directory = Path(directory)
    paths = {"sft_data": directory / "sft.jsonl", "rm_data": directory / "rm.jsonl",
             "prompts": directory / "prompts.jsonl"}
    write_jsonl(paths["sft_data"], sentiment.sft_rows(sft, 0, max_words))
    write_jsonl(paths["rm_data"], sentiment.rm_rows(rm, 1, max_words))
    write_jsonl(paths["prompts"], sentiment.ppo_rows(prompts, 2))
    return {k: str(v) for k, v in paths.items()}

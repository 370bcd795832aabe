"""The demo's third task: two-digit addition with a calculator tool (`fastppo demo --task tools`),
self-contained.

A prompt is a chat message "37 + 48"; the tiny model cannot add two-digit numbers itself, but it is
offered one tool, `add(a, b)`. SFT teaches the format on a few conversations, half of which answer
directly (the sum written out, which the model cannot compute for problems it has not seen) and half
of which call the tool first and answer with its result:

    <|im_start|>user\\n37 + 48<|im_end|>\\n<|im_start|>assistant\\n
    <tool_call>{"name": "add", "arguments": {"a": 37, "b": 48}}</tool_call><|im_end|>     (the model)
    \\n<|im_start|>tool\\n85<|im_end|>\\n<|im_start|>assistant\\n                          (the tool)
    85<|im_end|>                                                                            (the model)

GRPO on multi-turn episodes (fastppo.episodes, --tools fastppo.demo.calculator:add) then rewards a
correct final answer (`reward`): the policy learns that calling the tool pays, and the tool-call rate
and the accuracy on held-out problems rise.
"""
from __future__ import annotations

import random
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<bos>", "<|im_end|>", "<|im_start|>"]
CALL_HEAD = '<tool_call>{"name": "add", "arguments": {"a": '
CALL_SEP = ', "b": '
CALL_TAIL = "}}</tool_call>"
PIECES = [CALL_HEAD, CALL_SEP, CALL_TAIL, "system", "user", "assistant", "tool", "tools: ", "add",
          " + ", "\n"] + [str(d) for d in range(10)]
# ChatML-like; the tools' names in a system message (the template decides how tools are shown)
TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {% for t in tools %}{{ t.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROBLEM = re.compile(r"(\d+) \+ (\d+)")


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per piece of the format (the tool call's fixed text, role names, digits); any other
    character is <unk>. <|im_end|> ends every turn and is the EOS."""
    vocab = {t: i for i, t in enumerate(SPECIALS + PIECES)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pieces = "|".join(re.escape(p) for p in sorted(PIECES, key=len, reverse=True))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(f"{pieces}|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TEMPLATE
    return tok


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a} + {b}"}]


def conversation(a: int, b: int, with_tool: bool) -> list[dict]:
    """A demonstration: the answer directly, or a tool call, its result, then the answer; after the
    system message that offering the tool renders (TEMPLATE), as in the GRPO episodes."""
    start = [{"role": "system", "content": "tools: add"}] + question(a, b)
    if not with_tool:
        return start + [{"role": "assistant", "content": str(a + b)}]
    return start + [
        {"role": "assistant", "content": f"{CALL_HEAD}{a}{CALL_SEP}{b}{CALL_TAIL}"},
        {"role": "tool", "name": "add", "content": str(a + b)},
        {"role": "assistant", "content": str(a + b)}]


def problems(seed: int) -> tuple[list, list, list]:
    """(SFT, GRPO, held-out evaluation) problems: disjoint sets of (a, b), 10 <= a, b <= 99."""
    every = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(every)
    return every[:400], every[400:1400], every[1400:1656]


def sft_rows(pairs, seed: int) -> list[dict]:
    """Half the demonstrations answer directly, half use the tool (chosen by the seed)."""
    rng = random.Random(seed)
    return [{"messages": conversation(a, b, rng.random() < 0.5)} for a, b in pairs]


def ppo_rows(pairs) -> list[dict]:
    return [{"prompt": question(a, b)} for a, b in pairs]


def final_answer(episode: str) -> str:
    """The model's last turn of a decoded episode (special tokens skipped, so each turn after the
    first starts after "assistant\\n")."""
    return episode.rsplit("assistant\n", 1)[-1].strip()


def is_correct(prompt: str, episode: str) -> bool:
    found = PROBLEM.search(prompt)
    answer = final_answer(episode)
    return bool(found) and answer.isdigit() and int(answer) == int(found[1]) + int(found[2])


def reward(prompts, responses, prompt_ids, response_ids) -> list[float]:
    """1.0 when the episode's final answer is the sum, else 0.0 (fastppo.rewards' signature; a
    response is the whole episode after the prompt)."""
    return [float(is_correct(p, r)) for p, r in zip(prompts, responses)]

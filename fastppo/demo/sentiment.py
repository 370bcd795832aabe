"""The demo's built-in task: "make the continuation positive", self-contained.

A prompt is a few neutral words ("the film was"); a response is up to `max_words` words. A hidden
oracle of human preference scores a response by its sentiment: (positive words - negative words) per
word, in [-1, 1]. Nothing else sees the oracle directly: the SFT data are neutral-to-mixed
demonstrations, and the reward model learns it only from ranked pairs (chosen = preferred by the oracle).
The tokenizer is a word-level one built here from the task's vocabulary (nothing is downloaded).
"""
from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

POSITIVE = ("good great superb lovely brilliant wonderful fine happy bright warm "
            "delightful charming").split()
NEGATIVE = ("bad awful poor dull boring terrible sad grim cold weak dreary bleak").split()
NEUTRAL = ("the a film book show story was is it and with very quite rather then also "
           "this that plot cast").split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PROMPT_NOUNS = ("film book show story plot cast").split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(sorted(set(NEUTRAL + POSITIVE + NEGATIVE)))


def word_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace-split) over SPECIALS + vocabulary that adds <bos>."""
    words = SPECIALS + vocabulary
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Encoding adds <bos>, as Llama's tokenizers do (fastppo encodes prompts as the tokenizer does).
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", words.index("<bos>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def oracle(response: str) -> float:
    """The hidden preference: net sentiment per word of the response (EOS and padding excluded)."""
    words = [w for w in response.split() if w not in SPECIALS]
    if not words:
        return 0.0
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    return (pos - neg) / len(words)


def prompt(rng: random.Random) -> str:
    return f"the {rng.choice(PROMPT_NOUNS)} {rng.choice(['was', 'is'])}"


def demonstration(rng: random.Random, max_words: int) -> str:
    """SFT data: fluent-ish mixed-sentiment continuations (the oracle averages about zero)."""
    n = rng.randint(2, max_words)
    pool = [NEUTRAL, POSITIVE, NEGATIVE]
    return " ".join(rng.choice(rng.choice(pool)) for _ in range(n))


def sft_rows(n: int, seed: int, max_words: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt(rng), "response": demonstration(rng, max_words)} for _ in range(n)]


def rm_rows(n: int, seed: int, max_words: int) -> list[dict]:
    """Ranked pairs: two demonstrations for one prompt, the oracle's preferred one as "chosen"."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        p, a, b = prompt(rng), demonstration(rng, max_words), demonstration(rng, max_words)
        if oracle(a) == oracle(b):
            continue
        chosen, rejected = (a, b) if oracle(a) > oracle(b) else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return rows


def ppo_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt(rng)} for _ in range(n)]

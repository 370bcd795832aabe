"""Checks on model directories before any work: each names the config field and says what is wrong,
so that a run never fails minutes in (a missing tokenizer, an encoder, a prompt past the context, a
reward model with another tokenizer). Nothing is downloaded, ever."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from fastppo.models import HEAD_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_dir(path, what: str) -> None:
    """`path` is a local Hugging Face causal-LM directory with its tokenizer, else a ValueError that
    names `what` (the config field) and says what is wrong. Nothing is downloaded, ever."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} {path}: no such directory (fastppo loads local model directories "
                         "only; nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{what} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save "
                         "the tokenizer beside the model (tokenizer.save_pretrained(directory))")
    try:
        config = AutoConfig.from_pretrained(p)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"{what} {path}: unreadable config.json ({e})") from None
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    # BERT-like encoders are registered for causal LM too (as decoders they need is_decoder=True).
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if config.is_encoder_decoder or encoder or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = ("an encoder-decoder, not a causal language model" if config.is_encoder_decoder
                else "an encoder, not a causal language model" if encoder
                else "not a causal language model")
        raise ValueError(f"{what} {path}: a {config.model_type!r} model is {kind}; fastppo trains "
                         "decoder-only causal LMs (Llama, Qwen2, GPT-2, ...)")


def check_reward_model_dir(path, what: str) -> None:
    """check_model_dir, and a scalar score head: an AutoModelForSequenceClassification directory
    with num_labels=1 (what `fastppo rm` writes, and how the peers and the Hub store reward models),
    or a causal LM with fastppo's older head.safetensors beside it."""
    check_model_dir(path, what)
    if (Path(path) / HEAD_FILE).is_file():
        return
    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{what} {path}: not a fastppo reward model (an SFT checkpoint?): its "
                         f"architectures are {architectures}, not a sequence classifier; train one "
                         "with `fastppo rm`, or give a directory saved by "
                         "AutoModelForSequenceClassification with num_labels=1")
    if config.num_labels != 1:
        raise ValueError(f"{what} {path}: a sequence classifier with num_labels={config.num_labels};"
                         " a reward model gives one score (num_labels=1)")


def check_fits_context(path, length: int, what: str) -> None:
    """`length` tokens fit the context of the model in `path`, else a ValueError before any work
    (past it, position embeddings run out: an IndexError mid-run, or a silent run past the context)."""
    context = context_length(AutoConfig.from_pretrained(path))
    if context is not None and length > context:
        raise ValueError(f"{what} is {length} tokens, more than the {context} positions of {path} "
                         "(max_position_embeddings)")


def check_same_tokenizer(tokenizer, path, what: str) -> None:
    """The tokenizer in `path` is `tokenizer` (same vocabulary and special tokens), else a
    ValueError: fastppo hands the policy's token ids to the reward model as they are, so a
    different tokenizer would score other text than the one sampled, silently."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(path)
    for name, mine, theirs in (
            ("vocabulary", tokenizer.get_vocab(), other.get_vocab()),
            ("EOS token", tokenizer.eos_token_id, other.eos_token_id),
            ("BOS token", tokenizer.bos_token_id, other.bos_token_id),
            ("pad token", tokenizer.pad_token_id, other.pad_token_id)):
        if mine != theirs:
            detail = f"{len(mine)} vs {len(theirs)} entries" if name == "vocabulary" else \
                f"{mine} vs {theirs}"
            raise ValueError(f"{what} {path}: its tokenizer differs from the policy's ({name}: "
                             f"{detail}); the reward model must share the policy's tokenizer")


def context_length(config) -> int | None:
    """The most positions the model takes (max_position_embeddings; n_positions for GPT-2)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

"""Checks on model directories before any work: each names the config field and says what is wrong,
so that a run never fails minutes in (a missing tokenizer, an encoder, a prompt past the context, a
reward model with another tokenizer). Nothing is downloaded, ever."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig

from fastppo.models import HEAD_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# A model's weights, as from_pretrained looks for them (the first one there is the one read).
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")


def problem(path: Path, kind: str = "file") -> str | None:
    """Why `path` is not a readable `kind` ("file" or "directory"), in a few words for an error
    message ("a loop of symbolic links", "a directory, not a file", "not readable (permission
    denied)"), or None when it is one. A missing path is "missing"."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return "a loop of symbolic links" if e.errno == errno.ELOOP else \
            f"not readable ({(e.strerror or str(e)).lower()})"
    except ValueError as e:  # a NUL byte in the name
        return f"not a valid path ({e})"
    if kind == "directory":
        if not stat.S_ISDIR(st.st_mode):
            return "not a directory"
        return None if os.access(path, os.R_OK | os.X_OK) else "not readable (permission denied)"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None if os.access(path, os.R_OK) else "not readable (permission denied)"


def _unreadable(what: str, path, name: str, e: BaseException) -> ValueError:
    return ValueError(f"{what} {path}: unreadable {name} ({type(e).__name__}: "
                      f"{' '.join(str(e).split())})")


def check_model_dir(path, what: str) -> None:
    """`path` is a local Hugging Face causal-LM directory with its tokenizer and weights, else a
    ValueError that names `what` (the config field) and says what is wrong. Its config and tokenizer
    are read and its safetensors headers checked here, so that a damaged file is named before any
    work. Nothing is downloaded, ever."""
    p = Path(path)
    why = problem(p, "directory")
    if why == "missing":
        raise ValueError(f"{what} {path}: no such directory (fastppo loads local model directories "
                         "only; nothing is downloaded)")
    if why is not None:
        raise ValueError(f"{what} {path}: {why}")
    why = problem(p / "config.json")
    if why == "missing":
        raise ValueError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    if why is not None:
        raise ValueError(f"{what} {path}: config.json is {why}")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{what} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save "
                         "the tokenizer beside the model (tokenizer.save_pretrained(directory))")
    # What transformers raises for a malformed file is no one type (json's ValueError or
    # RecursionError, huggingface_hub's StrictDataclassFieldValidationError, a TypeError, the
    # tokenizers library's bare Exception): whatever reading the user's file raises names it.
    try:
        config = AutoConfig.from_pretrained(p)
    except Exception as e:
        raise _unreadable(what, path, "config.json", e) from None
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    # BERT-like encoders are registered for causal LM too (as decoders they need is_decoder=True).
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if config.is_encoder_decoder or encoder or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = ("an encoder-decoder, not a causal language model" if config.is_encoder_decoder
                else "an encoder, not a causal language model" if encoder
                else "not a causal language model")
        raise ValueError(f"{what} {path}: a {config.model_type!r} model is {kind}; fastppo trains "
                         "decoder-only causal LMs (Llama, Qwen2, GPT-2, ...)")
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(p)
    except Exception as e:  # as for config.json
        raise _unreadable(what, path, "tokenizer", e) from None
    check_weights(p, what)


def check_weights(path: Path, what: str) -> None:
    """The model directory `path` has its weights (WEIGHTS), each safetensors file with a whole
    header that fits the file (a truncated or damaged file, a missing shard), else a ValueError
    naming `what`, the directory and the file. Reads the headers only."""
    name = next((n for n in WEIGHTS if problem(path / n) != "missing"), None)
    if name is None:
        raise ValueError(f"{what} {path}: no weights ({', '.join(WEIGHTS)})")
    why = problem(path / name)
    if why is not None:
        raise ValueError(f"{what} {path}: {name} is {why}")
    files = [name]
    if name.endswith(".index.json"):
        try:
            files = list(json.loads((path / name).read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise _unreadable(what, path, name, e) from None
        if not files or not all(isinstance(f, str) and f for f in files):
            raise ValueError(f"{what} {path}: unreadable {name} (its weight_map names no files)")
        files = sorted(set(files))
        for shard in files:
            why = problem(path / shard)
            if why is not None:
                raise ValueError(f"{what} {path}: {shard}, a shard named in {name}, is {why}")
    for file in files:
        if file.endswith(".safetensors"):
            try:
                with safe_open(path / file, framework="pt"):
                    pass
            except Exception as e:  # safetensors' SafetensorError, an OSError
                raise ValueError(f"{what} {path}: damaged weights file {file} ({type(e).__name__}:"
                                 f" {' '.join(str(e).split())})") from None


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

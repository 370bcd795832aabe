"""JSONL data in the usual conventions, and the one token layout every trainer uses.

SFT rows are {"prompt", "response"} or {"messages"} (a conversation), RM rows {"prompt", "chosen",
"rejected"}, PPO rows {"prompt"}; a PPO or RM prompt may be chat messages [{"role", "content"}, ...]
(rendered with the tokenizer's chat template; RM's chosen and rejected are then the assistant's reply,
as text or messages). Files are JSONL, Parquet, or a saved `datasets` directory.
A sequence is laid out as [left padding | <bos> prompt | response <eos> | right padding]: prompts are
left-padded to a common length P and responses right-padded to R, so the logits at positions
P-1 .. P+R-2 predict the response tokens for every row at once.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

FIELDS = {"sft": ("prompt", "response"), "rm": ("prompt", "chosen", "rejected"), "ppo": ("prompt",),
          "env": ()}  # an environment's rows: any JSON object, given to its reset


def read_jsonl(path, kind: str) -> list[dict]:
    """Rows of a data file, each an object with the fields of `kind`: a JSONL file (a malformed line
    is a ValueError naming the file and the line), a Parquet file (`.parquet`), or a local Hugging
    Face `datasets` directory (`Dataset.save_to_disk`; of a DatasetDict, its "train" split or its only
    one). Nothing is downloaded; the last two need the `datasets` package."""
    fields = FIELDS[kind]
    path = Path(path)
    if path.is_dir() and not any((path / f).is_file() for f in DATASET_MARKERS):
        raise ValueError(f"{kind} data file {path} is a directory, not a file (nor a saved `datasets` "
                         f"directory: no {' or '.join(DATASET_MARKERS)} in it)")
    if not path.exists():
        raise ValueError(f"{kind} data file {path} does not exist")
    try:
        if path.is_dir() or path.suffix == ".parquet":
            rows = [check_row(row, kind, fields, f"{path} row {i}")
                    for i, row in enumerate(_read_table(path, kind))]
        else:
            rows = _read_rows(path, kind, fields)
    except OSError as e:  # permission denied, an I/O error
        raise ValueError(f"{kind} data file {path} is not readable ({e.strerror or e})") from None
    if not rows:
        raise ValueError(f"{kind} data file {path} has no rows")
    return rows


DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")


def _read_table(path: Path, kind: str) -> list:
    """The rows of a Parquet file or a saved `datasets` directory, as Python objects."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{kind} data {path}: reading Parquet or a `datasets` directory needs the "
                         "datasets package (pip install datasets); JSONL needs nothing") from None
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(data, datasets.DatasetDict):
                splits = list(data)
                if "train" not in data and len(splits) != 1:
                    raise ValueError(f"{kind} data {path} holds the splits {splits}: save the one "
                                     "to train on alone, or name one 'train'")
                data = data["train" if "train" in data else splits[0]]
            return data.to_list()
        import pyarrow.parquet
        return pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        if isinstance(e, ValueError) and str(e).startswith(f"{kind} data"):
            raise
        raise ValueError(f"{kind} data {path} cannot be read as "
                         f"{'a datasets directory' if path.is_dir() else 'Parquet'}: "
                         f"{type(e).__name__}: {str(e)[:200]}") from None


def _read_rows(path: Path, kind: str, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            except RecursionError:  # the decoder recurses once per level of nesting
                raise ValueError(f"{path}:{number}: not valid JSON (nested more than "
                                 f"{sys.getrecursionlimit()} levels deep)") from None
            except ValueError as e:  # an integer of more than 4300 digits
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
            rows.append(check_row(row, kind, fields, f"{path}:{number}"))
    return rows


def check_row(row, kind: str, fields: tuple[str, ...], where: str) -> dict:
    """The row, if it has the fields of `kind` (a ValueError saying `where` and what is wrong):
    strings, or chat messages where a conversation may stand (SFT's "messages"; PPO's and RM's
    "prompt"; RM's "chosen" and "rejected", as the assistant's messages that follow the prompt)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with {fields}")
    if kind == "sft" and "messages" in row:  # a conversation: trained on the assistant turns
        problem = conversation_problem(row["messages"]) if isinstance(
            row["messages"], list) else "is not a list of messages"
        if not problem and not any(m["role"] == "assistant" for m in row["messages"]):
            problem = "has no assistant message to train on"
        if problem:
            raise ValueError(f"{where}: field 'messages' {problem}")
        return row
    conversational = kind in ("ppo", "rm") and isinstance(row.get("prompt"), list)
    for name in fields:
        if conversational and isinstance(row.get(name), list):
            problem = conversation_problem(row[name])
            if problem:
                raise ValueError(f"{where}: field {name!r} {problem}")
            continue
        if not isinstance(row.get(name), str):
            also = " or chat messages" if conversational else ""
            raise ValueError(f"{where}: field {name!r} must be a string{also} (a {kind} row has "
                             f"{', '.join(fields)})")
        try:  # a "\\ud800" escape decodes to a lone surrogate, which no tokenizer encodes
            row[name].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: field {name!r} is not Unicode text (an "
                             f"unpaired surrogate \\u{ord(row[name][e.start]):04x} at "
                             f"character {e.start + 1})") from None
    return row


def conversation_problem(messages) -> str | None:
    """Why `messages` is not a chat conversation (a non-empty list of {"role": str, "content": str}
    objects), or None."""
    if not messages:
        return "is an empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            return f'message {i} must be {{"role": "...", "content": "..."}}; got {str(m)[:80]}'
    return None


def write_jsonl(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def special_ids(tokenizer) -> tuple[int, int]:
    """(pad id, EOS id). Responses end with EOS, so a tokenizer without one is refused. Padding is
    the tokenizer's pad token, else its EOS (GPT-2 and Llama ship without a pad token): padding is
    masked out by the attention mask and never read, so reusing EOS is safe."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has no EOS token; fastppo ends "
                         "every response with it (set tokenizer.eos_token)")
    return (eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id), eos


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as the model's own tokenizer encodes it, with the special tokens it adds itself
    (Llama's BOS; nothing for GPT-2 or Qwen2), as its `generate` would see it. Prompts are used as
    given: a chat template, if wanted, belongs in the data."""
    return require_tokens([tokenizer(p).input_ids for p in prompts], prompts)


def require_tokens(encoded: list[list[int]], prompts: list) -> list[list[int]]:
    """`encoded`, if every prompt encoded to at least one token (else a ValueError naming it)."""
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) encodes to no tokens; a "
                         "response needs at least one prompt token to follow")
    return encoded


def limit_prompts(prompts: list[list[int]], max_length: int, truncate: bool,
                  bos_id: int | None) -> list[list[int]]:
    """Prompts of at most max_length tokens (0: no limit): a longer one is refused, or with
    `truncate` cut from the left, keeping a leading BOS (the end of a prompt is what the response
    continues)."""
    if not max_length:
        return prompts
    limited = []
    for i, ids in enumerate(prompts):
        if len(ids) > max_length and not truncate:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than max_prompt_length="
                             f"{max_length}; shorten it, or pass --truncate_prompts true to keep its "
                             "last tokens")
        if len(ids) > max_length:
            head = ids[:1] if bos_id is not None and ids[0] == bos_id and max_length > 1 else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
        limited.append(ids)
    return limited


def encode_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    """Each response's tokens (no special tokens added), then EOS."""
    _, eos = special_ids(tokenizer)
    return [tokenizer(r, add_special_tokens=False).input_ids + [eos] for r in responses]


@dataclass
class Batch:
    """A batch in the one token layout (module docstring). Model calls take a Batch (fastppo.models):
    a different layout changes this class and the model wrappers only."""
    input_ids: torch.Tensor       # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R) bool
    response_mask: torch.Tensor   # (B, R) bool: the response tokens that count
    prompt_len: int               # P
    # (B, R) float32: the log-prob the rollout's sampler gave each response token, under the
    # distribution it drew from (temperature, top-k, top-p applied); 0 on padding. None: not a rollout.
    sampler_logprobs: torch.Tensor | None = None
    # Per-response-token tensors (B, R) a trainer attaches to the rows (old log-probs, advantages,
    # ...): select() and to() carry them with the rows.
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-row (B,) tensors (an episode's turns, whether it was truncated, ...), carried alike.
    per_row: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def sequences(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> "Batch":
        """Whole sequences as a batch: the first token the prompt, every later one a response token
        (a model then returns its outputs at positions 0 .. L-2, which predict tokens 1 .. L-1)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
            else attention_mask.bool()
        return cls(input_ids, mask, mask[:, 1:].clone(), 1)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def labels(self) -> torch.Tensor:
        """The response tokens as log-prob labels: -100 (ignored) where response_mask is False."""
        return self.responses.masked_fill(~self.response_mask, -100)

    @property
    def response_positions(self) -> slice:
        """The sequence positions whose outputs predict the response tokens: P-1 .. P+R-2. Models
        compute logits (and values) only there (fastppo.models)."""
        return slice(self.prompt_len - 1, self.input_ids.shape[1] - 1)

    def with_tokens(self, **per_token: torch.Tensor) -> "Batch":
        """This batch with per-token tensors added (or replaced); response_mask= replaces the mask."""
        mask = per_token.pop("response_mask", self.response_mask)
        return dataclasses.replace(self, response_mask=mask, per_token={**self.per_token, **per_token})

    def _map(self, f) -> "Batch":
        sampler = None if self.sampler_logprobs is None else f(self.sampler_logprobs)
        return Batch(f(self.input_ids), f(self.attention_mask), f(self.response_mask),
                     self.prompt_len, sampler, {k: f(v) for k, v in self.per_token.items()},
                     {k: f(v) for k, v in self.per_row.items()})

    def widened(self, prompt_len: int, response_len: int, pad_id: int) -> "Batch":
        """The same rows, prompts left-padded to `prompt_len` and responses right-padded to
        `response_len` (neither smaller than now)."""
        left, right = prompt_len - self.prompt_len, response_len - self.response_mask.shape[1]
        if left < 0 or right < 0:
            raise ValueError(f"widened: ({prompt_len}, {response_len}) is narrower than the batch's "
                             f"({self.prompt_len}, {self.response_mask.shape[1]})")
        def grow(t, fill=0, both=False):
            out = torch.nn.functional.pad(t.long() if t.dtype == torch.bool else t,
                                          (left if both else 0, right), value=fill)
            return out.bool() if t.dtype == torch.bool else out
        sampler = None if self.sampler_logprobs is None else grow(self.sampler_logprobs)
        return Batch(grow(self.input_ids, pad_id, True), grow(self.attention_mask, 0, True),
                     grow(self.response_mask), prompt_len, sampler,
                     {k: grow(v) for k, v in self.per_token.items()}, dict(self.per_row))

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def select(self, index) -> "Batch":
        return self._map(lambda t: t[index])


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
         prompt_len: int | None = None, trained: list[list[bool]] | None = None) -> Batch:
    """Prompts left-padded to `prompt_len` (default: the longest), responses right-padded.
    trained: which response tokens count (response_mask; default all): a conversation's or an
    episode's tokens that the model did not write are attended but not trained on."""
    P = max(len(p) for p in prompts)
    if prompt_len is not None:
        if prompt_len < P:
            raise ValueError(f"prompt_len={prompt_len} is shorter than the longest prompt ({P})")
        P = prompt_len
    R = max(max((len(r) for r in responses), default=0), 1)
    ids = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
    attn = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):P] = True
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, P:P + len(r)] = True
    response_mask = attn[:, P:].clone()
    for i, t in enumerate(trained or []):
        response_mask[i, :len(t)] = torch.tensor(t, dtype=torch.bool)
    return Batch(ids, attn, response_mask, P)


def pack_prompts(prompts: list[list[int]], pad_id: int, prompt_len: int | None = None) -> Batch:
    """Prompts alone, left-padded: the input of generation (no response columns yet)."""
    full = pack(prompts, [[] for _ in prompts], pad_id, prompt_len)
    P = full.prompt_len
    return Batch(full.input_ids[:, :P], full.attention_mask[:, :P], full.response_mask[:, :0], P)


@dataclass
class PackedRows:
    """The attended tokens of a padded batch without its padding: each sequence whole in one row,
    rows filled first-fit by decreasing length up to `row_length` tokens (default: the longest
    sequence), each sequence's position ids restarting at 0 (the same positions as in the padded
    layout, which skips left padding). A model confines attention to each sequence from the position
    ids (fastppo.models.backbone_outputs); a row's unused tail is padding that starts a sequence of its
    own. `where[b, j]` is the flat index (row * T + column) of the padded batch's token (b, j), -1
    where it is not attended: outputs go back to the padded layout through it."""
    input_ids: torch.Tensor      # (rows, T)
    position_ids: torch.Tensor   # (rows, T)
    where: torch.Tensor          # (B, L) long
    tokens: int                  # attended tokens of the batch

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0,
           row_length: int | None = None) -> "PackedRows":
        mask = attention_mask.bool()
        lengths = mask.sum(-1).tolist()
        T = max(max(lengths), 1) if row_length is None else row_length
        if max(lengths) > T:
            raise ValueError(f"row_length={T} is shorter than the longest sequence ({max(lengths)})")
        rows: list[list[int]] = []  # the sequences in each row
        room: list[int] = []
        for b in sorted(range(len(lengths)), key=lambda b: (-lengths[b], b)):  # first fit decreasing
            r = next((r for r, free in enumerate(room) if free >= lengths[b]), len(rows))
            if r == len(rows):
                rows.append([])
                room.append(T)
            rows[r].append(b)
            room[r] -= lengths[b]
        ids = torch.full((len(rows), T), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        pos = torch.arange(T, device=input_ids.device).repeat(len(rows), 1)
        where = torch.full(mask.shape, -1, dtype=torch.long, device=input_ids.device)
        for r, members in enumerate(rows):
            at = 0
            for b in members:
                n = lengths[b]
                ids[r, at:at + n] = input_ids[b][mask[b]]
                pos[r, at:at + n] = torch.arange(n, device=input_ids.device)
                where[b, mask[b]] = torch.arange(r * T + at, r * T + at + n, device=input_ids.device)
                at += n
            pos[r, at:] = torch.arange(T - at, device=input_ids.device)  # the tail: its own sequence
        return cls(ids, pos, where, int(sum(lengths)))

    def gather(self, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """outputs (rows, T, ...) at the padded layout's positions `index` ((B, n) of self.where):
        (B, n, ...), zeros where the padded position is not attended."""
        flat = outputs.reshape(-1, *outputs.shape[2:])
        picked = flat[index.clamp(min=0)]
        keep = (index >= 0).reshape(*index.shape, *([1] * (outputs.dim() - 2)))
        return picked * keep


class ResponseTokens:
    """Where a model call computes a batch's per-response-token outputs: on packed rows
    (`compact`) only at the response tokens that count, as (N, ...) in row-major order of the mask,
    so that no LM head or loss runs on response padding; else on the (B, R) grid, as the padded
    layout does. `at` is what the model wrappers take (None: the grid); `take` lays a (B, R)
    tensor out the same way; `put` lays outputs back onto the (B, R) grid (0 elsewhere)."""

    def __init__(self, mask: torch.Tensor, compact: bool):
        self.mask = mask
        self.compact = compact and not bool(mask.all())  # (no padding: the grid is the same)
        self.at = mask if self.compact else None

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or not self.compact else t[self.mask]

    def put(self, t: torch.Tensor) -> torch.Tensor:
        if not self.compact:
            return t
        grid = torch.zeros(self.mask.shape, dtype=t.dtype, device=t.device)
        grid[self.mask] = t
        return grid


def micro_batches(lengths: list[int], max_tokens: int, at_least: int = 1) -> list[list[int]]:
    """The rows 0..n-1 of sequences of `lengths` tokens split into micro-batches of at most
    `max_tokens` tokens each (a strict cap; 0: no cap, one micro-batch), as few as the cap allows
    (and at least `at_least`, at most n), balanced by token count: each sequence, longest first, goes
    to the micro-batch with the fewest tokens that has room for it. Every row is in exactly one
    micro-batch, each in increasing order; micro-batches are ordered by their first row. A sequence
    longer than the cap is a ValueError naming it."""
    n = len(lengths)
    if not max_tokens:
        return [list(range(n))] if at_least <= 1 else micro_batches(lengths, sum(lengths), at_least)
    too_long = [i for i in range(n) if lengths[i] > max_tokens]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens (prompt + "
                         f"response), more than max_tokens_per_micro_batch={max_tokens}")
    k = min(max(at_least, -(-sum(lengths) // max_tokens)), max(n, 1))
    while True:
        bins: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
            fits = [b for b in range(k) if load[b] + lengths[i] <= max_tokens]
            if not fits:
                break
            b = min(fits, key=lambda b: (load[b], b))
            bins[b].append(i)
            load[b] += lengths[i]
        else:
            return sorted((sorted(b) for b in bins if b), key=lambda b: b[0])
        k += 1

"""Multi-turn episodes: the model answers, a tool or an environment replies, the model goes on.

An episode is one token sequence in the one layout (fastppo.data): the first observation (the
prompt) on the left, then the model's turns exactly as the engine sampled them (ids, never
re-tokenised text) with the environment's tokens between them. The response region is everything
after the prompt; its `response_mask` covers the model's own tokens only, so the environment's
tokens are context: attended, never trained on, no KL penalty on them, and no logits computed for
them on the packed path (fastppo.data.ResponseTokens). GAE skips them (fastppo.kernels.gae's holes).

Two sources of replies, one interface (`Environment`: Gymnasium-style `reset(row)` and
`step(turn) -> (observation, reward, done)`):
  --env module:factory   the factory builds one environment per episode;
  --tools m:f[,m:f...]   plain functions, offered through the chat template's tool schema; a turn
                         with <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (the
                         Hermes/Qwen format) runs them, their results come back as tool messages;
                         a turn without a call ends the episode.
Observations are rendered with the tokenizer's chat template (messages; a text observation is a
user message), or appended as plain text when the tokenizer has none. A tool that raises, runs
past its limit or returns what cannot be sent as text, a malformed call, an environment whose step
raises or returns something else than (observation, reward: a finite number, done): each is counted
by name (the metrics) and the episode goes on (a tool: the model reads the error) or ends (the
environment), unless `strict_env` stops the run with one line.

Limits: `max_turns` model turns, `max_new_tokens` per turn, `max_episode_tokens` for the whole
response region. An episode ends, marked truncated, when the next observation and a full turn would
not fit, or when a turn (the last one too) reaches max_new_tokens without EOS; a turn is never cut in
the middle by the episode limit.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from fastppo import distributed, rewards, rollout
from fastppo.data import Batch, conversation_problem, pack, special_ids

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
OUTCOMES = ("tool_calls", "tool_errors", "tool_timeouts", "tool_bad_results", "malformed_calls",
            "env_errors", "truncated")
_SENTINEL = "\u2063fastppo-turn\u2063"


class Environment(Protocol):
    """One episode's environment (Gymnasium-style; an OpenEnv environment plugs in through a thin
    adapter with these two methods)."""

    def reset(self, row: dict) -> str | list[dict]:
        """The first observation for a data row: the prompt, as text or chat messages."""
        ...

    def step(self, turn: str) -> tuple[str | list[dict] | None, float, bool]:
        """The model's turn (decoded, special tokens skipped) -> (observation, reward, done). The
        reward goes on the turn's last token; `observation` (text, or messages such as
        [{"role": "tool", "content": ...}]) is appended before the next turn unless `done`."""
        ...


class EnvironmentFailed(ValueError):
    """The environment failed and strict_env asked the run to stop (one line, as every ValueError
    the CLI reports)."""


# ----------------------------------------------------------------------------------- tools


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """Each function's JSON schema as the chat templates take it (transformers' get_json_schema:
    type hints and a Google-style docstring with an Args section); an error naming the function
    when it cannot be described."""
    from transformers.utils import get_json_schema

    schemas = []
    for fn in tools:
        try:
            schemas.append(get_json_schema(fn))
        except Exception as err:  # transformers' DocstringParsingException, TypeHintParsingException
            raise ValueError(f"tool {getattr(fn, '__name__', fn)!r} cannot be offered to the model: "
                             f"{err} (a tool needs type hints and a docstring with an Args: "
                             "section)") from None
    return schemas


def parse_tool_calls(text: str) -> list[tuple[str, dict] | str]:
    """The <tool_call>{"name", "arguments"}</tool_call> blocks of a turn: (name, arguments) each, or
    the reason a block is malformed (a string)."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(f"not JSON ({err.msg})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('expected {"name": ..., "arguments": {...}}')
            continue
        arguments = call.get("arguments") or {}  # absent, null or "": a call without arguments
        if isinstance(arguments, str):  # some templates write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(f"arguments of {call['name']!r} must be an object")
            continue
        calls.append((call["name"], arguments))
    if not calls and "<tool_call>" in text:
        calls.append("<tool_call> without </tool_call>")
    return calls


def call_with_limit(fn: Callable, arguments: dict, seconds: float) -> tuple[str, Any]:
    """("ok", result), ("error", message) or ("timeout", None): fn(**arguments) in a thread,
    waited for `seconds` (a thread cannot be killed: a hung tool keeps its daemon thread until it
    returns; a tool that must be stopped hard should run its work in a subprocess itself)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn(**arguments)
        except BaseException as err:  # noqa: BLE001 (the user's code: anything becomes a message)
            box["error"] = f"{type(err).__name__}: {err}"
    thread = threading.Thread(target=target, daemon=True, name=f"tool-{fn.__name__}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return "timeout", None
    if "error" in box:
        return "error", box["error"]
    return "ok", box.get("result")


def as_text(result: Any) -> str | None:
    """A tool's result as the text of a tool message: a string as is, a number, bool, None, list or
    dict as JSON; anything else None (not sent)."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError):
        return None


@dataclass
class ToolEnvironment:
    """The environment of `--tools`: the row's prompt first; each turn's tool calls run (with a time
    limit) and their results come back as tool messages; a turn without a call ends the episode."""

    tools: dict[str, Callable]
    timeout: float
    strict: bool = False  # strict_env: a failed call stops the run (one line) instead
    counts: dict[str, int] = field(default_factory=dict)

    def reset(self, row: dict):
        return row["prompt"]

    def step(self, turn: str):
        calls = parse_tool_calls(turn)
        if not calls:
            return None, 0.0, True
        messages = []
        for call in calls:
            self.counts["tool_calls"] = self.counts.get("tool_calls", 0) + 1
            if isinstance(call, str):
                outcome, content = "malformed_calls", f"error: malformed tool call: {call}"
            elif call[0] not in self.tools:
                outcome, content = "malformed_calls", (f"error: no tool named {call[0]!r} (tools: "
                                                       f"{', '.join(self.tools)})")
            else:
                outcome, content = self.run(*call)
            if outcome:
                self.counts[outcome] = self.counts.get(outcome, 0) + 1
                if self.strict:
                    raise EnvironmentFailed(f"{outcome.replace('_', ' ')[:-1]}: {content} "
                                            "(strict_env: stopping; without it the model reads the "
                                            "error and goes on)")
            messages.append({"role": "tool", "name": call[0] if isinstance(call, tuple) else "",
                             "content": content})
        return messages, 0.0, False

    def run(self, name: str, arguments: dict) -> tuple[str | None, str]:
        fn = self.tools[name]
        try:
            inspect.signature(fn).bind(**arguments)
        except TypeError as err:
            return "malformed_calls", f"error: bad arguments for {name}: {err}"
        status, result = call_with_limit(fn, arguments, self.timeout)
        if status == "timeout":
            return "tool_timeouts", f"error: {name} did not return within {self.timeout:g} s"
        if status == "error":
            return "tool_errors", f"error: {name} raised {result}"
        text = as_text(result)
        if text is None:
            return "tool_bad_results", (f"error: {name} returned {type(result).__name__}, which "
                                        "cannot be sent as text")
        return None, text


def load_tools(specs: list[str]) -> dict[str, Callable]:
    """The functions named "module:function", by name (two tools of one name: an error)."""
    tools = {}
    for spec in specs:
        fn = rewards.load(spec, what="tools")
        if fn.__name__ in tools:
            raise ValueError(f"tools: two tools are named {fn.__name__!r}; the model calls them by name")
        tools[fn.__name__] = fn
    return tools


# --------------------------------------------------------------------------------- rendering


class Renderer:
    """Token ids of prompts and observations, with the tokenizer's chat template (and the tools'
    schemas) where the tokenizer has one, as plain text where it does not. The model's turns are
    never rendered: they stay the sampled ids."""

    def __init__(self, tokenizer, tools: list[dict] | None = None, where: str = "prompts"):
        self.tokenizer, self.tools, self.where = tokenizer, tools or None, where
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        _, self.eos = special_ids(tokenizer)
        if self.tools and not self.chat:
            raise ValueError(f"tools need a chat template to be offered to the model; the tokenizer "
                             f"of {tokenizer.name_or_path} has none")
        self._glue = None  # where observations start after a turn: found on first use (_turn_end)

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt(self, first: str | list[dict]) -> list[int]:
        """A first observation: chat messages through the template (with the generation prompt), or
        text encoded as the tokenizer encodes a prompt (fastppo.data.encode_prompts)."""
        if isinstance(first, str):
            return self.tokenizer(first).input_ids
        check_messages(first, self.where)
        if not self.chat:
            raise ValueError(f"{self.where}: chat messages need a chat template; the tokenizer of "
                             f"{self.tokenizer.name_or_path} has none")
        return self.ids(self.render(first, True))

    def _turn_end(self) -> int:
        """Where, in a rendered conversation, the text after an assistant turn's content begins
        once the model's EOS is taken off (the model samples its EOS; the template's glue after
        it, such as a newline, is context). An error when the template does not end an assistant
        turn with the EOS token: the model would never stop at the end of its turn."""
        eos_text = self.tokenizer.convert_ids_to_tokens(self.eos)
        before = self.render([{"role": "user", "content": "."},
                              {"role": "assistant", "content": _SENTINEL}], False)
        cut = before.find(_SENTINEL)
        if cut < 0:
            raise ValueError(f"the chat template of {self.tokenizer.name_or_path} drops assistant "
                             "content; fastppo cannot place observations after a turn")
        cut += len(_SENTINEL)
        if not before[cut:].lstrip(" ").startswith(eos_text):
            raise ValueError(f"the chat template of {self.tokenizer.name_or_path} does not end an "
                             f"assistant turn with the EOS token {eos_text!r}; set the tokenizer's "
                             "eos_token to the template's end-of-turn token")
        return cut + before[cut:].index(eos_text) + len(eos_text)

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[int], list[bool]]:
        """A whole conversation (SFT's {"messages"}) as (prompt ids, the ids after it, which of
        those are the assistant's): the assistant turns' tokens, their EOS included, are the ones
        trained on; the template's tokens and every other role's are context."""
        check_messages(messages, "messages")
        if not self.chat:
            raise ValueError(f"messages need a chat template; the tokenizer of "
                             f"{self.tokenizer.name_or_path} has none")
        text = self.render(messages, False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:k], True)) if k else 0
            end = len(self.render(messages[:k + 1], False))
            if not text.startswith(self.render(messages[:k + 1], False)):
                raise ValueError("the chat template renders a turn differently once a later message "
                                 "follows; the assistant's tokens cannot be told apart")
            turn = text[start:end]
            eos = turn.find(self.tokenizer.convert_ids_to_tokens(self.eos),
                            turn.find(m["content"]) + len(m["content"]))
            spans.append((start, end if eos < 0 else start + eos + len(
                self.tokenizer.convert_ids_to_tokens(self.eos))))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        trained = [any(a <= lo and hi <= b for a, b in spans) and hi > lo
                   for lo, hi in encoded["offset_mapping"]]
        if not any(trained):
            raise ValueError("messages: no assistant token to train on")
        first = trained.index(True)
        last = len(trained) - trained[::-1].index(True)
        first = max(first, 1)  # a prompt of one token at least: the first token predicts the next
        ids = encoded["input_ids"]
        return ids[:first], ids[first:last], trained[first:last]

    def observation(self, obs: str | list[dict]) -> list[int]:
        """The ids to append after a model turn (which ended with EOS) and before the next: the
        observation's messages and the generation prompt, as the template renders them after an
        assistant turn."""
        if not self.chat:
            if not isinstance(obs, str):
                raise ValueError("the environment returned chat messages, but the tokenizer has no "
                                 "chat template; return text")
            return self.ids(obs)
        messages = [{"role": "user", "content": obs}] if isinstance(obs, str) else obs
        check_messages(messages, "observation")
        if self._glue is None:
            self._glue = self._turn_end()
        base = [{"role": "user", "content": "."}, {"role": "assistant", "content": _SENTINEL}]
        before, after = self.render(base, False), self.render(base + messages, True)
        if not after.startswith(before[:self._glue]):
            raise ValueError(f"the chat template of {self.tokenizer.name_or_path} renders a turn "
                             "differently once a later message follows; observations cannot be "
                             "appended to the sampled ids")
        return self.ids(after[self._glue:])


def check_messages(messages, where: str) -> None:
    problem = "is not a list of messages" if not isinstance(messages, list) else \
        conversation_problem(messages)
    if problem:
        raise ValueError(f"{where} {problem}")


# ---------------------------------------------------------------------------------- episodes


@dataclass
class Limits:
    max_turns: int
    max_new_tokens: int
    max_episode_tokens: int
    strict: bool = False
    context: int | None = None  # the policy's positions: a first observation + max_episode_tokens


@dataclass
class _Episode:
    env: Any
    prompt: list[int]
    ids: list[int] = field(default_factory=list)         # the response region
    model: list[bool] = field(default_factory=list)      # which of them the model sampled
    sampler: list[float] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (position, turn reward)
    turns: int = 0
    done: bool = False
    truncated: bool = False


def run_episodes(generate: Callable, make_env: Callable[[], Any], rows: list[dict],
                 renderer: Renderer, limits: Limits, *, global_rows: torch.Tensor, pad_id: int,
                 prompt_len: int | None = None) -> tuple[Batch, dict]:
    """The episodes of `rows` (data rows; their global row numbers `global_rows`), every active
    episode's next turn generated in one batch: generate(contexts, rows=, turn=) -> Batch (a rollout
    engine's generate). Returns the batch (prompts left-padded to `prompt_len` or the longest,
    response regions right-padded; response_mask: the model's tokens; per_token["turn_rewards"]:
    each turn's reward on its last model token; per_row: turns, truncated, env reward) and the
    outcome counts."""
    counts = dict.fromkeys(OUTCOMES, 0)
    episodes = []
    try:
        for row, global_row in zip(rows, global_rows.tolist()):
            env = new_environment(make_env)
            episodes.append(_Episode(env, []))
            episodes[-1].prompt = first_observation(renderer, env, row, global_row, limits)
        for turn in range(limits.max_turns):
            active = [i for i, e in enumerate(episodes) if not e.done]
            if not active:
                break
            out = generate([episodes[i].prompt + episodes[i].ids for i in active],
                           rows=global_rows[active], turn=turn)
            responses, mask = out.responses.cpu(), out.response_mask.cpu()
            sampler = out.sampler_logprobs.cpu()
            for j, i in enumerate(active):
                take_turn(episodes[i], responses[j], mask[j], sampler[j], turn, renderer, limits,
                          counts)
    finally:
        for e in episodes:
            close(e.env)
    for e in episodes:
        env_counts = getattr(e.env, "counts", None)
        for k in OUTCOMES if isinstance(env_counts, dict) else ():  # the same keys on every rank
            counts[k] += int(env_counts.get(k, 0))
        counts["truncated"] += e.truncated
    return episode_batch(episodes, pad_id, prompt_len), counts


def take_turn(e: _Episode, responses, mask, sampler, turn: int, renderer: Renderer,
              limits: Limits, counts: dict) -> None:
    """Append one sampled turn to episode `e`, let the environment answer it, and end the episode
    where it ends: done, the last turn, a turn cut by max_new_tokens (truncated), an environment
    that fails (counted), or no room for the next observation and a whole turn (truncated)."""
    n = int(mask.sum())
    ids = responses[:n].tolist()
    e.ids += ids
    e.model += [True] * n
    e.sampler += sampler[:n].tolist()
    e.turns += 1
    if n == 0:  # nothing sampled (an engine that returns an empty turn): nothing to answer
        e.done = e.truncated = True
        return
    cut = ids[-1] != renderer.eos  # the turn ran out of max_new_tokens mid-thought
    try:
        obs, reward, done = guarded(e.env.step, renderer.tokenizer.decode(
            ids, skip_special_tokens=True), "step", limits)
        reply = [] if done or cut or turn + 1 == limits.max_turns or obs is None else \
            checked(lambda: renderer.observation(obs), "step", limits)
    except _Failed:
        counts["env_errors"] += 1
        e.done = True
        return
    if reward:
        e.rewards.append((len(e.ids) - 1, reward))
    if cut:
        e.done = e.truncated = True
    elif done or turn + 1 == limits.max_turns:
        e.done = True
    elif len(e.ids) + len(reply) + limits.max_new_tokens > limits.max_episode_tokens:
        e.done = e.truncated = True  # the next turn would not fit: end here, whole
    else:
        e.ids += reply
        e.model += [False] * len(reply)
        e.sampler += [0.0] * len(reply)


def new_environment(make_env: Callable[[], Any]):
    """make_env(), checked: an object with reset and step (a ValueError naming what is wrong)."""
    try:
        env = make_env()
    except Exception as err:  # the user's factory
        raise ValueError(f"the environment factory raised {type(err).__name__}: {err}") from None
    missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
    if missing:
        raise ValueError(f"the environment factory returned a {type(env).__name__}, which has no "
                         f"{' or '.join(missing)} method (an environment has reset(row) and "
                         "step(turn))")
    return env


def first_observation(renderer: Renderer, env, row: dict, global_row: int, limits: Limits):
    """The ids of an episode's first observation (text becomes a user message where the tokenizer
    has a chat template); a ValueError naming the row when it cannot be rendered or is too long."""
    try:
        first = guarded(env.reset, row, "reset", limits)
    except ValueError as err:  # EnvironmentFailed (strict) too: the same kind, the row named
        raise type(err)(f"row {global_row}: {err}") from None
    if isinstance(first, str) and renderer.chat:
        first = [{"role": "user", "content": first}]
    try:
        prompt = renderer.prompt(first)
    except ValueError as err:
        raise ValueError(f"row {global_row}: environment reset: {err}") from None
    if not prompt:
        raise ValueError(f"row {global_row}: environment reset gave a first observation of no "
                         "tokens; the model's first turn needs one to follow")
    if limits.context and len(prompt) + limits.max_episode_tokens > limits.context:
        raise ValueError(f"row {global_row}: environment reset gave a first observation of "
                         f"{len(prompt)} tokens: with max_episode_tokens={limits.max_episode_tokens} "
                         f"that is more than the {limits.context} positions this run was sized for "
                         "(the longest first observation at start + max_episode_tokens, within the "
                         "policy's context)")
    return prompt


def close(env) -> None:
    """env.close() where the environment has one (its failure is not the run's)."""
    try:
        getattr(env, "close", lambda: None)()
    except Exception:  # noqa: BLE001 (the user's environment; the episode is over)
        pass


class _Failed(Exception):
    pass


def guarded(fn, arg, what: str, limits: Limits):
    """fn(arg); an exception is the run's (strict: one line) or the episode's end (_Failed). A step
    must return (observation: None | text | messages, reward: a finite number, done)."""
    out = checked(lambda: fn(arg), what, limits)
    if what == "step":
        problem = step_problem(out)
        if problem:
            if limits.strict:
                raise EnvironmentFailed(f"environment step returned {problem} (strict_env: "
                                        "stopping; without it the episode ends)")
            raise _Failed()
        return out[0], as_number(out[1]), bool(out[2])
    return out


def checked(call: Callable, what: str, limits: Limits):
    """call(); an exception (the user's environment, or rendering what it returned) ends the
    episode (_Failed), or stops a strict run with one line; a reset that raises stops the run."""
    try:
        return call()
    except EnvironmentFailed:
        raise
    except Exception as err:  # noqa: BLE001 (the user's environment)
        if limits.strict:
            raise EnvironmentFailed(f"environment {what} raised {type(err).__name__}: {err} "
                                    "(strict_env: stopping; without it the episode ends)") from None
        if what == "reset":
            raise ValueError(f"environment reset raised {type(err).__name__}: {err}; an episode "
                             "needs a first observation") from None
        raise _Failed() from None


def step_problem(out) -> str | None:
    """Why a step's return value is not (observation, reward, done), or None."""
    if not (isinstance(out, tuple) and len(out) == 3):
        return f"{type(out).__name__}, not (observation, reward, done)"
    obs, reward, _ = out
    if obs is not None and not isinstance(obs, (str, list)):
        return f"an observation of type {type(obs).__name__} (expected None, text or messages)"
    if not math.isfinite(as_number(reward)):
        return f"the reward {reward!r} (expected a finite number)"
    return None


def as_number(reward) -> float:
    """A reward as a float: a real number (bool, int, float, numpy's) or a one-element array or
    tensor; NaN for anything else."""
    if isinstance(reward, numbers.Real):
        return float(reward)
    if getattr(reward, "ndim", None) == 0 and hasattr(reward, "item"):
        value = reward.item()
        return float(value) if isinstance(value, numbers.Real) else math.nan
    return math.nan


def episode_batch(episodes: list[_Episode], pad_id: int, prompt_len: int | None) -> Batch:
    batch = pack([e.prompt for e in episodes], [e.ids for e in episodes], pad_id, prompt_len,
                 trained=[e.model for e in episodes])
    R = batch.response_mask.shape[1]
    sampler = torch.zeros(len(episodes), R)
    turn_rewards = torch.zeros(len(episodes), R)
    for i, e in enumerate(episodes):
        sampler[i, :len(e.sampler)] = torch.tensor(e.sampler)
        for position, reward in e.rewards:
            turn_rewards[i, position] += reward
    batch.sampler_logprobs = sampler
    batch.per_token["turn_rewards"] = turn_rewards
    batch.per_row.update(turns=torch.tensor([float(e.turns) for e in episodes]),
                         truncated=torch.tensor([float(e.truncated) for e in episodes]),
                         env_reward=turn_rewards.sum(-1))
    return batch


def metrics(batch: Batch, outcomes: dict) -> dict:
    """Multi-turn episodes (env or tools): turns per episode, the environment's reward, the share of
    episode tokens the model wrote, the fraction of episodes truncated, and the outcome counts of
    fastppo.episodes (tool calls, tool errors and timeouts, malformed calls, environment errors)."""
    if "turns" not in batch.per_row:
        return {}
    region = batch.attention_mask[:, batch.prompt_len:]
    return {"turns_per_episode": batch.per_row["turns"].mean().item(),
            "env_reward": batch.per_row["env_reward"].mean().item(),
            "model_token_fraction": (batch.response_mask.sum() / region.sum().clamp(min=1)).item(),
            "truncated_fraction": batch.per_row["truncated"].mean().item(),
            **{k: v for k, v in outcomes.items() if k != "truncated"}}


def collect(engine, renderer: Renderer, make_env: Callable[[], Any], data_rows: list[dict],
            iteration: int, limits: Limits, device) -> tuple[Batch, dict]:
    """The iteration's episodes as one global batch on every rank (as fastppo.rollout.collect):
    each rank runs its rows' episodes, the engine's tokens keyed by (iteration, global row, turn),
    then the ranks exchange them; the outcome counts are summed over the ranks."""
    rows = distributed.my_rows(torch.arange(len(data_rows)))

    def generate(contexts, rows, turn):
        return engine.generate(contexts, iteration=iteration, rows=rows, turn=turn)
    local, counts = run_episodes(generate, make_env, [data_rows[i] for i in rows.tolist()],
                                 renderer, limits, global_rows=rows, pad_id=engine.pad_id)
    batch = rollout.gather_batch(local.to(device), limits.max_episode_tokens, engine.pad_id)
    totals = torch.tensor([float(counts[k]) for k in counts], dtype=torch.float64, device=device)
    distributed.sum_over_ranks(totals)
    return batch, dict(zip(counts, (int(v) for v in totals.tolist())))


def first_prompts(cfg, make_env, renderer: Renderer, rows: list[dict]) -> list[list[int]]:
    """Every row's first observation as ids, from a fresh environment each (its reset), before any
    model is loaded: the context and micro-batch checks see the prompts episodes will start from,
    and a reset that raises stops the run here, naming the row."""
    limits = Limits(cfg.max_turns, cfg.max_new_tokens, cfg.max_episode_tokens, cfg.strict_env)
    prompts = []
    for i, row in enumerate(rows):
        env = new_environment(make_env)
        try:
            prompts.append(first_observation(renderer, env, row, i, limits))
        except ValueError as err:
            raise ValueError(f"prompts {cfg.prompts}: {err}") from None
        finally:
            close(env)
    return prompts


def environment_factory(cfg, tokenizer) -> tuple[Callable[[], Any], Renderer]:
    """(a function that builds one episode's environment, the renderer of its observations) for a
    PPO config with `env` or `tools`."""
    if cfg.tools:
        tools = load_tools(cfg.tool_specs)
        renderer = Renderer(tokenizer, tool_schemas(list(tools.values())))
        make = lambda: ToolEnvironment(tools, cfg.tool_timeout, cfg.strict_env)  # noqa: E731
    else:
        make, renderer = rewards.load(cfg.env, what="env"), Renderer(tokenizer)
    if renderer.chat:  # the turn's end must be the EOS the model stops at, and a turn must render
        renderer.observation("check")  # the same once a message follows: checked at start
    return make, renderer

"""Rewards from a Python function (a verifier), named in the config as "module:function".

The function is called with one rollout's share of responses at a time and returns one float each:

    def reward(prompts: list[str], responses: list[str], prompt_ids: list[list[int]],
               response_ids: list[list[int]]) -> list[float]

prompts/responses are decoded without special tokens; the ids are the tokens themselves (the
response's up to and including its EOS, if it has one). The module is imported as Python imports any
module (from the working directory or sys.path): naming it in the config is asking fastppo to run it.

A function that raises, returns the wrong number of values, or a NaN or infinite one stops the run
with a message that names the function and the offending row. With `reward_fn_error_value` set, a
row whose call raises or whose value is not finite gets that value instead and is counted (metric
`reward_fn_errors`); a wrong number of values always stops the run (no row can be blamed).
"""
from __future__ import annotations

import importlib
import math
import sys
from numbers import Real
from pathlib import Path

from fastppo.config import REWARD_FN_SPEC


def load(spec: str, what: str = "reward_fn"):
    """The callable named by "module:function" (an error naming `what` and the spec when it cannot
    be found): reward functions, tools, environment factories."""
    if not isinstance(spec, str) or not REWARD_FN_SPEC.match(spec):
        raise ValueError(f"{what} must be 'module:function' (e.g. 'my_rewards:exact_match'); "
                         f"got {spec!r}")
    module_name, name = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: the working directory's modules
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no function {name!r}")
    return fn


def _value(row, value):
    """A finite float, or the reason it is not one."""
    if isinstance(value, (bool, str, bytes)):
        return None, f"returned {type(value).__name__} {value!r} for row {row}, not a number"
    if not isinstance(value, Real):
        try:  # a 0-d tensor or numpy scalar
            value = float(value)
        except (TypeError, ValueError):
            return None, f"returned {type(value).__name__} for row {row}, not a number"
    value = float(value)
    if not math.isfinite(value):
        return None, f"returned {value} for row {row}"
    return value, None


def score(fn, spec: str, prompts, responses, prompt_ids, response_ids, *,
          error_value: float | None = None, rows: list[int] | None = None) -> tuple[list[float], int]:
    """fn's rewards for these rows, and how many rows got error_value instead. rows: their numbers
    in the rollout (for the messages; default 0, 1, ...)."""
    n = len(responses)
    rows = list(range(n)) if rows is None else list(rows)
    try:
        out = fn(prompts, responses, prompt_ids, response_ids)
    except Exception as err:  # the user's code: find the row that breaks it
        out = None
        batch_error = err
    if out is not None:  # no row to blame for these: always fatal
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
            raise ValueError(f"reward_fn {spec!r} returned {type(out).__name__}, not a list of one "
                             f"float per response ({n} responses)")
        out = list(out)
        if len(out) != n:
            raise ValueError(f"reward_fn {spec!r} returned {len(out)} values for {n} responses "
                             "(one float per response expected)")
    values, errors = [], 0
    for i in range(n):
        row = rows[i]
        if out is None:  # call it on this row alone to tell which row raises
            try:
                single = list(fn(prompts[i:i + 1], responses[i:i + 1], prompt_ids[i:i + 1],
                                 response_ids[i:i + 1]))
                value, problem = _value(row, single[0]) if len(single) == 1 else (
                    None, f"returned {len(single)} values for 1 response (row {row})")
            except Exception as err:
                value, problem = None, f"raised {type(err).__name__}: {err} on row {row}"
        else:
            value, problem = _value(row, out[i])
        if problem is not None:
            if error_value is None:
                detail = f" (response {responses[i]!r})" if len(responses[i]) < 200 else ""
                raise ValueError(f"reward_fn {spec!r} {problem}{detail}; set reward_fn_error_value "
                                 "to give such rows a fixed reward instead of stopping")
            value, errors = error_value, errors + 1
        values.append(value)
    if out is None and errors == 0 and error_value is None:
        # every row works alone: the batch call itself is broken (with reward_fn_error_value set,
        # the rows' own values stand: a flaky verifier does not stop the run)
        raise ValueError(f"reward_fn {spec!r} raised {type(batch_error).__name__}: {batch_error} on "
                         f"rows {rows}, but on none of them alone; set reward_fn_error_value to keep "
                         "the rows' values scored one at a time")
    return values, errors

"""The `fastppo` command: sft | rm | ppo | pipeline | demo.

Each trainer command takes its dataclass config (fastppo.config) from a YAML file (`--config FILE`)
and/or flags (`--lr 1e-3`); jsonargparse rejects unknown keys, wrong types and a value outside a
field's choices, and the config's check() (run once, as the run starts: fastppo.run.owns_output)
rejects impossible combinations, all before any work starts; bad input gets one line on stderr.
`fastppo demo` with no arguments runs the whole pipeline on the built-in task in a few seconds to a
minute on a CPU.
"""
from __future__ import annotations

import json
import os
import sys
from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from jsonargparse import _loaders_dumpers

from fastppo.config import (YAML_MAX_BYTES, YAML_MAX_BYTES_TEXT, PPOConfig, RMConfig, SFTConfig,
                            limited_loader, read_config_text)
from fastppo.demo import DemoConfig
from fastppo.pipeline import PipelineConfig
from fastppo.run import Stopped

set_parsing_settings(docstring_parse_attribute_docstrings=True)
# Every YAML jsonargparse reads (--config files and text, and flag values such as the pipeline's
# --ppo '{...}') goes through its yaml_load with its default loader class, a safe loader (no tag
# runs code). Ours is that class refusing a document whose aliases expand past a limit, or that
# nests too deep (fastppo.config.check_yaml_node): a "billion laughs" config is refused at once
# instead of running for minutes through gigabytes. jsonargparse has no public hook for this class
# (set_loader replaces the config loader only, not the one flag values go through).
_loaders_dumpers.yaml_default_loader = limited_loader(_loaders_dumpers.get_yaml_default_loader())

COMMANDS = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "pipeline": PipelineConfig}
ERROR_HEAD, ERROR_TAIL = 400, 150  # the characters of an error kept from its start and its end


class Parser(ArgumentParser):
    """jsonargparse's parser, reading a config file (--config, or a `config:` key in one) within
    fastppo's limits before jsonargparse reads it: a regular file of at most 1 MiB of UTF-8 text,
    read no further (fastppo.config.read_config_text); an error about its content names the file."""

    def parse_path(self, path, *args, **kwargs):
        if str(path) == "-":  # stdin, as jsonargparse reads it
            return super().parse_path(path, *args, **kwargs)
        try:
            read_config_text(path)
        except ValueError as e:
            self.error(str(e))
        try:
            return super().parse_path(path, *args, **kwargs)
        except ArgumentError as e:
            self.error(f"config {path}: {e.message}")

    def parse_string(self, content, *args, **kwargs):
        if len(content) > YAML_MAX_BYTES:
            self.error(f"config text of {len(content)} characters: larger than {YAML_MAX_BYTES_TEXT}")
        return super().parse_string(content, *args, **kwargs)


class ConfigFile(ActionConfigFile):
    """--config FILE (or YAML text): a file is checked as Parser.parse_path reads one, also where
    jsonargparse would take a name that is no readable file (a directory) for YAML text."""

    @staticmethod
    def apply_config(parser, cfg, dest, value) -> None:
        if isinstance(value, str) and value != "-" and os.path.lexists(value):
            try:
                read_config_text(value)
            except ValueError as e:
                parser.error(str(e))
        ActionConfigFile.apply_config(parser, cfg, dest, value)


def parser() -> ArgumentParser:
    root = Parser(prog="fastppo", description=__doc__.splitlines()[0], exit_on_error=False)
    sub = root.add_subcommands(dest="command")
    for name, cls in COMMANDS.items():
        p = Parser(description=f"{name}: {cls.__name__}", exit_on_error=False)
        p.add_argument("--config", action=ConfigFile, help="YAML file with any of the fields below")
        p.add_class_arguments(cls, nested_key=None, as_group=False)
        sub.add_subcommand(name, p, help=f"train: {cls.__name__}" if name != "pipeline"
                           else "SFT -> RM -> PPO on your data")
    demo = Parser(description="the whole pipeline on the built-in task, with a tiny model",
                  exit_on_error=False)
    demo.add_class_arguments(DemoConfig, nested_key=None, as_group=False)
    sub.add_subcommand("demo", demo, help="SFT -> RM -> PPO on 'make the continuation positive' (or --task "
                       "arithmetic: SFT -> GRPO with a verifier as the reward; --task tools: GRPO on "
                       "multi-turn episodes with a calculator tool)")
    return root


def say(line: str) -> None:
    """Print once: on rank 0 under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
    except ArgumentError as e:  # a flag or YAML key the parser refuses: one line, naming the field
        command = f"fastppo {argv[0]}" if argv and argv[0] in (*COMMANDS, "demo") else "fastppo"
        print(f"{command}{_rank()}: error: {one_line(str(e))} (see `{command} --help`)",
              file=sys.stderr)
        return 2
    name = args.command
    options = {k: v for k, v in vars(args[name]).items() if k not in ("config", "__path__")}
    try:
        if name == "demo":
            from fastppo.demo import demo

            demo(DemoConfig(**options))  # checks its config
            return 0
        cfg = COMMANDS[name](**options)  # checked once, as its run starts (fastppo.run)
        if name == "pipeline":
            from fastppo.pipeline import run_pipeline

            result = run_pipeline(cfg)
            say(json.dumps({k: v if isinstance(v, (int, float)) else str(v)
                            for k, v in result.items()}, indent=2))
            return 0
        if name == "sft":
            from fastppo.sft import train_sft

            say(f"SFT checkpoint: {train_sft(cfg)}")
        elif name == "rm":
            from fastppo.rm import train_rm

            checkpoint, accuracy = train_rm(cfg)
            say(f"reward model checkpoint: {checkpoint} (held-out pairwise accuracy {accuracy:.3f})")
        else:
            from fastppo.ppo import train_ppo

            say(f"PPO checkpoint: {train_ppo(cfg)}")
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"fastppo {name}{_rank()}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Stopped as e:  # the run stopped itself (non-finite loss): one line, checkpoint kept
        print(f"fastppo {name}{_rank()}: stopped: {one_line(str(e))}", file=sys.stderr)
        return 1
    return 0


def one_line(text: str) -> str:
    """`text` as one line (each run of whitespace one space) of at most about 600 characters,
    whatever the input: a longer one keeps its start and its end and says how much it cut."""
    keep = ERROR_HEAD + ERROR_TAIL
    if len(text) <= 4 * keep:
        text = " ".join(text.split())
        if len(text) <= keep + 40:
            return text
    head = " ".join(text[:4 * ERROR_HEAD].split())[:ERROR_HEAD]
    tail = " ".join(text[-4 * ERROR_TAIL:].split())[-ERROR_TAIL:]
    return f"{head} ... ({len(text) - len(head) - len(tail)} characters cut) ... {tail}"


def _rank() -> str:
    """" (rank R)" under torchrun, where every rank reports its own errors."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())

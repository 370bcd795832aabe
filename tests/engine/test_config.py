"""The configs: options declared once and shared, per-trainer defaults, Literal choices checked for
configs built in Python, and each run's config checked once, as the run starts (fastppo.run)."""
import ast
import re
import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest

from fastppo import config, rewards, run
from fastppo.config import (ModelOptions, PPOConfig, RMConfig, RunOptions, SFTConfig,
                            TrainerOptions)
from fastppo.demo import DemoConfig
from fastppo.pipeline import PipelineConfig
from fastppo.rollout import ENGINES
from fastppo.rollout.vllm import VLLMOptions

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {SFTConfig: dict(data="d", model="m"), RMConfig: dict(data="d", model="m"),
           PPOConfig: dict(prompts="p", policy="x", reward_model="r"), DemoConfig: {}}


def names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def test_every_option_is_declared_once():
    # Each trainer's option fields come from the option classes, not from the trainer's own body.
    for cls in (SFTConfig, RMConfig, PPOConfig):
        assert names(TrainerOptions) | names(ModelOptions) <= names(cls)
        own = set(cls.__annotations__) - {"_"}
        assert own & names(TrainerOptions) <= {"out", "lr", "batch_size", "save_every"}  # defaults only
        assert not own & (names(ModelOptions) | names(VLLMOptions))
    assert issubclass(PPOConfig, VLLMOptions) and issubclass(PipelineConfig, RunOptions)
    assert not set(PipelineConfig.__annotations__) & (names(RunOptions) - {"out"})


@pytest.mark.parametrize("cls,defaults", [
    (SFTConfig, dict(out="runs/sft", lr=3e-3, batch_size=32, save_every=100)),
    (RMConfig, dict(out="runs/rm", lr=1e-3, batch_size=32, save_every=100)),
    (PPOConfig, dict(out="runs/ppo", lr=1e-3, batch_size=64, save_every=10,
                     gpu_memory_utilization=0.5, vllm_sleep=False)),
])
def test_per_trainer_defaults_are_kept(cls, defaults):
    cfg = cls(**MINIMAL[cls])
    assert {k: getattr(cfg, k) for k in defaults} == defaults
    assert (cfg.seed, cfg.device, cfg.dtype, cfg.resume, cfg.overwrite) == (0, "cpu", "float32",
                                                                            False, False)
    assert PipelineConfig(model="m", sft_data="s", rm_data="r", prompts="p").out == "runs/pipeline"


def test_every_flag_has_its_help_and_default():
    from fastppo.cli import parser

    subcommands = parser()._subcommands_action._name_parser_map
    for name, cls in [("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig),
                      ("pipeline", PipelineConfig), ("demo", DemoConfig)]:
        actions = {a.dest: a for a in subcommands[name]._actions}
        for f in fields(cls):
            assert actions[f.name].help and actions[f.name].help.strip(), (name, f.name)
        for key, value in (("out", f"runs/{name}"),):
            assert actions[key].default == value
    ppo_actions = {a.dest: a for a in subcommands["ppo"]._actions}
    assert ppo_actions["out"].help == {a.dest: a for a in subcommands["sft"]._actions}["out"].help


def literal_fields():
    for cls in MINIMAL:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                yield cls, f.name, typing.get_args(hints[f.name])


LITERALS = list(literal_fields())


def test_string_choices_are_typed():
    assert {name for _, name, _ in LITERALS} == {
        "dtype", "advantage_estimator", "kl_estimator", "kl_loss_estimator", "loss_reduction",
        "rollout_engine", "task"}
    assert dict((n, c) for _, n, c in LITERALS)["rollout_engine"] == tuple(ENGINES)


@pytest.mark.parametrize("cls,name,choices", LITERALS,
                         ids=[f"{c.__name__}.{n}" for c, n, _ in LITERALS])
def test_a_bad_choice_is_refused_naming_the_field(cls, name, choices):
    cfg = cls(**MINIMAL[cls])
    for value in choices:
        replace(cfg, **{name: value})  # every choice builds (check() may refuse a combination)
    message = f"{name} must be one of {choices!r}; got 'x'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        replace(cfg, **{name: "x"}).check()


def test_config_imports_neither_distributed_nor_rewards():
    tree = ast.parse((ROOT / "fastppo" / "config.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"fastppo.distributed", "fastppo.rewards"}, imported
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "fastppo"
                   and {a.name for a in n.names} & {"distributed", "rewards"} for n in ast.walk(tree))


def test_reward_fn_spec_is_one_pattern():
    assert rewards.REWARD_FN_SPEC is config.REWARD_FN_SPEC
    with pytest.raises(ValueError, match="reward_fn must be 'module:function'; got 'nocolon'"):
        PPOConfig(prompts="p", policy="x", reward_fn="nocolon").check()
    with pytest.raises(ValueError, match=r"reward_fn must be 'module:function' \(e.g."):
        rewards.load("nocolon")
    assert rewards.load("fastppo.demo.arithmetic:reward")(["1 + 2 ="], ["3"], [[1]], [[2]]) == [1.0]


def test_the_world_size_check_runs_with_the_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    SFTConfig(data="d", model="m", batch_size=7).check()  # the config alone knows no world
    with pytest.raises(ValueError, match=r"batch_size \(7\) must be a multiple of the number of "
                                         r"processes \(2\)"):
        run.check_config(SFTConfig(data="d", model="m", batch_size=7))
    with pytest.raises(ValueError, match=r"mini_batch_size \(3\) must be a multiple"):
        run.check_config(PPOConfig(prompts="p", policy="x", reward_model="r", batch_size=6,
                                   mini_batch_size=3))
    monkeypatch.setenv("WORLD_SIZE", "1")
    run.check_config(SFTConfig(data="d", model="m", batch_size=7))


def counting_checks(monkeypatch, *classes):
    """Count each class's check() calls."""
    calls = {cls.__name__: 0 for cls in classes}
    for cls in classes:
        real = cls.check

        def check(self, real=real, name=cls.__name__):
            calls[name] += 1
            return real(self)
        monkeypatch.setattr(cls, "check", check)
    return calls


def test_the_cli_checks_a_trainer_config_once(monkeypatch, tmp_path):
    from fastppo import cli, sft

    calls = counting_checks(monkeypatch, SFTConfig)
    monkeypatch.setattr(sft, "train_sft", run.owns_output(lambda cfg: Path(cfg.out) / "checkpoint"))
    assert cli.main(["sft", "--data", "d", "--model", "m", "--out", str(tmp_path / "sft")]) == 0
    assert calls == {"SFTConfig": 1}
    assert (tmp_path / "sft" / run.CONFIG).is_file()


def test_the_pipeline_checks_each_stage_once_before_the_first(monkeypatch, tmp_path):
    from fastppo import pipeline

    calls = counting_checks(monkeypatch, SFTConfig, RMConfig, PPOConfig)
    seen = []

    def stage(result):
        def train(cfg):
            seen.append((type(cfg).__name__, dict(calls)))
            return result
        return run.owns_output(train)
    monkeypatch.setattr(pipeline, "read_jsonl", lambda path, kind: [])
    monkeypatch.setattr(pipeline, "check_model_dir", lambda path, what: None)
    monkeypatch.setattr(pipeline, "train_sft", stage("sft"))
    monkeypatch.setattr(pipeline, "train_rm", stage(("rm", 0.5)))
    monkeypatch.setattr(pipeline, "train_ppo", stage("ppo"))
    cfg = PipelineConfig(model="m", sft_data="s", rm_data="r", prompts="p", out=str(tmp_path),
                         dtype="float32", ppo={"kl_coef": 0.1})
    assert pipeline.run_pipeline(cfg)["rm_accuracy"] == 0.5
    once = {"SFTConfig": 1, "RMConfig": 1, "PPOConfig": 1}
    assert seen == [("SFTConfig", once), ("RMConfig", once), ("PPOConfig", once)]
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\); got 'x'"):
        pipeline.run_pipeline(replace(cfg, dtype="x"))


def test_a_python_caller_gets_the_checks(tmp_path):
    train = run.owns_output(lambda cfg: "trained")
    with pytest.raises(ValueError, match=r"rollout_engine must be one of \('hf', 'vllm'\); got 'x'"):
        train(PPOConfig(prompts="p", policy="x", reward_model="r", rollout_engine="x",
                        out=str(tmp_path / "ppo")))
    assert not (tmp_path / "ppo").exists()
    assert train(SFTConfig(data="d", model="m", out=str(tmp_path / "sft"))) == "trained"


def test_vllm_options_keep_their_flags():
    from fastppo.cli import parser

    args = parser().parse_args(["ppo", "--prompts", "p", "--policy", "x", "--reward_model", "r",
                                "--gpu_memory_utilization", "0.7", "--vllm_sleep", "true"])
    cfg = PPOConfig(**{k: v for k, v in vars(args.ppo).items() if k not in ("config", "__path__")})
    assert (cfg.gpu_memory_utilization, cfg.vllm_sleep) == (0.7, True)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]; got 1.5"):
        replace(cfg, gpu_memory_utilization=1.5).check()

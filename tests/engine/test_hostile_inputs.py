"""Broken and hostile inputs (issue 27): model directories, data lines, integer flags and YAML configs
that once gave a traceback, overflowed, or ran for minutes. Each is refused with one short line on
stderr and exit code 2, before any work. The CLI runs in this process (fastppo.cli.main): every case
fails before a model is loaded."""
import json
import os
import time

import pytest

from fastppo.cli import main
from fastppo.data import read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model directory (untrained: nothing here gets as far as training) and SFT data."""
    from fastppo.demo import seeded_base_model, sentiment

    tmp = tmp_path_factory.mktemp("hostile")
    model = seeded_base_model(tmp, 0, sentiment.build_tokenizer())
    (tmp / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 4)
    (tmp / "prompts.jsonl").write_text('{"prompt": "a"}\n' * 4)
    return tmp, model


def refused(capsys, *argv, limit=700):
    """`fastppo ARGV`'s stderr, asserted to be one line of at most `limit` characters, exit code 2."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and err.strip().count("\n") == 0, err[-2000:]
    assert len(err) <= limit, err[:2000]
    return err


def _copy(model, path):
    import shutil

    shutil.copytree(model, path)
    return path


def _loop(path):
    """`path` as a symbolic link to itself."""
    os.symlink(path.name, path)
    return path


def _bad_model(tmp, model, kind):
    """A model directory broken in the way `kind` names, and what the refusal must say."""
    path = tmp / f"model-{kind}"
    if kind == "symlink loop":
        return _loop(path), f"model {path}: a loop of symbolic links"
    _copy(model, path)
    if kind == "config.json a directory":
        (path / "config.json").unlink()
        (path / "config.json").mkdir()
        return path, f"model {path}: config.json is a directory, not a file"
    if kind == "config.json a symlink loop":
        (path / "config.json").unlink()
        _loop(path / "config.json")
        return path, f"model {path}: config.json is a loop of symbolic links"
    if kind == "config.json nested deep":
        deep = "[" * 100_000 + "]" * 100_000
        (path / "config.json").write_text('{"model_type": "llama", "x": ' + deep + "}")
        return path, f"model {path}: unreadable config.json (RecursionError"
    if kind == "config.json wrong type":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
        return path, f"model {path}: unreadable config.json"
    if kind == "tokenizer.json garbage":
        (path / "tokenizer.json").write_text("garbage{")
        return path, f"model {path}: unreadable tokenizer"
    if kind == "weights a directory":
        (path / "model.safetensors").unlink()
        (path / "model.safetensors").mkdir()
        return path, f"model {path}: model.safetensors is a directory, not a file"
    if kind == "weights truncated":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        return path, f"model {path}: damaged weights file model.safetensors"
    if kind == "weights missing":
        (path / "model.safetensors").unlink()
        return path, f"model {path}: no weights (model.safetensors"
    raise AssertionError(kind)


MODEL_DIRS = ["symlink loop", "config.json a directory", "config.json a symlink loop",
              "config.json nested deep", "config.json wrong type", "tokenizer.json garbage",
              "weights a directory", "weights truncated", "weights missing"]


@pytest.mark.parametrize("kind", MODEL_DIRS)
def test_an_unreadable_model_directory_is_named(base, capsys, kind):
    tmp, model = base
    path, message = _bad_model(tmp, model, kind)
    err = refused(capsys, "sft", "--data", tmp / "sft.jsonl", "--model", path, "--out", tmp / f"run-{kind}")
    assert message in err


@pytest.mark.parametrize("field", ["policy", "reward_model"])
def test_a_symlink_loop_is_named_for_each_model_field(base, capsys, field):
    tmp, model = base
    loop = _loop(tmp / f"loop-{field}")
    models = {"policy": model, "reward_model": model, field: loop}
    err = refused(capsys, "ppo", "--prompts", tmp / "prompts.jsonl", "--policy", models["policy"],
                  "--reward_model", models["reward_model"], "--out", tmp / f"run-{field}")
    assert f"{field} {loop}: a loop of symbolic links" in err


def test_a_data_file_that_is_a_symlink_loop_is_named(base, capsys):
    tmp, model = base
    loop = _loop(tmp / "loop.jsonl")
    err = refused(capsys, "sft", "--data", loop, "--model", model, "--out", tmp / "run-data-loop")
    assert f"data {loop}: a loop of symbolic links" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_model_directory_without_permission_is_named(base, capsys):
    tmp, model = base
    path = _copy(model, tmp / "model-private")
    (path / "config.json").chmod(0)
    try:
        err = refused(capsys, "sft", "--data", tmp / "sft.jsonl", "--model", path, "--out", tmp / "run-p")
    finally:
        (path / "config.json").chmod(0o644)
    assert f"model {path}: config.json is not readable (permission denied)" in err


# -- data lines -------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,message", [
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "response": "b"}',
     "not valid JSON (nested more than"),
    ('{"prompt": "a", "response": "b", "n": ' + "1" * 5000 + "}", "not valid JSON (Exceeds the limit"),
    ('{"prompt": "a\\ud800", "response": "b"}',
     "field 'prompt' is not Unicode text (an unpaired surrogate \\ud800 at character 2)"),
], ids=["nested 100,000 deep", "5000-digit integer", "lone surrogate"])
def test_a_hostile_data_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        read_jsonl(path, "sft")
    assert f"{path}:2: {message}" in str(e.value)


def test_a_data_file_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"sft data file {tmp_path} is a directory, not a file"):
        read_jsonl(tmp_path, "sft")


def test_a_deeply_nested_data_line_on_the_command_line(base, capsys):
    tmp, model = base
    data = tmp / "deep.jsonl"
    data.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    err = refused(capsys, "sft", "--data", data, "--model", model, "--out", tmp / "run-deep")
    assert f"{data}:1: not valid JSON (nested more than" in err


# -- integers past what they feed ---------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["sft", "--seed", "99999999999999999999"],
     "seed must be in [-2**63, 2**64 - 1]; got 99999999999999999999"),
    (["sft", "--seed", str(-2 ** 63 - 1)], "seed must be in [-2**63, 2**64 - 1]"),
    (["ppo", "--seed", str(2 ** 63)], "seed must be in [-2**63, 2**63 - 1] (PPO keys its sampling"),
    (["sft", "--steps", "1" + "0" * 400], "steps must be <= 2**31 - 1; got a 401-digit number"),
    (["sft", "--batch_size", str(2 ** 63)], f"batch_size must be <= 2**31 - 1; got {2 ** 63}"),
    (["rm", "--lora_rank", str(2 ** 40)], "lora_rank must be <= 2**31 - 1"),
    (["ppo", "--top_k", str(2 ** 63)], "top_k must be <= 2**31 - 1"),
    (["ppo", "--max_new_tokens", str(2 ** 64)], "max_new_tokens must be <= 2**31 - 1"),
    (["ppo", "--iterations", str(2 ** 64)], "iterations must be <= 2**31 - 1"),
    (["pipeline", "--sft_steps", str(2 ** 64)], "steps must be <= 2**31 - 1"),
    (["demo", "--seed", "99999999999999999999"], "seed must be in [-2**63, 2**63 - 1] (PPO keys"),
], ids=["seed 2**66", "seed -2**63-1", "ppo seed 2**63", "steps 10**400", "batch_size 2**63",
        "lora_rank 2**40", "top_k 2**63", "max_new_tokens 2**64", "iterations 2**64",
        "pipeline sft_steps 2**64", "demo seed 2**66"])
def test_an_integer_past_its_range_names_the_field(base, capsys, args, message):
    tmp, model = base
    inputs = {"sft": ["--data", "d", "--model", "m"], "rm": ["--data", "d", "--model", "m"],
              "ppo": ["--prompts", "p", "--policy", "x", "--reward_model", "y"],
              "pipeline": ["--model", "m", "--sft_data", "d", "--rm_data", "d", "--prompts", "p"],
              "demo": []}
    err = refused(capsys, args[0], *inputs[args[0]], *args[1:], "--out", tmp / "run-int")
    assert message in err


def test_seeds_that_work_keep_working():
    from fastppo.config import PPOConfig, SFTConfig

    for seed in (-2 ** 63, -5, 0, 2 ** 64 - 1):
        SFTConfig(data="d", model="m", seed=seed).check()
    PPOConfig(prompts="p", policy="x", reward_model="y", seed=2 ** 63 - 1).check()


# -- YAML configs ------------------------------------------------------------------------------------

def billion_laughs(levels=9, width=9, key="a"):
    """YAML whose aliases expand to width**levels strings."""
    lines = [f"{key}0: &{key}0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"{key}{i}: &{key}{i} [" + ", ".join([f"*{key}{i - 1}"] * width) + "]"
              for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_every_error_line_is_cut_to_a_few_hundred_characters():
    from fastppo.cli import one_line

    line = one_line("start " + "x\n" * 50_000_000 + " end")  # 100 MB, as an expanded alias bomb gave
    assert line.startswith("start x x") and line.endswith("x x end") and len(line) < 600
    assert "... (99999" in line and "characters cut) ..." in line
    assert one_line("a  short\n message") == "a short message"


def test_a_yaml_alias_bomb_is_refused_within_a_second(base, capsys):
    tmp, _ = base
    bomb = tmp / "bomb.yaml"
    bomb.write_text("data: d\nmodel: m\n" + billion_laughs(key="lora_target_modules_")
                    .replace("lora_target_modules_9:", "lora_target_modules:", 1))
    start = time.perf_counter()
    err = refused(capsys, "sft", "--config", bomb)
    assert time.perf_counter() - start < 1
    assert "expands to more than 100000 nodes" in err and f"config {bomb}" in err


def test_a_yaml_alias_bomb_in_a_flag_or_inline_config_is_refused(base, capsys):
    tmp, _ = base
    start = time.perf_counter()
    refused(capsys, "pipeline", "--model", "m", "--sft_data", "d", "--rm_data", "d", "--prompts", "p",
            "--ppo", billion_laughs(), "--out", tmp / "run-bomb")
    err = refused(capsys, "sft", "--config", "data: d\nmodel: m\n" + billion_laughs())
    assert "expands to more than 100000 nodes" in err
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("text,message", [
    ("a: &a [*a]\n", "expands to more than 100000 nodes"),  # a recursive alias
    ("data: d\nmodel: m\nlora_target_modules: " + "[" * 500 + "]" * 500 + "\n",
     "nested more than 100 levels deep"),
    ("data: !!python/object/apply:os.system ['touch {pwned}']\nmodel: m\n",
     "could not determine a constructor for the tag"),
    ("- 1\n- 2\n", "Unexpected config"),
    ("hello\n", "Unexpected config"),
    ("x" * 300_000 + "\n", "characters cut"),  # a long error is cut, whatever the input
], ids=["recursive alias", "nested 500 deep", "python tag", "a list", "a scalar", "a long scalar"])
def test_a_config_that_is_no_mapping_gets_one_short_line(base, capsys, text, message):
    tmp, _ = base
    pwned = tmp / "pwned"
    config = tmp / "config.yaml"
    config.write_text(text.format(pwned=pwned))
    start = time.perf_counter()
    err = refused(capsys, "sft", "--config", config)
    assert time.perf_counter() - start < 1
    assert message in err
    assert not pwned.exists()


@pytest.mark.parametrize("kind", ["binary garbage", "50 MB", "a directory", "nested garbage"])
def test_a_config_file_that_is_not_yaml_text(base, capsys, kind):
    tmp, _ = base
    config = tmp / f"config-{kind}.yaml"
    if kind == "binary garbage":
        config.write_bytes(b"data: d\n\xcc\xff\x00garbage")
        message = f"config {config}: not UTF-8 text (byte 0xcc at offset 8)"
    elif kind == "50 MB":
        config.write_bytes(b"data: d\nmodel: m\nlora_target_modules:\n" + b"- abcdefghij\n" * 4_000_000)
        message = f"config {config}: larger than 1 MiB"
    elif kind == "a directory":
        config.mkdir()
        message = f"config {config}: a directory, not a file"
    else:  # a config that names another config
        (tmp / "garbage.yaml").write_bytes(b"\xff\xfe")
        config.write_text(f"config: {tmp / 'garbage.yaml'}\n")
        message = f"config {tmp / 'garbage.yaml'}: not UTF-8 text"
    start = time.perf_counter()
    err = refused(capsys, "sft", "--config", config)
    assert time.perf_counter() - start < 1
    assert message in err


def test_load_yaml_refuses_what_the_cli_refuses(tmp_path):
    # fastppo.config.load_yaml: the limited safe loader for any other YAML fastppo reads (a
    # checkpoint's config.yaml), each refusal a ValueError naming the file.
    from fastppo.config import load_yaml

    assert load_yaml("a: &x [1, 2]\nb: *x\n", "c.yaml") == {"a": [1, 2], "b": [1, 2]}
    for text, message in ((billion_laughs(), "expands to more than 100000 nodes"),
                          ("!!python/object/apply:os.system ['true']", "could not determine a constructor"),
                          ("x" * (1 << 21), "larger than 1 MiB")):
        with pytest.raises(ValueError, match="^c.yaml: ") as e:
            load_yaml(text, "c.yaml")
        assert message in str(e.value) and len(str(e.value)) < 600

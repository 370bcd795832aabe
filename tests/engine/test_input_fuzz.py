"""A property test of the CLI's input handling: generated malformed data rows, configs and checkpoint
files for each trainer. Whatever the input, the command ends with exit code 2 (bad input), 1 (a run
that stopped itself, its checkpoint kept) or 0 (the mutation left the input valid, and it trained):
one `fastppo ...` line on stderr, no traceback, a short message, no code run from the input, and no
file changed but the run's own written files (the folder is snapshot before and after).

Each case runs in this process (fastppo.cli.main, stderr captured at fd 2 as cli_cases.py does), with
the smallest settings, so that a mutation that stays valid trains one step in about a second."""
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from cli_cases import run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = {"sft": ["--steps", "1", "--batch_size", "2", "--save_every", "1"],
        "rm": ["--steps", "1", "--batch_size", "2", "--save_every", "1", "--eval_fraction", "0.5"],
        "ppo": ["--iterations", "1", "--batch_size", "2", "--mini_batch_size", "2",
                "--max_new_tokens", "2", "--ppo_epochs", "1", "--save_every", "1"]}
DATA = {"sft": "sft.jsonl", "rm": "rm.jsonl", "ppo": "prompts.jsonl"}
FIELDS = {"sft": ("prompt", "response"), "rm": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
# What a run writes into its output folder (fastppo.run, fastppo.metrics, fastppo.checkpoint).
WRITTEN = ("config.yaml", "metrics.jsonl", "sft.png", "rm.png", "ppo.png", "checkpoint",
           "checkpoint.old", "checkpoint.tmp")
SETTINGS = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def inputs(small_run, tmp_path_factory):
    """A copy of the small run's data (4 rows each) and models, so that a stray write shows."""
    source, _ = small_run
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data").mkdir()
    for name in DATA.values():
        lines = (source / "data" / name).read_text().splitlines()[:4]
        (root / "data" / name).write_text("\n".join(lines) + "\n")
    for stage in ("base", "sft", "rm"):
        shutil.copytree(source / stage / ("checkpoint" if stage != "base" else ""),
                        root / stage, ignore=shutil.ignore_patterns("trainer"))
    return root


def command(trainer, root: Path, out: Path, *, data: Path | None = None) -> list[str]:
    data = data or root / "data" / DATA[trainer]
    if trainer == "ppo":
        models = ["--prompts", data, "--policy", root / "sft", "--reward_model", root / "rm"]
    else:
        models = ["--data", data, "--model", root / ("base" if trainer == "sft" else "sft")]
    return [trainer, *map(str, models), "--out", str(out), *TINY[trainer]]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def check(result: dict, trainer: str, before: dict, after: dict, out_name: str, *,
          kept: tuple[str, ...] = ()) -> None:
    code, stderr = result["code"], result["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(stderr) < 4000, f"{len(stderr)} characters on stderr"
    said = [line for line in stderr.splitlines() if line.startswith("fastppo ")]
    assert code in (0, 1, 2), (code, stderr[-2000:])
    if code:
        assert len(said) == 1 and said[0].startswith((f"fastppo {trainer}: error: ",
                                                      f"fastppo {trainer}: stopped: ")), stderr
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    for path in changed:  # only the run's own files, in its own folder
        parts = Path(path).parts
        assert parts[0] == out_name and parts[1] in WRITTEN, (path, stderr[-1000:])
        if code:  # a refused or stopped run keeps what was there (a damaged checkpoint included)
            assert not any(path.startswith(f"{out_name}/{k}") for k in kept), (path, stderr)


# ------------------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


DATA_KINDS = ("flip", "cut", "row", "field", "deep")
CONFIG_KINDS = ("value", "unknown", "tag", "bomb", "shape", "bytes")
CHECKPOINT_KINDS = ("cut", "flip", "garbage", "gone", "loop", "huge")


@st.composite
def malformed_data(draw, trainer, kind):
    """A data file: the valid one with bytes flipped, cut short, a row replaced by any JSON value,
    a field of the wrong type or absent, or deep nesting."""
    def mutate(text: str) -> bytes:
        rows = text.splitlines()
        i = draw(st.integers(0, len(rows) - 1))
        if kind == "flip":
            raw = bytearray(text.encode())
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, len(raw) - 1))
                raw[at] ^= 1 << draw(st.integers(0, 7))
            return bytes(raw)
        if kind == "cut":
            return text.encode()[:draw(st.integers(0, len(text) - 1))]
        if kind == "row":
            rows[i] = json.dumps(draw(json_values))
        elif kind == "field":
            row = json.loads(rows[i])
            field = draw(st.sampled_from(FIELDS[trainer]))
            if draw(st.booleans()):
                row[field] = draw(json_values)
            else:
                row.pop(field)
            rows[i] = json.dumps(row)
        else:
            depth = draw(st.sampled_from([100, 5000, 100_000]))
            rows[i] = "[" * depth + "]" * depth
        return ("\n".join(rows) + "\n").encode()
    return mutate


@st.composite
def malformed_config(draw, trainer, kind):
    """A YAML config: a field given a value of another type or out of range, an unknown key, a
    python tag, an alias bomb, a list or scalar document, or flipped bytes."""
    fields = {"sft": ["steps", "lr", "batch_size", "seed", "dtype", "lora_rank", "max_prompt_length"],
              "rm": ["steps", "lr", "eval_fraction", "seed", "dtype", "save_every"],
              "ppo": ["iterations", "top_p", "top_k", "temperature", "advantage_estimator", "seed",
                      "kl_coef", "mini_batch_size", "rollout_engine", "clip_eps"]}[trainer]
    if kind == "value":
        value = draw(st.one_of(json_values, st.sampled_from([-1, 0, 2**64, 10**30, float("nan"),
                                                             float("inf"), "x", [1, 2]])))
        return yaml.safe_dump({draw(st.sampled_from(fields)): value})
    if kind == "unknown":
        return yaml.safe_dump({draw(st.text("abcdefgh_", min_size=1, max_size=10)) + "_x": 1})
    if kind == "tag":
        return "seed: !!python/object/apply:os.system ['touch PWNED']\n"
    if kind == "bomb":
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
        return "\n".join(lines) + "\n"
    if kind == "shape":
        return draw(st.sampled_from(["- 1\n- 2\n", "42\n", "'just a string'\n", "", "{{{\n"]))
    raw = bytearray(yaml.safe_dump({"seed": 3, fields[0]: 1}).encode())  # kind == "bytes"
    at = draw(st.integers(0, len(raw) - 1))
    raw[at] ^= 1 << draw(st.integers(0, 7))
    return raw.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("kind", [f"data-{k}" for k in DATA_KINDS] + [f"config-{k}" for k in CONFIG_KINDS])
@pytest.mark.parametrize("trainer", ["sft", "rm", "ppo"])
def test_malformed_data_and_configs(inputs, tmp_path_factory, trainer, kind):
    source, kind = kind.split("-")

    @SETTINGS
    @given(st.data())
    def case(data):
        root = tmp_path_factory.mktemp("case")
        shutil.copytree(inputs, root, dirs_exist_ok=True)
        if source == "data":
            valid = (root / "data" / DATA[trainer]).read_text()
            bad = root / "data" / "bad.jsonl"
            bad.write_bytes(data.draw(malformed_data(trainer, kind))(valid))
            argv = command(trainer, root, root / "out", data=bad)
        else:
            config = root / "bad.yaml"
            config.write_text(data.draw(malformed_config(trainer, kind)))
            argv = [*command(trainer, root, root / "out"), "--config", str(config)]
        before = snapshot(root)
        result = run(argv)
        check(result, trainer, before, snapshot(root), "out")
        assert not (root / "PWNED").exists() and not Path("PWNED").exists()
    case()


@pytest.fixture(scope="module")
def saved_runs(inputs, tmp_path_factory):
    """One checkpointed run per trainer (one step), to damage."""
    runs = {}
    for trainer in ("sft", "ppo"):
        out = tmp_path_factory.mktemp("saved") / trainer
        result = run(command(trainer, inputs, out))
        assert result["code"] == 0, result["stderr"][-3000:]
        runs[trainer] = out
    return runs


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
@pytest.mark.parametrize("trainer", ["sft", "ppo"])
def test_damaged_checkpoints_on_resume(inputs, saved_runs, tmp_path_factory, trainer, kind):
    files = sorted(p.relative_to(saved_runs[trainer]) for p in
                   (saved_runs[trainer] / "checkpoint").rglob("*") if p.is_file())

    @SETTINGS
    @given(st.sampled_from(files), st.integers(0, 2**32))
    def case(name, seed):
        rng = random.Random(seed)
        root = tmp_path_factory.mktemp("resume")
        shutil.copytree(inputs, root, dirs_exist_ok=True)
        out = root / "out"
        shutil.copytree(saved_runs[trainer], out)
        target = out / name
        raw = target.read_bytes()
        if kind == "cut":
            target.write_bytes(raw[:rng.randrange(len(raw) or 1)])
        elif kind == "flip":
            data = bytearray(raw)
            for at in rng.sample(range(len(data)), min(len(data), rng.randint(1, 8))):
                data[at] ^= 1 << rng.randrange(8)
            target.write_bytes(bytes(data))
        elif kind == "garbage":
            target.write_bytes(rng.randbytes(rng.randint(0, 64)))
        elif kind == "gone":
            target.unlink()
        elif kind == "loop":
            target.unlink()
            target.symlink_to(target.name)
        else:  # a safetensors-style header claiming 8 EB, or a JSON number past every float
            target.write_bytes((2**63).to_bytes(8, "little") + b"{}" if name.suffix != ".json"
                               else b'{"step": 1e999999, "x": ' + b"9" * 5000 + b"}")
        argv = [*command(trainer, root, out), "--resume", "true", "--allow_config_change", "true"]
        argv[argv.index("--steps" if trainer == "sft" else "--iterations") + 1] = "2"
        before = snapshot(root)
        result = run(argv)
        check(result, trainer, before, snapshot(root), "out", kept=("checkpoint",))
        # every file of a checkpoint is in its manifest with its size and SHA-256 (the manifest
        # itself parsed strictly): whatever the damage, the resume is refused. (Without its
        # manifest, a checkpoint is one of an older fastppo, which resumes.)
        if not (kind == "gone" and name.name == "manifest.json"):
            assert result["code"] == 2 and "is damaged: " in result["stderr"], result["stderr"]
    case()

"""Checkpoints: atomic writes, and a trainer state that resumes exactly and loads without running code
(a tampered or older pickle state is refused with a clear error, never executed)."""
import json
import os
import random
import shutil

import pytest
import torch

from fastppo import checkpoint, run
from fastppo.checkpoint import (LEGACY_STATE, STATE_JSON, STATE_TENSORS, TRAINER, load_state,
                                save_state)
from fastppo.config import SFTConfig
from fastppo.sft import train_sft

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "ckpt"
    checkpoint.save_atomic(target, lambda d: (d / STATE_JSON).write_text("first"))

    def crash(directory):
        (directory / STATE_JSON).write_text("half")
        raise KeyboardInterrupt("killed mid-save")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(target, crash)
    assert (target / STATE_JSON).read_text() == "first"
    # A crash between the two renames leaves the previous checkpoint at .old: latest() finds it.
    target.rename(tmp_path / "ckpt.old")
    assert checkpoint.latest(target) == tmp_path / "ckpt.old"


def trained_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), fused=True)
    for _ in range(2):
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
    return model, optimizer


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert type(a) is type(b) and a == b


def test_state_round_trips_exactly(tmp_path):
    _, optimizer = trained_optimizer()
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    state = {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(generator),
             "step": 7, "kl_coef": 0.1 + 1e-17, "eval_accuracy": None, "note": "x",
             "odd": [float("inf"), float("nan"), -0.0, True, (1, (2.5,)), {3: "int key"}]}
    save_state(tmp_path, state)
    assert_same(state, load_state(tmp_path))
    # Human-readable: the numbers and names are in the JSON, the tensors only in safetensors.
    body = json.loads((tmp_path / STATE_JSON).read_text())
    assert body["state"]["step"] == 7 and body["state"]["optimizer"]["param_groups"][0]["lr"] == 1e-2


def test_state_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="cannot store object at /bad"):
        save_state(tmp_path, {"bad": object()})


def evil_pickle(path, marker):
    """A trainer_state.pt that runs a shell command when loaded the way resume used to load it."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"step": 1, "optimizer": Evil()}, path)


def sft_config(small_run, target, **overrides):
    out, _ = small_run
    settings = dict(steps=2, batch_size=4, save_every=1) | overrides
    return SFTConfig(data=str(out / "data" / "sft.jsonl"), model=str(out / "base"), out=str(target),
                     **settings)


def test_tampered_pickle_state_is_refused_not_executed(small_run, tmp_path):
    train_sft(sft_config(small_run, tmp_path / "run"))
    found = tmp_path / "run" / "checkpoint"
    (found / TRAINER / STATE_JSON).unlink()
    (found / TRAINER / STATE_TENSORS).unlink()
    (found / TRAINER / "manifest.json").unlink()  # the older format had none
    marker = tmp_path / "pwned"
    evil_pickle(found / LEGACY_STATE, marker)
    with pytest.raises(ValueError, match=r"older format.*python -m fastppo.checkpoint convert"):
        train_sft(sft_config(small_run, tmp_path / "run", steps=3, resume=True))
    # Explicit conversion reads with weights_only=True: refused too.
    with pytest.raises(ValueError, match="refused by torch.load"):
        checkpoint.convert_legacy(found)
    assert not marker.exists()
    # The test can fail: the same file, loaded as resume used to load it, runs the command.
    torch.load(found / LEGACY_STATE, weights_only=False)
    assert marker.exists()


def test_older_checkpoint_converts_explicitly_and_resumes_exactly(small_run, tmp_path):
    train_sft(sft_config(small_run, tmp_path / "straight", steps=4))
    train_sft(sft_config(small_run, tmp_path / "resumed"))
    found = tmp_path / "resumed" / "checkpoint"
    # Rewrite the state as the older format did (a torch.save pickle of the same dict).
    torch.save(load_state(found), found / LEGACY_STATE)
    (found / TRAINER / STATE_JSON).unlink()
    (found / TRAINER / STATE_TENSORS).unlink()
    (found / TRAINER / "manifest.json").unlink()  # the older format had none
    with pytest.raises(ValueError, match="older format"):
        train_sft(sft_config(small_run, tmp_path / "resumed", steps=4, resume=True))
    assert checkpoint.main(["convert", str(found)]) == 0
    assert (found / STATE_JSON).exists() and not (found / LEGACY_STATE).exists()
    train_sft(sft_config(small_run, tmp_path / "resumed", steps=4, resume=True))
    rows = {name: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                   for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    assert rows["resumed"] == rows["straight"]


@pytest.mark.parametrize("tamper,message", [
    (lambda d: (d / STATE_JSON).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / STATE_JSON).write_text('{"format": "other", "state": {}}'),
     "not a fastppo trainer state"),
    (lambda d: (d / STATE_JSON).write_text(
        (d / STATE_JSON).read_text().replace('"__tuple__"', '"__call__"', 1)), "unknown tag"),
    (lambda d: (d / STATE_JSON).write_text(
        (d / STATE_JSON).read_text().replace('/rng/torch"', '/rng/elsewhere"')), "is missing from"),
    (lambda d: (d / STATE_TENSORS).write_bytes(b"\x00" * 64), "not a valid safetensors file"),
    (lambda d: (d / STATE_TENSORS).unlink(), "checkpoint is incomplete"),
    (lambda d: (d / STATE_JSON).write_text(
        (d / STATE_JSON).read_text().replace('"step": 2', '"step": "2"')), "no int 'step'"),
    (lambda d: (d / STATE_JSON).write_text(
        (d / STATE_JSON).read_text().replace('"/rng/torch"', '["/rng/torch"]')), "is missing from"),
    (lambda d: (d / STATE_JSON).write_text(
        '{"format": "fastppo-trainer-state/1", "state": ' + "[" * 100000 + "]" * 100000 + "}"),
     "nested too deeply"),
])
def test_tampered_state_is_refused_with_a_clear_error(small_run, tmp_path, tamper, message):
    train_sft(sft_config(small_run, tmp_path / "run"))
    tamper(tmp_path / "run" / "checkpoint" / TRAINER)
    if hasattr(checkpoint, "write_manifest"):  # the files' new sizes as written: the parser finds it
        checkpoint.write_manifest(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match=message):
        train_sft(sft_config(small_run, tmp_path / "run", steps=3, resume=True))


@pytest.mark.parametrize("case", ["json", "optimizer", "rng", "kl_coef"])
def test_resume_changes_nothing_when_the_state_is_refused(tmp_path, case):
    _, optimizer = trained_optimizer()
    generator = torch.Generator().manual_seed(0)
    run.save(tmp_path, lambda directory, state: None, optimizer, generator, iteration=1,
             kl_coef="0.1" if case == "kl_coef" else 0.1)
    state_file = tmp_path / "checkpoint" / TRAINER / STATE_JSON
    if case == "json":
        state_file.write_text("{not json")
    elif case == "optimizer":  # a run whose model has another shape
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    elif case == "rng":  # a well-formed file with a Python RNG state of the wrong size
        state = load_state(state_file.parent)
        state["rng"]["python"] = (3, (1, 2), None)
        save_state(state_file.parent, state)
    checkpoint.write_manifest(tmp_path / "checkpoint")  # the new sizes: the state itself is refused
    loaded = []
    before = random.getstate(), torch.get_rng_state(), generator.get_state()
    with pytest.raises(ValueError, match="not valid JSON|does not fit this run|no float 'kl_coef'"):
        run.resume(tmp_path, loaded.append, optimizer, generator, iteration=int, kl_coef=float)
    assert loaded == [] and random.getstate() == before[0]
    assert torch.equal(torch.get_rng_state(), before[1])
    assert torch.equal(generator.get_state(), before[2])


# ------------------------------------------------------------- damaged checkpoints, through the CLI

def same_size(path, text: str) -> None:
    """Write `text` into `path`, padded to the file's size, or cut to it, and drop its SHA-256 from
    its checkpoint's manifest (as a manifest written before fastppo recorded them): so that the
    damage is found by parsing the file, not by its size or digest."""
    size = path.stat().st_size
    raw = text.encode()
    pad = b" " if path.suffix == ".json" else b"\n#"
    raw = raw + pad
    path.write_bytes(raw + pad[-1:] * (size - len(raw)) if len(raw) <= size else raw[:size])
    for root in path.parents:
        manifest = root / checkpoint.MANIFEST
        if manifest.exists():
            body = json.loads(manifest.read_text())
            body["sha256"].pop(path.relative_to(root).as_posix())
            manifest.write_text(json.dumps(body))
            return


def flip_a_bit(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # in the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))


def rewrite_json(path, change) -> None:
    body = json.loads(path.read_text())
    change(body)
    same_size(path, json.dumps(body, separators=(",", ":")))


def groups(body):
    return body["state"]["optimizer"]["param_groups"]


def move_run(source, target) -> None:
    """A copy of the run folder `source` at `target`, as if it had been written there."""
    import yaml
    shutil.copytree(source, target)
    for path in (target / run.CONFIG, target / "checkpoint" / run.CONFIG):
        saved = yaml.safe_load(path.read_text())
        saved["out"] = str(target)
        path.write_text(yaml.safe_dump(saved, sort_keys=False))
    if (target / "checkpoint" / TRAINER / "manifest.json").exists():
        checkpoint.write_manifest(target / "checkpoint")


def header_of_8_eb(path):
    raw = path.read_bytes()
    path.write_bytes((8 * 2**60).to_bytes(8, "little") + raw[8:])


DAMAGE = [  # (case, trainer, tamper(checkpoint folder), what stderr names)
    ("model truncated", "sft", lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:1000]), "model.safetensors"),
    ("model truncated, no manifest", "sft", lambda c: (
        (c / TRAINER / "manifest.json").unlink(missing_ok=True),
        (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-7])),
     "model.safetensors"),
    ("model header of 8 EB", "sft", lambda c: header_of_8_eb(c / "model.safetensors"),
     "model.safetensors"),
    ("model missing", "sft", lambda c: (c / "model.safetensors").unlink(), "model.safetensors"),
    ("model weights a bit flipped", "sft", lambda c: flip_a_bit(c / "model.safetensors"),
     "model.safetensors: its contents changed"),
    ("trainer state a bit flipped", "sft", lambda c: flip_a_bit(c / TRAINER / STATE_TENSORS),
     f"{STATE_TENSORS}: its contents changed"),
    ("model config not JSON", "sft", lambda c: same_size(c / "config.json", "{"), "config.json"),
    ("trainer state tensors", "sft", lambda c: (c / TRAINER / STATE_TENSORS).write_bytes(
        b"\0" * (c / TRAINER / STATE_TENSORS).stat().st_size), STATE_TENSORS),
    ("trainer state not JSON", "sft", lambda c: same_size(c / TRAINER / STATE_JSON, "[{"),
     STATE_JSON),
    ("lr a string", "sft", lambda c: rewrite_json(
        c / TRAINER / STATE_JSON, lambda b: groups(b)[0].update(lr="0.003")), "lr"),
    ("betas of one number", "sft", lambda c: rewrite_json(
        c / TRAINER / STATE_JSON, lambda b: groups(b)[0].update(betas=[0.9])), "betas"),
    ("eps infinite", "sft", lambda c: rewrite_json(
        c / TRAINER / STATE_JSON, lambda b: groups(b)[0].update(eps=float("inf"))), "eps"),
    ("config a YAML list", "sft", lambda c: same_size(c / run.CONFIG, "- 1\n- 2\n"), "config.yaml"),
    ("config with a python tag", "sft", lambda c: same_size(
        c / run.CONFIG, "seed: !!python/object/apply:os.system ['touch {marker}']\n"),
     "config.yaml"),
    ("value head", "ppo", lambda c: (c / TRAINER / "value_head.safetensors").write_bytes(
        b"\xff" * (c / TRAINER / "value_head.safetensors").stat().st_size),
     "value_head.safetensors"),
]


@pytest.fixture(scope="module")
def damaged(small_run, tmp_path_factory):
    """Each DAMAGE case resumed through the CLI (in one process): case -> (exit code, stderr,
    checkpoint folder)."""
    from test_cli import run_cases

    out, _ = small_run
    tmp = tmp_path_factory.mktemp("damaged")
    train_sft(sft_config(small_run, tmp / "sft"))
    argvs, folders = [], []
    for i, (name, trainer, tamper, _) in enumerate(DAMAGE):
        target = tmp / f"case{i}"
        move_run(tmp / "sft" if trainer == "sft" else out / "ppo", target)
        marker = tmp / f"pwned{i}"
        if "python tag" in name:
            tamper = lambda c, m=marker: same_size(  # noqa: E731
                c / run.CONFIG, f"seed: !!python/object/apply:os.system ['touch {m}']\n")
        tamper(target / "checkpoint")
        if trainer == "sft":
            argvs.append(["sft", "--data", out / "data" / "sft.jsonl", "--model", out / "base",
                          "--out", target, "--steps", 3, "--batch_size", 4, "--save_every", 1,
                          "--resume", "true"])
        else:  # the demo's PPO run: other settings than these, allowed
            argvs.append(["ppo", "--prompts", out / "data" / "prompts.jsonl", "--policy",
                          out / "sft" / "checkpoint", "--reward_model", out / "rm" / "checkpoint",
                          "--out", target, "--iterations", 5, "--resume", "true",
                          "--allow_config_change", "true"])
        folders.append(target / "checkpoint")
    results = run_cases(argvs, tmp)
    assert not any((tmp / f"pwned{i}").exists() for i in range(len(DAMAGE)))  # no code ran
    return {name: (*result, folder) for (name, *_), result, folder in zip(DAMAGE, results, folders)}


@pytest.mark.parametrize("case,names", [(c[0], c[3]) for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_a_damaged_checkpoint_is_refused_with_one_line_naming_the_file(damaged, case, names):
    code, stderr, folder = damaged[case]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr[-3000:]
    assert f"checkpoint {folder}" in stderr and names in stderr, stderr
    assert "damaged" in stderr, stderr

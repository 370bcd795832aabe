"""An output folder belongs to one run: locked while it runs, never appended to by another run,
resumed only by the same config, and its resolved config saved with it and with every checkpoint."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastppo import checkpoint, run
from fastppo.checkpoint import load_state
from fastppo.config import SFTConfig
from fastppo.pipeline import PipelineConfig, run_pipeline
from fastppo.sft import train_sft

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def sft(small_run, target, **overrides):
    out, _ = small_run
    settings = dict(data=str(out / "data" / "sft.jsonl"), model=str(out / "base"), steps=2,
                    batch_size=4, save_every=1) | overrides
    return SFTConfig(out=str(target), **settings)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run.LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                               "since": "2026-11-25 10:00:00"}))


def test_a_second_run_into_a_locked_folder_is_refused(small_run, tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", alive.pid)
        with pytest.raises(ValueError, match=f"in use by another fastppo run \\(pid {alive.pid} on"):
            train_sft(sft(small_run, tmp_path / "run"))
        assert not (tmp_path / "run" / "checkpoint").exists()
        # another host's lock cannot be checked: refused too
        write_lock(tmp_path / "other", 1, host="elsewhere")
        with pytest.raises(ValueError, match="on elsewhere"):
            train_sft(sft(small_run, tmp_path / "other"))
    finally:
        alive.kill()
        alive.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_released(small_run, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path / "run", gone.pid)
    train_sft(sft(small_run, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint").is_dir() and not (tmp_path / "run" / run.LOCK).exists()
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / run.LOCK).write_text('{"pid": ')  # a crash while writing the lock
    train_sft(sft(small_run, tmp_path / "run2"))


def test_a_fresh_run_never_mixes_with_another_runs_checkpoint(small_run, tmp_path):
    train_sft(sft(small_run, tmp_path / "run", steps=3))
    with pytest.raises(ValueError, match="already holds a run's checkpoint; pass --resume true"):
        train_sft(sft(small_run, tmp_path / "run", seed=1))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2]  # untouched
    train_sft(sft(small_run, tmp_path / "run", seed=1, overwrite=True))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1]
    assert load_state(tmp_path / "run" / "checkpoint")["step"] == 2


def test_resume_refuses_a_checkpoint_of_another_config(small_run, tmp_path):
    train_sft(sft(small_run, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"another config \(lr: 0.003 -> 0.01\); pass "
                                         r"--allow_config_change true"):
        train_sft(sft(small_run, tmp_path / "run", steps=3, lr=0.01, resume=True))
    train_sft(sft(small_run, tmp_path / "run", steps=3, resume=True))  # more steps: the same run
    train_sft(sft(small_run, tmp_path / "run", steps=4, lr=0.01, resume=True,
                  allow_config_change=True))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2, 3]


def test_resume_takes_fields_added_since_the_checkpoint_as_their_defaults(small_run, tmp_path):
    # A checkpoint written before max_prompt_length existed resumes; one that differs still does not.
    train_sft(sft(small_run, tmp_path / "run"))
    for path in (tmp_path / "run" / run.CONFIG, tmp_path / "run" / "checkpoint" / run.CONFIG):
        saved = yaml.safe_load(path.read_text())
        del saved["max_prompt_length"], saved["truncate_prompts"]
        path.write_text(yaml.safe_dump(saved))
    checkpoint.write_manifest(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match=r"another config \(max_prompt_length: 0 -> 8\)"):
        train_sft(sft(small_run, tmp_path / "run", steps=3, resume=True, max_prompt_length=8))
    train_sft(sft(small_run, tmp_path / "run", steps=3, resume=True))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2]


def test_the_resolved_config_is_saved_with_the_run_and_each_checkpoint(small_run, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, _ = small_run
    train_sft(sft(small_run, "rel", model=os.path.relpath(out / "base", tmp_path)))
    for path in (tmp_path / "rel" / run.CONFIG, tmp_path / "rel" / "checkpoint" / run.CONFIG):
        saved = yaml.safe_load(path.read_text())
        assert saved["model"] == str((out / "base").resolve()) and saved["steps"] == 2
        assert saved["out"] == str(tmp_path / "rel")


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(small_run, tmp_path,
                                                                           monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        train_sft(sft(small_run, tmp_path / "file"))
    monkeypatch.setattr(run.os, "access", lambda path, mode: False)  # root ignores chmod here
    with pytest.raises(ValueError, match="is not writable"):
        train_sft(sft(small_run, tmp_path / "ro" / "run"))
    assert not (tmp_path / "ro").exists()


def test_a_failed_save_removes_its_aside_copy_and_keeps_the_last_checkpoint(tmp_path):
    target = tmp_path / "checkpoint"
    checkpoint.save_atomic(target, lambda d: (d / "weights").write_text("good"))

    def disk_full(directory):
        (directory / "weights").write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_atomic(target, disk_full)
    assert (target / "weights").read_text() == "good"
    assert not (tmp_path / "checkpoint.tmp").exists()


@pytest.mark.parametrize("where", ["metrics.jsonl", "sft.png"])
def test_a_disk_that_fills_while_logging_stops_the_run_with_one_line(small_run, tmp_path,
                                                                     monkeypatch, where):
    # metrics.jsonl fills up at step 2 (after the step-1 checkpoint), or the plot at the end
    from pathlib import Path

    import matplotlib.figure

    real_open, real_savefig, rows = Path.open, matplotlib.figure.Figure.savefig, []

    def fills_up(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            rows.append(1)
            if where == "metrics.jsonl" and len(rows) == 2:
                raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    def plot_fills_up(self, path, *args, **kwargs):
        if where == "sft.png":
            raise OSError(28, "No space left on device")
        return real_savefig(self, path, *args, **kwargs)
    monkeypatch.setattr(Path, "open", fills_up)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", plot_fills_up)
    with pytest.raises(run.Stopped, match=rf"could not write .*{where} \(No space left on device\)"
                                          r".* checkpoint .* complete") as stop:
        train_sft(sft(small_run, tmp_path / "run", steps=2))
    assert "\n" not in str(stop.value)
    assert load_state(tmp_path / "run" / "checkpoint")["step"] == (1 if where == "metrics.jsonl" else 2)
    assert not (tmp_path / "run" / run.LOCK).exists()


def test_a_trainer_whose_disk_fills_stops_and_keeps_its_last_checkpoint(small_run, tmp_path,
                                                                        monkeypatch):
    # The second save (step 2) runs out of space half-way: the run stops with one line naming the
    # kept checkpoint and the room a save needs, nothing partial is left, and it resumes from step 1.
    real, calls = run.save_state, []

    def fills_up(directory, state):
        calls.append(state["step"])
        if len(calls) == 2:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "trainer_state.json").write_text("{")
            raise OSError(28, "No space left on device")
        real(directory, state)
    monkeypatch.setattr(run, "save_state", fills_up)
    with pytest.raises(run.Stopped, match=r"could not write the checkpoint at step 2 \(No space "
                                          r"left on device\); stopping\. The last good checkpoint "
                                          r"is in .*checkpoint\. A save needs room for a second "
                                          r"checkpoint beside the first \(about \d+ MiB"):
        train_sft(sft(small_run, tmp_path / "run", steps=3))
    assert calls == [1, 2]
    assert load_state(tmp_path / "run" / "checkpoint")["step"] == 1
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
    assert not (tmp_path / "run" / run.LOCK).exists()  # the lock goes with the run
    monkeypatch.setattr(run, "save_state", real)
    train_sft(sft(small_run, tmp_path / "run", steps=3, resume=True))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2]


def test_pipeline_checks_every_stage_before_the_first(small_run, tmp_path):
    out, _ = small_run
    data = out / "data"
    cfg = PipelineConfig(model=str(out / "base"), sft_data=str(data / "sft.jsonl"),
                         rm_data=str(data / "rm.jsonl"), prompts=str(data / "prompts.jsonl"),
                         out=str(tmp_path), sft_steps=1, rm_steps=1, ppo_iterations=1)
    (tmp_path / "ppo" / "checkpoint").mkdir(parents=True)
    (tmp_path / "ppo" / "checkpoint" / checkpoint.STATE_JSON).write_text("{}")
    with pytest.raises(ValueError, match=f"out {tmp_path / 'ppo'} already holds a run's checkpoint"):
        run_pipeline(cfg)
    assert not (tmp_path / "sft").exists()
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        run_pipeline(PipelineConfig(**{**vars(cfg), "rm": {"resume": True}}))
    assert not (tmp_path / "sft").exists()


def test_the_demo_can_run_twice_into_its_folder(tmp_path):
    from fastppo.demo import DemoConfig, demo

    for _ in range(2):
        demo(DemoConfig(str(tmp_path), sft_steps=2, rm_steps=2, ppo_iterations=1), quiet=True)
    assert len(metrics(tmp_path / "ppo")) == 1


# --------------------------------------------------- what a run deletes: only what fastppo wrote

def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def move_run(source, target):
    """A copy of the run folder `source` at `target`, as if it had been written there."""
    shutil.copytree(source, target)
    for path in (target / run.CONFIG, target / "checkpoint" / run.CONFIG):
        saved = yaml.safe_load(path.read_text())
        saved["out"] = str(target)
        path.write_text(yaml.safe_dump(saved, sort_keys=False))
    if (target / "checkpoint" / "trainer" / "manifest.json").exists():
        checkpoint.write_manifest(target / "checkpoint")


def users_files(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def older(folder):
    """The checkpoint in `folder` as an older fastppo wrote it: without a manifest."""
    (folder / "checkpoint" / "trainer" / "manifest.json").unlink(missing_ok=True)


FOREIGN = [  # (case, a real checkpoint first?, the user's files, what else, flags, what stderr names)
    ("fresh run, a folder of the user's", False,
     {"checkpoint/weights.bin": "w", "checkpoint.old/sub/b.txt": "b"}, None, [],
     "{out}/checkpoint holds weights.bin"),
    ("overwrite, a note beside a checkpoint", True, {"checkpoint/mynotes.txt": "n"}, None,
     ["--overwrite", "true"], "{out}/checkpoint holds mynotes.txt"),
    ("overwrite, a file in checkpoint.old", True, {"checkpoint.old/sub/b.txt": "b"}, None,
     ["--overwrite", "true"], "{out}/checkpoint.old holds sub/b.txt"),
    ("resume, a note beside the checkpoint", True, {"checkpoint/mynotes.txt": "n"}, None,
     ["--resume", "true"], "{out}/checkpoint holds mynotes.txt"),
    ("fresh run, a file in checkpoint.tmp", False, {"checkpoint.tmp/model.safetensors": "m"},
     None, [], "{out}/checkpoint.tmp holds model.safetensors"),
    ("overwrite, an older checkpoint", True, {}, older, ["--overwrite", "true"],
     "{out}/checkpoint is a checkpoint of an older fastppo"),
]


@pytest.fixture(scope="module")
def foreign(small_run, tmp_path_factory):
    """Each FOREIGN case run through the CLI (in one process): case -> (exit code, stderr, the
    folder, its files before, after)."""
    from test_cli import run_cases

    out, _ = small_run
    tmp = tmp_path_factory.mktemp("foreign")
    train_sft(sft(small_run, tmp / "run", steps=1))
    argvs, folders, before = [], [], []
    for i, (_, real, files, change, flags, _) in enumerate(FOREIGN):
        target = tmp / f"case{i}"
        if real:
            move_run(tmp / "run", target)
        users_files(target, files)
        if change:
            change(target)
        argvs.append(["sft", "--data", out / "data" / "sft.jsonl", "--model", out / "base", "--out",
                      target, "--steps", 2, "--batch_size", 4, "--save_every", 1, *flags])
        folders.append(target)
        before.append(snapshot(target))
    results = run_cases(argvs, tmp)
    return {case[0]: (*result, folder, files, snapshot(folder))
            for case, result, folder, files in zip(FOREIGN, results, folders, before)}


@pytest.mark.parametrize("case,names", [(c[0], c[5]) for c in FOREIGN], ids=[c[0] for c in FOREIGN])
def test_a_folder_holding_files_fastppo_did_not_write_is_never_deleted(foreign, case, names):
    # Refused before any work with one line naming it (--overwrite included); nothing changes.
    code, stderr, folder, before, after = foreign[case]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr[-3000:]
    assert names.format(out=folder) in stderr and "by hand" in stderr, stderr
    assert after == before


def test_a_fresh_run_deletes_the_copies_fastppo_wrote(small_run, tmp_path):
    # A previous run's checkpoint, its .old copy and the aside copy of a save killed part-way: all
    # fastppo's, all deleted by --overwrite.
    target = tmp_path / "run"
    train_sft(sft(small_run, target, steps=1))
    shutil.copytree(target / "checkpoint", target / "checkpoint.old")
    checkpoint.start_aside(target / "checkpoint.tmp")
    (target / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    train_sft(sft(small_run, target, steps=1, overwrite=True))
    assert not (target / "checkpoint.old").exists() and not (target / "checkpoint.tmp").exists()
    assert (target / "checkpoint" / checkpoint.MANIFEST).is_file()


def test_an_older_checkpoint_resumes_and_is_replaced_only_if_its_files_are_fastppos(small_run,
                                                                                   tmp_path):
    # A checkpoint of an older fastppo (no manifest) resumes; the save that replaces it deletes it
    # when each of its files is one the new checkpoint has too, else stops with one line, keeping it.
    target = tmp_path / "run"
    train_sft(sft(small_run, target, steps=1))
    shutil.copytree(target, tmp_path / "noted")
    older(target)
    train_sft(sft(small_run, target, resume=True))
    assert load_state(target / "checkpoint")["step"] == 2
    assert (target / "checkpoint" / checkpoint.MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.joinpath("run").iterdir() if "checkpoint" in p.name) == \
        ["checkpoint"]
    noted = tmp_path / "noted"
    older(noted)
    for path in (noted / run.CONFIG, noted / "checkpoint" / run.CONFIG):
        path.write_text(path.read_text().replace(str(target), str(noted)))
    (noted / "checkpoint" / "mynotes.txt").write_text("mine")
    with pytest.raises(run.Stopped, match=r"could not write the checkpoint at step 2 \(.*checkpoint "
                                          r"is a checkpoint of an older fastppo.*mynotes\.txt"):
        train_sft(sft(small_run, noted, resume=True))
    assert (noted / "checkpoint" / "mynotes.txt").read_text() == "mine"
    assert load_state(noted / "checkpoint")["step"] == 1
    assert not (noted / "checkpoint.tmp").exists()


@pytest.mark.parametrize("copy", ["checkpoint", "checkpoint.old", "checkpoint.tmp"])
def test_a_save_never_deletes_a_folder_it_did_not_write(tmp_path, copy):
    target = tmp_path / "checkpoint"
    checkpoint.save_atomic(target, lambda d: (d / "weights").write_text("good"))
    users_files(tmp_path, {f"{copy}/mine.txt": "mine"})
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path / copy} holds mine.txt"):
        checkpoint.save_atomic(target, lambda d: (d / "weights").write_text("new"))
    assert snapshot(tmp_path) == before


def test_a_failed_save_at_any_file_stops_with_one_line_and_keeps_the_last_checkpoint(
        small_run, tmp_path, monkeypatch):
    # Disk full at the k-th file a save writes, for each k (safetensors raises SafetensorError,
    # Python's writes OSError): the run stops with one line, the aside copy is removed and the last
    # checkpoint stays as it was.
    import builtins
    import io

    import safetensors.torch
    from safetensors import SafetensorError

    from fastppo.models import ActorCritic, load_lm, save_model
    from transformers import AutoTokenizer

    out, _ = small_run
    model = ActorCritic(load_lm(out / "sft" / "checkpoint", "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(out / "sft" / "checkpoint")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.value_head(torch.randn(2, model.value_head.in_features)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(0)
    (tmp_path / run.CONFIG).write_text("seed: 0\n")

    def save(step):
        run.save(tmp_path, lambda directory, state: save_model(model, tokenizer, directory, state),
                 optimizer, generator, model=model, step=step)
    save(0)
    good = snapshot(tmp_path / "checkpoint")
    aside = tmp_path / "checkpoint.tmp"
    written, fail_at = [], [0]

    def count(path, exception):
        path = Path(path)
        if aside in path.parents:
            written.append(str(path.relative_to(aside)))
            if len(written) == fail_at[0]:
                raise exception

    full = OSError(28, "No space left on device")
    real_open, real_serialize = builtins.open, safetensors.torch.serialize_file

    def opening(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            count(file, full)
        return real_open(file, mode, *args, **kwargs)

    def serializing(tensors, filename, *args, **kwargs):
        count(filename, SafetensorError("Error while serializing: I/O error: No space left on "
                                        "device (os error 28)"))
        return real_serialize(tensors, filename, *args, **kwargs)
    real_tokenizer_save = tokenizer._save_pretrained

    def tokenizer_save(*args, **kwargs):  # tokenizer.json: written by the tokenizers library (Rust)
        count(Path(kwargs.get("save_directory") or args[0]) / "tokenizer.json", full)
        return real_tokenizer_save(*args, **kwargs)
    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr(safetensors.torch, "serialize_file", serializing)
    monkeypatch.setattr(tokenizer, "_save_pretrained", tokenizer_save)
    for k in range(1, 40):
        written.clear()
        fail_at[0] = k
        try:
            save(k)
        except run.Stopped as stop:
            assert len(written) == k, (k, written)
            message = str(stop)
            assert "\n" not in message and f"could not write the checkpoint at step {k} (No space " \
                   "left on device" in message, (written[-1], message)
            assert snapshot(tmp_path / "checkpoint") == good, written[-1]
            assert not aside.exists() and not (tmp_path / "checkpoint.old").exists(), written[-1]
            continue
        break
    names = set(written)
    assert k > 8 and {"model.safetensors", "tokenizer.json", "trainer/value_head.safetensors",
                      "config.yaml", "trainer/trainer_state.safetensors"} <= names, written
    assert load_state(tmp_path / "checkpoint")["step"] == k


def test_a_full_disk_at_the_lock_is_one_line(small_run, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(run.json, "dump", full)
    with pytest.raises(ValueError, match=r"could not write the lock .*\(No space left on device\)"):
        train_sft(sft(small_run, tmp_path / "run"))
    assert not (tmp_path / "run" / run.LOCK).exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (room for one checkpoint of the small run, not two), where mount works."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mount -t tmpfs does not work here (the injected failures test the same)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_with_one_line(small_run, tmp_path, small_disk):
    with pytest.raises(run.Stopped, match=r"could not write the checkpoint at step 2 \(No space "
                                          r"left on device.*A save needs room for a second"):
        train_sft(sft(small_run, small_disk / "run", steps=3))
    assert load_state(small_disk / "run" / "checkpoint")["step"] == 1
    assert not (small_disk / "run" / "checkpoint.tmp").exists()
    assert not (small_disk / "run" / run.LOCK).exists()
    filler = os.open(small_disk / "filler", os.O_CREAT | os.O_WRONLY)  # the disk full to the last byte
    for size in (2**16, 2**12, 1):
        try:
            while True:
                os.write(filler, b"\0" * size)
        except OSError:
            pass
    os.close(filler)
    with pytest.raises(ValueError, match=r"No space left on device"):
        train_sft(sft(small_run, small_disk / "other", steps=1))

"""An output folder belongs to one run: locked while it runs, never appended to by another run,
resumed only by the same config, and its resolved config saved with it and with every checkpoint."""
import json
import os
import socket
import subprocess
import sys

import pytest
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

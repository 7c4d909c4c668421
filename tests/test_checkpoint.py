"""Checkpoints survive faults: kill -9 and resume reproduces the uninterrupted run (losses and
the exact blocks trained on), a kill while saving keeps the previous checkpoint, a NaN loss
stops with one line and touches nothing, SIGTERM checkpoints and exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_or_dump, tiny_recipe_dict

import hftrain.train_step
from hftrain.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
)
from hftrain.cli import main
from hftrain.tracking import read_metrics

FAULTS = REPO / "tests" / "fault_injection.py"


def write_recipe(tmp_path: Path, corpus: Path, name: str, **sections) -> Path:
    data = tiny_recipe_dict(corpus, tmp_path / name, **sections)
    data["train"].update({"max_steps": 30, "log_interval": 5})
    data["checkpoint"] = {"interval": 10, "keep": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(data))
    return path


def run_with_fault(record: Path, recipe: Path, *, kill_at_step=0, kill_on_save=0,
                   extra=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAULTS), str(record), str(kill_at_step),
                           str(kill_on_save), "--", "train", str(recipe), *extra],
                          capture_output=True, text=True, cwd=REPO)


def trained_steps(record: Path) -> dict[int, str]:
    """step -> digest of what that step trained on; a later line for a step wins (a resumed
    run retrains the steps the killed run did after its last checkpoint)."""
    steps = {}
    for line in record.read_text().splitlines():
        step, digest = line.split()
        steps[int(step)] = digest
    return steps


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def assert_resume_equals_the_whole_run(record: Path, recipe: Path, run_dir: Path,
                                       whole_losses: dict, whole_steps: dict) -> None:
    """`--resume` finishes the run on the same blocks (none twice, none skipped) with the
    uninterrupted run's losses."""
    resumed = run_with_fault(record, recipe, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert trained_steps(record) == whole_steps
    got = losses(run_dir)
    for step, loss in whole_losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shakespeare_text):
    tmp = tmp_path_factory.mktemp("whole")
    corpus = tmp / "corpus.txt"
    corpus.write_text(shakespeare_text)
    recipe = write_recipe(tmp, corpus, "run")
    record = tmp / "record.txt"
    proc = run_with_fault(record, recipe)
    assert proc.returncode == 0, proc.stderr
    return corpus, losses(tmp / "run"), trained_steps(record)


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    corpus, whole_losses, whole_steps = uninterrupted
    recipe = write_recipe(tmp_path, corpus, "run")
    record = tmp_path / "record.txt"
    killed = run_with_fault(record, recipe, kill_at_step=24)
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run").name == "step-00000020"
    resumed = run_with_fault(record, recipe, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert trained_steps(record) == whole_steps  # the same blocks, none twice, none skipped
    got = losses(tmp_path / "run")
    assert got.keys() == whole_losses.keys()
    for step, loss in whole_losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000020", "step-00000030"]


def test_the_checkpoint_benchmark_runs_in_seconds(tmp_path):
    """benchmarks/checkpoint.py's smoke mode: one round on a tiny GPT-2."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "checkpoint.py"),
                           "--rounds", "1", "--tiny", "--dir", str(tmp_path / "bench")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Checkpointer.save" in proc.stdout and "ratio" in proc.stdout
    assert not (tmp_path / "bench").exists()  # it cleans up after itself


def test_kill_while_saving_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
    corpus, whole_losses, _ = uninterrupted
    recipe = write_recipe(tmp_path, corpus, "run")
    killed = run_with_fault(tmp_path / "record.txt", recipe, kill_on_save=2)
    assert killed.returncode == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".step-00000020.tmp").is_dir()  # the half-written one, never used
    assert latest_checkpoint(tmp_path / "run").name == "step-00000010"
    resumed = run_with_fault(tmp_path / "record.txt", recipe, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "run")[30] == pytest.approx(whole_losses[30], rel=1e-5)


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, corpus_file, capsys,
                                                               monkeypatch):
    recipe = write_recipe(tmp_path, corpus_file, "run")
    real_nll = hftrain.train_step.token_nll
    calls = {"n": 0}

    def nan_at_step_13(logits, labels):
        calls["n"] += 1
        nll = real_nll(logits, labels)
        return nll * float("nan") if calls["n"] == 13 else nll

    monkeypatch.setattr(hftrain.train_step, "token_nll", nan_at_step_13)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hftrain:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "not finite at step 13" in errors[0] and "step-00000010" in errors[0]
    assert latest_checkpoint(tmp_path / "run").name == "step-00000010"
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


def test_nan_loss_can_be_skipped(tmp_path, corpus_file, monkeypatch):
    recipe = write_recipe(tmp_path, corpus_file, "run")
    real_nll = hftrain.train_step.token_nll
    calls = {"n": 0}

    def nan_once(logits, labels):
        calls["n"] += 1
        return real_nll(logits, labels) * (float("nan") if calls["n"] == 13 else 1.0)

    monkeypatch.setattr(hftrain.train_step, "token_nll", nan_once)
    main(["train", str(recipe), "train.on_nan=skip"])
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records[-1]["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in records)  # no NaN reaches the log


# SIGHUP takes the same path as SIGTERM (`hftrain.signals`); its variant runs with -m slow
@pytest.mark.parametrize("name", ["TERM", pytest.param("HUP", marks=pytest.mark.slow)])
def test_sigterm_or_sighup_checkpoints_exits_cleanly_and_resumes(name, uninterrupted, tmp_path):
    """A real process gets SIGTERM (preemption) or SIGHUP (its terminal closed, its SSH
    session dropped) at step 7: it finishes the step, checkpoints, exits 128 + the signal with
    the resume command; resuming reproduces the uninterrupted run."""
    corpus, whole_losses, whole_steps = uninterrupted
    recipe = write_recipe(tmp_path, corpus, "run")
    record = tmp_path / "record.txt"
    env = {**os.environ, "SIGNAL_IN": f"step7:{name}"}
    # SIGHUP at its default, as in a terminal: a suite started under nohup would pass its
    # ignore on (and the run rightly keeps ignoring it, as the next test checks)
    stopped = subprocess.run([sys.executable, str(FAULTS), str(record), "0", "0", "--", "train",
                              str(recipe)], capture_output=True, text=True, cwd=REPO, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert stopped.returncode == 128 + getattr(signal, f"SIG{name}"), stopped.stderr
    assert "stopped at step 7" in stopped.stderr and "Traceback" not in stopped.stderr
    assert latest_checkpoint(tmp_path / "run").name == "step-00000007"
    assert_resume_equals_the_whole_run(record, recipe, tmp_path / "run", whole_losses,
                                       whole_steps)


def test_a_run_under_nohup_ignores_sighup(uninterrupted, tmp_path):
    """`nohup hftrain train ...`: SIGHUP was set to be ignored before hftrain started, and
    stays ignored (the run goes on to the end when the terminal closes)."""
    corpus, whole_losses, _ = uninterrupted
    recipe = write_recipe(tmp_path, corpus, "run")
    env = {**os.environ, "SIGNAL_IN": "step7:HUP"}
    done = subprocess.run([sys.executable, str(FAULTS), str(tmp_path / "record.txt"), "0", "0",
                           "--", "train", str(recipe)], capture_output=True, text=True,
                          cwd=REPO, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "run").keys() == whole_losses.keys()


@pytest.mark.slow  # 44 s of CI; the default suite's kill -9 tests cover the resume itself
def test_a_run_without_a_checkpoint_interval_survives_kill_9_by_the_clock(uninterrupted,
                                                                         tmp_path):
    """checkpoint.interval 0 (the default) and a time-based checkpoint every
    `checkpoint.minutes` (here a few microseconds, so after every step): a kill -9 at step 24
    loses one step, and the resumed run equals the uninterrupted one."""
    corpus, whole_losses, whole_steps = uninterrupted
    recipe = write_recipe(tmp_path, corpus, "run")
    data = json.loads(recipe.read_text())
    data["checkpoint"] = {"minutes": 1e-7, "keep": 2}
    recipe.write_text(json.dumps(data))
    record = tmp_path / "record.txt"
    assert run_with_fault(record, recipe, kill_at_step=24).returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run").name == "step-00000023"
    assert_resume_equals_the_whole_run(record, recipe, tmp_path / "run", whole_losses,
                                       whole_steps)


@pytest.mark.slow  # a minute and a half of CI; the default suite kills 2-process runs in
# test_sharded.py (FSDP2 kill -9, a torchrun restart, a cache run resumed on 1 process)
def test_two_process_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, corpus_file):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    data = tiny_recipe_dict(corpus_file, tmp_path / "whole", train={"batch_size": 4})
    data["train"].update({"max_steps": 30, "log_interval": 5})
    data["checkpoint"] = {"interval": 10}

    def launch(name: str, kill_at_step: int, *train_args: str) -> subprocess.CompletedProcess:
        data["run"]["output_dir"] = str(tmp_path / name)
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(json.dumps(data))
        return run_or_dump([torchrun, "--nproc_per_node", "2", str(FAULTS),
                            str(tmp_path / f"{name}.record"), str(kill_at_step), "0", "--",
                            "train", str(recipe), *train_args], 600, cwd=REPO)

    assert launch("whole", 0).returncode == 0
    assert launch("killed", 17).returncode != 0
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000010"
    resumed = launch("killed", 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for rank in range(2):
        whole_steps = trained_steps(tmp_path / f"whole.record.rank{rank}")
        assert trained_steps(tmp_path / f"killed.record.rank{rank}") == whole_steps
    whole, got = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert got.keys() == whole.keys()
    for step, loss in whole.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


class Counter:
    """A Stateful part: what the loop's counters look like to the checkpointer."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def tiny_checkpointer(run_dir: Path):
    import torch
    from accelerate import Accelerator

    from hftrain.checkpoint import Checkpointer

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return Checkpointer(accelerator, run_dir, {"loop": Counter()})


def test_a_checkpoint_completing_in_the_background_is_not_used_until_complete(tmp_path,
                                                                             monkeypatch):
    """Training goes on while a checkpoint's manifest is hashed; until it is renamed into
    place, a resume (which reads only complete checkpoints) sees the one before, so a crash
    mid-completion falls back cleanly. `wait()` lets it finish; the older one is pruned."""
    import threading

    import hftrain.checkpoint as checkpoint

    checkpointer = tiny_checkpointer(tmp_path / "run")
    first = checkpointer.save(10, {}, keep=1)
    hashing, release = threading.Event(), threading.Event()
    real_write = checkpoint._write_state_file

    def slow_write(folder, state):
        hashing.set()
        release.wait(timeout=60)
        real_write(folder, state)

    monkeypatch.setattr(checkpoint, "_write_state_file", slow_write)
    second = checkpointer.save(20, {}, keep=1, background=True)
    assert hashing.wait(timeout=60)  # save() returned while the manifest is still pending
    assert latest_checkpoint(tmp_path / "run") == first == checkpointer.latest
    assert (second.parent / ".step-00000020.tmp").is_dir() and not second.exists()
    release.set()
    assert checkpointer.wait() == second == latest_checkpoint(tmp_path / "run")
    listed = json.loads((second / STATE_FILE).read_text())["files"]
    assert "model.safetensors" in listed and not first.exists()


def test_a_background_save_that_fails_is_reported_and_keeps_the_previous(tmp_path,
                                                                        monkeypatch):
    """A full disk while completing in the background: the next save (or the run's end)
    raises one line naming the intact checkpoint, and nothing half-written is left."""
    import errno

    import hftrain.checkpoint as checkpoint
    from hftrain.checkpoint import CheckpointError

    checkpointer = tiny_checkpointer(tmp_path / "run")
    first = checkpointer.save(10, {}, keep=2)

    def full_disk(folder, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_state_file", full_disk)
    checkpointer.save(20, {}, keep=2, background=True)
    with pytest.raises(CheckpointError, match=f"No space left on device.*{first} is intact"):
        checkpointer.save(30, {}, keep=2)
    assert latest_checkpoint(tmp_path / "run") == first == checkpointer.latest
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [first.name]


def test_a_ctrl_c_while_waiting_leaves_the_background_save_to_finish(tmp_path, monkeypatch):
    """Ctrl-C lands while the run waits for a checkpoint completing in the background: the
    save stays pending, and the next wait still completes it (it is not forgotten)."""
    import threading
    from concurrent.futures import Future

    import hftrain.checkpoint as checkpoint

    checkpointer = tiny_checkpointer(tmp_path / "run")
    release = threading.Event()
    real_write = checkpoint._write_state_file
    monkeypatch.setattr(checkpoint, "_write_state_file",
                        lambda folder, state: release.wait(60) and real_write(folder, state))
    saved = checkpointer.save(10, {}, keep=1, background=True)
    real_result = Future.result

    def interrupted(self, timeout=None):
        monkeypatch.setattr(Future, "result", real_result)
        raise KeyboardInterrupt

    monkeypatch.setattr(Future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.wait()
    assert checkpointer.latest is None and not saved.exists()
    release.set()
    assert checkpointer.wait() == saved == latest_checkpoint(tmp_path / "run")

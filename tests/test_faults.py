"""Lose nothing, let nothing in: what hftrain does with folders, checkpoints and resumes when
a user (or the machine) gets something wrong. One test per observed failure (issue 10,
items 1-11); each asserts what the user sees and what is left on disk."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli, run_or_dump, tiny_recipe_dict

import hftrain.atomic
import hftrain.finish
import hftrain.lifecycle
import hftrain.tracking
import hftrain.train_state
from hftrain.checkpoint import STATE_FILE, latest_checkpoint, state_digest
from hftrain.cli import main
from hftrain.run_folder import LOCK, MARKER, RunLock
from hftrain.tracking import read_metrics

FAULTS = REPO / "tests" / "fault_injection.py"


def recipe_file(tmp_path: Path, corpus: Path, out: Path, **train) -> Path:
    data = tiny_recipe_dict(corpus, out)
    data["train"].update({"max_steps": 20, **train})
    data["checkpoint"] = {"interval": 10, "keep": 2}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(data))
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hftrain: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def val_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


@pytest.fixture
def finished(tmp_path, corpus_file, capsys):
    """A finished 20-step run (checkpoints at 10 and 20) and its recipe file."""
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 0, err
    return recipe, tmp_path / "run"


# 1. run.overwrite deletes only folders hftrain made --------------------------------------


@pytest.mark.parametrize("target", ["cwd", "data folder", "foreign folder"])
def test_overwrite_never_deletes_what_hftrain_did_not_make(target, tmp_path, corpus_file,
                                                           capsys, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    monkeypatch.chdir(foreign)
    out = {"cwd": Path("."), "data folder": corpus_file.parent, "foreign folder": foreign}[target]
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "x")
    before = snapshot(tmp_path)
    code, _, err = cli(["train", str(recipe), f"run.output_dir={out}", "run.overwrite=true"],
                       capsys)
    assert code == 2 and "run.output_dir" in one_error_line(err)
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written


def test_overwrite_replaces_a_run_hftrain_made(finished, capsys):
    recipe, run_dir = finished
    code, out, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"],
                         capsys)
    assert code == 0 and (run_dir / "hub").is_dir(), err  # staged, so the run's too
    code, _, err = cli(["train", str(recipe), "run.overwrite=true", "train.max_steps=5"], capsys)
    assert code == 0, err
    assert (run_dir / MARKER).is_file()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000005"]


@pytest.mark.parametrize("where", ["final/NOTES.md", "tokenizer/notes.txt", "hftrain/mine.txt",
                                   "checkpoints/best/model.bin",
                                   "checkpoints/step-00000010/notes.txt",
                                   "hub/notes.txt", "final/sub/deep/thesis.tex"])
def test_overwrite_refuses_a_users_file_at_any_depth(where, finished, capsys):
    """run.overwrite removes exactly what hftrain recorded writing: a file the user put
    anywhere in the run's folders stops it in one line, and nothing is deleted."""
    recipe, run_dir = finished
    assert cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"],
               capsys)[0] == 0
    (run_dir / where).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / where).write_text("precious")
    before = snapshot(run_dir)
    code, _, err = cli(["train", str(recipe), "run.overwrite=true", "train.max_steps=5"], capsys)
    line = one_error_line(err)  # names the file, or the folder hftrain did not make
    assert code == 2 and (where in line or f"({Path(where).parent})" in line), line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("how", ["copied checkpoint", "older run folder", "continued run",
                                 "tokenizer command"])
def test_a_users_file_survives_what_found_it_before(how, finished, tmp_path, capsys):
    """Ways a hostile probe got a user's file deleted: a checkpoint copied under another name
    (its state file valid); a run folder from before the record of written files; a finished
    run continued (the export is replaced whole); `hftrain tokenizer ... run.overwrite=true`."""
    import shutil

    recipe, run_dir = finished
    if how == "copied checkpoint":
        shutil.copytree(run_dir / "checkpoints" / "step-00000020",
                        run_dir / "checkpoints" / "best-keep")
        mine, argv = run_dir / "checkpoints" / "best-keep", ["run.overwrite=true"]
    elif how == "older run folder":
        marker = json.loads((run_dir / MARKER).read_text())
        del marker["written"]
        (run_dir / MARKER).write_text(json.dumps(marker))
        mine, argv = run_dir / "final" / "notes.txt", ["run.overwrite=true"]
    elif how == "continued run":
        mine, argv = run_dir / "final" / "notes.txt", ["--resume", "train.max_steps=25"]
    else:
        folder = tmp_path / "tok"
        assert cli(["tokenizer", str(recipe), f"run.output_dir={folder}"], capsys)[0] == 0
        mine = folder / "tokenizer" / "notes.txt"
        argv = None
    if not mine.exists():
        mine.write_text("precious")
    before = snapshot(tmp_path)
    command = ["train", str(recipe), "train.max_steps=5", *argv] if argv else \
        ["tokenizer", str(recipe), f"run.output_dir={tmp_path / 'tok'}", "run.overwrite=true",
         "tokenizer.kind=byte_bpe"]
    if argv and "--resume" in argv:
        command = ["train", str(recipe), *argv]
    code, _, err = cli(command, capsys)
    assert code == 2 and "hftrain did not write" in one_error_line(err), err
    assert snapshot(tmp_path) == before


# 2. the push staging folder ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["run folder", "export", "user folder", "parent"])
def test_push_dry_run_never_deletes_the_folder_it_is_given(target, finished, tmp_path, capsys):
    _, run_dir = finished
    user = tmp_path / "docs"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    folder = {"run folder": run_dir, "export": run_dir / "final", "user folder": user,
              "parent": tmp_path}[target]
    before = snapshot(tmp_path)
    code, _, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run",
                        "--folder", str(folder)], capsys)
    assert code == 2 and "--folder" in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_push_dry_run_restages_its_own_folder(finished, capsys):
    _, run_dir = finished
    for _ in range(2):  # the second replaces what the first staged
        code, out, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m",
                              "--dry-run"], capsys)
        assert code == 0, err
    assert "README.md" in out and ".hftrain-staging" not in out
    assert (run_dir / "hub" / "model.safetensors").is_file()


# 3. checkpoints hold no pickle that runs -------------------------------------------------


class Payload:
    """Unpickling this writes a file: the proof that a checkpoint ran code."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (Path.write_text, (self.proof, "pwned"))


def plant(checkpoint: Path, proof: Path, keep_manifest_valid: bool) -> None:
    """Replace every file of a checkpoint (and add Accelerate's custom-state file) with a
    pickle payload. With `keep_manifest_valid`, as an attacker who knows the format would:
    only the files torch unpickles (the optimizer, the RNG states) get a payload, the weights
    stay intact so that loading reaches them, and the manifest and its digest are rewritten
    to match."""
    import hashlib

    import torch

    names = [p.name for p in checkpoint.iterdir()] + ["custom_checkpoint_0.pkl"]
    if keep_manifest_valid:
        names = [n for n in names if n.endswith((".bin", ".pkl"))]
    for name in names:
        if name.endswith((".bin", ".pkl", ".pt")):
            torch.save({"state": Payload(proof)}, checkpoint / name)
        else:
            (checkpoint / name).write_bytes(pickle.dumps(Payload(proof)))
    if keep_manifest_valid:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        state["files"] = {p.name: {"size": p.stat().st_size,
                                   "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                          for p in checkpoint.iterdir() if p.name != STATE_FILE}
        state["state_sha256"] = state_digest(state)
        (checkpoint / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("keep_manifest_valid", [False, True])
def test_resume_never_runs_a_pickle_planted_in_a_checkpoint(keep_manifest_valid, finished,
                                                            tmp_path, capsys):
    recipe, run_dir = finished
    proof = tmp_path / "proof"
    for checkpoint in (run_dir / "checkpoints").iterdir():
        plant(checkpoint, proof, keep_manifest_valid)
    code, _, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert not proof.exists()
    assert code == 2
    assert "checkpoint" in one_error_line(err)


# 4. failures after training began leave a run that --resume finishes ----------------------


def test_a_full_disk_while_appending_metrics_is_one_line_and_tears_no_record(
        tmp_path, corpus_file, capsys, monkeypatch):
    """The disk fills while the step-15 record is appended (half of it written): one line
    naming metrics.jsonl, the half record cut back off, and --resume finishes the run."""
    import os

    import hftrain.tracking

    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    real_write = os.write

    def filling_disk(fd, data):
        if b'"step": 15' in data and b'"loss"' in data:
            return real_write(fd, data[: len(data) // 2])  # the rest does not fit
        return real_write(fd, data)

    monkeypatch.setattr(hftrain.tracking.os, "write", filling_disk)
    code, _, err = cli(["train", str(recipe)], capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot append to" in line and "metrics.jsonl" in line
    assert "No space left" in line and "--resume" in line
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and '"step": 15' not in text  # cut back off, no torn line
    monkeypatch.setattr(hftrain.tracking.os, "write", real_write)
    code, _, err = cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0, err
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 20


def test_a_full_disk_at_the_lock_is_one_line(tmp_path, corpus_file, capsys, monkeypatch):
    """The disk is full when the run folder's lock records its holder: one line naming the
    folder, exit 2, the lock released (the next start, with space again, runs)."""
    import errno
    import io
    import os

    import hftrain.run_folder

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".hftrain-lock"):
            return io.TextIOWrapper(io.BufferedRandom(FullDisk(fd, "r+")), encoding="utf-8")
        return real_fdopen(fd, *args, **kwargs)

    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    monkeypatch.setattr(hftrain.run_folder.os, "fdopen", fdopen)
    code, _, err = cli(["train", str(recipe)], capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot write the run folder" in line and "No space left" in line
    assert "Traceback" not in err
    monkeypatch.setattr(hftrain.run_folder.os, "fdopen", real_fdopen)
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 0, err


def test_a_full_disk_while_staging_a_push_is_one_line_and_leaves_no_partial_file(
        finished, capsys, monkeypatch):
    """The disk fills while `push` copies the weights into the staging folder (half the file
    written): one line, exit 2, no half-copied file staged; the next push stages it all."""
    import errno
    import os
    import shutil as real_shutil

    import hftrain.hub

    _, run_dir = finished
    real_copy2 = real_shutil.copy2

    def filling_copy(source, target, **kwargs):
        if str(source).endswith("model.safetensors"):
            data = Path(source).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy2(source, target, **kwargs)

    monkeypatch.setattr(hftrain.hub.shutil, "copy2", filling_copy)
    argv = ["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"]
    code, _, err = cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot stage the upload" in line and "No space left" in line
    staged = run_dir / "hub"
    assert [p.name for p in staged.iterdir()] == [hftrain.hub.STAGING_MARKER]
    monkeypatch.setattr(hftrain.hub.shutil, "copy2", real_copy2)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    assert (staged / "model.safetensors").read_bytes() == \
        (run_dir / "final" / "model.safetensors").read_bytes()


def test_a_pickled_export_is_one_line_and_its_payload_never_runs(finished, tmp_path, capsys):
    """An export whose weights are a pickle (pytorch_model.bin) carrying a payload: torch's
    weights_only loader refuses it; hftrain says so in one line."""
    import os
    import pickle

    _, run_dir = finished
    export = tmp_path / "evil_export"
    shutil.copytree(run_dir / "final", export)
    (export / "model.safetensors").unlink()
    proof = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    (export / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    code, _, err = cli(["generate", str(export), "--prompt", "a", "--max-new-tokens", "2"],
                       capsys)
    assert code == 2 and "cannot load model" in one_error_line(err)
    assert not proof.exists()


def test_a_tokenizer_changed_under_a_run_is_refused_on_resume(finished, capsys):
    """The run's tokenizer/tokenizer.json edited (two ids swapped): the same ids would mean
    other text, so --resume stops in one line instead of training on."""
    recipe, run_dir = finished
    path = run_dir / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tokenizer))
    code, _, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 2 and "the tokenizer is not the one the run was trained with" in \
        one_error_line(err)
    assert latest_checkpoint(run_dir).name == "step-00000020"  # nothing trained on


@pytest.mark.parametrize("key", ["model.init_from", "tokenizer.name_or_path"])
def test_a_deleted_init_from_folder_is_named_in_one_line(key, finished, tmp_path, capsys):
    """A fine-tuning run from a local export that was deleted (or moved) since: one line
    naming the key and the folder, not a Hub lookup's message about repository ids."""
    recipe, run_dir = finished
    gone = tmp_path / "exports" / "gone"
    code, _, err = cli(["train", str(recipe), f"{key}={gone}", "run.output_dir="
                        f"{tmp_path / 'tuned'}"], capsys)
    assert code == 2 and f"{key} '{gone}' does not exist" in one_error_line(err)
    assert not (tmp_path / "tuned").exists()


@pytest.mark.parametrize("bytes_", ["same", "changed"])
def test_data_moved_with_the_same_bytes_resumes_and_changed_data_is_refused(
        bytes_, tmp_path, shakespeare_text, capsys):
    """The corpus moved to another folder after step 20 (the recipe updated to match): with
    the same bytes the run resumes, saying so; with other bytes it is refused as before."""
    old = tmp_path / "old" / "corpus.txt"
    old.parent.mkdir()
    old.write_text(shakespeare_text[:60_000], encoding="utf-8")
    recipe = recipe_file(tmp_path, old, tmp_path / "run")
    assert cli(["train", str(recipe)], capsys)[0] == 0
    new = tmp_path / "new" / "corpus.txt"
    new.parent.mkdir()
    old.rename(new)
    if bytes_ == "changed":
        new.write_text(shakespeare_text[:60_000].replace("e", "E", 1), encoding="utf-8")
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=30",
                          f"data.train_files=[{json.dumps(str(new))}]"], capsys)
    if bytes_ == "same":
        assert code == 0, err
        assert "data.train_files moved since the checkpoint" in err
        assert "resumed at step 20" in out
    else:
        assert code == 2 and "data.train_files" in one_error_line(err)


def test_no_sample_is_fine(tmp_path, corpus_file, capsys):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    code, out, err = cli(["train", str(recipe), "sample.max_new_tokens=0"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "sample:" not in out


def test_a_full_disk_during_export_leaves_a_run_that_resume_finishes(tmp_path, corpus_file,
                                                                     capsys, monkeypatch):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    real_export = hftrain.finish.export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hftrain.finish, "export", disk_full)
    code, _, err = cli(["train", str(recipe)], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left" in line and "--resume" in line
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists()
    assert latest_checkpoint(run_dir).name == "step-00000020"
    monkeypatch.setattr(hftrain.finish, "export", real_export)
    code, out, err = cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert "trained 0 steps (resumed at step 20)" in out
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in val_records(run_dir)] == [15, 20]  # no duplicate final record


def test_a_bad_record_mid_run_keeps_the_steps_done(tmp_path, capsys, monkeypatch):
    """A fine-tuning record with a missing field, met mid-run (the tokenizer is reused, so
    nothing reads the data ahead; the file is read in 2 KB pieces, so the bad one comes after
    a few steps): the steps trained so far are checkpointed, the error names the file and
    line, and fixing the record and --resume finishes the run."""
    monkeypatch.setattr("hftrain.data.sources.PIECE_BYTES", 2048)
    data = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}."}
               for i in range(300)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    val = tmp_path / "val.jsonl"  # validation reads a file of its own: the bad record is met
    val.write_text(data.read_text())  # by training only
    recipe = tiny_recipe_dict(data, tmp_path / "tok")
    recipe["data"].update({"kind": "sft", "shuffle_tokens": 0, "block_size": 32,
                           "val_files": [str(val)]})
    recipe["train"].update({"max_steps": 60, "batch_size": 4})
    recipe["sample"] = {"max_new_tokens": 0}
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps(recipe))
    assert cli(["tokenizer", str(path)], capsys)[0] == 0
    bad = dict(records[150])
    del bad["completion"]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*records[:150], bad, *records[151:]]))
    reuse = [f"tokenizer.name_or_path={tmp_path / 'tok' / 'tokenizer'}",
             f"run.output_dir={tmp_path / 'run'}"]
    code, _, err = cli(["train", str(path), *reuse], capsys)
    line = one_error_line(err)
    assert code == 2 and "sft.jsonl line 151" in line and "--resume" in line, line
    saved = latest_checkpoint(tmp_path / "run")
    assert saved is not None and 0 < int(saved.name.split("-")[1]) < 60
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = cli(["train", str(path), *reuse, "--resume"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# kill -9 during the export by default; SIGTERM during the final evaluation with -m slow
@pytest.mark.parametrize("phase,signame", [pytest.param("final_eval", "TERM",
                                                        marks=pytest.mark.slow),
                                           ("export", "KILL")])
def test_a_signal_after_training_leaves_a_run_that_resume_finishes(phase, signame, tmp_path,
                                                                   corpus_file):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    record = tmp_path / "record.txt"

    def launch(*extra: str, signal_in: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "SIGNAL_IN": signal_in}
        return subprocess.run([sys.executable, str(FAULTS), str(record), "0", "0", "--",
                               "train", str(recipe), *extra],
                              capture_output=True, text=True, cwd=REPO, env=env)

    stopped = launch(signal_in=f"{phase}:{signame}")
    assert stopped.returncode in (128 + signal.SIGTERM, -signal.SIGKILL), stopped.stderr
    if signame == "TERM":
        assert "Finish it with:" in stopped.stderr and "Traceback" not in stopped.stderr
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists()
    assert latest_checkpoint(run_dir).name == "step-00000020"
    resumed = launch("--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 0 steps" in resumed.stdout
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in val_records(run_dir)] == [15, 20]


# 5. one writer per run folder ------------------------------------------------------------


def test_a_second_process_on_a_run_folder_refuses(tmp_path, corpus_file):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    with RunLock(tmp_path / "run") as lock:  # this test process is the first writer
        lock.acquire()
        second = subprocess.run([sys.executable, "-m", "hftrain", "train", str(recipe)],
                                capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 2
    assert f"in use by PID {os.getpid()}" in one_error_line(second.stderr)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK, MARKER]


# 6. metrics.jsonl survives a kill while it is rewritten, and a torn last line ----------------


def test_a_torn_metrics_line_and_a_killed_rewrite_lose_nothing(finished, capsys, monkeypatch):
    recipe, run_dir = finished
    metrics = run_dir / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 21, "lo')  # killed mid-write
    before = metrics.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # stands for a kill between writing the new file and renaming

    monkeypatch.setattr(hftrain.atomic.os, "replace", killed)  # after the new file is written
    code, _, _ = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 130
    assert metrics.read_text() == before  # the old file, whole
    monkeypatch.undo()
    code, _, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 0, err
    steps = [r["step"] for r in read_metrics(metrics) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30


# 7. --resume with run.overwrite=true ------------------------------------------------------


def test_resume_with_overwrite_refuses_and_keeps_the_checkpoints(finished, capsys):
    recipe, run_dir = finished
    before = snapshot(run_dir)
    code, _, err = cli(["train", str(recipe), "--resume", "run.overwrite=true"], capsys)
    assert code == 2 and "run.overwrite" in one_error_line(err)
    assert snapshot(run_dir) == before


# 8. --resume continues the same run or refuses --------------------------------------------


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=4", "train.batch_size"), ("train.lr=0.01", "train.lr"),
    ("model.n_embd=64", "model.n_embd"), ("data.block_size=32", "data.block_size"),
    ("data.train_files=[other.txt]", "data.train_files"),
])
def test_resume_with_a_changed_recipe_refuses(override, key, finished, tmp_path, capsys):
    recipe, run_dir = finished
    (tmp_path / "other.txt").write_text("x" * 1000)
    before = snapshot(run_dir)
    code, _, err = cli(["train", str(recipe), "--resume", "train.max_steps=30", override],
                       capsys)
    line = one_error_line(err)
    assert code == 2 and key in line
    assert snapshot(run_dir) == before


def test_a_setting_added_since_the_run_started_is_no_change_at_its_default():
    """A checkpoint written before hftrain had `train.muon_lr` resumes while the recipe leaves
    it at its default; set to something else, it is a change like any other."""
    from hftrain.recipe import Recipe, flatten
    from hftrain.resume import changed_keys

    defaults = flatten(Recipe().to_dict())
    saved = {k: v for k, v in defaults.items() if not k.startswith("train.muon")}
    assert changed_keys(saved, dict(defaults), defaults) == []
    assert changed_keys(saved, {**defaults, "train.muon_lr": 0.05}, defaults) == [
        "train.muon_lr (None -> 0.05)"]
    assert changed_keys(defaults, {**defaults, "train.lr": 0.5}, defaults) == [
        f"train.lr ({defaults['train.lr']!r} -> 0.5)"]


def test_a_tokenizer_built_with_other_settings_is_refused(tmp_path, corpus_file, capsys):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    code, _, err = cli(["tokenizer", str(recipe)], capsys)
    assert code == 0, err
    code, _, err = cli(["train", str(recipe), "tokenizer.kind=byte_bpe",
                        "tokenizer.vocab_size=300"], capsys)
    assert code == 2 and "tokenizer.kind ('char' -> 'byte_bpe')" in one_error_line(err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# 9. the resume hint repeats the overrides -------------------------------------------------


def test_the_resume_hint_after_sigterm_resumes_the_same_run(tmp_path, corpus_file):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "default")
    out = tmp_path / "elsewhere"
    record = tmp_path / "record.txt"
    stopped = subprocess.run(
        [sys.executable, str(FAULTS), str(record), "0", "0", "--", "train", str(recipe),
         f"run.output_dir={out}", "train.max_steps=25"],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "SIGNAL_IN": "final_eval:TERM"})
    assert stopped.returncode == 128 + signal.SIGTERM
    hint = stopped.stderr.split("Finish it with: ")[1].splitlines()[0]
    assert hint.startswith("hftrain train ") and hint.endswith(" --resume")
    resumed = subprocess.run([sys.executable, "-m", "hftrain", *shlex.split(hint)[1:]],
                             capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 0 steps (resumed at step 25)" in resumed.stdout
    assert (out / "final").is_dir() and not (tmp_path / "default").exists()


# 10. --resume on a finished run ----------------------------------------------------------


def test_resume_on_a_finished_run_does_nothing_until_max_steps_grows(finished, capsys):
    recipe, run_dir = finished
    before = snapshot(run_dir)
    code, out, err = cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert "already finished its 20 steps" in out
    assert snapshot(run_dir) == before
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 0, err
    assert "trained steps 21-30 (10 steps this run, resumed at step 20)" in out
    assert [r["step"] for r in val_records(run_dir)] == [15, 30]
    assert "max_steps: 30" in (run_dir / "final" / "hftrain_recipe.yaml").read_text()


# 11. a damaged newest checkpoint falls back to the one before ----------------------------


@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer", "bad JSON"])
def test_a_damaged_newest_checkpoint_falls_back(damage, tmp_path, corpus_file, capsys):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run", max_steps=30)
    code, _, err = cli(["train", str(recipe), "train.max_steps=20"], capsys)
    assert code == 0, err
    newest = tmp_path / "run" / "checkpoints" / "step-00000020"
    if damage == "truncated weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing optimizer":
        (newest / "optimizer.bin").unlink()
    else:
        (newest / STATE_FILE).write_text("{not json")
    code, out, err = cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert f"skipping damaged checkpoint {newest}" in err and "Traceback" not in err
    assert "trained steps 11-30 (20 steps this run, resumed at step 10)" in out


# 13. a full disk while checkpointing, an output folder that cannot be written ----------------


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; "
                 "No space left on device"),  # what torch.save raises on a full disk
])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(error, tmp_path,
                                                                      corpus_file, capsys,
                                                                      monkeypatch):
    import accelerate

    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run", max_steps=30)
    real_save = accelerate.Accelerator.save_state
    saves = {"n": 0}

    def disk_full_on_second_save(self, output_dir=None, **kwargs):
        saves["n"] += 1
        real_save(self, output_dir, **kwargs)
        if saves["n"] == 2:
            raise error

    monkeypatch.setattr(accelerate.Accelerator, "save_state", disk_full_on_second_save)
    code, _, err = cli(["train", str(recipe)], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and "step-00000010 is intact" in line
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010"]  # no half checkpoint
    monkeypatch.undo()
    code, out, err = cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert "trained steps 11-30 (20 steps this run, resumed at step 10)" in out


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_output_folder_that_cannot_be_written_is_one_line(where, tmp_path, corpus_file,
                                                             capsys):
    if where == "under a file":
        out = corpus_file / "run"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        if os.access(parent, os.W_OK):
            pytest.skip("this user (root) writes to read-only folders")
        out = parent / "run"
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    code, _, err = cli(["train", str(recipe), f"run.output_dir={out}"], capsys)
    assert code == 2 and "run folder" in one_error_line(err)


# Found by probing the above (each was a way to lose a run or mix two) ---------------------


def test_a_continuation_killed_before_its_checkpoint_is_not_taken_for_finished(finished,
                                                                              tmp_path):
    recipe, run_dir = finished
    record = tmp_path / "record.txt"
    killed = subprocess.run([sys.executable, str(FAULTS), str(record), "25", "0", "--", "train",
                             str(recipe), "--resume", "train.max_steps=40"],
                            capture_output=True, text=True, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, "-m", "hftrain", "train", str(recipe), "--resume"],
                             capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 0 steps (resumed at step 20)" in resumed.stdout  # evaluated and exported
    assert [r["step"] for r in val_records(run_dir)] == [15, 20]


def test_a_signal_during_the_sample_says_the_run_is_finished(tmp_path, corpus_file):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    stopped = subprocess.run([sys.executable, str(FAULTS), str(tmp_path / "r"), "0", "0", "--",
                              "train", str(recipe)], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "SIGNAL_IN": "sample:TERM"})
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "finished and exported" in stopped.stderr and "--resume" not in stopped.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_overwrite_refuses_a_run_folder_holding_the_users_files(finished, capsys):
    recipe, run_dir = finished
    (run_dir / "notes.txt").write_text("precious")
    before = snapshot(run_dir)
    code, _, err = cli(["train", str(recipe), "run.overwrite=true"], capsys)
    assert code == 2 and "notes.txt" in one_error_line(err)
    assert snapshot(run_dir) == before


def test_a_kill_while_overwrite_clears_leaves_a_folder_hftrain_still_owns(finished, capsys,
                                                                          monkeypatch):
    import hftrain.run_folder

    recipe, run_dir = finished
    real_rmtree = hftrain.run_folder.shutil.rmtree
    calls = {"n": 0}

    def killed_on_second(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands for a kill part-way through the clearing
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(hftrain.run_folder.shutil, "rmtree", killed_on_second)
    code, _, _ = cli(["train", str(recipe), "run.overwrite=true"], capsys)
    assert code == 130 and (run_dir / MARKER).is_file()
    monkeypatch.undo()
    code, _, err = cli(["train", str(recipe), "run.overwrite=true"], capsys)
    assert code == 0, err


def test_folders_hftrain_did_not_write_never_push_out_real_checkpoints(finished, capsys):
    recipe, run_dir = finished
    for junk in ("step-00000098", "step-00000099"):
        (run_dir / "checkpoints" / junk).mkdir()
    code, _, err = cli(["train", str(recipe), "--resume", "train.max_steps=40"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000030", "step-00000040", "step-00000098", "step-00000099"]


@pytest.mark.parametrize("edit", ["digest", "step", "trajectory", "micro_batches", "renamed",
                                  "processes", "metrics_lines"])
def test_an_edited_state_file_marks_the_checkpoint_damaged(edit, finished, capsys):
    """Edits caught by the state file's own digest, and (with the digest recomputed, as a
    careless tool might) by its consistency checks."""
    recipe, run_dir = finished
    newest = run_dir / "checkpoints" / "step-00000020"
    state = json.loads((newest / STATE_FILE).read_text())
    if edit == "digest":
        state["parts"]["loop"]["tokens_seen"] += 1
    elif edit == "step":
        state["step"] = state["parts"]["loop"]["step"] = 25
    elif edit == "trajectory":
        del state["trajectory"]
    elif edit == "micro_batches":
        state["parts"]["loop"]["micro_batches"] = 10**9  # a replay that would never end
    elif edit == "processes":  # rank 1 would take rank 0's data position
        state["processes"] = 2
    elif edit == "metrics_lines":  # metrics.jsonl would be cut to nothing, or fail later
        state["parts"]["metrics"]["lines"] = None
    if edit not in ("digest", "renamed"):
        state["state_sha256"] = state_digest(state)
    if edit == "renamed":  # a copy of step 20 named as step 40
        import shutil

        shutil.copytree(newest, newest.with_name("step-00000040"))
        newest = newest.with_name("step-00000040")
    else:
        (newest / STATE_FILE).write_text(json.dumps(state))
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 0, err
    assert f"skipping damaged checkpoint {newest}" in err
    resumed_at = 20 if edit == "renamed" else 10
    assert f"resumed at step {resumed_at}" in out


def test_resume_says_when_a_data_file_changed(finished, corpus_file, capsys):
    recipe, run_dir = finished
    with corpus_file.open("a") as f:
        f.write("\nMore text, added after the checkpoint.\n")
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 0, err
    assert f"data file {corpus_file.resolve()} changed since the checkpoint" in err or \
        f"data file {corpus_file} changed since the checkpoint" in err


def test_a_tokenizer_built_from_other_data_or_without_its_record_is_refused(tmp_path,
                                                                            corpus_file,
                                                                            capsys):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text("Другой текст. " * 500)
    assert cli(["tokenizer", str(recipe)], capsys)[0] == 0
    code, _, err = cli(["train", str(recipe), f"data.train_files=[{other}]"], capsys)
    assert code == 2 and "data.train_files" in one_error_line(err)
    (tmp_path / "run" / "tokenizer" / "hftrain_tokenizer.json").unlink()
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 2 and "hftrain_tokenizer.json" in one_error_line(err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_waits_for_no_one_the_lock_comes_before_the_checkpoints_are_read(finished):
    recipe, run_dir = finished
    with RunLock(run_dir) as lock:
        lock.acquire()
        second = subprocess.run([sys.executable, "-m", "hftrain", "train", str(recipe),
                                 "--resume"], capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 2 and "in use by PID" in one_error_line(second.stderr)


def test_a_finished_run_whose_export_was_deleted_is_exported_again(finished, capsys):
    import shutil

    recipe, run_dir = finished
    shutil.rmtree(run_dir / "final")
    code, out, err = cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert "trained 0 steps (resumed at step 20)" in out
    assert (run_dir / "final" / "config.json").is_file()


@pytest.mark.parametrize("where", ["symlink", "under a file", "bad repo id"])
def test_push_staging_mistakes_are_one_line(where, finished, tmp_path, capsys):
    _, run_dir = finished
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    folder = {"symlink": link, "under a file": run_dir / "loss.png" / "hub",
              "bad repo id": tmp_path / "new"}[where]
    repo = "not a repo id!!" if where == "bad repo id" else "me/m"
    code, _, err = cli(["push", str(run_dir / "final"), "--repo-id", repo, "--dry-run",
                        "--folder", str(folder)], capsys)
    assert code == 2 and one_error_line(err)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("link", ["file", "folder"])
def test_push_never_stages_what_a_link_in_the_export_points_at(link, finished, tmp_path,
                                                               capsys):
    """A token file (or a private folder) linked into the export is refused in one line and
    never copied into the upload."""
    _, run_dir = finished
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text("hf_SECRET_TOKEN")
    target = secret / "token" if link == "file" else secret
    (run_dir / "final" / "extra").symlink_to(target)
    code, _, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"],
                       capsys)
    assert code == 2 and "is a symbolic link" in one_error_line(err)
    staged = run_dir / "hub"
    assert not staged.exists() or not any(
        "hf_SECRET_TOKEN" in p.read_text(errors="replace") for p in staged.rglob("*")
        if p.is_file())


def test_the_staged_upload_carries_no_local_absolute_path(finished, tmp_path, capsys):
    """The recipe names the corpus and the run folder by absolute paths: the staged recipe
    and model card keep only their last two parts."""
    _, run_dir = finished
    code, _, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"],
                       capsys)
    assert code == 0, err
    assert str(tmp_path) in (run_dir / "final" / "hftrain_recipe.yaml").read_text()
    for name in ("hftrain_recipe.yaml", "README.md"):
        assert str(tmp_path) not in (run_dir / "hub" / name).read_text(), name
    import yaml

    staged = yaml.safe_load((run_dir / "hub" / "hftrain_recipe.yaml").read_text())
    assert staged["run"]["output_dir"] == "run"


def test_no_user_or_home_reaches_the_card_or_recipe_from_any_path_form(finished, capsys):
    """Paths a recipe may hold in any form (missing on this machine, ~, ~user, ../..,
    file://, Windows) are published as their last component only."""
    import yaml

    _, run_dir = finished
    path = run_dir / "final" / "hftrain_recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["init_from"] = "/home/alice/models/unreleased-7b"
    recipe["tokenizer"]["name_or_path"] = "~/tokenizers/acme-internal"
    recipe["data"]["train_files"] = ["C:\\Users\\alice\\data.txt", "~bob/notes.txt",
                                     "../../home/alice/private.txt", "file:///home/alice/x.txt"]
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"],
                       capsys)
    assert code == 0, err
    for name in ("README.md", "hftrain_recipe.yaml"):
        text = (run_dir / "hub" / name).read_text()
        assert not any(word in text for word in ("alice", "bob", "/home", "~", "Users")), name
    assert "unreleased-7b" in (run_dir / "hub" / "README.md").read_text()


@pytest.mark.parametrize("content", ["- a list\n", "data: 5\nmodel: [1]\n",
                                     "data: {train_files: 7}\n", "data: [unclosed\n"])
def test_push_of_an_export_with_a_malformed_recipe_is_one_line(content, finished, capsys):
    _, run_dir = finished
    (run_dir / "final" / "hftrain_recipe.yaml").write_text(content)
    code, out, err = cli(["push", str(run_dir / "final"), "--repo-id", "me/m", "--dry-run"],
                         capsys)
    assert (code == 0 and "README.md" in out) or (code == 2 and one_error_line(err)), err


@pytest.mark.parametrize("name", [".hftrain-lock", "loss.png", "metrics.jsonl", "recipe.yaml",
                                  ".metrics.jsonl.tmp", "checkpoints/.step-00000030.tmp"])
def test_a_link_planted_in_a_run_folder_is_refused_and_never_written_through(
        name, finished, tmp_path, capsys):
    """`--resume` of a run whose folder holds a symbolic link where hftrain writes its own
    file: one line, exit 2, and the file the link points at is untouched."""
    recipe, run_dir = finished
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    planted = run_dir / name
    if planted.exists():
        planted.unlink()
    planted.symlink_to(victim)
    code, _, err = cli(["train", str(recipe), "--resume", "train.max_steps=30"], capsys)
    assert code == 2 and "is a symbolic link" in one_error_line(err), err
    assert victim.read_text() == "the user's own file"


def test_no_writer_follows_a_link_even_past_the_check(tmp_path):
    """The writers themselves (atomic replace, metrics append, the plot) never write through
    a link, should one appear after the start-up check."""
    from hftrain.atomic import LinkRefused, atomic_write_text
    from hftrain.tracking import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("kept")
    (tmp_path / ".a.txt.tmp").symlink_to(victim)
    atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and victim.read_text() == "kept"
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(LinkRefused):
        MetricsLog(tmp_path / "metrics.jsonl", enabled=True).write({"step": 1, "loss": 1.0})
    assert victim.read_text() == "kept"


def test_a_tilde_in_the_output_dir_means_home(tmp_path, corpus_file, monkeypatch):
    from hftrain.recipe import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(recipe_file(tmp_path, corpus_file, tmp_path / "run"),
                         ["run.output_dir=~/runs/x"])
    assert recipe.run.output_dir == str(tmp_path / "runs" / "x")


def test_a_damaged_newer_checkpoint_never_pushes_out_the_good_ones(finished, capsys):
    recipe, run_dir = finished
    weights = run_dir / "checkpoints" / "step-00000020" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=17",
                          "checkpoint.interval=5", "checkpoint.keep=1"], capsys)
    assert code == 0, err
    assert "resumed at step 10" in out
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000017", "step-00000020"]  # the damaged one is left, not counted
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=17"], capsys)
    assert code == 0 and "already finished its 17 steps" in out


def test_a_user_error_after_a_checkpoint_is_one_line_with_the_command_that_resumes(
        tmp_path, corpus_file, capsys, monkeypatch):
    """A mistake found mid-run (a data file changed under the run, say) is still one line and
    exit 2, naming the checkpoint kept and the command that continues; that command does."""
    from hftrain.errors import DataError

    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    real_step = hftrain.train_state.Run.optimizer_step

    def fails_at_13(self, micro_batches):
        if self.step + 1 == 13:
            raise DataError(f"data file {corpus_file} changed during the run")
        return real_step(self, micro_batches)

    monkeypatch.setattr(hftrain.train_state.Run, "optimizer_step", fails_at_13)
    code, _, err = cli(["train", str(recipe), "train.log_interval=5"], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"hftrain: error: data file {corpus_file} changed")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000010"
    hint = f"continue it with: hftrain train {recipe} train.log_interval=5 --resume"
    assert f"The run is saved at {checkpoint}; {hint}" in line
    monkeypatch.setattr(hftrain.train_state.Run, "optimizer_step", real_step)
    code, out, err = cli(shlex.split(line.split("continue it with: hftrain ")[1]), capsys)
    assert code == 0 and "resumed at step 10" in out, err


def test_a_failure_inside_an_update_is_not_checkpointed_as_a_step(tmp_path, corpus_file,
                                                                    capsys, monkeypatch):
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    real_step = hftrain.train_state.Run.optimizer_step

    def fails_at_13(self, micro_batches):
        if self.step + 1 == 13:
            raise RuntimeError("out of memory")  # weights may be half updated
        return real_step(self, micro_batches)

    monkeypatch.setattr(hftrain.train_state.Run, "optimizer_step", fails_at_13)
    with pytest.raises(RuntimeError):
        main(["train", str(recipe)])
    assert "continue it with" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step-00000010"


def test_a_failed_push_after_export_does_not_advise_resume(tmp_path, corpus_file, capsys,
                                                           monkeypatch):
    from hftrain.errors import HftrainError

    def no_network(*args, **kwargs):
        raise HftrainError("pushing to me/m failed (ConnectError): no route")

    monkeypatch.setattr(hftrain.finish, "push", no_network)
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    code, _, err = cli(["train", str(recipe), "hub.push_to_hub=true", "hub.repo_id=me/m"],
                       capsys)
    line = one_error_line(err)
    assert code == 2 and "retry with: hftrain push" in line and "--resume" not in line
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_the_same_data_file_by_another_path_is_the_same_run(finished, corpus_file, capsys,
                                                            monkeypatch):
    recipe, run_dir = finished
    monkeypatch.chdir(corpus_file.parent)
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=30",
                          f"data.train_files=[{corpus_file.name}]"], capsys)
    assert code == 0, err
    assert "resumed at step 20" in out


def test_a_new_file_matching_a_glob_is_another_run(finished, corpus_file, capsys):
    recipe, run_dir = finished
    glob_recipe = ["train", str(recipe), f"data.train_files=[{corpus_file.parent}/c*.txt]"]
    code, _, err = cli([*glob_recipe, "run.overwrite=true", "train.max_steps=10"], capsys)
    assert code == 0, err
    (corpus_file.parent / "corpus2.txt").write_text(corpus_file.read_text())
    code, _, err = cli([*glob_recipe, "--resume", "train.max_steps=20"], capsys)
    assert code == 2 and "data.train_files" in one_error_line(err)


def test_overwrite_never_deletes_the_model_a_run_starts_from(finished, capsys):
    recipe, run_dir = finished
    before = snapshot(run_dir)
    code, _, err = cli(["train", str(recipe), "run.overwrite=true",
                        f"model.init_from={run_dir / 'final'}"], capsys)
    assert code == 2 and "final" in one_error_line(err)
    assert snapshot(run_dir) == before


@pytest.mark.slow  # by default test_sharded.py's FSDP2 kill -9 falls back past a damaged shard
def test_two_processes_fall_back_from_a_damaged_checkpoint_together(tmp_path, corpus_file):
    """Under torchrun, rank 0 decides which checkpoint to resume from (warning once) and both
    ranks load it; the resumed run finishes."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run", batch_size=4)

    def launch(*extra: str) -> subprocess.CompletedProcess:
        return run_or_dump([torchrun, "--nproc_per_node", "2", "-m", "hftrain", "train",
                            str(recipe), *extra], 600, cwd=REPO)

    assert launch().returncode == 0
    (tmp_path / "run" / "checkpoints" / "step-00000020" / "optimizer.bin").unlink()
    resumed = launch("--resume", "train.max_steps=30")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.count("skipping damaged checkpoint") == 1
    assert "trained steps 11-30 (20 steps this run, resumed at step 10)" in resumed.stdout


@pytest.mark.slow  # by default test_sharded.py's refusals under torchrun and on two nodes
def test_a_refusal_under_torchrun_is_one_line_not_a_traceback_per_rank(tmp_path, corpus_file):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run", batch_size=4)

    def launch(*extra: str) -> subprocess.CompletedProcess:
        return run_or_dump([torchrun, "--nproc_per_node", "2", "-m", "hftrain", "train",
                            str(recipe), *extra], 600, cwd=REPO)

    assert launch("train.max_steps=10").returncode == 0
    refused = launch("--resume", "train.lr=0.01")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert output.count("hftrain: error:") == 1 and "train.lr (0.003 -> 0.01)" in output
    errors = output.replace("MULTI_CPU (gloo)", "")  # the start-up line names the backend
    assert "exitcode  : 2" in output and "gloo" not in errors and "[rank1]" not in output


@pytest.mark.parametrize("stage", ["marker", "tokenizer"])
def test_a_full_disk_before_the_first_step_is_one_line_and_the_folder_stays_usable(
        stage, tmp_path, corpus_file, capsys, monkeypatch):
    import hftrain.run_folder

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = (hftrain.run_folder, "atomic_write_text") if stage == "marker" else \
        (hftrain.lifecycle, "save_run_tokenizer")
    monkeypatch.setattr(*target, disk_full)
    recipe = recipe_file(tmp_path, corpus_file, tmp_path / "run")
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 2 and "No space left on device" in one_error_line(err)
    monkeypatch.undo()
    code, _, err = cli(["train", str(recipe)], capsys)  # space freed: the same command works
    assert code == 0, err

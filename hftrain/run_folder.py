"""The run folder: hftrain deletes only what it made, and one process writes a run at a time.

A folder hftrain creates for a run carries a marker, `.hftrain-run` (JSON: who made it, and
once the run has finished, the step it finished at). `run.overwrite` clears only a folder with
that marker; it refuses the current directory, a folder that holds the recipe or the data, and
any non-empty folder hftrain did not make. While a run writes, its main process holds an OS
lock (`fcntl.flock`) on `.hftrain-lock` inside the folder, which the kernel releases when the
process exits however it exits (kill -9 included), so a stale lock never blocks a resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hftrain.errors import HftrainError

MARKER = ".hftrain-run"
LOCK = ".hftrain-lock"


def is_run_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def has_run(folder: Path) -> bool:
    """Whether training has started in `folder` (not just a tokenizer built into it)."""
    return (folder / "metrics.jsonl").exists() or (folder / "checkpoints").is_dir()


def read_marker(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(folder: Path, **fields: Any) -> None:
    """Create or update the marker, atomically (write a temporary file, then rename)."""
    data = {"created_by": "hftrain", **read_marker(folder), **fields}
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def _contains(folder: Path, path: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (symbolic links resolved)."""
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def check_writable_target(folder: Path, protected: Iterable[Path], key: str) -> None:
    """Refuse a run folder that is the working directory, or holds the recipe or the data:
    hftrain may later clear the folder it writes to, and these must never go with it."""
    if _contains(folder, Path.cwd()):
        raise HftrainError(f"{key} '{folder}' is the current directory or one of its parents; "
                           "give the run a folder of its own (e.g. runs/NAME)")
    for path in protected:
        if _contains(folder, path):
            raise HftrainError(f"{key} '{folder}' holds {path}; give the run a folder of its "
                               "own (e.g. runs/NAME)")


def check_new_run_target(folder: Path, overwrite: bool) -> None:
    """A new run goes to a folder that is new, empty, or hftrain's own (a run there needs
    `run.overwrite`; a folder with only a tokenizer from `hftrain tokenizer` does not)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise HftrainError(f"run.output_dir '{folder}' is a file, not a folder")
    if not is_run_folder(folder):
        if any(folder.iterdir()):
            raise HftrainError(
                f"run.output_dir '{folder}' is not empty and was not made by hftrain; "
                "choose a new or empty folder (hftrain only replaces folders it created)"
            )
        return
    if has_run(folder) and not overwrite:
        raise HftrainError(
            f"{folder} already holds a run; continue it with --resume, choose another "
            "run.output_dir, or pass run.overwrite=true to replace it"
        )


def clear_run_folder(folder: Path) -> None:
    """Empty a folder hftrain made, keeping the lock this process holds on it."""
    if not is_run_folder(folder):
        raise HftrainError(f"refusing to clear '{folder}': it was not made by hftrain")
    for entry in folder.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def run_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for the block, creating the folder and its marker if needed.

    A second process refuses at once, naming the holder's PID. Only the main process of a
    multi-process run locks (the others write nothing but their share of a checkpoint).
    """
    if not enabled:
        yield
        return
    import fcntl

    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK).open("a+", encoding="utf-8")
    except OSError as exc:
        raise HftrainError(f"cannot write the run folder {folder}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise HftrainError(f"{folder} is in use by {holder}; wait for it to finish, or "
                           "choose another run.output_dir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} ({' '.join(sys.argv[:3])})\n")
        handle.flush()
        if created or not any(p.name != LOCK for p in folder.iterdir()):
            write_marker(folder)
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock

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
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from hftrain.atomic import LinkRefused, atomic_write_text, open_no_follow
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


def write_marker(folder: Path, fresh: bool = False, **fields: Any) -> None:
    """Create or update (`fresh`: replace) the marker, atomically (a temporary file renamed
    over it, so the folder is never without one)."""
    data = {"created_by": "hftrain", **({} if fresh else read_marker(folder)), **fields}
    atomic_write_text(folder / MARKER, json.dumps(data, indent=2) + "\n")


def contains(folder: Path, path: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (symbolic links resolved)."""
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def check_writable_target(folder: Path, protected: Iterable[Path], key: str) -> None:
    """Refuse a run folder that is the working directory, or holds the recipe or the data:
    hftrain may later clear the folder it writes to, and these must never go with it."""
    if contains(folder, Path.cwd()):
        raise HftrainError(f"{key} '{folder}' is the current directory or one of its parents; "
                           "give the run a folder of its own (e.g. runs/NAME)")
    for path in protected:
        if contains(folder, path):
            raise HftrainError(f"{key} '{folder}' holds {path}; give the run a folder of its "
                               "own (e.g. runs/NAME)")


def check_ours_or_new(folder: Path) -> None:
    """hftrain writes only into a folder that is new, empty, or one it made."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise HftrainError(f"run.output_dir '{folder}' is a file, not a folder")
    if not is_run_folder(folder) and any(not _leftover(e) for e in folder.iterdir()):
        raise HftrainError(
            f"run.output_dir '{folder}' is not empty and was not made by hftrain; "
            "choose a new or empty folder (hftrain only replaces folders it created)"
        )


def check_new_run_target(folder: Path, overwrite: bool) -> None:
    """A new run goes to a folder that is new, empty, or hftrain's own: one that holds a run
    needs `run.overwrite`, and then nothing the user put there (a folder with only a tokenizer
    from `hftrain tokenizer` needs neither)."""
    check_ours_or_new(folder)
    if not is_run_folder(folder):
        return
    if has_run(folder) and not overwrite:
        raise HftrainError(
            f"{folder} already holds a run; continue it with --resume, choose another "
            "run.output_dir, or pass run.overwrite=true to replace it"
        )
    if overwrite:
        _refuse_foreign_entries(folder)


RUN_ENTRIES = frozenset({
    "recipe.yaml", "metrics.jsonl", "tokenizer", "final", "checkpoints", "loss.png", "hub",
    "hftrain",  # the Accelerate trackers' logs (project_dir/hftrain)
})
"""What hftrain writes into a run folder, besides the marker, the lock and temporary names
(`.NAME.tmp`, `.NAME.old`) of atomic writes."""


def _leftover(entry: Path) -> bool:
    """The lock or a temporary file: what a run that failed before its first file (a full
    disk) leaves in a folder it created."""
    return entry.name == LOCK or (entry.name.startswith(".") and entry.name.endswith(".tmp"))


def _made_by_hftrain(entry: Path) -> bool:
    name = entry.name
    if name in (MARKER, LOCK) or name in RUN_ENTRIES:
        return True
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def clear_run_folder(folder: Path) -> None:
    """Empty a folder hftrain made, keeping the lock this process holds on it and, until
    everything else is gone, the marker (a kill part-way leaves a folder that is still
    hftrain's). Refuses, touching nothing, if the user has put anything else in it."""
    if not is_run_folder(folder):
        raise HftrainError(f"refusing to clear '{folder}': it was not made by hftrain")
    _refuse_foreign_entries(folder)
    for entry in folder.iterdir():
        if entry.name in (LOCK, MARKER):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    write_marker(folder, fresh=True)


def _refuse_foreign_entries(folder: Path) -> None:
    foreign = sorted(e.name for e in folder.iterdir() if not _made_by_hftrain(e))
    foreign += foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise HftrainError(f"{folder} holds files hftrain did not write ({shown}); "
                           "move them out before replacing the run, or choose another "
                           "run.output_dir")


RECORDED = ("tokenizer", "final", "hub")
"""The run's folders whose files hftrain records in the marker (`written`) when it writes
them: the tokenizer, the export and the push staging folder."""

KNOWN_NAMES = {
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                  "hftrain_tokenizer.json"),
    "final": ("config.json", "generation_config.json", "model.safetensors",
              "model-*-of-*.safetensors", "model.safetensors.index.json", "hftrain_recipe.yaml",
              "hftrain_run.json", "*_recurrent.py", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "added_tokens.json",
              "vocab.json", "merges.txt"),
    # TensorBoard's logs under Accelerate's project_dir: RUN/hftrain/<time>/events..., hparams
    "hftrain": ("*/events.out.tfevents.*", "events.out.tfevents.*", "*/hparams.yml"),
}
"""What hftrain writes into a folder it has no record of (a run started by an earlier
version; the trackers' folder, which the trackers fill), as `fnmatch` patterns of paths
relative to the folder."""
KNOWN_NAMES["hub"] = (*KNOWN_NAMES["final"], "README.md", "loss.png", ".hftrain-staging")


def record_written(run_dir: Path, name: str) -> None:
    """Record in the marker every file now under `run_dir/name` as hftrain's own (no-op when
    `run_dir` is not a run folder: an export or tokenizer written elsewhere). Called right
    after hftrain replaced the folder whole, so everything in it is hftrain's."""
    if not is_run_folder(run_dir):
        return
    written = read_marker(run_dir).get("written")
    written = dict(written) if isinstance(written, dict) else {}
    written[name] = _listing(run_dir / name)
    write_marker(run_dir, written=written)


def _listing(folder: Path) -> list[str]:
    """`checkpoint.manifest_names` of a folder that is one (not a link to one), else []."""
    from hftrain.checkpoint import manifest_names

    return manifest_names(folder) if folder.is_dir() and not folder.is_symlink() else []


def foreign_files(folder: Path, names: tuple[str, ...] = (*RECORDED, "hftrain")) -> list[str]:
    """Files inside the run's own folders (`names`, and `checkpoints/` among the defaults)
    that hftrain did not write, at any depth: in `checkpoints/`, anything but `step-N`
    folders' listed files (and temporary folders of killed saves); in a RECORDED folder,
    anything the marker does not list, or, with no record of it, anything but KNOWN_NAMES."""
    found: list[str] = []
    written = read_marker(folder).get("written")
    written = written if isinstance(written, dict) else {}
    for name in names:
        if name in written:
            known = set(written.get(name) or [])
            found += [f"{name}/{f}" for f in _listing(folder / name) if f not in known]
        else:
            found += [f"{name}/{f}" for f in _listing(folder / name)
                      if not any(fnmatch(f, pattern) for pattern in KNOWN_NAMES[name])]
    if names == (*RECORDED, "hftrain"):
        found += _foreign_checkpoint_files(folder / "checkpoints")
    return found


def _foreign_checkpoint_files(root: Path) -> list[str]:
    from hftrain.checkpoint import STATE_FILE, is_checkpoint_name, read_state

    if not root.is_dir() or root.is_symlink():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".step-") and entry.name.endswith((".tmp", ".old")):
            continue  # a killed save's
        try:
            if not is_checkpoint_name(entry.name):
                raise ValueError("not a name hftrain gives a checkpoint")
            listed = set(read_state(entry)["files"]) | {STATE_FILE}
        except (OSError, ValueError, KeyError, TypeError):
            found.append(f"checkpoints/{entry.name}")
            continue
        found += [f"checkpoints/{entry.name}/{f}" for f in _listing(entry) if f not in listed]
    return found


def check_replaceable(run_dir: Path, name: str) -> None:
    """Refuse (one line) before hftrain replaces `run_dir/name` whole (the export, the
    tokenizer) when the user put files of their own in it."""
    foreign = foreign_files(run_dir, (name,))
    if foreign:
        raise HftrainError(f"{run_dir / name} holds files hftrain did not write "
                           f"({', '.join(foreign[:3])}); hftrain replaces that folder whole: "
                           "move them out first")


def check_no_links(folder: Path) -> None:
    """Refuse, in one line, a symbolic link where hftrain writes its own files: any entry of
    the run folder or of its `checkpoints/` (the run folder itself may be a link: the user
    chose that path). hftrain writes there by name (the lock, metrics.jsonl, loss.png, the
    marker, temporary names, whole folders), and a planted link would make it truncate or
    replace the file or folder it points at. (The writers also refuse to follow one: this
    says so before anything is written.)"""
    for parent in (folder, folder / "checkpoints"):
        if not parent.is_dir() or parent.is_symlink():
            if parent.is_symlink():
                raise LinkRefused(parent)
            continue
        for entry in parent.iterdir():
            if entry.is_symlink():
                raise LinkRefused(entry)


class RunLock:
    """The run folder's lock: held from `acquire` until `release` (or the block's end).

    `acquire` creates the folder (and its marker) if needed and refuses at once, naming the
    holder's PID, when another process holds it. It may be called early, before the run
    reads the folder's checkpoints, when the folder is already a run folder; calling it again
    does nothing. Only the main process of a multi-process run locks (the others write only
    their share of a checkpoint), so `enabled` is False on the others.
    """

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self._handle: Any = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.enabled or self._handle is not None:
            return
        import fcntl

        folder = self.folder
        check_no_links(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = os.fdopen(open_no_follow(folder / LOCK, os.O_RDWR), "r+", encoding="utf-8")
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
        self._handle = handle
        try:  # who holds it, for the next one's message
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} ({' '.join(sys.argv[:3])})\n")
            handle.flush()
        except OSError as exc:  # a full disk
            self.release()
            raise HftrainError(f"cannot write the run folder {folder}: {exc.strerror}") from None
        if not any(not _leftover(p) for p in folder.iterdir()):
            try:  # a folder hftrain created (or found empty)
                write_marker(folder)
            except OSError as exc:
                self.release()
                raise HftrainError(f"cannot write the run folder {folder}: {exc.strerror}") \
                    from None

    def release(self) -> None:
        if self._handle is not None:
            # Closing the descriptor releases the lock; on a full disk the close's flush of
            # the holder's line fails, and the descriptor is closed all the same.
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None

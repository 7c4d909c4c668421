"""Write a file or a folder completely or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: leave nothing behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write into; rename it into place on success.

    A crash or an exception inside the block removes the temporary folder and leaves `target`
    as it was, so readers only ever see a complete folder. An existing `target` is moved aside
    before the new one takes its name and deleted only after.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(target, tmp)


def replace_directory(target: Path, complete: Path) -> None:
    """Rename the folder `complete` to `target`. An existing `target` is moved aside to
    `.NAME.old` first and removed only after, so a kill leaves one of the two whole."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    complete.rename(target)
    shutil.rmtree(old, ignore_errors=True)


WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, RuntimeError, SafetensorError)
"""What a full disk or a read-only folder raises while writing: OSError from Python,
RuntimeError from torch.save, SafetensorError from safetensors."""


def write_error_reason(exc: Exception) -> str:
    """The reason in a WRITE_ERRORS exception, for a one-line message."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]

"""Write a file or a folder completely or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError

from hftrain.errors import HftrainError


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old content or the new, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` through a temporary sibling renamed over it. Neither is
    written through a symbolic link: the temporary file is created new (`O_EXCL`, and
    `O_NOFOLLOW`), and a rename replaces a link at `path` rather than its target."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale one, or a link planted there: removed, not followed
    try:
        with open_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: leave nothing behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_new(path: Path) -> BinaryIO:
    """`path` created for writing, failing if anything (a file, a link) is already there."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o644),
                     "wb")


def open_no_follow(path: Path, flags: int) -> int:
    """`os.open(path, flags | O_CREAT | O_NOFOLLOW)`: a symbolic link at `path` raises
    `LinkRefused` (one line naming it) instead of being written through."""
    try:
        return os.open(path, flags | os.O_CREAT | NO_FOLLOW, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise LinkRefused(path) from None
        raise exc from None


class LinkRefused(HftrainError):
    """A symbolic link where hftrain writes a file of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is a symbolic link; hftrain writes its own files and never "
                         "through a link (it could overwrite the file it points at): remove it")


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

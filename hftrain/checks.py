"""Field checks shared by the recipe dataclasses' `__post_init__` (recipe sections and the
model field classes, which cannot import recipe.py). The recipe loader adds key and file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hftrain.errors import HftrainError

# Each check is written so that NaN fails it (every comparison with NaN is false); the recipe
# loader already refuses non-finite floats, this also covers sections built in code.


def _require(fields: Any, names: tuple[str, ...], ok: Callable[[Any], bool], what: str) -> None:
    """Raise `ValueError("<name> must be <what>, got <value>")` for the first named field whose
    value fails `ok`. Unset (None) optional fields are skipped: unset means "not used"."""
    for name in names:
        value = getattr(fields, name)
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {what}, got {value}")


def at_least_one(fields: Any, *names: str) -> None:
    """Each named field is a count: 1 or more."""
    _require(fields, names, lambda v: v >= 1, ">= 1")


def positive(fields: Any, *names: str) -> None:
    """Each named field is greater than 0."""
    _require(fields, names, lambda v: v > 0, "> 0")


def non_negative(fields: Any, *names: str) -> None:
    """Each named field is 0 or more."""
    _require(fields, names, lambda v: v >= 0, ">= 0")


def in_unit_interval(fields: Any, *names: str) -> None:
    """Each named field is a rate or fraction in [0, 1)."""
    _require(fields, names, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def in_range(fields: Any, low: float, high: float, *names: str) -> None:
    """Each named field lies in [low, high], both ends included."""
    _require(fields, names, lambda v: low <= v <= high, f"in [{low}, {high}]")


def check_local_folder(name: str, key: str) -> None:
    """A name that is a local path (not a Hub id like `user/name`) must exist: one line
    naming the key, rather than a Hub lookup's message about an invalid repository id."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise HftrainError(f"{key} '{name}' does not exist (deleted or moved?); point {key} "
                           "at the model's folder")

"""Field checks shared by the recipe dataclasses' `__post_init__` (recipe sections and the
model field classes, which cannot import recipe.py). The recipe loader adds key and file."""

from __future__ import annotations

from typing import Any


def at_least_one(fields: Any, *names: str) -> None:
    """Each named field is a count: 1 or more."""
    for name in names:
        if getattr(fields, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(fields, name)}")


def in_unit_interval(fields: Any, *names: str) -> None:
    """Each named field is a rate or fraction in [0, 1)."""
    for name in names:
        if not 0.0 <= getattr(fields, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(fields, name)}")

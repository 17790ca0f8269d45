"""Checks every method's frozen config dataclass shares."""

from __future__ import annotations

from typing import Any, Iterable


def check_positive(config: Any, fields: Iterable[str]) -> None:
    """Raises `ValueError` naming the first of `fields` whose value in `config` is below 1."""
    for field in fields:
        if getattr(config, field) < 1:
            raise ValueError(f"{field} must be positive, got {getattr(config, field)}.")

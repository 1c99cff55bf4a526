"""Field checks shared by every config dataclass; messages start with the field name for the YAML loader."""

from __future__ import annotations


def check_positive(obj: object, *names: str) -> None:
    """Raise `ValueError("<name>: ...")` for the first named field that is not > 0."""
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name}: must be > 0, got {value}")


def check_at_least(obj: object, minimum: float, *names: str) -> None:
    """Raise `ValueError("<name>: ...")` for the first named field below `minimum`."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ValueError(f"{name}: must be >= {minimum}, got {value}")

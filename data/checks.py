"""Field checks shared by every config dataclass; messages start with the field name for the YAML loader."""

from __future__ import annotations

import math
from collections.abc import Mapping


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


def is_number(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_table(path: str, table: object, *, probabilities: bool, side_lengths: bool = False) -> dict:
    """A mapping of names to non-negative numbers, normalised to floats; raises `ValueError("<path>...: ...")`.

    `probabilities` tables must sum to 1 (or be empty); `side_lengths` keys are positive integers (pixels)
    and need at least one entry.
    """
    if not isinstance(table, Mapping):
        raise ValueError(f"{path}: expected a mapping of name to number, got {table!r}")
    out: dict = {}
    for key, number in table.items():
        if side_lengths:
            if not str(key).isdigit() or int(key) < 1:
                raise ValueError(f"{path}: side length {key!r} is not a positive integer (pixels)")
            key = int(key)
        if not is_number(number) or not math.isfinite(number) or number < 0:
            raise ValueError(f"{path}.{key}: expected a non-negative number, got {number!r}")
        out[key] = float(number)
    if probabilities and out and abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"{path}: probabilities sum to {sum(out.values()):.6g}, expected 1")
    if side_lengths and not out:
        raise ValueError(f"{path}: needs at least one side length")
    return out

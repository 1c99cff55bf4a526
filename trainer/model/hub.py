"""Reading a pretrained checkpoint's files (hub name or folder) with a one-line error that names the config field."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def from_checkpoint(field: str, name_or_path: str, load: Callable[[], T]) -> T:
    """`load()`; when the checkpoint's files cannot be read (offline, unknown repo, no access, missing folder) a
    ValueError names the field and the checkpoint, which `plait train` prints as one line with exit code 2."""
    try:
        return load()
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{field}: cannot load {name_or_path!r}: {reason}") from None

"""Checkpoints load without running code: every `.pt` file is read by torch's weights-only unpickler.

A pickle can name any callable, so a crafted checkpoint could run code when loaded. plait's own files (rank
state, run state) and DeepSpeed's (model, optimizer and universal states) hold tensors, containers and a few
plain-data types (`SAFE_GLOBALS`). Before a load, `check_files` reads the pickles' opcodes, without running
them, and refuses any file that names anything else; during it, `weights_only` makes every `torch.load`,
DeepSpeed's included, use the weights-only unpickler.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _reconstruct() -> Any:
    """numpy's array rebuilder (its module moved in numpy 2)."""
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct(), ZeroStageEnum, fragment_address,
                LossScaler, DynamicLossScaler]
"""Plain-data types checkpoints hold besides tensors: numpy arrays (RNG states), DeepSpeed's ZeRO stage, fragment
addresses and loss scalers (attribute bags, rebuilt without calling any of their code)."""
ALLOWED_NAMES = frozenset(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
"""Fully qualified names a checkpoint file may refer to."""


class UnsafeCheckpoint(ValueError):
    """A checkpoint file refers to something other than tensors and plain data; it is not loaded."""


def check_files(folder: Path) -> None:
    """Raise UnsafeCheckpoint naming the first `.pt` file under `folder` that refers to anything outside
    SAFE_GLOBALS."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, pickle.UnpicklingError, OSError, ValueError) as err:
            raise UnsafeCheckpoint(f"{path}: not a readable torch checkpoint ({err})") from None
        unsafe = sorted(named - ALLOWED_NAMES)
        if unsafe:
            raise UnsafeCheckpoint(f"{path}: refers to {', '.join(unsafe)}; plait loads only tensors and plain data "
                                   "from checkpoints (unpickling anything else could run code)")


@contextmanager
def weights_only() -> Iterator[None]:
    """Inside, every `torch.load` (whatever its caller asks) uses the weights-only unpickler with the allowed
    types."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous


def safe_load(path: Path, map_location: str = "cpu") -> Any:
    """One checkpoint file through the weights-only unpickler; UnsafeCheckpoint names it when it holds more."""
    with weights_only():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(f"{path}: {str(err).splitlines()[0]}") from None

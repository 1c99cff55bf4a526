"""Count the host-device synchronisations a piece of training code would make on a GPU, on a CPU.

On a CPU every tensor is in host memory, so "device" tensors are tracked instead: those registered with
`mark` (the module's parameters, buffers, optimizer state, batches after the trainer's transfer) and every
tensor an operation computes from one of them. A synchronisation is anything that needs a device value on
the host: a scalar read (`.item()`, `float()`, `int()`, `bool()`, which all reach `aten._local_scalar_dense`),
`.tolist()`, `.numpy()`, `.cpu()`, and the operations whose output shape depends on device values
(`nonzero`, boolean-mask indexing, `unique`, `bincount`, `repeat_interleave` without `output_size`), which
copy a count back on CUDA. Each one is attributed to the innermost Python frame outside torch.
"""

from __future__ import annotations

import traceback
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SCALAR_READ = "aten._local_scalar_dense"
SHAPE_FROM_VALUES = {"aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
                     "aten.unique_consecutive", "aten.bincount", "aten.histc"}
"""Ops whose output size is computed from device values (a device-to-host copy on CUDA)."""
HOST_METHODS = ("tolist", "numpy", "cpu")


@dataclass
class Sync:
    """One synchronisation: what asked for the value and from where."""

    op: str
    site: str
    """`path:line in function` of the innermost frame outside torch."""


class SyncCounter(TorchDispatchMode):
    """Dispatch mode tracking device tensors and recording every synchronisation on one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[Sync] = []
        self.device_ids: set[int] = set()
        """ids of live device tensors (an id leaves the set when its tensor is freed)."""
        self._saved: dict[str, object] = {}

    def mark(self, tensors: Iterable[torch.Tensor]) -> None:
        """Treat `tensors` as living on the device."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.device_ids:
                self.device_ids.add(id(tensor))
                weakref.finalize(tensor, self.device_ids.discard, id(tensor))

    def on_device(self, tensor: object) -> bool:
        """Whether `tensor` is (computed from) a device tensor."""
        return isinstance(tensor, torch.Tensor) and id(tensor) in self.device_ids

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        name = str(func.overloadpacket)
        if from_device and _syncs(name, func, args, kwargs):
            self._record(name)
        out = func(*args, **kwargs)
        if from_device:
            self.mark(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    def _record(self, op: str) -> None:
        self.syncs.append(Sync(op, _site()))

    def __enter__(self) -> SyncCounter:
        for method in HOST_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original
            setattr(torch.Tensor, method, self._host_method(method, original))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)

    def _host_method(self, method: str, original):
        """`Tensor.<method>` recording a sync when called on a device tensor."""
        counter = self

        def wrapped(tensor, *args, **kwargs):
            if counter.on_device(tensor):
                counter._record(f"Tensor.{method}")
            return original(tensor, *args, **kwargs)

        return wrapped

    def by_site(self, exclude: Iterable[str] = ()) -> Counter[str]:
        """`op @ site` counts, leaving out syncs whose site contains any of `exclude`."""
        skip = tuple(exclude)
        return Counter(f"{s.op} @ {s.site}" for s in self.syncs if not any(x in s.site for x in skip))


def _syncs(name: str, func, args, kwargs) -> bool:
    """Whether running `func` on device inputs makes the host wait for a device value."""
    if name == SCALAR_READ or name in SHAPE_FROM_VALUES:
        return True
    if name == "aten.repeat_interleave":
        repeats = args[0] if len(args) == 1 else args[1]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("aten.index", "aten.index_put", "aten.index_put_"):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


def _site() -> str:
    """The innermost frame that is not torch itself nor this module."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename
        if "/torch/" in path or path.endswith("device_syncs.py"):
            continue
        return f"{path}:{frame.lineno} in {frame.name}"
    return "<unknown>"

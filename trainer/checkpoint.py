"""Checkpoints: DeepSpeed's sharded save on every rank plus plait's state, a `latest` marker written last,
keep-K purge, universal conversion when the world size changes, and a preemption flag (SIGTERM/SIGUSR1).

Layout of `RUN_DIR/checkpoints/`:

    step00000040/            DeepSpeed's files (model + optimizer shards, client state = run state)
        plait_rank{r}.pt     per-rank state: data source position and RNG (python, numpy, torch)
        plait_meta.json      written by rank 0 after every rank finished: the checkpoint is complete
    step00000040_universal/  made on demand when resuming at another world size
    latest                   the tag of the newest complete checkpoint (DeepSpeed's own file name)

A process killed mid-save leaves a folder without `plait_meta.json`; `latest` still names the previous
checkpoint, and loading also skips any folder without the marker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from plait.trainer.losses.distributed import host_group
from plait.trainer.safe_load import check_files, safe_load, weights_only

logger = logging.getLogger(__name__)

LATEST = "latest"
"""Marker file naming the newest complete checkpoint."""
META = "plait_meta.json"
"""Completion marker inside a checkpoint folder (written after all ranks saved)."""
_TAG = re.compile(r"^step(\d{8})$")


def tag_of(step: int) -> str:
    """Checkpoint folder name of optimizer step `step`."""
    return f"step{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Every global RNG this process uses (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    """Write a small file so a reader sees the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(folder: Path) -> list[str]:
    """Tags of complete checkpoints (with the marker), oldest first."""
    if not folder.is_dir():
        return []
    tags = [p.name for p in folder.iterdir() if _TAG.match(p.name) and (p / META).is_file()]
    return sorted(tags)


def latest_tag(folder: Path) -> str | None:
    """The tag `latest` names when that checkpoint is complete, else the newest complete one, else None."""
    marker = folder / LATEST
    if marker.is_file():
        tag = marker.read_text().strip()
        if (folder / tag / META).is_file():
            return tag
        logger.warning("checkpoint %s named by %s is incomplete; using the newest complete one", tag, marker)
    tags = complete_tags(folder)
    return tags[-1] if tags else None


def read_meta(folder: Path, tag: str) -> dict[str, Any]:
    """The completion record of a checkpoint (step, world size, ZeRO stage, frozen modules)."""
    return json.loads((folder / tag / META).read_text())


def purge(folder: Path, keep: int, protect: str) -> list[str]:
    """Delete all but the newest `keep` step folders (and their universal copies); `protect` always stays."""
    if keep <= 0:
        return []
    steps = sorted(p.name for p in folder.iterdir() if _TAG.match(p.name))
    kept = set(complete_tags(folder)[-keep:]) | {protect}
    removed = [tag for tag in steps if tag not in kept and tag < protect]
    for tag in removed:
        shutil.rmtree(folder / tag, ignore_errors=True)
        shutil.rmtree(folder / f"{tag}_universal", ignore_errors=True)
    return removed


def _tensor_only_copy(source: Path, staging: Path) -> None:
    """A copy of a checkpoint whose model-state files hold tensors only (links for everything else).

    ds_to_universal calls `.float()` on every module state entry; the queues' extra state (ring pointer
    and fill count) is a dict. The original model-state files are put back after the conversion.
    """
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for item in source.iterdir():
        if item.name.startswith("mp_rank_") and item.name.endswith("_model_states.pt"):
            state = safe_load(item)
            state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
            torch.save(state, staging / item.name)
        else:
            (staging / item.name).symlink_to(item.resolve())


def to_universal(folder: Path, tag: str) -> str:
    """Convert checkpoint `tag` to DeepSpeed's universal format (rank 0 works, all ranks wait); returns its tag."""
    universal = f"{tag}_universal"
    if _rank() == 0 and not (folder / universal / META).is_file():
        staging, out = folder / f".{tag}_staging", folder / universal
        shutil.rmtree(out, ignore_errors=True)
        _tensor_only_copy(folder / tag, staging)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(staging),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        logger.info("converting checkpoint %s to universal format for world size %d", tag, _world())
        proc = subprocess.run(cmd, capture_output=True, text=True)
        shutil.rmtree(staging, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"universal conversion of {folder / tag} failed:\n{proc.stderr[-3000:]}")
        for item in (folder / tag).iterdir():
            if item.name.startswith("plait_") or item.name.startswith("mp_rank_"):
                shutil.copy2(item, out / item.name)
    _barrier()
    return universal


class Checkpointer:
    """Saves and loads one run's checkpoints through a DeepSpeed engine."""

    def __init__(self, folder: str | Path, keep: int) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, engine, step: int, run_state: dict[str, Any], rank_state: dict[str, Any],
             frozen: list[str] = ()) -> str:
        """Save on every rank; `latest` moves only after all ranks finished; then purge to `keep`.

        `frozen` (the curriculum modules the engine was built without) goes in the marker: a resume builds the same
        engine before loading. Frozen parameters' weights are saved too (ZeRO-0/1 in the module state, ZeRO-2/3 as
        DeepSpeed's frozen fragments), so they come back exactly.
        """
        tag = tag_of(step)
        if _rank() == 0:
            # Re-saving a step (e.g. after a resume) must not look complete while it is being overwritten.
            (self.folder / tag / META).unlink(missing_ok=True)
        engine.save_checkpoint(str(self.folder), tag=tag, client_state={"plait": run_state}, save_latest=False,
                               exclude_frozen_parameters=False)
        torch.save(rank_state, self.folder / tag / f"plait_rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            meta = {"step": step, "world_size": _world(), "zero_stage": engine.zero_optimization_stage(),
                    "accumulation": engine.gradient_accumulation_steps(), "frozen": sorted(frozen)}
            _write_atomic(self.folder / tag / META, json.dumps(meta))
            _write_atomic(self.folder / LATEST, tag)
            removed = purge(self.folder, self.keep, tag)
            logger.info("saved checkpoint %s%s", self.folder / tag,
                        f" (removed {', '.join(removed)})" if removed else "")
        _barrier()
        return str(self.folder / tag)

    def latest_meta(self) -> dict[str, Any] | None:
        """The latest complete checkpoint's marker (step, world size, accumulation, frozen modules); None if none."""
        tag = latest_tag(self.folder)
        return read_meta(self.folder, tag) if tag is not None else None

    def needs_universal(self) -> bool:
        """Whether the latest checkpoint was written at another world size (decide before building the engine)."""
        tag = latest_tag(self.folder)
        return tag is not None and read_meta(self.folder, tag)["world_size"] != _world()

    def load(self, engine) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Load the latest complete checkpoint into `engine`: (run state, this rank's state), or None if none."""
        tag = latest_tag(self.folder)
        if tag is None:
            return None
        saved_world = read_meta(self.folder, tag)["world_size"]
        check_files(self.folder / tag)
        load_tag = tag if saved_world == _world() else to_universal(self.folder, tag)
        if load_tag != tag:
            check_files(self.folder / load_tag)
        with weights_only():
            path, client = engine.load_checkpoint(str(self.folder), tag=load_tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.folder / load_tag}")
        own = self.folder / load_tag / f"plait_rank{_rank()}.pt"
        if saved_world != _world():
            logger.warning("resuming a world-size-%d checkpoint at world size %d: weights and optimizer are exact, "
                           "per-rank data positions and RNG come from the nearest saved rank", saved_world, _world())
            own = self.folder / load_tag / f"plait_rank{min(_rank(), saved_world - 1)}.pt"
            frozen = read_meta(self.folder, tag).get("frozen", [])
            if frozen:
                logger.warning("universal checkpoints carry no frozen weights: the frozen modules %s keep their "
                               "values from the build (exact only if they were frozen since step 0)", frozen)
        rank_state = safe_load(own)
        logger.info("resumed from %s", self.folder / load_tag)
        return client["plait"], rank_state


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank: one tiny all-reduce MAX on the host (gloo) group, never a device sync."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=host_group())
    return bool(value.item())


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag the loop polls; `requested()` agrees across ranks (any rank signalled)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signalled = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: checkpointing and stopping after this step", signal.Signals(signum).name)
        self.signalled = True

    def requested(self) -> bool:
        """True on every rank once any rank got a signal."""
        return any_rank(self.signalled)

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

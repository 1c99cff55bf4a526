"""The training step on a GPU, proven on a CPU: every tensor reaches the model on its parameters' device, and a
non-logging optimizer step never waits for the device.

Placement: the training forward and backward run with the module on the `meta` device and the batch moved by
`PackedBatch.to`, the trainer's transfer (a host tensor left behind, or one created without a device, stops
it; so does any read of a device value, which meta tensors cannot give). Syncs: one real DeepSpeed step,
with `device_syncs.SyncCounter` recording every device value the host asks for; the worker runs in its own
process (DeepSpeed's process group and environment stay out of pytest's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ALLOWED = ("/deepspeed/", "ops/attention.py:")
"""Sync sites the test allows: DeepSpeed's own (its overflow and gradient-norm checks), and the CPU attention
fallback (`_bucketed_attention` groups sequences by length on the host; on CUDA in bf16 the flash-attn and
torch varlen paths take their lengths from the batch's host metadata)."""


def _config(tmp_path: Path, **overrides):
    from test_train_distributed import write_config

    from plait.trainer.config import load_config

    return load_config(write_config(tmp_path / "run.yaml", **overrides), [f"run_dir={tmp_path / 'run'}"])


def test_training_forward_and_backward_run_on_meta_with_the_trainers_transfer(tmp_path: Path):
    from synthetic import SyntheticBatches

    from plait.trainer.engine import TrainModule

    cfg = _config(tmp_path)
    module = TrainModule(cfg.model, cfg.data.sizing, cfg.loss).to("meta", torch.bfloat16)
    host = SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, 0).batch(0, 0)
    assert host.num_samples > 0 and {"vision", "audio"} <= set(host.streams)
    out = module(host.to(torch.device("meta")), 0)
    out.loss.backward()
    assert out.loss.is_meta and all(v.is_meta for v in out.components.values() if v.dim() == 0 and v.is_meta)
    assert all(p.grad is not None and p.grad.is_meta for p in module.parameters())
    media, text = module.embed(host.to(torch.device("meta")))
    assert media.is_meta and text.is_meta and media.shape[0] == host.num_samples
    # The check has teeth: the same forward on the batch as the loader hands it (host memory) stops.
    with pytest.raises(RuntimeError, match="device"):
        module(host, 0)


@pytest.mark.distributed
def test_a_non_logging_step_reads_nothing_back_from_the_device(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(HERE), str(tmp_path)], env={**env, "DS_ACCELERATOR": "cpu",
                          "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((tmp_path / "syncs.json").read_text())
    assert report["transfers"] == report["micro_batches"] == 2 and report["device"] == "cpu"
    assert report["forward_inputs_moved"]
    # The counter sees what it should: the logging step after it reads the window back.
    assert report["logging_step_syncs"] > 0
    assert report["syncs"] == {}, json.dumps(report["syncs"], indent=1)


def _device_state(engine) -> list[torch.Tensor]:
    """Every tensor the engine keeps on the device: parameters, buffers, optimizer state and partitions."""
    tensors = [*engine.module.parameters(), *engine.module.buffers()]
    for value in vars(engine.optimizer).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            tensors.extend(item if isinstance(item, (list, tuple)) else [item])
    for state in engine.optimizer.optimizer.state.values():
        tensors.extend(state.values())
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _worker(out: Path) -> None:
    """Train one step, then count the syncs of the next (non-logging, GAS 2) and of a logging one."""
    from device_syncs import SyncCounter
    from synthetic import SyntheticBatches

    from plait.data.batch import PackedBatch
    from plait.trainer.train import Trainer

    cfg = _config(out, tracking={"log_every": 3}, deepspeed={"gradient_accumulation_steps": 2})
    trainer = Trainer(cfg, data=SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, 0))
    trainer.train_step()
    trainer.step += 1
    counter = SyncCounter()
    moved: list[PackedBatch] = []
    seen: list[bool] = []
    original_to, original_forward = PackedBatch.to, trainer.engine.module.forward

    def transfer(batch: PackedBatch, device) -> PackedBatch:
        """The trainer's transfer, with fresh tensors the counter treats as device memory."""
        assert torch.device(device) == trainer.device
        result = original_to(batch, device)._map(torch.clone)
        counter.mark(t for name, t in vars(result).items() if isinstance(t, torch.Tensor) and name != "host_modality")
        counter.mark(t for s in result.streams.values() for t in vars(s).values() if isinstance(t, torch.Tensor))
        moved.append(result)
        return result

    def forward(batch: PackedBatch, *args, **kwargs):
        seen.append(any(batch is m for m in moved))
        return original_forward(batch, *args, **kwargs)

    PackedBatch.to = transfer
    trainer.engine.module.forward = forward
    try:
        counter.mark(_device_state(trainer.engine))
        with counter:
            trainer.train_step()
        trainer.step += 1
    finally:
        PackedBatch.to = original_to
        trainer.engine.module.forward = original_forward
    syncs = counter.by_site(ALLOWED)
    try:
        logging_counter = SyncCounter()
        logging_counter.mark(_device_state(trainer.engine))
        with logging_counter:
            trainer.train_step()
            trainer.step += 1
            trainer._log()
    finally:
        trainer.close()
    (out / "syncs.json").write_text(json.dumps({
        "syncs": dict(syncs), "transfers": len(moved), "micro_batches": 2, "device": str(trainer.device),
        "forward_inputs_moved": len(seen) == 2 and all(seen), "logging_step_syncs": len(logging_counter.syncs),
        "allowed": dict(counter.by_site()),
    }, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _worker(Path(sys.argv[1]))

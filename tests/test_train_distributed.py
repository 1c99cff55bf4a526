"""Two-rank DeepSpeed training (CPU, gloo, fp32): exact resume under every engine variant (ZeRO 0, 1, 2, 3,
ZeRO-2/3 with CPU offload and ZeRO-3 with LoRA; ZeRO-3 stopped by SIGTERM on one rank, the others by run length)
through a curriculum that freezes and unfreezes modules mid-run (`FREEZING`), the NaN guard, resume at world size 1
through a universal checkpoint, and SIGTERM preemption through the DeepSpeed launcher (`slow`).

The tests launch this file with torchrun; run as a script (`python THIS PHASE DIR`) it is the worker.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve()
LAUNCH = HERE.parents[1] / "launch" / "train.py"
HALF = 2
"""Steps before the stop of the ZeRO-2/3 runs; their full run is 2 * HALF."""


@dataclass(frozen=True)
class Variant:
    """One engine configuration: trained `steps` steps uninterrupted, and again stopped after `stop` and resumed."""

    stage: int
    """ZeRO stage."""
    offload: str = "none"
    """`deepspeed.offload`: `cpu` offloads the optimizer state (and at stage 3 the parameters)."""
    stop: int = 1
    """Steps before the stop. One is enough: the checkpoint then holds Adam moments that shape later updates."""
    steps: int = 3
    """Full run length; two steps after a resume at 1, so the last loss follows an update with restored moments."""
    sigterm: bool = False
    """Stop by a SIGTERM on rank 1 (both ranks must agree and save) instead of by run length."""
    lora: bool = False
    """LoRA adapters on the LLM (`model.llm.lora`), whose base weights then never train."""


VARIANTS = {
    "zero0": Variant(0),
    "zero1": Variant(1),
    "zero2": Variant(2, stop=HALF, steps=2 * HALF),
    "zero3": Variant(3, stop=HALF, steps=2 * HALF, sigterm=True),
    "zero2_offload": Variant(2, "cpu"),
    "zero3_offload": Variant(3, "cpu"),
    "zero3_lora": Variant(3, stop=HALF, steps=2 * HALF, lora=True),
}
"""Every engine variant the suite trains at world size 2 and resumes exactly (the short ones keep it fast)."""

FREEZING = {"phases": [{"start": 0, "values": {"frozen": ["encoder"], "hard_negative_ratio": 0.5,
                                               "resolution": {16: 1.0}}},
                       {"start": 1, "values": {"frozen": ["llm"]}},
                       {"start": 2, "values": {"loss_weights": {"contrastive": 1.0, "caption": 0.0}}},
                       {"start": 3, "values": {"frozen": []}}]}
"""The curriculum of the exact-resume runs: the encoder frozen at step 0 and trained from 1, the LLM trained at 0,
frozen at 1 and trained again (fresh state) from 3, captioning off from 2. A stop at 1 resumes from the checkpoint of
the engine before the first switch, a stop at 2 from one whose frozen LLM weights were trained."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config() -> dict:
    """A run config (as YAML data) with a ~0.1M-parameter model, small queues and the temperature learned."""
    llama = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    return {
        "seed": 3,
        "data": {"sizing": {"patch_size": 4, "audio_patch": 4, "video_side_px": 16, "video_max_frames": 4,
                            "max_audio_seconds": 1.0, "max_sample_tokens": 256},
                 "packing": {"max_tokens": 1024}, "workers": 0},
        "model": {
            "encoder": {"dim": 32, "depth": 2, "num_heads": 4, "ffn_hidden": 48, "mome_layers": [1]},
            "resampler": {"dim": 32, "depth": 1, "num_latents": 4, "num_heads": 4, "ffn_hidden": 48},
            "llm": {"model_kwargs": llama, "mome_layers": [1]},
            "mome": {"num_experts": 4, "top_k": 2},
            "embed_dim": 16,
        },
        "loss": {"queue": {"size": 8}, "hard_negatives": {"num_negatives": 4}},
        "optim": {"warmup_steps": 1, "lr": 3e-3},
        "checkpoint": {"every": HALF, "keep": 2},
        "tracking": {"log_every": 1},
        "eval": {"every": 0},
        "curriculum": {"phases": [{"start": 0, "values": {"frozen": ["encoder"], "hard_negative_ratio": 0.5,
                                                          "resolution": {16: 1.0}}},
                                  {"start": 1, "values": {"frozen": []}},
                                  # Captioning off for two steps (the model skips that pass), then on again.
                                  {"start": 2, "values": {"loss_weights": {"contrastive": 1.0, "caption": 0.0}}},
                                  {"start": 4, "values": {"loss_weights": {"contrastive": 1.0, "caption": 1.0}}}]},
    }


def write_config(path: Path, **overrides) -> Path:
    """Write the tiny config with top-level/section overrides (`deepspeed={...}`)."""
    data = tiny_config()
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(phase: str, out: Path, nproc: int = 2) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(HERE), phase, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _reports(out: Path, phase: str) -> list[dict]:
    return [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
def test_exact_resume_every_zero_variant_and_elastic_resume(tmp_path: Path):
    _torchrun("first", tmp_path)
    _torchrun("resume", tmp_path)
    first, resumed = _reports(tmp_path, "first"), _reports(tmp_path, "resume")
    for rank in range(2):
        for name, variant in VARIANTS.items():
            runs = (first[rank][f"full-{name}"], first[rank][f"part-{name}"], resumed[rank][f"resumed-{name}"])
            assert [run["world_size"] for run in runs] == [2, 2, 2], name
            full = runs[0]["losses"]
            assert len(full) == variant.steps and all(math.isfinite(x) for x in full)
            # N steps + stop + resume + the rest == the uninterrupted run, bitwise.
            assert runs[1]["losses"] == full[: variant.stop], (name, rank)
            assert runs[2]["start"] == variant.stop and runs[2]["losses"] == full[variant.stop :], (name, rank)
            for run in runs:
                _assert_engine(run["engine"], variant)
            if variant.lora:
                _assert_lora([run["lora"] for run in runs])
        # NaN on one rank: the step is skipped on both, nothing non-finite stays; M=2 in a row stops with a checkpoint.
        assert first[rank]["nan_finite"] and first[rank]["nan_skipped"] == 1
        assert first[rank]["stop_step"] == 3 and "2 non-finite steps in a row" in first[rank]["stop_message"]
        assert first[rank]["stop_checkpoint"].endswith("step00000003")
    # The ranks saw different data (otherwise equal losses would prove little).
    assert first[0]["full-zero2"]["losses"][0] != first[1]["full-zero2"]["losses"][0]
    # Elastic: the world-size-2 ZeRO-2 checkpoint resumes at world size 1 through a universal checkpoint.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(HERE), "elastic", str(tmp_path)], env={**env, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    elastic = json.loads((tmp_path / "elastic.json").read_text())
    assert elastic["world_size"] == 1 and elastic["start"] == 2 * HALF and elastic["steps"] == 2 * HALF + 1
    assert math.isfinite(elastic["loss"])
    assert (tmp_path / "part-zero2" / "checkpoints" / f"step{2 * HALF:08d}_universal").is_dir()


def _assert_engine(facts: dict, variant: Variant) -> None:
    """The engine ran the variant's ZeRO stage, and DeepSpeed's optimizer took the offload path exactly when asked."""
    offload = variant.offload == "cpu"
    params = offload and variant.stage == 3
    assert facts["stage"] == variant.stage, facts
    assert facts["offload_config"] == ["cpu" if offload else "none", "cpu" if params else "none"], facts
    assert facts["offload_optimizer"] == offload and facts["offload_param"] == params, facts
    # ZeRO 1-3 wrap the client AdamW; ZeRO-0 in fp32 steps it directly. Its state and the fp32 weights it updates
    # (the master partitions under ZeRO) are fp32 on the CPU.
    wrapper = {0: "AdamW", 3: "DeepSpeedZeroOptimizer_Stage3"}.get(variant.stage, "DeepSpeedZeroOptimizer")
    assert facts["optimizer"] == wrapper, facts
    assert facts["master"] == ["cpu", "torch.float32"] and facts["state"] == ["cpu", "torch.float32"], facts


def _assert_lora(facts: list[dict]) -> None:
    """The LLM's base weights stayed bitwise what the full run started from, through freezing, unfreezing and the
    checkpoint, and no rank holds Adam state for them (only ZeRO-3's per-parameter padding beyond the trainable)."""
    assert len({digest for f in facts for digest in (f["digest_before"], f["digest_after"])}) == 1, facts
    for f in facts:
        assert f["base_params"] > 0 and not f["base_trainable"], f
        padding = f["adam_elements"] - f["trainable_elements"]
        assert 0 <= padding < 2 * f["trainable_params"] < f["base_elements"], f


def test_offload_at_zero0_is_refused_at_config_load_not_ignored():
    from plait.trainer.config import ConfigError, load_config
    from plait.trainer.engine import deepspeed_config

    with pytest.raises(ConfigError, match="deepspeed.offload.*zero_stage 1, 2 or 3"):
        load_config(None, ["deepspeed.zero_stage=0", "deepspeed.offload=cpu"])
    assert deepspeed_config(load_config(None, ["deepspeed.zero_stage=1", "deepspeed.offload=cpu"]))[
        "zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_through_deepspeed_launcher_checkpoints_and_resumes(tmp_path: Path, demo_dir: Path):
    config = write_config(tmp_path / "run.yaml", checkpoint={"every": 0}, tracking={"log_every": 1},
                          data={"shards": str(demo_dir)})
    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(LAUNCH), str(config), "--run-dir", str(run_dir), "--steps", "100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    db = run_dir / "mlflow.db"
    deadline = time.time() + 240
    # Wait until training is under way (metrics are logged each step), then preempt the whole job.
    while time.time() < deadline and proc.poll() is None and not _logged_steps(db, 3):
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-5000:]
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    checkpoints = run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step"))
    assert 3 <= stopped_at < 100000, output[-5000:]
    assert (checkpoints / tag / "plait_meta.json").is_file(), output[-5000:]
    # Rerunning the same command (shorter) resumes from the preemption checkpoint and finishes.
    rerun = subprocess.run(cmd[:-1] + [str(stopped_at + 1)], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    result = json.loads(_last_json(rerun.stdout))
    assert result["steps"] == stopped_at + 1 and result["world_size"] == 2
    # The resumed run continued the preempted MLflow run: one run, the checkpoint's id, now finished.
    from mlflow.tracking import MlflowClient

    from plait.trainer.export import run_state

    client = MlflowClient(f"sqlite:///{db}")
    assert result["run_id"] == run_state(checkpoints, tag)["mlflow_run_id"]
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    history = client.get_metric_history(result["run_id"], "loss/total")
    assert sorted(m.step for m in history) == list(range(1, stopped_at + 2))


def _last_json(stdout: str) -> str:
    """The final JSON line (the DeepSpeed launcher may prefix rank output)."""
    line = [line for line in stdout.splitlines() if "{" in line][-1]
    return line[line.index("{"):]


def _logged_steps(db: Path, steps: int) -> bool:
    """Whether the run's SQLite store has a metric at step >= `steps`."""
    import sqlite3

    if not db.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("select max(step) from metrics").fetchone()
    except sqlite3.Error:
        return False
    return row is not None and row[0] is not None and row[0] >= steps


def _run(config_path: Path, run_dir: Path, variant: Variant, steps: int, sigterm_at: int | None = None) -> dict:
    """Train `variant` (resuming if `run_dir` has a checkpoint): losses, start step, world size and engine facts.

    With `sigterm_at`, rank 1 sends itself SIGTERM while fetching that step's batch; the run saves on that preemption.
    """
    import torch.distributed as dist

    from plait.trainer.config import load_config
    from plait.trainer.engine import init_distributed
    from plait.trainer.train import Trainer

    init_distributed()
    # Only the final (or preemption) checkpoint is resumed from; periodic ones would only cost time.
    cfg = load_config(config_path, [f"run_dir={run_dir}", f"steps={steps}", f"deepspeed.zero_stage={variant.stage}",
                                    f"deepspeed.offload={variant.offload}", "checkpoint.every=0",
                                    *(["model.llm.lora.r=4"] if variant.lora else [])])
    rank = dist.get_rank()
    data = SignalAt(cfg, rank, at=sigterm_at if rank == 1 else None)
    trainer = Trainer(cfg, data=data)
    start = trainer.step
    base_before = frozen_digest(trainer.module) if variant.lora else None
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.preempted == (sigterm_at is not None)
    report = {"losses": trainer.losses, "start": start, "world_size": trainer.world,
              "engine": engine_facts(trainer.engine)}
    if variant.lora:
        report["lora"] = {"digest_before": base_before, "digest_after": frozen_digest(trainer.module),
                          **adam_facts(trainer)}
    return report


def frozen_digest(module) -> str:
    """SHA-256 of the gathered weights the model keeps frozen (LoRA's base weights), in name order."""
    import hashlib

    import deepspeed
    import torch

    names = sorted(module.fixed_frozen)
    params = dict(module.named_parameters())
    digest = hashlib.sha256()
    with deepspeed.zero.GatheredParameters([params[n] for n in names]):
        for name in names:
            digest.update(params[name].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adam_facts(trainer) -> dict:
    """Elements of AdamW's first moment over all ranks, against the trainable and the model-frozen parameters."""
    import torch
    import torch.distributed as dist

    engine, module = trainer.engine, trainer.module
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    local = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
    total = torch.tensor([local])
    dist.all_reduce(total)
    params = dict(module.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    return {"adam_elements": int(total), "trainable_elements": sum(int(p.ds_numel) for p in trainable),
            "trainable_params": len(trainable), "base_params": len(module.fixed_frozen),
            "base_elements": sum(int(params[n].ds_numel) for n in module.fixed_frozen),
            "base_trainable": any(params[n].requires_grad for n in module.fixed_frozen)}


def engine_facts(engine) -> dict:
    """ZeRO stage, optimizer class, configured offload devices, and what DeepSpeed's optimizer object did about them.

    On a CPU-only machine every tensor lives on the CPU whatever the config, so device checks alone prove nothing:
    offload shows as DeepSpeed taking its offload path, the flags it branches on together with the structures
    only that path builds (ZeRO-1/2: the CPU gradient staging buffer; ZeRO-3: the sub-group -> CPU map of the
    optimizer, the flat CPU memory holding the parameter partitions).
    """
    import torch

    opt = engine.optimizer
    basic = getattr(opt, "optimizer", opt)
    stage = engine.zero_optimization_stage()
    if stage == 3:
        optimizer_offload = bool(opt.offload_optimizer and getattr(opt, "subgroup_to_device", None))
        param_offload = bool(opt.offload_param and opt.param_groups_fp16_flat_cpu_memory)
        masters = opt.fp32_partitioned_groups_flat
    elif stage in (1, 2):
        optimizer_offload = bool(opt.cpu_offload and hasattr(opt, "temp_grad_buffer_for_cpu_offload"))
        param_offload = False
        masters = opt.single_partition_of_fp32_groups
    else:
        optimizer_offload = param_offload = False
        masters = [p for group in basic.param_groups for p in group["params"]]
    configured = (engine.zero_offload_optimizer(), engine.zero_offload_param())
    states = [t for s in basic.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"stage": stage, "optimizer": type(opt).__name__,
            "offload_config": [str(c.device) if c is not None else "none" for c in configured],
            "offload_optimizer": optimizer_offload, "offload_param": param_offload,
            "master": sorted({t.device.type for t in masters} | {str(t.dtype) for t in masters}),
            "state": sorted({t.device.type for t in states} | {str(t.dtype) for t in states})}


class SignalAt:
    """Synthetic batches that deliver SIGTERM to this process when step `at` is fetched (a preemption)."""

    def __init__(self, cfg, rank: int, at: int | None) -> None:
        from synthetic import SyntheticBatches

        self.inner, self.at = SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank), at

    def batch(self, step: int, micro: int):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner.batch(step, micro)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _nan_guard(config_path: Path, out: Path) -> dict:
    """Rank 1 alone gets a NaN batch at step 1: both ranks skip it; then NaN every step stops after 2 in a row."""
    import torch
    import torch.distributed as dist

    from plait.trainer.config import load_config
    from synthetic import SyntheticBatches

    from plait.trainer.train import NonFiniteStop, Trainer

    rank = dist.get_rank()
    cfg = load_config(config_path, [f"run_dir={out / 'nan'}", "steps=3", "checkpoint.every=0"])
    data = SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank, nan_steps=(1,) if rank == 1 else ())
    trainer = Trainer(cfg, data=data)
    try:
        trainer.train()
    finally:
        trainer.close()
    skipped = trainer.skipped_total
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.module.parameters())
    queues_finite = all(bool(torch.isfinite(q.media).all()) for q in trainer.module.objective.queues.queues.values())
    cfg = load_config(config_path, [f"run_dir={out / 'nan_stop'}", "steps=10", "checkpoint.every=0",
                                    "optim.max_nonfinite_steps=2"])
    trainer = Trainer(cfg, data=SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank,
                                                 nan_steps=tuple(range(1, 10))))
    stop_message = ""
    try:
        trainer.train()
    except NonFiniteStop as err:
        stop_message = str(err)
    finally:
        trainer.close("FAILED")
    return {"nan_skipped": skipped, "nan_finite": finite and queues_finite,
            "stop_message": stop_message, "stop_step": trainer.step, "stop_checkpoint": trainer.checkpoint_path}


def _worker(phase: str, out: Path) -> None:
    """`first`: full runs and first parts; `resume`: the rest of each part; `elastic`: world size 1 from 2 ranks."""
    import deepspeed
    import torch.distributed as dist

    # One MLflow store for every run of the phase: each new SQLite store costs seconds of schema creation.
    tracking = {"log_every": 1, "uri": f"sqlite:///{out / 'mlflow.db'}"}
    first = phase == "first"
    config = write_config(out / "run.yaml", tracking=tracking, curriculum=FREEZING) if first else out / "run.yaml"
    if phase == "elastic":
        run = _run(config, out / "part-zero2", VARIANTS["zero2"], 2 * HALF + 1)
        (out / "elastic.json").write_text(json.dumps({"world_size": run["world_size"], "start": run["start"],
                                                      "loss": run["losses"][-1],
                                                      "steps": run["start"] + len(run["losses"])}))
    else:
        report = _variant_runs(phase, config, out)
        (out / f"{phase}-rank{dist.get_rank()}.json").write_text(json.dumps(report))
    deepspeed.comm.destroy_process_group()


def _variant_runs(phase: str, config: Path, out: Path) -> dict:
    """`first`: every variant's full run and first part, then the NaN guard; `resume`: the rest of each part."""
    report: dict = {}
    for name, variant in VARIANTS.items():
        part = out / f"part-{name}"
        if phase == "first":
            report[f"full-{name}"] = _run(config, out / f"full-{name}", variant, variant.steps)
            if variant.sigterm:
                report[f"part-{name}"] = _run(config, part, variant, variant.steps, sigterm_at=variant.stop - 1)
            else:
                report[f"part-{name}"] = _run(config, part, variant, variant.stop)
        else:
            report[f"resumed-{name}"] = _run(config, part, variant, variant.steps)
    if phase == "first":
        report.update(_nan_guard(config, out))
    return report


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))

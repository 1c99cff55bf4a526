"""bf16 training as on a GPU, run on the CPU: DeepSpeed's bf16 on the CPU accelerator (ZeRO-2, two ranks, gloo)
against the same run in fp32, with fp32 master weights, and the numerically sensitive parts (InfoNCE logits and
softmax, the temperature, the router softmax of the balance/z/entropy losses, caption cross-entropy) computed in
fp32 whatever the training dtype; and the log-mel front end in fp32 whatever its input.

The test launches this file with torchrun; run as a script it is the worker.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
STEPS = 20
"""Optimizer steps of each run (the tiny config's curriculum: encoder frozen at step 0, captioning off at 2-3)."""
FIRST_RTOL = 0.01
"""|bf16 - fp32| / fp32 of the first step's loss: same initial weights (rounded to bf16), so only the bf16 forward
differs. Measured (seeds 3 and 11, both ranks): at most 0.14%."""
STEP_RTOL = 0.15
"""|bf16 - fp32| / fp32 of any step's loss. Measured: at most 8.7% (seed 3, step 2, a small loss of 1.8 with
captioning off); the runs drift apart through 20 steps of bf16-rounded updates at lr 3e-3."""
MEAN_RTOL = 0.04
"""The same gap averaged over the 20 steps. Measured: 1.3% to 1.8%."""
REFERENCE_RTOL = 1e-5
"""Largest relative error of a sensitive value against its float64 recomputation from the same inputs. Measured:
at most 7e-7 (an InfoNCE row), ~1e-7 for the rest, as fp32 gives; bf16 arithmetic rounds at 2^-9 (2e-3)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_log_mel_is_float32_whatever_the_wave_dtype():
    from plait.data.decode_audio import LogMelConfig, log_mel

    cfg = LogMelConfig()
    wave = torch.randn(cfg.hop_length * 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # The loader computes log-mel before the model and never sees the training dtype; a half-precision wave is
    # upcast first, so the STFT, the mel projection and the log run in float32 (reference-free: log_mel itself
    # fixes float32, there is no float64 path to compare with).
    mels = {dtype: log_mel(wave.to(dtype), cfg) for dtype in (torch.float64, torch.float32, torch.bfloat16)}
    assert {m.dtype for m in mels.values()} == {torch.float32}
    assert torch.equal(mels[torch.float64], mels[torch.float32])
    assert bool(torch.isfinite(mels[torch.bfloat16]).all())


@pytest.mark.distributed
def test_bf16_training_tracks_fp32_with_fp32_master_weights_and_fp32_losses(tmp_path: Path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["world_size"] == 2
        fp32, bf16 = report["fp32"]["losses"], report["bf16"]["losses"]
        assert len(fp32) == len(bf16) == STEPS and all(math.isfinite(x) for x in fp32 + bf16)
        gaps = [abs(b - f) / abs(f) for f, b in zip(fp32, bf16)]
        assert gaps[0] <= FIRST_RTOL and max(gaps) <= STEP_RTOL and sum(gaps) / STEPS <= MEAN_RTOL, gaps
        # The bf16 run really computed in bf16 (equal losses would mean the setting did nothing).
        assert bf16 != fp32
        _assert_weights(report["fp32"], torch.float32)
        _assert_weights(report["bf16"], torch.bfloat16)
        _assert_fp32_parts(report["probe"])


def _assert_weights(run: dict, module_dtype: torch.dtype) -> None:
    """Module parameters in the training dtype; the optimizer's masters and Adam state in fp32; queues in fp32."""
    engine = run["engine"]
    assert run["module_dtypes"] == [str(module_dtype)] and engine["stage"] == 2, run
    assert engine["master"] == ["cpu", "torch.float32"] and engine["state"] == ["cpu", "torch.float32"], engine
    assert run["queue_dtypes"] == ["torch.float32"]
    # The masters carry what bf16 cannot hold: the updates accumulate in fp32, not in the module's copy.
    assert run["master_finer_than_bf16"]


def _assert_fp32_parts(probe: dict) -> None:
    """Every objective forward of the bf16 run computed the sensitive values in fp32, as exact as fp32 allows."""
    assert probe["forwards"] == STEPS, probe
    parts = ("scored embeddings", "infonce operands", "infonce", "temperature", "contrastive", "router logits",
             "balance", "z", "entropy_local", "entropy_global", "caption", "total")
    assert set(probe["dtypes"]) == set(parts), probe["dtypes"]
    assert all(dtypes == ["torch.float32"] for dtypes in probe["dtypes"].values()), probe["dtypes"]
    compared = ("infonce", "temperature", "balance", "z", "entropy_local", "entropy_global", "caption")
    assert set(probe["errors"]) == set(compared), probe["errors"]
    assert max(probe["errors"].values()) <= REFERENCE_RTOL, probe["errors"]


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst |value - reference| / max(|reference|, 1): the loss terms are O(1), or differences of O(1) terms (the
    entropy deficit, a row's InfoNCE near 0), so the floor measures rounding on the scale of the operands."""
    gap = (value.double() - reference.double()).abs() / reference.double().abs().clamp(min=1.0)
    return float(gap.max()) if gap.numel() else 0.0


class Fp32Probe:
    """Per micro-batch of the bf16 run, the dtype of each sensitive value and its worst relative error against a
    float64 recomputation from the same inputs: forward hooks on the objective (router regularisers, caption CE)
    and on its contrastive loss (embeddings scored, temperature), and a pass-through wrapper of the InfoNCE kernel
    (a plain function, no module to hook) that replays each call with `infonce_reference` in float64."""

    def __init__(self, objective: torch.nn.Module) -> None:
        from plait.trainer.losses import contrastive

        self.forwards = 0
        self.dtypes: dict[str, set[str]] = {}
        self.errors: dict[str, float] = {}
        objective.contrastive.register_forward_hook(self._contrastive)
        objective.register_forward_hook(self._objective)
        contrastive.infonce_chunked = self._infonce(contrastive.infonce_chunked)

    def _note(self, part: str, value: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Record `value`'s dtype and, given a float64 `reference`, the worst relative error so far."""
        self.dtypes.setdefault(part, set()).add(str(value.dtype))
        if reference is not None:
            self.errors[part] = max(self.errors.get(part, 0.0), _relative(value, reference))

    def _infonce(self, chunked):
        """`chunked` unchanged, plus: its operands' dtypes (they set the logits' and softmax's) and per-row losses
        against the materialised-logits reference in float64, with the same negatives."""
        from plait.ops.infonce import infonce_reference

        signature = inspect.signature(chunked)

        def infonce(*args, **kwargs):
            losses, stats = chunked(*args, **kwargs)
            call = signature.bind(*args, **kwargs).arguments
            operands = [call["query"], call["keys"], call["queue"], torch.as_tensor(call["scale"])]
            for operand in operands:
                self._note("infonce operands", operand)
            with torch.no_grad():
                wide = [operand.detach().double() for operand in operands]
                reference, _ = infonce_reference(*wide, call["positive_index"], call["exclude"], call["share"],
                                                 call.get("negatives"), call.get("label_smoothing", 0.0))
            self._note("infonce", losses.detach(), reference)
            return losses, stats

        return infonce

    @torch.no_grad()
    def _contrastive(self, module, args, result) -> None:
        """The gathered embeddings scored, the temperature (float64: exp of the stored parameter), pair losses."""
        batch = args[0]
        self._note("scored embeddings", batch.media)
        self._note("scored embeddings", batch.text)
        exact = module.logit_scale.double().exp().clamp(max=module.config.max_logit_scale).squeeze(0)
        self._note("temperature", result.metrics["contrastive/logit_scale"], exact)
        for loss in result.pair_losses.values():
            self._note("contrastive", loss)

    @torch.no_grad()
    def _objective(self, module, args, output) -> None:
        """Router regularisers and caption CE replayed in float64 from this forward's router logits and captions.

        Every rank runs the replay on every forward, so its all-reduces pair up across ranks."""
        from plait.trainer.losses.balance import balance_losses
        from plait.trainer.losses.caption import caption_loss

        inputs = args[0]
        self.forwards += 1
        parts = output.components
        for router in inputs.router_outputs:
            self._note("router logits", router.logits)
        routers = [dataclasses.replace(r, logits=r.logits.double()) for r in inputs.router_outputs]
        wide = balance_losses(routers, module.config.balance, module.group)
        for name, reference in (("balance", wide.balance), ("z", wide.z_loss), ("entropy_local", wide.entropy_local),
                                ("entropy_global", wide.entropy_global)):
            self._note(name, parts[f"loss/{name}"], reference)
        logits, targets = inputs.caption_logits, inputs.caption_targets
        if logits is None or targets is None:
            logits, targets = torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
        caption = caption_loss(logits.double(), targets, module.config.caption, module.group)[0]
        if "loss/caption" in parts:
            self._note("caption", parts["loss/caption"], caption)
        self._note("total", output.loss)

    def report(self) -> dict:
        """JSON-ready: forwards seen, dtypes per part, worst float64 error per part."""
        return {"forwards": self.forwards, "dtypes": {k: sorted(v) for k, v in self.dtypes.items()},
                "errors": self.errors}


def _train(config: Path, run_dir: Path, precision: str, rank: int) -> tuple[dict, dict | None]:
    """Train STEPS steps at `precision`; the run's losses and weight dtypes, and the fp32 probe's report (bf16)."""
    from synthetic import SyntheticBatches
    from test_train_distributed import engine_facts

    from plait.trainer.config import load_config
    from plait.trainer.train import Trainer

    cfg = load_config(config, [f"run_dir={run_dir}", f"steps={STEPS}", f"deepspeed.precision={precision}",
                               "checkpoint.every=0"])
    trainer = Trainer(cfg, data=SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank))
    probe = Fp32Probe(trainer.module.objective) if precision == "bf16" else None
    try:
        trainer.train()
    finally:
        trainer.close()
    masters = trainer.engine.optimizer.single_partition_of_fp32_groups
    queues = list(trainer.module.objective.queues.queues.values())
    run = {"losses": trainer.losses, "engine": engine_facts(trainer.engine),
           "module_dtypes": sorted({str(p.dtype) for p in trainer.module.parameters()}),
           "queue_dtypes": sorted({str(q.media.dtype) for q in queues} | {str(q.text.dtype) for q in queues}),
           "master_finer_than_bf16": any(bool((m.bfloat16().float() != m).any()) for m in masters)}
    return run, probe.report() if probe is not None else None


def _worker(out: Path) -> None:
    """Train the tiny config in fp32 and then in bf16 on this rank; write the rank's report."""
    import deepspeed
    import torch.distributed as dist

    from test_train_distributed import write_config

    from plait.trainer.engine import init_distributed

    init_distributed()
    rank = dist.get_rank()
    config = out / "run.yaml"
    if rank == 0:
        write_config(config, tracking={"log_every": 1, "uri": f"sqlite:///{out / 'mlflow.db'}"})
    dist.barrier()
    report: dict = {"world_size": dist.get_world_size()}
    report["fp32"], _ = _train(config, out / "fp32", "fp32", rank)
    report["bf16"], report["probe"] = _train(config, out / "bf16", "bf16", rank)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

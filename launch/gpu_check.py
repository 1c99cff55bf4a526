"""One GPU check: every fast path against its reference, then a short real training run, as one JSON line.

    make gpu-check                                   # = python launch/gpu_check.py
    python launch/gpu_check.py [--steps 50] [--run-dir DIR] [--peak-tflops 989]

On one CUDA GPU, sized to finish in under 8 minutes on an 80 GB-class GPU:
1. `plait bench gpu --checks-only`: varlen attention (flash-attn, torch varlen, bucketed SDPA), MoE dispatch
   (torch, Triton), chunked InfoNCE (torch, Triton) and the fused norm + AdamW (apex when importable) against
   their references, values and gradients;
2. `plait train configs/examples/vlm-1b-1node.yaml` on this GPU alone: the built-in demo data, 50 steps logged
   every 10, in this process with `torch.cuda.set_sync_debug_mode("warn")` so that every host sync is counted
   by the line of Python that caused it;
3. the last stdout line: check statuses, then tokens/s, MFU, step time (from the run's MLflow metrics, leaving
   out the first, warm-up window), peak GPU memory and the host syncs with the lines that make most of them.
The run lives in a temporary folder under runs/ that is removed at the end (its final checkpoint is ~17 GB);
`--run-dir NEW_DIR` keeps it. Exit codes: 0 all passed, 1 a check or the run failed, 2 nothing was run (no
CUDA GPU here, or `--run-dir` exists: the check never resumes a run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "examples" / "vlm-1b-1node.yaml"
"""The run config trained here (its model is also `plait bench gpu`'s ~1B model)."""
LOG_EVERY = 10
"""Steps per metrics window: the first window (warm-up) is left out of the figures."""
DEMO_SAMPLES = 5000
"""Demo samples: about one epoch of 50 steps at the example's packing, so few part-filled epoch ends."""
SYNC_MESSAGE = "called a synchronizing CUDA operation"
"""How torch's sync debug mode words its warning."""
EXIT_FAILED, EXIT_NOT_RUN = 1, 2
GIB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of the training run")
    parser.add_argument("--run-dir", default=None,
                        help="a new directory to keep the run in (default: a temporary one under runs/, removed "
                             "at the end with its ~17 GB checkpoint)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="this GPU's peak for MFU (default: the table of known accelerators)")
    return parser.parse_args(argv)


def one_gpu_overrides(run_dir: Path, steps: int, peak_tflops: float | None) -> list[str]:
    """`--set` items that scale the example to one GPU: demo data, a short run, no mid-run checkpoints, and the
    fastest attention path installed (the example names flash-attn, which a CUDA machine may lack)."""
    from plait.trainer.config_loader import read_yaml

    ds_file = Path(read_yaml(EXAMPLE)["deepspeed"]["config_file"])
    overrides = [f"run_dir={run_dir}", f"steps={steps}", "data.shards=", f"data.demo.samples={DEMO_SAMPLES}",
                 "data.demo.samples_per_shard=200", f"data.workers={max(1, min(8, (os.cpu_count() or 2) - 2))}",
                 f"deepspeed.config_file={ds_file if ds_file.is_absolute() else REPO / ds_file}",
                 "model.attention_backend=auto", "optim.warmup_steps=10", "checkpoint.every=0", "checkpoint.keep=1",
                 "eval.max_samples=256", f"tracking.log_every={LOG_EVERY}", "tracking.experiment=plait-gpu-check"]
    if peak_tflops is not None:
        overrides.append(f"tracking.peak_tflops={peak_tflops}")
    return overrides


def run_checks() -> dict:
    """`plait bench gpu --checks-only` in this process; its flat result (`check/<path>`: status, `device`)."""
    from plait.trainer.bench import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return gpu.run(parser.parse_args(["--checks-only", "--budget-s", "180"]))


@contextlib.contextmanager
def counted_host_syncs() -> Iterator[Counter]:
    """Count host syncs by the `file:line` that caused them (torch's sync debug mode, as warnings); other
    warnings are shown once each at the end."""
    sites: Counter = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield sites
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sites.update(sync_sites(caught))
    others = {(str(w.message), w.category, w.filename, w.lineno) for w in caught if not is_sync(w)}
    for message, category, filename, lineno in sorted(others, key=lambda o: (o[2], o[3])):
        warnings.showwarning(message, category, filename, lineno)


def is_sync(warning: warnings.WarningMessage) -> bool:
    """Whether a warning is torch's report of a host sync."""
    return str(warning.message).startswith(SYNC_MESSAGE)


def sync_sites(caught: list[warnings.WarningMessage]) -> Counter:
    """`file:line` of each host-sync warning (paths relative to the repository where they lie in it)."""
    sites: Counter = Counter()
    for warning in caught:
        if is_sync(warning):
            path = Path(warning.filename)
            where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            sites[f"{where}:{warning.lineno}"] += 1
    return sites


def train(config: Path, overrides: list[str]) -> tuple[int, dict | None]:
    """`plait train CONFIG --set ...` on one rank in this process; its exit code and result line (None if none).

    Its stdout is held back (its result line is folded into the check's), everything else goes to stderr; a run
    that raises gives exit code 1 and no result.
    """
    from plait.trainer.train_command import RESULT_PREFIX, run_rank

    args = argparse.Namespace(config=str(config), set=overrides, run_dir=None, steps=None, nproc=1)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            code = run_rank(args)
        except Exception:  # noqa: BLE001 - a crashed run is a result of the check, reported in its JSON line
            traceback.print_exc()
            code = EXIT_FAILED
    result = None
    for line in captured.getvalue().splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line)
        else:
            sys.stderr.write(line + "\n")
    return code, result


def metric_history(tracking_uri: str, run_id: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, int, float]]]:
    """(step, timestamp in ms, value) of each metric of an MLflow run, by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
            for key in keys}


def throughput(history: dict[str, list[tuple[int, int, float]]]) -> dict[str, float | int | None]:
    """Tokens/s and MFU averaged over the windows after the first (warm-up), and the wall time per step between
    the first window's end and the last's (logging and all); a run of one window keeps that window."""
    windows = history.get("throughput/tokens_per_s", [])
    warmup_end = windows[0][0] if len(windows) > 1 else -1

    def mean(key: str) -> float | None:
        values = [value for step, _, value in history.get(key, []) if step > warmup_end]
        return sum(values) / len(values) if values else None

    step_time = None
    if len(windows) > 1:
        (first_step, first_ms, _), (last_step, last_ms, _) = windows[0], windows[-1]
        step_time = (last_ms - first_ms) / 1e3 / (last_step - first_step)
    return {"tokens_per_s": mean("throughput/tokens_per_s"), "mfu": mean("throughput/mfu"), "step_time_s": step_time,
            "windows": sum(step > warmup_end for step, _, _ in windows)}


def summary(checks: dict, code: int, result: dict | None, history: dict, peak: dict[str, float],
            syncs: Counter) -> dict:
    """The check's JSON line: statuses, the run's figures, peak memory and host syncs (the whole run's, start-up,
    evaluation and checkpoint included: a site with a multiple of `steps` syncs is in the step); `passed` is the
    verdict."""
    statuses = {key.removeprefix("check/"): value for key, value in checks.items() if key.startswith("check/")}
    checks_passed = not any(status.startswith("failed") for status in statuses.values())
    steps = result["steps"] if result else 0
    return {
        "passed": checks_passed and code == 0 and result is not None,
        "device": checks.get("device"),
        "checks_passed": checks_passed,
        "checks": statuses,
        "train_exit_code": code,
        "steps": steps,
        "loss": result["loss"] if result else None,
        **throughput(history),
        **peak,
        "host_syncs": sum(syncs.values()),
        "host_sync_sites": dict(syncs.most_common(10)),
        "run": {key: result[key] for key in ("run_id", "tracking_uri", "checkpoint")} if result else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Refuse without CUDA; else checks, the training run and the JSON line; returns the exit code."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); it checks the CUDA fast "
                         "paths and a training run on one GPU, so nothing was run\n")
        return EXIT_NOT_RUN
    if args.run_dir and Path(args.run_dir).exists():
        sys.stderr.write(f"gpu-check: {args.run_dir} exists; the check trains a fresh run, give a new directory\n")
        return EXIT_NOT_RUN
    from plait.trainer.console import setup_logging

    setup_logging()
    started = time.perf_counter()
    checks = run_checks()
    with contextlib.ExitStack() as stack:
        if args.run_dir:
            run_dir = Path(args.run_dir)
        else:
            (REPO / "runs").mkdir(exist_ok=True)
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-", dir=REPO / "runs")))
        torch.cuda.reset_peak_memory_stats()
        with counted_host_syncs() as syncs:
            code, result = train(EXAMPLE, one_gpu_overrides(run_dir, args.steps, args.peak_tflops))
        peak = {"peak_memory_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        keys = ("throughput/tokens_per_s", "throughput/mfu")
        history = metric_history(result["tracking_uri"], result["run_id"], keys) if result else {}
    line = summary(checks, code, result, history, peak, syncs)
    line["run_dir"] = args.run_dir
    line["wall_s"] = time.perf_counter() - started
    sys.stdout.write(json.dumps(line) + "\n")
    return 0 if line["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

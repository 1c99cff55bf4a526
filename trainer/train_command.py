"""`plait train` and `plait export`, and the run function `launch/train.py` calls on every rank.

`plait train CONFIG --nproc N` starts N local ranks through the DeepSpeed launcher running
`launch/train.py`; `--nproc 1` (the default) trains in this process. Rerunning the same command resumes
from the run directory's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

LAUNCH_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
"""The per-rank entry point the DeepSpeed launcher runs."""

RESULT_PREFIX = '{"run_id"'
"""How the result line of a training run starts (the first key of `Trainer.result`)."""

EXIT_BAD_INPUT = 2
"""Exit code of bad input: a config, file or data error, such as a run whose loader gave up on some rank (every rank
stops after the checkpoint of the last completed step)."""
EXIT_NONFINITE = 3
"""Exit code of a run stopped by too many non-finite steps in a row (after its checkpoint)."""
EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after its checkpoint: launch/slurm.sbatch requeues on it."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse then names the flag and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by `plait train` and `launch/train.py`."""
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("--run-dir", default=None, help="checkpoints, MLflow store and logs (default: config's)")
    parser.add_argument("--steps", type=positive_int, default=None, help="override the run length in optimizer steps")
    parser.add_argument("--nproc", type=positive_int, default=1, help="local ranks (>1 runs the DeepSpeed launcher)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def _overrides(args: argparse.Namespace) -> list[str]:
    """`--set` plus the dedicated flags as overrides."""
    extra = [f"run_dir={args.run_dir}"] if args.run_dir else []
    extra += [f"steps={args.steps}"] if args.steps is not None else []
    return [*args.set, *extra]


def run_rank(args: argparse.Namespace) -> int:
    """Train on this rank (launched or in-process); prints the result JSON on rank 0; returns an exit code."""
    import deepspeed
    from rich.markup import escape

    from plait.trainer.config import load_config
    from plait.trainer.console import console, emit_result
    from plait.trainer.train import DataFailureStop, NonFiniteStop, Trainer

    cfg = load_config(args.config, _overrides(args))
    trainer = Trainer(cfg)
    status, code = "FAILED", 1
    try:
        result = trainer.train()
        status, code = ("KILLED", EXIT_PREEMPTED) if trainer.preempted else ("FINISHED", 0)
        emit_result(result)
    except NonFiniteStop as err:
        console.print(f"[bold red]stopped:[/] {err}", highlight=False, soft_wrap=True)
        code = EXIT_NONFINITE
    except DataFailureStop as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        code = EXIT_BAD_INPUT
    finally:
        trainer.close(status)
        deepspeed.comm.destroy_process_group()
    return code


def launch_local(args: argparse.Namespace) -> int:
    """Run `--nproc` ranks on this machine through the DeepSpeed launcher; returns its exit code."""
    from plait.trainer.engine import free_port

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(LAUNCH_SCRIPT), args.config,
           *(f"--set={item}" for item in _overrides(args))]
    # The launcher logs to stdout after the ranks exit: hold rank 0's result line back and print it last.
    result = None
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = line
            else:
                sys.stderr.write(line)
    if result is not None:
        sys.stdout.write(result)
        sys.stdout.flush()
    return proc.returncode


def _cmd_train(args: argparse.Namespace) -> None:
    code = launch_local(args) if args.nproc > 1 else run_rank(args)
    if code:
        raise SystemExit(code)


def _cmd_export(args: argparse.Namespace) -> None:
    from plait.trainer.console import emit_result
    from plait.trainer.export import export

    emit_result(export(args.checkpoint, args.out, merge_lora=args.merge_lora))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `plait train` and `plait export`."""
    train = subparsers.add_parser("train", help="train (or resume) a run from a config")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)
    export = subparsers.add_parser("export", help="the trained model as a self-contained directory "
                                                  "(for plait embed and PretrainedModel.from_pretrained)")
    export.add_argument("checkpoint", help="a checkpoint folder (RUN_DIR/checkpoints/stepNNNNNNNN) or run dir")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--merge-lora", action="store_true",
                        help="fold LoRA adapters into the LLM's weights in the saved model too (llm/ always has them "
                             "merged)")
    export.set_defaults(func=_cmd_export)

"""Per-rank training entry point: what the DeepSpeed launcher, torchrun and srun run.

    deepspeed --num_gpus 8 launch/train.py configs/quickstart.yaml --run-dir runs/q
    deepspeed --hostfile hostfile launch/train.py CONFIG           (multi-node)
    torchrun --nproc_per_node 2 launch/train.py CONFIG --set deepspeed.zero_stage=3

Same flags as `plait train` (`--nproc` is ignored here: the launcher decides the ranks). Rerunning the
same command resumes from the run directory's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from plait.trainer.console import setup_logging
from plait.trainer.train_command import add_train_arguments, run_rank


def main(argv: list[str] | None = None) -> int:
    """Parse, train on this rank, return the exit code (the run closes itself in a `finally`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_rank(args)


if __name__ == "__main__":
    sys.exit(main())

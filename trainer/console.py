"""The one place user-facing output goes: rich on rank 0, silence elsewhere; the final JSON line on stdout."""

from __future__ import annotations

import json
import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
"""Human-readable output (summaries, tables, progress); stderr, so stdout stays machine-readable."""


def rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def setup_logging(verbose: bool = False) -> None:
    """Rich log lines on rank 0; warnings and errors only on the other ranks."""
    level = logging.DEBUG if verbose else logging.INFO
    if rank() != 0:
        level = logging.WARNING
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def emit_result(result: dict) -> None:
    """Print a command's result as the final stdout line (JSON), on rank 0 only."""
    if rank() == 0:
        sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
        sys.stdout.flush()

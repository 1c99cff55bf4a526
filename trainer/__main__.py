"""`python -m plait.trainer ...` is the `plait` command."""

from plait.trainer.cli import main

main()

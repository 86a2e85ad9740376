"""`python -m rloopd` runs the CLI."""

from rloopd.cli import main

main()

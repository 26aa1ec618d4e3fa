"""The `finestyle` command. Thin: parse options into a config, call one stage function, report.

Exit codes: 0 success (bad inputs skipped and reported still count), 2 unusable input or arguments
(one line on stderr, no traceback), 1 internal failure.

Each command group has its module (`stages`, `review`, `inference`, `models`, `evaluate`, `bench`, `world`),
registered on the app in `base`; importing them here, in this order, gives `--help` its order.
"""

from __future__ import annotations

import sys

# isort: off
from finestyle.cli import stages, review, inference, models, evaluate, world, bench  # noqa: F401 - registers commands

# isort: on
from finestyle.cli.base import app, command, print_summary

__all__ = ["app", "command", "main", "print_summary"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - internal failure: traceback then exit 1
        import traceback

        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()

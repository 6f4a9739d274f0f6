"""The `tether` command: thin argparse front end over the packages.

Each area registers its own subcommands through a `register(subparsers)`
function in its `cmd` module, so this file only lists them. Exit codes: 0 ok,
1 a failure the command found (e.g. an invalid bundle), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules exposing `register(subparsers: argparse._SubParsersAction) -> None`.
# Each registered subcommand sets `func(args) -> int` via `set_defaults`.
COMMAND_MODULES: tuple[str, ...] = (
    "tether.control.cmd",
    "tether.sidecar.cmd",
    "tether.verify.cmd",
    "tether.demo.cmd",
    "tether.healthcheck",
    "tether.runner.cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """Builds the full parser from every area's `register`."""
    parser = argparse.ArgumentParser(prog="tether", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from tether.core.errors import ConfigError, TetherError
    from tether.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"tether: {err.message}", file=sys.stderr)
        return 2
    except TetherError as err:
        print(f"tether: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Tether: leases, mediated tool calls and verifiable receipts for multi-agent systems.

Run the control plane (`tether control`) and a sidecar per node (`tether
sidecar`); operate them with the other commands; check exported receipts
offline with `tether verify`. Every command that dials the control plane takes
its address and credential from --control/--tls-ca/--tls-cert/--tls-key or
TETHER_CONTROL, TETHER_TLS_CA, TETHER_TLS_CERT and TETHER_TLS_KEY.

Exit codes: 0 ok; 1 a failure the command found (an invalid bundle, a refused
or failed call, an unreachable control plane); 2 a usage or configuration
error, including a request the control plane refused as INVALID_ARGUMENT; 130
interrupted. Errors are one line on stderr; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from tether import __version__

# Modules exposing `register(subparsers: argparse._SubParsersAction) -> None`.
# Each registered subcommand sets `func(args) -> int` via `set_defaults`.
COMMAND_MODULES: tuple[str, ...] = (
    "tether.control.cmd",
    "tether.control.receipts_cmd",
    "tether.sidecar.cmd",
    "tether.verify.cmd",
    "tether.demo.cmd",
    "tether.healthcheck",
    "tether.runner.cmd",
)

# Commands that build the parser from their own module only. `tether verify`'s run time is
# its start-up too: it starts without the control plane's modules (gRPC, the console, x509;
# about 0.3 s), which its worker processes would otherwise wait for. `tether sidecar` is a
# long-lived process with a memory budget: it keeps none of the other commands' modules (the
# verifier, multiprocessing, the control plane's CLI) resident.
FAST_COMMANDS: dict[str, str] = {"verify": "tether.verify.cmd", "sidecar": "tether.sidecar.cmd"}
# Global options that take a value, so the command word is found after them.
_VALUED_OPTIONS = frozenset({"--log-level", "--log-format"})

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE (128 + 13)


def _level(text: str) -> str:
    from tether.logs import LOG_LEVELS

    level = text.upper()
    if level == "WARN":
        level = "WARNING"
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level; use one of {', '.join(LOG_LEVELS)}"
        )
    return level


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """Builds the parser from every area's `register` (or only those of `modules`)."""
    from tether.logs import ENV_LOG_FORMAT, LOG_FORMATS

    summary, _, rest = (__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="tether",
        description=summary + "\n\n" + rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument(
        "--log-level",
        type=_level,
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO (default), WARNING or ERROR",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get(ENV_LOG_FORMAT) or "auto",
        help=f"auto (default: text on a terminal, JSON otherwise), text or json "
        f"(env {ENV_LOG_FORMAT})",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the traceback too, and let gRPC's own logs through",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_grpc(argv: Sequence[str]) -> None:
    """Silences gRPC's C core logging (raw `E1201 ... add_port.cc` lines) unless --debug.

    It must run before `grpc` is imported; the errors it would print reach the
    user as Tether's own one-line messages. GRPC_VERBOSITY in the environment wins.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if "--debug" in argv else "NONE")


def _detach_stdout() -> None:
    """After EPIPE, points stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _fail(message: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):
        print(f"tether: {message}", file=sys.stderr)


def exit_code_of(err: BaseException) -> int:
    """The documented exit code of an error a command raised (see the module docstring)."""
    from tether.core.errors import ConfigError, InvalidArgument

    # A request the control plane refused as INVALID_ARGUMENT comes back as
    # InvalidArgument: a usage error like any the CLI finds itself.
    return EXIT_USAGE if isinstance(err, ConfigError | InvalidArgument) else EXIT_FAILURE


def run_command(args: argparse.Namespace) -> int:
    """Runs the parsed command: one line and the documented exit code for every failure."""
    from tether.core.errors import TetherError

    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except TetherError as err:
        if debug:
            import traceback

            traceback.print_exc()
        _fail(err.message)
        return exit_code_of(err)
    except BrokenPipeError:
        _detach_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except OSError as err:
        if debug:
            import traceback

            traceback.print_exc()
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}")
        return EXIT_FAILURE
    except Exception as err:  # the last resort: still one line, and no traceback unless asked
        if debug:
            import traceback

            traceback.print_exc()
        _fail(
            f"unexpected error: {type(err).__name__}: {str(err)[:300]} (re-run with --debug "
            "for the traceback, and please report it)"
        )
        return EXIT_FAILURE


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line, past the global options; None if unsure.

    Anything but a known global option before it (`--help`, `--version`, a typo) gives
    None, so the full parser handles (and explains) it.
    """
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED_OPTIONS:
            skip = True
        elif arg == "--debug" or arg.partition("=")[0] in _VALUED_OPTIONS:
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_grpc(argv)
    fast = FAST_COMMANDS.get(_command_word(argv) or "")
    parser = build_parser((fast,) if fast else COMMAND_MODULES)
    args: Any = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        _fail("give a COMMAND; `tether --help` lists them")
        return EXIT_USAGE
    from tether.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        code = run_command(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _detach_stdout()
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())

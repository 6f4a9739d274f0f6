"""`tether run` (any program as an agent) and `tether mcp` (stdio MCP clients to the sidecar)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError


def register(subparsers: Any) -> None:
    """Adds the `run` and `mcp` subcommands."""
    run: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run a program as the agent for tasks of a queue (docs/mcp.md)",
        description="Claim tasks through the sidecar and run CMD for each: the payload on "
        "stdin and in $TETHER_PAYLOAD_FILE, the lease's MCP endpoint and token in the "
        "environment and in $TETHER_MCP_CONFIG. Exit 0 completes the task succeeded (stdout "
        "is the result), anything else failed (with the tail of stderr). The command's "
        "process tree is killed on lease loss, cancel or --timeout.",
        usage="tether run --queue Q [options] -- CMD [ARGS...]",
    )
    run.add_argument("--queue", required=True, help="queue to claim tasks from")
    run.add_argument(
        "--count", type=int, default=1, help="tasks to run, one after another (0: no limit)"
    )
    run.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="PATH",
        help="a file CMD writes, uploaded after it exits (repeatable; missing → task failed)",
    )
    run.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="kill CMD after this long (task failed)"
    )
    run.add_argument(
        "--socket",
        default=os.environ.get("TETHER_SOCKET", "tether.sock"),
        help="the sidecar's Broker socket (default $TETHER_SOCKET or ./tether.sock)",
    )
    run.add_argument(
        "--token-file",
        default=os.environ.get("TETHER_AGENT_TOKEN_FILE"),
        help="the agent's token file (default $TETHER_AGENT_TOKEN_FILE; none on the "
        "agent's own socket)",
    )
    run.add_argument(
        "--wait-ms", type=int, default=10_000, help="how long each claim waits (default 10000)"
    )
    run.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="stop when a claim finds no task instead of waiting for the next",
    )
    run.add_argument(
        "--kill-grace",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="between SIGTERM and SIGKILL when CMD is stopped (default 2)",
    )
    run.add_argument("--json", action="store_true", help="one JSON line per task on stdout")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(func=_run)

    bridge: argparse.ArgumentParser = subparsers.add_parser(
        "mcp",
        help="a stdio MCP server relaying to the sidecar's MCP server (for stdio-only clients)",
        description="Relay MCP between stdin/stdout and the sidecar's MCP server, with the "
        "lease's token. Reads $TETHER_MCP_URL or $TETHER_MCP_SOCKET and $TETHER_MCP_TOKEN "
        "(as `tether run` sets them) unless flags say otherwise.",
    )
    bridge.add_argument("--url", help="Streamable HTTP endpoint (default $TETHER_MCP_URL)")
    bridge.add_argument(
        "--unix-socket", help="the sidecar's MCP Unix socket (default $TETHER_MCP_SOCKET)"
    )
    bridge.add_argument(
        "--token-file", help="file holding the lease's MCP token (default $TETHER_MCP_TOKEN)"
    )
    bridge.set_defaults(func=_mcp)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from tether.runner.run import RunConfig, run_tasks, summary

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("run: give the command after --, e.g. tether run --queue q -- ./agent")
    if args.count < 0:
        raise ConfigError("--count: must be 0 (no limit) or more")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout: must be positive")
    if not 0 <= args.wait_ms <= 60_000:
        raise ConfigError("--wait-ms: must be 0..60000")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise ConfigError(f"--token-file: cannot read {args.token_file}: {err}") from err
    cfg = RunConfig(
        socket=args.socket,
        token=token,
        queue=args.queue,
        argv=tuple(argv),
        count=args.count,
        artifacts=tuple(Path(p) for p in args.artifact),
        timeout_s=args.timeout,
        wait_ms=args.wait_ms,
        exit_when_idle=args.exit_when_idle,
        kill_grace_s=args.kill_grace,
        json_lines=args.json,
    )
    outcomes = asyncio.run(run_tasks(cfg))  # the standard loop: it watches CMD's children
    print(summary(outcomes), file=sys.stderr)
    return 0 if all(o.state == "succeeded" for o in outcomes) else 1


def _mcp(args: argparse.Namespace) -> int:
    import anyio

    from tether.runner.bridge import bridge

    unix_socket = args.unix_socket or os.environ.get("TETHER_MCP_SOCKET", "")
    url = args.url or os.environ.get("TETHER_MCP_URL", "")
    if unix_socket and not args.url:
        url = "http://localhost/mcp"  # HTTP over the socket; the host is only a label
    if not url:
        raise ConfigError("mcp: no endpoint; set TETHER_MCP_URL or TETHER_MCP_SOCKET (or flags)")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise ConfigError(f"--token-file: cannot read {args.token_file}: {err}") from err
    else:
        token = os.environ.get("TETHER_MCP_TOKEN", "")
    if not token:
        raise ConfigError("mcp: no token; set TETHER_MCP_TOKEN or --token-file")
    anyio.run(bridge, url, token, unix_socket)
    return 0

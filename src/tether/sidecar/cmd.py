"""`tether sidecar`: run a node's sidecar until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from tether import runtime
from tether.grpcutil.limits import SIDECAR_LIMITS, add_limit_arguments, limit_values
from tether.sidecar import config as sidecar_config

log = logging.getLogger("tether.sidecar")

MALLOC_ARENA_MAX = 2
"""glibc malloc arenas the sidecar's threads share (glibc's default: 8 per core).

gRPC's threads, the spool's writer and the log writer each got an arena of their own,
and each kept its high-water mark of freed memory: 1.3 MB of the sidecar's RSS after the
mediation benchmark (median of 8 runs, docs/performance.md), with no measurable CPU cost
per call. `MALLOC_ARENA_MAX` in the environment wins (glibc applies it itself)."""
_M_ARENA_MAX = -8  # mallopt() parameter number, from glibc's malloc.h


def register(subparsers: Any) -> None:
    """Adds the `sidecar` subcommand."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "sidecar",
        help="serve the agent Broker API for this node",
        description="Serve BrokerService on a Unix socket, talking to the control plane "
        "as a registered node. Arguments override TETHER_* env, which overrides --config.",
    )
    p.add_argument(
        "--control",
        action="append",
        help="control plane address (host:port or unix:/path); several replicas: repeat it or "
        "separate them by commas, the sidecar fails over between them",
    )
    p.add_argument("--socket", help="shared Broker socket path (default ./tether.sock)")
    p.add_argument("--node-id", dest="node_id", help="this node's id")
    p.add_argument("--key", help="node Ed25519 private key (PEM, mode 0600)")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--state-dir", dest="state_dir", help="local state directory")
    p.add_argument(
        "--join-token-file",
        "--enrollment-token-file",
        dest="enrollment_token_file",
        help="file holding this node's single-use join token (first enrolment only)",
    )
    p.add_argument(
        "--trust-bundle",
        dest="trust_bundle",
        help="pinned trust bundle: CA certificate(s) and control public key(s) (PEM); required",
    )
    p.add_argument(
        "--enroll",
        action="append",
        help="control plane enrolment address (default: each --control port + 1); with "
        "several replicas, one per --control address, in the same order",
    )
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME=TOKEN_FILE",
        help="an agent authenticated by the token in TOKEN_FILE (repeatable)",
    )
    p.add_argument(
        "--agent-socket",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an agent bound to its own socket PATH (repeatable)",
    )
    p.add_argument("--listen-tcp", dest="listen_tcp", help="also serve on this TCP address")
    p.add_argument("--ready-file", dest="ready_file", help="written once serving")
    p.add_argument("--policy", dest="policy_file", help="local copy of the policy (TOML)")
    p.add_argument(
        "--metrics-listen",
        dest="metrics_listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--mcp",
        action="store_const",
        const=True,
        default=None,
        help="serve MCP (Streamable HTTP) for agents that speak it, on --mcp-socket (docs/mcp.md)",
    )
    p.add_argument(
        "--mcp-socket",
        dest="mcp_socket",
        metavar="PATH",
        help="the MCP Unix socket (default: <socket stem>-mcp.sock beside --socket); implies --mcp",
    )
    p.add_argument(
        "--mcp-listen",
        dest="mcp_listen",
        metavar="HOST:PORT",
        help="also serve MCP on this loopback address (127.0.0.1:PORT; 0 picks); implies --mcp",
    )
    p.add_argument(
        "--grace-period-ms",
        dest="grace_period_ms",
        type=int,
        help="on SIGTERM, how long running calls may take to finish (default 10000)",
    )
    p.add_argument(
        "--agent-liveness-ms",
        dest="agent_liveness_ms",
        type=int,
        help="an agent is alive this long after its last call (default: lease TTL)",
    )
    add_limit_arguments(p, SIDECAR_LIMITS, "agent")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> sidecar_config.SidecarConfig:
    """Builds the config from parsed arguments, the environment and --config."""
    keys = (
        "control",
        "socket",
        "node_id",
        "key",
        "state_dir",
        "enrollment_token_file",
        "trust_bundle",
        "enroll",
        "listen_tcp",
        "ready_file",
        "grace_period_ms",
        "agent_liveness_ms",
        "policy_file",
        "metrics_listen",
        "mcp",
        "mcp_socket",
        "mcp_listen",
    )
    values: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    for key in ("control", "enroll"):  # repeated flags: one comma-separated list
        if values[key] is not None:
            values[key] = ",".join(values[key])
    values.update(limit_values(args))
    values["agent_tokens"] = sidecar_config.parse_agent_pairs("--agent", args.agent)
    values["agent_sockets"] = sidecar_config.parse_agent_pairs("--agent-socket", args.agent_socket)
    return sidecar_config.load(values, os.environ, args.config)


def limit_malloc_arenas(arenas: int = MALLOC_ARENA_MAX) -> bool:
    """Caps glibc's malloc arenas, before the process starts its threads.

    Returns whether the cap was set: not when `MALLOC_ARENA_MAX` is in the environment
    (glibc read it at start-up) or the C library has no `mallopt` (not glibc).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))


def run(args: argparse.Namespace) -> int:
    """Runs the sidecar; returns 0 after a graceful stop."""
    cfg = config_from_args(args)
    limit_malloc_arenas()  # before runtime.run starts the log writer, gRPC its threads
    return runtime.run(_serve(cfg))


async def _serve(cfg: sidecar_config.SidecarConfig) -> int:
    from tether.sidecar.server import Sidecar

    sidecar = Sidecar(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGTERM while start-up waits for the control plane must end the process too.
    starting = asyncio.create_task(sidecar.start(), name="tether-sidecar-start")
    stopping = asyncio.create_task(stop.wait(), name="tether-sidecar-stop-signal")
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:
        starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        log.warning("stopped before the sidecar started serving")
        await sidecar.stop(0)
        return 0
    except BaseException:
        stopping.cancel()
        await sidecar.stop(0)
        raise
    await stopping
    await sidecar.stop()
    return 0

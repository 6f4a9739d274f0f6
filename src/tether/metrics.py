"""Prometheus metrics for the control plane and the sidecar.

Call sites only increment the counters defined here (`LEASES_GRANTED.inc()`),
so instrumenting a code path is one line. Counters live in one process-wide
registry (`COUNTERS`); gauges that must be read from live state (tasks by
state, spool depth, receipt stream lag) are collectors bound to one running
server. Each `--metrics-listen` endpoint serves its own registry: the shared
counters, its server's collectors and the process collector, so two servers in
one process (tests, `tether demo`) never register a series twice.

Live-state collectors run on the scraping HTTP thread but read state that
belongs to the server's asyncio loop, so they hand a coroutine to that loop
(`run_coroutine_threadsafe`) and wait a bounded time; a scrape never blocks
the servers for longer than one short store query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tether.core.errors import ConfigError

log = logging.getLogger("tether.metrics")

COUNTERS = CollectorRegistry(auto_describe=True)
"""Every counter below; shared by all servers of the process."""

# -- control plane -------------------------------------------------------------------
LEASES_GRANTED = Counter(
    "tether_leases_granted", "Leases granted by the control plane.", registry=COUNTERS
)
LEASES_RENEWED = Counter(
    "tether_leases_renewed", "Lease renewals granted by the control plane.", registry=COUNTERS
)
LEASES_EXPIRED = Counter(
    "tether_leases_expired",
    "Leases that lapsed without being finished; outcome is the task's next state "
    "(queued for a retry, or expired when its attempts are spent).",
    ["outcome"],
    registry=COUNTERS,
)
AUTH_REFUSALS = Counter(
    "tether_auth_refusals",
    "Refused enrolments and refused callers, by what was refused (enrollment: a RegisterNode; "
    "certificate: a node certificate of a revoked or re-keyed node; caller: an RPC the "
    "caller's identity or role may not make) and a machine-readable reason.",
    ["kind", "reason"],
    registry=COUNTERS,
)

# -- both servers (grpcutil/limits.py) ------------------------------------------------
SHED = Counter(
    "tether_shed",
    "Calls refused with RESOURCE_EXHAUSTED (OVERLOADED) before any work, by server "
    "(sidecar, control) and reason: concurrency (the server's in-flight limit), "
    "caller_concurrency (one caller's in-flight limit), rate (one caller's token bucket), "
    "idle (the request message did not arrive within request_read_timeout_ms).",
    ["server", "reason"],
    registry=COUNTERS,
)
RPCS_IN_FLIGHT = Gauge(
    "tether_rpcs_in_flight",
    "Calls admitted and not yet finished (health checks not counted), by server.",
    ["server"],
    registry=COUNTERS,
)

# -- sidecar -------------------------------------------------------------------------
TOOL_CALLS = Counter(
    "tether_tool_calls",
    "Tool calls that ran or were replayed, by tool and status (ok, error, replayed, ...).",
    ["tool", "status"],
    registry=COUNTERS,
)
DENIALS = Counter(
    "tether_denials",
    "Tool calls refused before running, by reason (POLICY_DENIED, BUDGET_EXHAUSTED, ...).",
    ["reason"],
    registry=COUNTERS,
)
DENIALS_UNRECORDED = Counter(
    "tether_denials_unrecorded",
    "Tool calls refused past denied_receipts_per_minute for their task and agent: answered "
    "RESOURCE_EXHAUSTED and left without a tool_denied receipt.",
    registry=COUNTERS,
)
BUDGET_SPENT = Counter(
    "tether_budget_spent_micros",
    "Cost charged for tool calls, micro-units, by tool.",
    ["tool"],
    registry=COUNTERS,
)

# Series an alert may name exist from the start (at 0), not only after their first event.
for _outcome in ("queued", "expired"):
    LEASES_EXPIRED.labels(_outcome)
for _reason in ("POLICY_DENIED", "BUDGET_EXHAUSTED", "RESOURCE_EXHAUSTED"):
    DENIALS.labels(_reason)

CONTROL_ONLY = frozenset(
    {
        "tether_leases_granted",
        "tether_leases_renewed",
        "tether_leases_expired",
        "tether_auth_refusals",
    }
)
"""Counters only a control plane moves: a sidecar's endpoint does not show them."""
SIDECAR_ONLY = frozenset(
    {
        "tether_tool_calls",
        "tether_denials",
        "tether_denials_unrecorded",
        "tether_budget_spent_micros",
    }
)
"""Counters only a sidecar moves: a control plane's endpoint does not show them."""

SCRAPE_TIMEOUT_S = 2.0


class _Shared(Collector):
    """Re-exports the process-wide counters into one endpoint's registry.

    With `server` ("control" or "sidecar") only that server's counters and the
    shared ones: a sidecar's /metrics showing a control plane's lease counters at
    0 would read as "no leases", which is not what it means.
    """

    def __init__(self, server: str | None = None) -> None:
        self._hide: frozenset[str] = {"control": SIDECAR_ONLY, "sidecar": CONTROL_ONLY}.get(
            server or "", frozenset()
        )

    def collect(self) -> Iterable[Any]:
        return [m for m in COUNTERS.collect() if m.name not in self._hide]


def _on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[Any]]) -> Any:
    """Runs `make()` on the server's loop from the scrape thread; None on failure."""

    async def run() -> Any:
        return await make()

    try:
        return asyncio.run_coroutine_threadsafe(run(), loop).result(SCRAPE_TIMEOUT_S)
    except Exception as err:  # a scrape must never crash the endpoint
        log.warning("metrics: live value unavailable: %s", err)
        return None


class TasksCollector(Collector):
    """`tether_tasks{state}`: tasks in each state, counted in the store at scrape time."""

    def __init__(self, service: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._service = service
        self._loop = loop

    async def _counts(self) -> dict[str, int]:
        from tether.core.states import State

        by_state = await self._service.store.count_tasks_by_state()
        return {state.name.lower(): by_state.get(state, 0) for state in State}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = _on_loop(self._loop, self._counts)
        gauge = GaugeMetricFamily("tether_tasks", "Tasks by state.", labels=["state"])
        for state, n in sorted((counts or {}).items()):
            gauge.add_metric([state], n)
        yield gauge


class SpoolCollector(Collector):
    """Spool depth and receipt stream lag of one sidecar's receipt spool."""

    def __init__(self, spool: Any, clock: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._spool = spool
        self._clock = clock
        self._loop = loop

    async def _read(self) -> tuple[int, float]:
        from tether.crypto.receipts import parse_receipt

        spool = self._spool
        depth = max(0, int(spool.last_seq) - int(spool.acked_seq))
        lag_s = 0.0
        if depth:
            oldest = spool.unacked(limit=1)
            if oldest:
                _, receipt = parse_receipt(oldest[0][1])
                lag_s = max(0.0, (self._clock.now_ms() - receipt.time_unix_ms) / 1000)
        return depth, lag_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        read = _on_loop(self._loop, self._read)
        depth, lag_s = read if read is not None else (0, 0.0)
        yield GaugeMetricFamily(
            "tether_spool_depth",
            "Signed receipts in the local spool not yet acknowledged by the ledger.",
            value=depth,
        )
        yield GaugeMetricFamily(
            "tether_receipt_stream_lag_seconds",
            "Age of the oldest receipt not yet acknowledged by the ledger (0 when caught up).",
            value=lag_s,
        )


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint."""

    address: str
    """Bound "host:port" (the real port when 0 was asked)."""
    registry: CollectorRegistry
    _httpd: WSGIServer
    _thread: Thread

    def close(self) -> None:
        """Stops serving and frees the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(
    listen: str, collectors: Iterable[Collector] = (), server: str | None = None
) -> MetricsServer:
    """Serves Prometheus text format on http://`listen`/metrics ("host:port", port 0 ok).

    `server` ("control" or "sidecar") leaves out the other server's counters.

    Raises:
        ConfigError: `listen` is malformed or cannot be bound.
    """
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"metrics_listen: {listen!r} is not host:port")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Shared(server))
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    try:
        httpd, thread = start_http_server(int(port), host, registry)
    except OSError as err:
        raise ConfigError(f"metrics_listen: cannot listen on {listen}: {err.strerror}") from err
    bound = httpd.server_address[1]
    address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    log.info("metrics on http://%s/metrics", address)
    return MetricsServer(address, registry, httpd, thread)

"""Prometheus metrics for the control plane and the sidecar.

Call sites only increment the counters defined here (`LEASES_GRANTED.inc()`),
so instrumenting a code path is one line. Counters live in one process-wide
registry (`COUNTERS`); gauges that must be read from live state (tasks by
state, spool depth, receipt stream lag) are collectors bound to one running
server. Each `--metrics-listen` endpoint serves its own registry: the shared
counters, its server's collectors and the process collector, so two servers in
one process (tests, `tether demo`) never register a series twice.

The counters are this module's own (a float and a lock per series), exported
in Prometheus' form at scrape time: `prometheus_client` (with `http.server`,
`wsgiref` and `email`, about 3 MB resident) is imported only by a process that
serves an endpoint, so a sidecar without `--metrics-listen` stays within its
memory budget (docs/performance.md).

Live-state collectors run on the scraping HTTP thread but read state that
belongs to the server's asyncio loop, so they hand a coroutine to that loop
(`run_coroutine_threadsafe`) and wait a bounded time; a scrape never blocks
the servers for longer than one short store query.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from tether.core.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("tether.metrics")


class Collector(Protocol):
    """What an endpoint scrapes: metric families in prometheus_client's form."""

    def collect(self) -> Iterable[Metric]: ...


class _Series:
    """One counter series (one set of label values): its value, its creation time, a lock."""

    __slots__ = ("_lock", "created", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Adds `amount`.

        Raises:
            ValueError: `amount` is negative (a counter never goes down).
        """
        if amount < 0:
            raise ValueError("a counter is only incremented by a non-negative amount")
        with self._lock:
            self.value += amount


class _GaugeSeries(_Series):
    """One gauge series: it goes down too."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Adds `amount`."""
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtracts `amount`."""
        with self._lock:
            self.value -= amount


S = TypeVar("S", bound=_Series)


class _Metric(Generic[S]):
    """A counter or gauge family: its series by label values, made on first use."""

    kind: str
    series_type: type[S]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: Registry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._series[()] = self.series_type()
        registry.register(self)

    def labels(self, *values: str, **by_name: str) -> S:
        """The series of these label values (positional in label order, or by name).

        Raises:
            ValueError: not one value for each label name.
        """
        if by_name and not values and by_name.keys() == set(self.labelnames):
            values = tuple(by_name[n] for n in self.labelnames)
        elif by_name or len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: give one value for each of {self.labelnames}")
        key = tuple(map(str, values))
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, self.series_type())
        return series

    def inc(self, amount: float = 1.0) -> None:
        """Adds `amount` to an unlabelled metric."""
        self._series[()].inc(amount)

    def items(self) -> list[tuple[tuple[str, ...], S]]:
        """(label values, series) of every series made so far, in the order they were made."""
        with self._lock:
            return list(self._series.items())

    def export(self) -> Metric:
        """This family in prometheus_client's form (only called while serving)."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in self.items():
            family.add_metric(key, series.value, created=series.created)
        return family


class Counter(_Metric[_Series]):
    """A monotonic counter, exported as `<name>_total` (and `<name>_created`)."""

    kind = "counter"
    series_type = _Series


class Gauge(_Metric[_GaugeSeries]):
    """A value that goes up and down, exported as `<name>`."""

    kind = "gauge"
    series_type = _GaugeSeries

    def export(self) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in self.items():
            family.add_metric(key, series.value)
        return family


class Registry:
    """The process's counters and gauges, by name."""

    def __init__(self) -> None:
        self.metrics: dict[str, _Metric[Any]] = {}

    def register(self, metric: _Metric[Any]) -> None:
        """Adds a metric; a name may be registered once.

        Raises:
            ValueError: the name is taken.
        """
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample's value by its exposed name (`tether_shed_total`), or None if absent."""
        for metric in self.metrics.values():
            exposed = metric.name + ("_total" if metric.kind == "counter" else "")
            if exposed != name:
                continue
            for key, series in metric.items():
                if dict(zip(metric.labelnames, key, strict=True)) == dict(labels or {}):
                    return float(series.value)
        return None


COUNTERS = Registry()
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


class _Shared:
    """Re-exports the process-wide counters into one endpoint's registry.

    With `server` ("control" or "sidecar") only that server's counters and the
    shared ones: a sidecar's /metrics showing a control plane's lease counters at
    0 would read as "no leases", which is not what it means.
    """

    def __init__(self, server: str | None = None) -> None:
        self._hide: frozenset[str] = {"control": SIDECAR_ONLY, "sidecar": CONTROL_ONLY}.get(
            server or "", frozenset()
        )

    def collect(self) -> list[Metric]:
        return [m.export() for m in COUNTERS.metrics.values() if m.name not in self._hide]


def _on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[Any]]) -> Any:
    """Runs `make()` on the server's loop from the scrape thread; None on failure."""

    async def run() -> Any:
        return await make()

    try:
        return asyncio.run_coroutine_threadsafe(run(), loop).result(SCRAPE_TIMEOUT_S)
    except Exception as err:  # a scrape must never crash the endpoint
        log.warning("metrics: live value unavailable: %s", err)
        return None


class TasksCollector:
    """`tether_tasks{state}`: tasks in each state, counted in the store at scrape time."""

    def __init__(self, service: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._service = service
        self._loop = loop

    async def _counts(self) -> dict[str, int]:
        from tether.core.states import State

        by_state = await self._service.store.count_tasks_by_state()
        return {state.name.lower(): by_state.get(state, 0) for state in State}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        counts = _on_loop(self._loop, self._counts)
        gauge = GaugeMetricFamily("tether_tasks", "Tasks by state.", labels=["state"])
        for state, n in sorted((counts or {}).items()):
            gauge.add_metric([state], n)
        yield gauge


class SpoolCollector:
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
        from prometheus_client.core import GaugeMetricFamily

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
    _thread: threading.Thread

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
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

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

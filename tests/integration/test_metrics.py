"""Prometheus metrics: scrape both servers' /metrics after a real task has run."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest

from tether.core.errors import ConfigError
from tether.metrics import serve
from tether.testing import start_control, start_sidecar

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[tools.echo]
adapter = "python"
cost_micros = 7
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.forbidden]
adapter = "python"
[tools.forbidden.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[queues.work]
tools = ["echo"]
budget_micros = 1000
"""


async def scrape(address: str) -> dict[str, float]:
    """Fetches http://address/metrics (off the event loop) as {series: value}."""

    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(get)
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


async def test_counters_move_when_a_task_runs(tmp_path: Path) -> None:
    """After a claimed task calls a tool, is denied one and completes, the control plane's
    and the sidecar's /metrics show the lease, the tool call, the denial, the spend, the
    task states and an empty spool."""
    async with (
        start_control(tmp_path, metrics_listen="127.0.0.1:0", vault=False) as cp,
        start_sidecar(tmp_path, cp.address, metrics_listen="127.0.0.1:0") as side,
        side.agent("alice") as agent,
    ):
        control, client = cp.running, cp.client
        assert control.metrics is not None
        assert side.sidecar.metrics is not None
        before_c = await scrape(control.metrics.address)
        before_s = await scrape(side.sidecar.metrics.address)
        await client.put_policy(POLICY)
        await client.submit("work", b"{}")
        await client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=5000)
        assert task is not None
        await agent.start(task.task_id)
        await agent.call_tool(task.task_id, "echo", {"x": 1})
        with pytest.raises(Exception, match="forbidden"):
            await agent.call_tool(task.task_id, "forbidden", {})
        await agent.complete(task.task_id, result=b"ok")
        after_c = await scrape(control.metrics.address)
        after_s = await scrape(side.sidecar.metrics.address)

    def moved(before: dict[str, float], after: dict[str, float], series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    assert moved(before_c, after_c, "tether_leases_granted_total") >= 1
    assert after_c['tether_tasks{state="succeeded"}'] == 1
    assert after_c['tether_tasks{state="queued"}'] == 1
    assert moved(before_s, after_s, 'tether_tool_calls_total{status="ok",tool="echo"}') == 1
    assert moved(before_s, after_s, 'tether_denials_total{reason="POLICY_DENIED"}') == 1
    assert moved(before_s, after_s, 'tether_budget_spent_micros_total{tool="echo"}') == 7
    assert after_s["tether_spool_depth"] == 0  # CompleteTask waited for the ledger's ack
    assert after_s["tether_receipt_stream_lag_seconds"] == 0
    assert "process_cpu_seconds_total" in after_s
    # Each endpoint shows its own server's counters only (and the shared ones).
    assert not [k for k in after_s if k.startswith(("tether_leases_", "tether_auth_refusals"))]
    assert not [k for k in after_c if k.startswith(("tether_tool_calls", "tether_denials"))]


async def test_alerting_series_exist_before_their_first_event(tmp_path: Path) -> None:
    """tether_leases_expired_total and tether_denials_total are scraped at 0 from the start,
    so an alert on them (docs/deploy.md) has a series to watch before anything lapsed."""
    async with (
        start_control(tmp_path, metrics_listen="127.0.0.1:0", vault=False) as cp,
        start_sidecar(tmp_path, cp.address, metrics_listen="127.0.0.1:0") as side,
    ):
        assert cp.running.metrics is not None
        assert side.sidecar.metrics is not None
        control = await scrape(cp.running.metrics.address)
        sidecar = await scrape(side.sidecar.metrics.address)
    for outcome in ("queued", "expired"):
        assert f'tether_leases_expired_total{{outcome="{outcome}"}}' in control
    for reason in ("POLICY_DENIED", "BUDGET_EXHAUSTED"):
        assert f'tether_denials_total{{reason="{reason}"}}' in sidecar


def test_bad_metrics_address_is_a_config_error() -> None:
    """A malformed --metrics-listen is refused with a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="metrics_listen"):
        serve("no-port-here")

"""The process's own counters: counted without prometheus_client, exported in its form."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from tether.metrics import Counter, Gauge, Registry, serve


def test_counters_count_and_are_read_by_exposed_name() -> None:
    """Series are made by label values (positional or by name) and read as `<name>_total`."""
    reg = Registry()
    calls = Counter("t_calls", "Calls.", ["tool", "status"], registry=reg)
    calls.labels("echo", "ok").inc()
    calls.labels(tool="echo", status="ok").inc(2)
    plain = Counter("t_plain", "Plain.", registry=reg)
    plain.inc()
    gauge = Gauge("t_flight", "In flight.", ["server"], registry=reg)
    gauge.labels(server="s").inc()
    gauge.labels(server="s").dec(3)
    assert reg.get_sample_value("t_calls_total", {"tool": "echo", "status": "ok"}) == 3.0
    assert reg.get_sample_value("t_calls_total", {"tool": "echo", "status": "error"}) is None
    assert reg.get_sample_value("t_plain_total") == 1.0
    assert reg.get_sample_value("t_flight", {"server": "s"}) == -2.0


def test_counters_refuse_what_prometheus_refuses() -> None:
    """A negative increment, a missing or extra label and a second registration are errors."""
    reg = Registry()
    calls = Counter("t_calls", "Calls.", ["tool"], registry=reg)
    with pytest.raises(ValueError, match="non-negative"):
        calls.labels("echo").inc(-1)
    with pytest.raises(ValueError, match="one value for each"):
        calls.labels()
    with pytest.raises(ValueError, match="one value for each"):
        calls.labels(tool="echo", status="ok")
    with pytest.raises(ValueError, match="one value for each"):
        calls.labels("echo", tool="echo")
    with pytest.raises(ValueError, match="twice"):
        Counter("t_calls", "Again.", registry=reg)


def test_served_endpoint_exports_counters_in_prometheus_form() -> None:
    """/metrics shows a sidecar counter as `_total` with its labels, and hides control ones."""
    from tether import metrics

    metrics.TOOL_CALLS.labels("unit-echo", "ok").inc()
    endpoint = serve("127.0.0.1:0", server="sidecar")
    try:
        url = f"http://{endpoint.address}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        endpoint.close()
    assert "# TYPE tether_tool_calls_total counter" in text
    assert 'tether_tool_calls_total{status="ok",tool="unit-echo"}' in text
    assert 'tether_tool_calls_created{status="ok",tool="unit-echo"}' in text
    assert "tether_rpcs_in_flight" in text
    assert "tether_leases_granted" not in text
    assert "process_cpu_seconds_total" in text


def test_counting_does_not_import_prometheus_client() -> None:
    """Incrementing counters loads no prometheus_client; serving an endpoint does."""
    code = (
        "import sys\n"
        "from tether import metrics\n"
        "metrics.TOOL_CALLS.labels('echo', 'ok').inc()\n"
        "metrics.SHED.labels(server='sidecar', reason='rate').inc()\n"
        "print('prometheus_client' in sys.modules)\n"
        "metrics.serve('127.0.0.1:0').close()\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == ["False", "True"]

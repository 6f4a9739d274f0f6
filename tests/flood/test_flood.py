"""Flood tests: real control plane and sidecar processes, a flooder process, /proc RSS.

The sidecar (and the control plane) must shed what they cannot hold, with
RESOURCE_EXHAUSTED and a retry hint, keep health answering, let other callers
through, and keep memory bounded. TETHER_FLOOD_CALLS sets the flood's size
(default 10,000 header-only streams; `make flood` runs 100,000) and
TETHER_FLOOD_REPORT names a JSON file the figures are written to.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.agent import AgentClient
from tether.core.errors import Overloaded, Unavailable
from tether.testing import endpoint, spawn_control_cli, spawn_sidecar_cli

FLOOD_CALLS = int(os.environ.get("TETHER_FLOOD_CALLS", "10000"))
FLOODER = Path(__file__).with_name("flooder.py")
MAX_GROWTH_MB = 150.0
HEALTH_DEADLINE_S = 1.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to stop (SIGTERM, then SIGKILL) when the test ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Watch:
    """Health probes and memory samples taken while a flood runs."""

    pid: int
    health_target: str
    health_creds: grpc.ChannelCredentials | None = None
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    slow: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the watch began, latency) of every probe slower than 200 ms."""
    t_start: float = field(default_factory=time.monotonic)

    async def run(self) -> None:
        """Checks health every 100 ms (deadline 1 s) and samples RSS until stopped."""
        options = [("grpc.use_local_subchannel_pool", 1)]  # a probe's own connection
        if self.health_creds is None:
            channel = grpc.aio.insecure_channel(self.health_target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.health_target, self.health_creds, options)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = await stub.Check(
                        health_pb2.HealthCheckRequest(), timeout=HEALTH_DEADLINE_S
                    )
                    took = time.monotonic() - t0
                    self.latencies.append(took)
                    if took > 0.2:  # when, in the flood, health was slow (diagnostics)
                        self.slow.append((round(t0 - self.t_start, 2), round(took, 3)))
                    if resp.status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures.append(f"status {resp.status}")
                except grpc.aio.AioRpcError as err:
                    self.failures.append(f"{err.code().name}: {err.details()}")
                self.rss.append(rss_mb(self.pid))
                await asyncio.sleep(0.1)
        finally:
            await channel.close()


def flooder(
    tmp: Path, target: str, calls: int, *, connections: int = 50, **opts: Any
) -> tuple[subprocess.Popen[bytes], Path]:
    """Starts tests/flood/flooder.py; returns the process and its status file."""
    status = tmp / f"flood-{time.monotonic_ns()}.json"
    argv = [sys.executable, str(FLOODER), "--target", target, "--calls", str(calls),
            "--connections", str(connections), "--status-file", str(status)]  # fmt: skip
    for key, value in opts.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    log = (tmp / "flooder.log").open("ab")
    return subprocess.Popen(argv, stdout=log, stderr=log), status


def read_status(status: Path) -> dict[str, Any] | None:
    """The flooder's last report, if any (it replaces the file in one rename)."""
    try:
        report: dict[str, Any] = json.loads(status.read_text())
    except FileNotFoundError:
        return None
    return report


async def phase(status: Path, proc: subprocess.Popen[bytes], want: str) -> dict[str, Any]:
    """Waits for the flooder to report `want` ("holding" or "done")."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        report = read_status(status)
        if report is not None and report["phase"] in (want, "done"):
            return report
        if proc.poll() not in (None, 0):
            raise AssertionError(f"flooder exited with {proc.returncode}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"flooder never reached {want}")


def record(name: str, figures: dict[str, Any]) -> None:
    """Prints the figures and appends them to TETHER_FLOOD_REPORT, if set."""
    print(f"\n{name}: {json.dumps(figures, sort_keys=True)}")
    path = os.environ.get("TETHER_FLOOD_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}, sort_keys=True) + "\n")


async def baseline_rss(pid: int) -> float:
    """The process's RSS once it has settled (the least of a few samples)."""
    samples = []
    for _ in range(5):
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.2)
    return min(samples)


async def idle_stream_round(
    tmp_path: Path,
    sidecar: subprocess.Popen[bytes],
    target: str,
    alice: AgentClient,
    mallory_token: str,
) -> tuple[dict[str, Any], Watch, dict[str, int], dict[str, Any], dict[str, Any]]:
    """One flood of header-only streams from mallory while alice works and health is
    probed; returns the flooder's reports, the watch and alice's results."""
    watch = Watch(sidecar.pid, target)
    watcher = asyncio.create_task(watch.run())
    alice_results: dict[str, int] = {}

    async def alice_works() -> None:
        while not watch.stop.is_set():
            try:
                await alice.claim("work", wait_ms=0)
                alice_results["ok"] = alice_results.get("ok", 0) + 1
            except Exception as err:  # any refusal of the innocent agent fails the test
                name = type(err).__name__
                alice_results[name] = alice_results.get(name, 0) + 1
            await asyncio.sleep(0.05)

    worker = asyncio.create_task(alice_works())
    proc, status = flooder(  # 10,000 streams open at once, over 100 connections
        tmp_path, target, FLOOD_CALLS, connections=100, window=10_000, token=mallory_token
    )
    try:
        holding = await phase(status, proc, "holding")
        done = await phase(status, proc, "done")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    await asyncio.sleep(3)
    watch.stop.set()
    await asyncio.gather(watcher, worker)
    return holding, watch, alice_results, done, {"during": max(watch.rss)}


async def test_sidecar_flood_of_idle_streams(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Header-only streams from one agent are shed with RESOURCE_EXHAUSTED and a retry
    hint; health answers within 1 s throughout; another agent's calls all succeed; the
    sidecar grows by less than 150 MB, and repeated floods add nothing lasting (no leak:
    what the allocator keeps after one flood is reused by the next); TETHER_FLOOD_ROUNDS
    sets how many (3)."""
    control, address = spawn_control_cli(tmp_path)
    procs.append(control)
    sidecar, sock, tokens = spawn_sidecar_cli(tmp_path, address, agents=("alice", "mallory"))
    procs.append(sidecar)
    target = f"unix:{sock}"
    alice = AgentClient(sock, tokens["alice"].read_text().strip())
    mallory_token = tokens["mallory"].read_text().strip()
    for _ in range(20):  # warm the paths the flood and the probes use
        assert await alice.claim("work", wait_ms=0) is None
    base = await baseline_rss(sidecar.pid)

    afters: list[float] = []
    for round_no in range(1, 1 + int(os.environ.get("TETHER_FLOOD_ROUNDS", "3"))):
        holding, watch, alice_results, done, extra = await idle_stream_round(
            tmp_path, sidecar, target, alice, mallory_token
        )
        after = await baseline_rss(sidecar.pid)
        afters.append(after)
        codes = done["codes"]
        shed = codes.get("RESOURCE_EXHAUSTED", 0)
        figures = {
            "round": round_no,
            "calls": FLOOD_CALLS,
            "codes": codes,
            "hinted": done["hinted"],
            "held_idle": holding["held"],
            "rss_baseline_mb": round(base, 1),
            "rss_peak_mb": round(max(watch.rss), 1),
            "rss_while_holding_mb": round(extra["during"], 1),
            "rss_after_mb": round(after, 1),
            "health_checks": len(watch.latencies),
            "health_max_ms": round(max(watch.latencies) * 1000, 1),
            "health_failures": len(watch.failures),
            "health_failure_kinds": sorted(set(watch.failures))[:3],
            "alice": alice_results,
            "flood_opened_s": done["opened_s"],
            "flooder_max_rss_mb": done["flooder_max_rss_mb"],
            "details": done["details"],
            "codes_before_release": done["codes_before_release"],
        }
        record("sidecar_idle_streams", figures)
        # Refused by Tether (RESOURCE_EXHAUSTED, hinted) or, arriving faster than the event
        # loop takes calls, by gRPC core's backlog (CANCELLED); nothing else, nothing queued.
        before = done["codes_before_release"]
        assert set(before) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, figures
        assert sum(before.values()) + holding["held"] == FLOOD_CALLS, figures
        assert shed >= FLOOD_CALLS // 10, figures
        assert done["hinted"] == shed, "every shed call carries grpc-retry-pushback-ms"
        assert holding["held"] <= 128, "one agent holds at most max_rpcs_per_caller calls"
        assert not watch.failures, watch.failures[:5]
        assert max(watch.latencies) < HEALTH_DEADLINE_S
        assert set(alice_results) == {"ok"}, alice_results
        assert max(watch.rss) - base < MAX_GROWTH_MB, figures
    await alice.close()
    # glibc keeps freed arenas mapped, so RSS after a flood stays near its peak (it moved
    # 75 -> 119 -> 137 -> 137 -> 86 -> 124 MB over five rounds here); what matters is that
    # later, identical floods reuse that memory instead of adding to it each time.
    assert afters[-1] - max(afters[:-1]) < 15, {"rss_after_mb": [round(a, 1) for a in afters]}


async def test_sidecar_sheds_one_agents_burst_with_retry_hint(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """10,000 real calls with 500 in flight from one agent: the excess is refused at
    once (OVERLOADED, retry_after_ms), not queued; the rest are answered; health holds."""
    control, address = spawn_control_cli(tmp_path)
    procs.append(control)
    sidecar, sock, tokens = spawn_sidecar_cli(tmp_path, address, agents=("alice",))
    procs.append(sidecar)
    watch = Watch(sidecar.pid, f"unix:{sock}")
    watcher = asyncio.create_task(watch.run())
    alice = AgentClient(sock, tokens["alice"].read_text().strip())
    assert await alice.claim("work", wait_ms=0) is None  # connected: HTTP/2 settings known
    outcomes: dict[str, int] = {}
    hints: list[int] = []
    window = asyncio.Semaphore(500)

    async def one() -> None:
        async with window:
            try:
                await alice.claim("work", wait_ms=0)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except Overloaded as err:
                outcomes["overloaded"] = outcomes.get("overloaded", 0) + 1
                hints.append(int(err.metadata["retry_after_ms"]))
            except Unavailable:  # refused by gRPC core (REFUSED_STREAM) before Tether saw it
                outcomes["refused_stream"] = outcomes.get("refused_stream", 0) + 1

    try:
        await asyncio.gather(*(one() for _ in range(10_000)))
    finally:
        watch.stop.set()
        await watcher
        await alice.close()
    figures = {
        **outcomes,
        "health_max_ms": round(max(watch.latencies) * 1000, 1),
        "health_failures": len(watch.failures),
        "health_failure_kinds": sorted(set(watch.failures))[:3],
    }
    record("sidecar_burst_500_in_flight", figures)
    assert outcomes.get("overloaded", 0) > 0, figures
    assert outcomes.get("ok", 0) > 0, figures
    assert sum(outcomes.values()) == 10_000
    assert min(hints) > 0
    assert not watch.failures, watch.failures[:5]
    assert max(watch.latencies) < HEALTH_DEADLINE_S


async def test_control_plane_flood_from_one_node(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A node floods the control plane with header-only node RPCs over many connections:
    past its per-node limit they are shed (RESOURCE_EXHAUSTED with a retry hint), the rest
    are shed as idle after request_read_timeout_ms; health answers within 1 s and another
    node is served throughout."""
    long_mode = FLOOD_CALLS >= 100_000
    # The long mode runs the defaults (1,024 calls per node, idle after 10 s); the CI mode
    # a smaller per-node limit, so the calls it holds (and sheds as idle, all in the same
    # few seconds) are fewer on a machine that may be busy with other work, and sooner.
    limits = [] if long_mode else ["--max-rpcs-per-caller", "256"]
    limits += [] if long_mode else ["--request-read-timeout-ms", "3000"]
    control, address = spawn_control_cli(tmp_path, extra_args=limits)
    procs.append(control)
    ep = endpoint(address)
    flooding = await ep.node_client("flood-node")
    other = await ep.node_client("node-2")
    tls = flooding.tls
    assert tls is not None
    assert tls.cert_pem is not None
    assert tls.key_pem is not None
    (tmp_path / "ca.pem").write_bytes(tls.ca_pem)
    (tmp_path / "node.crt").write_bytes(tls.cert_pem)
    (tmp_path / "node.key").write_bytes(tls.key_pem)
    ca = ep.pki.operator_tls()
    creds = grpc.ssl_channel_credentials(ca.ca_pem, ca.key_pem, ca.cert_pem)
    watch = Watch(control.pid, address, creds)
    watcher = asyncio.create_task(watch.run())
    served: dict[str, int] = {}

    async def other_node_works() -> None:
        while not watch.stop.is_set():
            try:
                await other.acquire_lease("work", "node-2", "alice")
                served["ok"] = served.get("ok", 0) + 1
            except Exception as err:
                served[type(err).__name__] = served.get(type(err).__name__, 0) + 1
            await asyncio.sleep(0.05)

    worker = asyncio.create_task(other_node_works())
    calls = FLOOD_CALLS // 10 if long_mode else 2000
    proc, status = flooder(
        tmp_path,
        address,
        calls,
        connections=20 if long_mode else 8,
        method="/tether.v1.ControlService/RenewLease",
        ca=tmp_path / "ca.pem",
        cert=tmp_path / "node.crt",
        key=tmp_path / "node.key",
        settle_s=15 if long_mode else 5,  # past the read timeout: held calls shed as idle
        hold_s=1,
    )
    try:
        done = await phase(status, proc, "done")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        watch.stop.set()
        await asyncio.gather(watcher, worker)
        await flooding.close()
        await other.close()
    codes = done["codes"]
    figures = {
        "calls": calls,
        "codes": codes,
        "hinted": done["hinted"],
        "health_max_ms": round(max(watch.latencies) * 1000, 1),
        "health_failures": len(watch.failures),
        "health_failure_kinds": sorted(set(watch.failures))[:3],
        "other_node": served,
        "control_rss_peak_mb": round(max(watch.rss), 1),
        "slow": watch.slow[:20],
    }
    record("control_node_flood", figures)
    assert set(codes) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, figures
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, figures
    assert done["held"] == 0, "the node's idle calls were shed after request_read_timeout_ms"
    assert done["hinted"] == codes["RESOURCE_EXHAUSTED"]
    assert not watch.failures, watch.failures[:5]
    assert max(watch.latencies) < HEALTH_DEADLINE_S
    assert set(served) == {"ok"}, served

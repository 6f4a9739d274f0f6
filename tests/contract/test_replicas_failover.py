"""Failover between control-plane replicas: a sidecar given several addresses moves to a
healthy replica when its own is paused or gone, keeping the lease it holds and every
spooled receipt; it starts even while its first replica is down; the CLI does the same."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract_helpers import fresh_database

from tether.testing import endpoint, spawn_control_cli, start_sidecar
from tether.verify import verify_bundle
from tether.verify.bundle import bundle_from_proto

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]


def _dead_address() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def replicas(tmp_path: Path, url: str, n: int) -> Iterator[list[tuple[Any, str]]]:
    procs: list[tuple[Any, str]] = []
    try:
        for i in range(n):
            procs.append(spawn_control_cli(tmp_path, db=url, log_name=f"r{i}.log", vault=False))
        yield procs
    finally:
        for proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


async def _spool_drained(side: Any, timeout_s: float) -> None:
    began = time.monotonic()
    while await side.sidecar._sink.pending():
        assert time.monotonic() - began < timeout_s, "receipts not acknowledged in time"
        await asyncio.sleep(0.05)


async def test_sidecar_fails_over_keeping_its_lease_and_receipts(tmp_path: Path) -> None:
    """r1 is paused while the agent holds a lease from it: renewals, the completion and the
    receipts go through r2, new claims keep flowing there, and one ledger verifies."""
    with fresh_database() as url, replicas(tmp_path, url, 2) as procs:
        (p1, a1), (_, a2) = procs
        async with endpoint(a2).admin() as admin:
            for _ in range(12):
                await admin.submit("work", b"{}")
        async with start_sidecar(
            tmp_path,
            f"{a1},{a2}",
            node_id="node-a",
            uplink_timeout_ms=1500,
            uplink_retry_budget_ms=4000,
        ) as side:
            uplink = side.sidecar.uplink
            assert uplink.address == a1
            async with side.agent("alice") as agent:
                held = await agent.claim("work", wait_ms=5000)
                assert held is not None
                os.kill(p1.pid, signal.SIGSTOP)  # r1 freezes with our lease granted by it
                errors = 0
                done = []
                began = time.monotonic()
                while len(done) < 6:
                    try:
                        task = await agent.claim("work", wait_ms=2000)
                    except Exception:
                        errors += 1
                        assert errors <= 3, "claim errors are bounded during a replica fault"
                        continue
                    assert task is not None
                    await agent.complete(task.task_id, result=b"ok")
                    done.append(task.task_id)
                print(f"{errors} claim error(s); 6 tasks in {time.monotonic() - began:.1f}s")
                assert uplink.address == a2
                assert uplink.failovers >= 1
                # The lease r1 granted is alive on r2 (renewed there), and completes there.
                await agent.heartbeat(held.task_id)
                state, _ = await agent.complete(held.task_id, result=b"ok")
                assert state == "succeeded"
            await _spool_drained(side, 60)
            os.kill(p1.pid, signal.SIGCONT)
            async with endpoint(a2).admin() as admin:
                bundle = bundle_from_proto(await admin.export_bundle())
            report = verify_bundle(bundle, [uplink.registration.control_key])
            assert report.ok, [f.to_dict() for f in report.failures]
            assert {t.task_id for t in report.tasks} >= {held.task_id, *done}


async def test_sidecar_starts_while_its_first_replica_is_down(tmp_path: Path) -> None:
    """With the first listed replica unreachable, the sidecar enrols on the next and serves."""
    with fresh_database() as url, replicas(tmp_path, url, 1) as procs:
        (_, a1), dead = procs[0], _dead_address()
        async with endpoint(a1).admin() as admin:
            await admin.submit("work", b"{}")
        async with start_sidecar(
            tmp_path,
            f"{dead},{a1}",
            node_id="node-b",
            enroll_address=f"{_dead_address()},{endpoint(a1).enroll_address}",
        ) as side:
            assert side.sidecar.uplink.address == a1
            async with side.agent("alice") as agent:
                task = await agent.claim("work", wait_ms=5000)
                assert task is not None
                assert (await agent.complete(task.task_id, result=b"ok"))[0] == "succeeded"


def test_cli_uses_the_first_healthy_replica(tmp_path: Path) -> None:
    """TETHER_CONTROL with a dead replica first: `tether submit` goes to the live one."""
    with fresh_database() as url, replicas(tmp_path, url, 1) as procs:
        (_, a1), dead = procs[0], _dead_address()
        pki = endpoint(a1).pki
        cert, key = pki.write_operator()
        env = dict(
            os.environ,
            TETHER_CONTROL=f"{dead},{a1}",
            TETHER_TLS_CA=str(pki.dir / "ca.crt"),
            TETHER_TLS_CERT=str(cert),
            TETHER_TLS_KEY=str(key),
        )
        out = subprocess.run(
            [sys.executable, "-m", "tether.cli", "submit", "--queue", "work", "--payload", "{}"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr.decode()
        listed = subprocess.run(
            [sys.executable, "-m", "tether.cli", "tasks", "--queue", "work"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr.decode()
        assert listed.stdout.decode().count("\n") >= 1

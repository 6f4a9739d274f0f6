"""Replicas on one PostgreSQL share the policy in force: a version applied through one
replica is enforced by every replica at once (NOTIFY), and in any case within the
documented bound (`policy_max_staleness_ms`), even with the LISTEN connections killed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from contract_helpers import fresh_database

from tether.control.client import ControlClient
from tether.control.service import ControlConfig
from tether.core.errors import PolicyDenied
from tether.core.policy import parse_policy
from tether.crypto.envelopes import from_proto
from tether.crypto.leases import decode_lease
from tether.crypto.signing import SigningKey
from tether.testing import ControlHandle, default_test_policy, start_control

pytestmark = pytest.mark.postgres

BOUND_MS = 1_000


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path, url: str, n: int, bound_ms: int = BOUND_MS
) -> AsyncIterator[list[ControlHandle]]:
    """`n` replicas sharing the key, CA and database (as deployed)."""
    key = SigningKey.generate()
    cfg = ControlConfig(policy_max_staleness_ms=bound_ms)
    async with contextlib.AsyncExitStack() as stack:
        handles = [
            await stack.enter_async_context(
                start_control(
                    tmp_path / f"r{i}", key=key, db=url, vault=False, pki_dir=tmp_path / "pki",
                    config=cfg,
                )
            )
            for i in range(n)
        ]  # fmt: skip
        yield handles


def _policy(agents: tuple[str, ...], ttl_ms: int) -> str:
    """The test policy with queue "work" given its own TTL and claimable by `agents` only."""
    doc = default_test_policy(queues=("work",), agents=agents)
    return doc.replace("[queues.work]\n", f"[queues.work]\nlease_ttl_ms = {ttl_ms}\n")


async def _lease_digest(cp: ControlHandle, node: ControlClient, node_id: str) -> str:
    await cp.client.submit("work", b"{}")
    resp = await node.acquire_lease("work", node_id, "alice", wait_ms=2000)
    assert resp.HasField("task")
    return decode_lease(from_proto(resp.lease).payload).policy_digest


async def test_policy_applied_through_one_replica_is_enforced_by_all(tmp_path: Path) -> None:
    """v2 through r1 is seen by r2 and r3 by NOTIFY (well before their re-check would):
    leases carry v2's digest and TTL, and a claim v2 no longer grants is refused everywhere."""
    with fresh_database() as url:
        # A 60 s bound: only the NOTIFY can make the others see v2 within seconds.
        async with replicas(tmp_path, url, 3, bound_ms=60_000) as (r1, r2, r3):
            v1 = _policy(("alice", "bob"), 20_000)
            await r1.client.put_policy(v1)
            for r in (r2, r3):  # v1 reached every replica (they started with the default)
                await _until(lambda r=r: r.service.policy_in_force.version == 2)
            nodes = [await r.node_client(f"node-{i}") for i, r in enumerate((r1, r2, r3))]
            v2 = _policy(("alice",), 25_000)  # bob's grant revoked, another TTL
            put = await r1.client.put_policy(v2)
            digest = parse_policy(v2).digest
            for r in (r2, r3):
                await _until(lambda r=r: r.service.policy_in_force.version == put.version)
            for i, (r, node) in enumerate(zip((r1, r2, r3), nodes, strict=True)):
                assert await _lease_digest(r, node, f"node-{i}") == digest
                got = await r.client.get_policy()
                assert got.version == put.version
                with pytest.raises(PolicyDenied):  # the revoked grant is dead on every replica
                    await node.acquire_lease("work", f"node-{i}", "bob")
                task = (await r.client.submit("work", b"{}")).task
                assert task.lease_ttl_ms == 25_000  # submissions take v2's TTL too
            for node in nodes:
                await node.close()


def _kill_listeners(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'tether-control-listen%' AND datname = current_database()"
        ).fetchall()
    return len(rows)


async def test_policy_staleness_bound_holds_without_notifications(tmp_path: Path) -> None:
    """With every LISTEN connection killed as the update commits, each lease r2 signs once
    the documented bound has passed carries the new digest."""
    with fresh_database() as url:
        async with replicas(tmp_path, url, 2) as (r1, r2):
            node = await r2.node_client("node-b")
            await r1.client.put_policy(_policy(("alice",), 20_000))
            await _until(lambda: r2.service.policy_in_force.version == 2)
            for _ in range(20):
                await r1.client.submit("work", b"{}")
            assert _kill_listeners(url) == 2
            new = _policy(("alice",), 21_000)
            await r1.client.put_policy(new)
            t0 = time.monotonic()  # the update is committed
            digest = parse_policy(new).digest
            after_bound = 0
            while time.monotonic() - t0 < 3 * BOUND_MS / 1000:
                sent = time.monotonic()
                got = await _lease_digest(r2, node, "node-b")
                if sent - t0 > BOUND_MS / 1000:
                    assert got == digest, f"lease {sent - t0:.3f}s after the update is stale"
                    after_bound += 1
                await asyncio.sleep(0.05)
            assert after_bound >= 3
            await node.close()


async def _until(cond: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)

"""Two control-plane replicas on one PostgreSQL database keep ONE receipt ledger:
sidecars stream to different replicas, and either replica exports a bundle that verifies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from contract_helpers import fresh_database

from tether.crypto.signing import SigningKey
from tether.testing import start_control, start_sidecar
from tether.verify import verify_bundle
from tether.verify.bundle import Bundle, bundle_from_proto

pytestmark = pytest.mark.postgres

TASKS_PER_NODE = 3
RECEIPTS_PER_TASK = 3  # lease granted, task started, task finished


async def _work(side: Any, n: int) -> list[str]:
    """Claims and completes `n` tasks through the sidecar; every receipt acknowledged."""
    done = []
    async with side.agent("alice") as agent:
        for _ in range(n):
            task = await agent.claim("work", wait_ms=5000)
            assert task is not None
            state, pending = await agent.complete(task.task_id, result=b"ok")
            assert (state, pending) == ("succeeded", False)
            done.append(task.task_id)
    return done


def _check(bundle: Bundle, key: SigningKey, tasks: list[str]) -> None:
    report = verify_bundle(bundle, [key.public])
    assert report.ok, [f.to_dict() for f in report.failures]
    refs = [(e.leaf_index, e.envelope) for e in bundle.entries]
    assert len({env for _, env in refs}) == len(refs) == len(tasks) * RECEIPTS_PER_TASK
    assert sorted(i for i, _ in refs) == list(range(len(refs)))
    assert bundle.checkpoint.tree_size == len(refs)
    assert {t.task_id for t in report.tasks} == set(tasks)
    assert report.nodes == 2


async def test_two_replicas_one_ledger(tmp_path: Path) -> None:
    """Receipts streamed to two replicas form one tree; exports from both verify alike."""
    key = SigningKey.generate()  # replicas share the control key and CA, as deployed
    pki = tmp_path / "pki"
    with fresh_database() as url:
        async with (
            start_control(tmp_path / "r1", key=key, db=url, vault=False, pki_dir=pki) as r1,
            start_control(tmp_path / "r2", key=key, db=url, vault=False, pki_dir=pki) as r2,
            start_sidecar(tmp_path, r1.address, node_id="node-a") as side_a,
            start_sidecar(tmp_path, r2.address, node_id="node-b") as side_b,
        ):
            for _ in range(2 * TASKS_PER_NODE):
                await r1.client.submit("work", b"{}")
            done_a, done_b = await asyncio.gather(
                _work(side_a, TASKS_PER_NODE), _work(side_b, TASKS_PER_NODE)
            )
            tasks = done_a + done_b
            one = bundle_from_proto(await r1.client.export_bundle())
            two = bundle_from_proto(await r2.client.export_bundle(tasks))
            for bundle in (one, two):
                _check(bundle, key, tasks)
            assert one.checkpoint.root_hash == two.checkpoint.root_hash

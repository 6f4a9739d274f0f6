"""`transitions_then_acquire(brief=True)` refuses exactly what the full path refuses.

Differential: the same start state and the same items through both paths, on
SQLite and PostgreSQL; the refusal (type, message, index), the grants and every
task's row and lease history afterwards must be the same. Stale tokens, another
node's task, expired leases, unknown tasks, repeated task ids and mixed events.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from contract_helpers import NOW, empty_tables, sign, submit

from tether.core.errors import TetherError
from tether.core.states import Event
from tether.store.base import GrantAsk, HolderTransition, Store
from tether.store.postgres import PostgresStore
from tether.store.sqlite import SqliteStore

SCENARIOS = 60


async def _setup(store: Store) -> None:
    for i in range(7):
        # t1 and t4 have short leases: expired at the transition's time.
        await submit(store, f"t{i}", ttl=100 if i in (1, 4) else 100_000, now=NOW + i)
    await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l0", "l1", "l2"], now_ms=NOW + 10,
        sign=sign, start=True,
    )  # fmt: skip
    await store.acquire_leases(
        queue="q", node_id="n2", agent_id="a", lease_ids=["k3", "k4"], now_ms=NOW + 10,
        sign=sign, start=True,
    )  # fmt: skip


def _items(rnd: random.Random) -> list[HolderTransition]:
    events = [Event.SUCCEED] * 6 + [Event.FAIL, Event.RELEASE]
    out = []
    for _ in range(rnd.randint(1, 4)):
        task = f"t{rnd.choice([0, 0, 1, 2, 2, 3, 4, 5, 9])}"
        out.append(
            HolderTransition(
                task_id=task,
                event=rnd.choice(events),
                fencing_token=rnd.choice([1, 1, 1, 2, 0]),
                result=b"r",
                error="e" if rnd.random() < 0.5 else "",
            )
        )
    return out


async def _outcome(store: Store, items: list[HolderTransition], brief: bool) -> Any:
    then = GrantAsk(queue="q", agent_id="a", lease_ids=["m0"], sign=sign, start=True)
    try:
        done, granted = await store.transitions_then_acquire(
            node_id="n1", items=items, now_ms=NOW + 500, then=then, brief=brief
        )
        answer: Any = ("ok", [t.task_id for t, _ in granted], len(done))
    except TetherError as err:
        answer = (type(err).__name__, err.message, err.metadata.get("index"))
    rows = []
    for i in range(7):
        t = await store.get_task(f"t{i}")
        hist = [(h.kind, h.lease_id, h.outcome) for h in await store.lease_history(f"t{i}")]
        rows.append((t.state, t.fencing_token, t.node_id, t.result, t.error, t.attempt, hist))
    return answer, rows


async def _run(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rnd = random.Random(20261208)
    kinds: set[str] = set()
    for n in range(SCENARIOS):
        items = _items(rnd)
        seen = []
        for brief in (False, True):
            store: Store
            if kind == "sqlite":
                store = SqliteStore(tmp_path / f"s{n}-{brief}.db")
                await store.open()
            else:
                url = request.getfixturevalue("pg_url")
                store = PostgresStore(url)
                await store.open()
                empty_tables(url)
            try:
                await _setup(store)
                seen.append(await _outcome(store, items, brief))
            finally:
                await store.close()
        full, brief_ = seen
        # The brief path answers no ended task: everything else is the same.
        if full[0][0] == "ok":
            full = (full[0][:2], full[1])
            brief_ = (brief_[0][:2], brief_[1])
        assert brief_ == full, (n, items)
        kinds.add(full[0][0])
    # The scenarios reach every refusal and the all-SUCCEED batch path's successes.
    assert {"ok", "StaleFencingToken", "NotOwner", "LeaseExpired", "NotFound"} <= kinds, kinds


async def test_brief_refuses_and_writes_as_the_full_path_sqlite(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    await _run("sqlite", tmp_path, request)


@pytest.mark.postgres
async def test_brief_refuses_and_writes_as_the_full_path_postgres(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    await _run("postgres", tmp_path, request)

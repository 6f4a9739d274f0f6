"""The Store contract, run against every store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from contract_helpers import (
    NOW,
    execute_outside,
    lease,
    new_database,
    only_migrations_up_to,
    same_database,
    sign,
    submit,
)

from tether.core.errors import (
    AlreadyExists,
    BudgetExhausted,
    IdempotencyConflict,
    InvalidArgument,
    InvalidTransition,
    LeaseExpired,
    NotFound,
    NotOwner,
    StaleFencingToken,
)
from tether.core.states import Event, State
from tether.core.timeouts import EndReason
from tether.store.base import (
    GrantAsk,
    HolderTransition,
    JoinTokenRecord,
    LapseOutcome,
    NewTask,
    NodeRecord,
    SealedSecret,
    Store,
    TaskRecord,
    ToolCallPhase,
    ToolCallWrite,
)
from tether.store.postgres import PostgresStore
from tether.store.postgres import migration_files as pg_migrations
from tether.store.sqlite import backoff_ms
from tether.store.sqlite import migration_files as sqlite_migrations


async def test_migrations_are_applied_in_order_and_recorded(store: Store) -> None:
    """Every numbered migration file is applied once and recorded; reopening applies none."""
    files = pg_migrations() if isinstance(store, PostgresStore) else sqlite_migrations()
    versions = [v for v, _, _ in files]
    assert versions == sorted(versions)
    assert await store.applied_migrations() == versions  # type: ignore[attr-defined]
    await store.close()
    await store.open()
    assert await store.applied_migrations() == versions  # type: ignore[attr-defined]


async def test_postgres_migrations_mirror_sqlite_numbering() -> None:
    """PostgreSQL migrations use the SQLite numbers and names; only the ledger's are absent."""
    pg = {v: n for v, n, _ in pg_migrations()}
    lite = {v: n for v, n, _ in sqlite_migrations()}
    assert all(lite.get(v) == n for v, n in pg.items())
    assert all(lite[v].startswith("ledger") for v in set(lite) - set(pg))


async def test_acquire_takes_oldest_ready_and_bumps_token_and_attempt(store: Store) -> None:
    """A lease goes to the oldest ready task of the queue with token+1 and attempt+1."""
    await submit(store, "t1", now=NOW)
    await submit(store, "t2", now=NOW + 1)
    await submit(store, "other", queue="q2", now=NOW - 5)
    task = await lease(store, now=NOW + 2)
    assert (task.task_id, task.state, task.fencing_token, task.attempt) == (
        "t1",
        State.LEASED,
        1,
        1,
    )
    assert task.lease_expires_unix_ms == NOW + 2 + 1000
    history = await store.lease_history("t1")
    assert [(h.kind, h.outcome, h.envelope) for h in history] == [
        ("grant", "active", b"lease:t1:1")
    ]
    assert await store.lease_envelope("t1", 1) == b"lease:t1:1"
    assert await store.lease_envelope("t1", 2) is None


async def test_acquire_on_an_empty_queue_returns_none(store: Store) -> None:
    """AcquireLease on a queue with no ready task returns None and changes nothing."""
    await submit(store, "t1", queue="other")
    got = await store.acquire_lease(
        queue="q", node_id="n", agent_id="a", lease_id="l", now_ms=NOW, sign=sign
    )
    assert got is None


async def test_acquire_leases_grants_several_in_queue_order_in_one_call(store: Store) -> None:
    """acquire_leases grants up to one task per lease id, oldest first, each with its own
    lease id, token and signed envelope in the history; fewer when fewer are ready."""
    for i in range(3):
        await submit(store, f"t{i}", now=NOW + i)
    got = await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l0", "l1"], now_ms=NOW + 5,
        sign=sign, start=True,
    )  # fmt: skip
    assert [(t.task_id, t.lease_id, t.state, t.fencing_token) for t, _ in got] == [
        ("t0", "l0", State.RUNNING, 1),
        ("t1", "l1", State.RUNNING, 1),
    ]
    assert [e for _, e in got] == [b"lease:t0:1", b"lease:t1:1"]
    assert [h.kind for h in await store.lease_history("t1")] == ["grant"]
    for task_id, lease_id in (("t0", "l0"), ("t1", "l1")):  # each row its own grant's
        (h,) = await store.lease_history(task_id)
        assert (h.lease_id, h.fencing_token, h.kind, h.envelope, h.outcome) == (
            lease_id, 1, "grant", f"lease:{task_id}:1".encode(), "active",
        )  # fmt: skip
        assert h.created_unix_ms == NOW + 5
    rest = await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l2", "l3", "l4"], now_ms=NOW + 6,
        sign=sign,
    )  # fmt: skip
    assert [t.task_id for t, _ in rest] == ["t2"]
    none = await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l5"], now_ms=NOW + 7, sign=sign
    )
    assert none == []


async def test_transitions_apply_all_or_none_and_name_the_refused_item(store: Store) -> None:
    """transitions ends several held tasks in one transaction; when one is refused (a stale
    token) none is applied and the error's metadata names its index."""
    for i in range(3):
        await submit(store, f"t{i}", now=NOW + i)
    await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l0", "l1", "l2"], now_ms=NOW + 5,
        sign=sign, start=True,
    )  # fmt: skip
    items = [
        HolderTransition(task_id="t0", event=Event.SUCCEED, fencing_token=1, result=b"a"),
        HolderTransition(task_id="t1", event=Event.SUCCEED, fencing_token=2, result=b"b"),
        HolderTransition(task_id="t2", event=Event.FAIL, fencing_token=1, error="x"),
    ]
    with pytest.raises(StaleFencingToken) as info:
        await store.transitions(node_id="n1", items=items, now_ms=NOW + 6)
    assert info.value.metadata["index"] == "1"
    assert [(await store.get_task(f"t{i}")).state for i in range(3)] == [State.RUNNING] * 3
    items[1] = HolderTransition(task_id="t1", event=Event.SUCCEED, fencing_token=1, result=b"b")
    done = await store.transitions(
        node_id="n1", items=items, now_ms=NOW + 7, backoff_base_ms=1, backoff_cap_ms=1
    )
    assert [(t.task_id, t.state) for t in done] == [
        ("t0", State.SUCCEEDED),
        ("t1", State.SUCCEEDED),
        ("t2", State.FAILED),  # failures are not retried by default
    ]
    assert (done[0].result, done[1].result) == (b"a", b"b")
    assert [h.outcome for h in await store.lease_history("t0")] == ["finished"]


async def test_transitions_of_only_successes_answer_in_item_order(store: Store) -> None:
    """A batch of SUCCEEDs ends every task with its own result and closes each lease in the
    history, answered in the items' order; one stale token among them refuses all."""
    for i in range(4):
        await submit(store, f"t{i}", now=NOW + i)
    await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l0", "l1", "l2", "l3"],
        now_ms=NOW + 5, sign=sign, start=True,
    )  # fmt: skip
    items = [
        HolderTransition(task_id=f"t{i}", event=Event.SUCCEED, fencing_token=1, result=b"r%d" % i)
        for i in (3, 1, 0, 2)
    ]
    bad = [*items[:3], HolderTransition(task_id="t2", event=Event.SUCCEED, fencing_token=2)]
    with pytest.raises(StaleFencingToken) as info:
        await store.transitions(node_id="n1", items=bad, now_ms=NOW + 6)
    assert info.value.metadata["index"] == "3"
    assert [(await store.get_task(f"t{i}")).state for i in range(4)] == [State.RUNNING] * 4
    done = await store.transitions(node_id="n1", items=items, now_ms=NOW + 7)
    assert [(t.task_id, t.state, t.result) for t in done] == [
        ("t3", State.SUCCEEDED, b"r3"),
        ("t1", State.SUCCEEDED, b"r1"),
        ("t0", State.SUCCEEDED, b"r0"),
        ("t2", State.SUCCEEDED, b"r2"),
    ]
    for i in range(4):
        assert [h.outcome for h in await store.lease_history(f"t{i}")] == ["finished"]
    with pytest.raises(InvalidTransition):
        await store.transitions(node_id="n1", items=items[:2], now_ms=NOW + 8)


async def test_transitions_then_acquire_ends_and_grants_in_one_transaction(store: Store) -> None:
    """transitions_then_acquire ends a holder's tasks and grants the next ones together;
    when an end is refused nothing is ended and nothing is granted (the queue is untouched)."""
    for i in range(5):
        await submit(store, f"t{i}", now=NOW + i)
    await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l0", "l1"], now_ms=NOW + 5,
        sign=sign, start=True,
    )  # fmt: skip
    then = GrantAsk(queue="q", agent_id="a", lease_ids=["m0", "m1"], sign=sign, start=True)
    stale = [
        HolderTransition(task_id="t0", event=Event.SUCCEED, fencing_token=1),
        HolderTransition(task_id="t1", event=Event.SUCCEED, fencing_token=9),
    ]
    with pytest.raises(StaleFencingToken) as info:
        await store.transitions_then_acquire(node_id="n1", items=stale, now_ms=NOW + 6, then=then)
    assert info.value.metadata["index"] == "1"
    assert [(await store.get_task(f"t{i}")).state for i in range(5)] == [State.RUNNING] * 2 + [
        State.QUEUED
    ] * 3
    assert await store.lease_history("t2") == []
    good = [
        HolderTransition(task_id="t0", event=Event.SUCCEED, fencing_token=1, result=b"a"),
        HolderTransition(task_id="t1", event=Event.FAIL, fencing_token=1, error="x"),
    ]
    done, granted = await store.transitions_then_acquire(
        node_id="n1", items=good, now_ms=NOW + 7, then=then
    )
    assert [(t.task_id, t.state) for t in done] == [("t0", State.SUCCEEDED), ("t1", State.FAILED)]
    assert [(t.task_id, t.lease_id, t.state, t.fencing_token) for t, _ in granted] == [
        ("t2", "m0", State.RUNNING, 1),
        ("t3", "m1", State.RUNNING, 1),
    ]
    assert [e for _, e in granted] == [b"lease:t2:1", b"lease:t3:1"]
    assert [h.outcome for h in await store.lease_history("t0")] == ["finished"]
    assert [(h.kind, h.lease_id) for h in await store.lease_history("t3")] == [("grant", "m1")]
    last = [HolderTransition(task_id="t2", event=Event.SUCCEED, fencing_token=1)]
    more = GrantAsk(queue="q", agent_id="a", lease_ids=["m2", "m3", "m4"], sign=sign)
    done, granted = await store.transitions_then_acquire(
        node_id="n1", items=last, now_ms=NOW + 8, then=more
    )
    assert [t.task_id for t in done] == ["t2"]
    assert [(t.task_id, t.state) for t, _ in granted] == [("t4", State.LEASED)]


async def test_transitions_then_acquire_brief_writes_the_same_and_reads_no_end_back(
    store: Store,
) -> None:
    """With `brief` the ends and grants are written as without it (results, history,
    refusals with their index, all or nothing), but the ended tasks are not returned."""
    for i in range(7):
        await submit(store, f"t{i}", now=NOW + i)
    await store.acquire_leases(
        queue="q", node_id="n1", agent_id="a", lease_ids=["l0", "l1", "l2"], now_ms=NOW + 8,
        sign=sign, start=True,
    )  # fmt: skip
    then = GrantAsk(queue="q", agent_id="a", lease_ids=["m0", "m1"], sign=sign, start=True)
    stale = [
        HolderTransition(task_id="t0", event=Event.SUCCEED, fencing_token=1),
        HolderTransition(task_id="t1", event=Event.SUCCEED, fencing_token=1),
        HolderTransition(task_id="t2", event=Event.SUCCEED, fencing_token=7),
    ]
    with pytest.raises(StaleFencingToken) as info:
        await store.transitions_then_acquire(
            node_id="n1", items=stale, now_ms=NOW + 9, then=then, brief=True
        )
    assert info.value.metadata["index"] == "2"
    assert [(await store.get_task(f"t{i}")).state for i in range(4)] == [State.RUNNING] * 3 + [
        State.QUEUED
    ]
    assert await store.lease_history("t3") == []
    succeed = [
        HolderTransition(task_id=f"t{i}", event=Event.SUCCEED, fencing_token=1, result=b"r%d" % i)
        for i in (1, 0)
    ]
    done, granted = await store.transitions_then_acquire(
        node_id="n1", items=succeed, now_ms=NOW + 10, then=then, brief=True
    )
    assert done == []
    assert [(t.task_id, t.lease_id, t.state) for t, _ in granted] == [
        ("t3", "m0", State.RUNNING),
        ("t4", "m1", State.RUNNING),
    ]
    for i in (0, 1):
        task = await store.get_task(f"t{i}")
        assert (task.state, task.result, task.lease_expires_unix_ms) == (
            State.SUCCEEDED,
            b"r%d" % i,
            0,
        )
        assert [h.outcome for h in await store.lease_history(f"t{i}")] == ["finished"]
    mixed = [
        HolderTransition(task_id="t2", event=Event.FAIL, fencing_token=1, error="x"),
        HolderTransition(task_id="t3", event=Event.SUCCEED, fencing_token=1, result=b"ok"),
    ]
    more = GrantAsk(queue="q", agent_id="a", lease_ids=["m2"], sign=sign)
    done, granted = await store.transitions_then_acquire(
        node_id="n1", items=mixed, now_ms=NOW + 11, then=more, brief=True
    )
    assert done == []
    assert [(t.task_id, t.state) for t, _ in granted] == [("t5", State.LEASED)]
    assert [(await store.get_task(t)).state for t in ("t2", "t3")] == [
        State.FAILED,
        State.SUCCEEDED,
    ]
    with pytest.raises(InvalidTransition) as info:
        await store.transitions_then_acquire(
            node_id="n1", items=succeed, now_ms=NOW + 12, then=more, brief=True
        )
    assert info.value.metadata["index"] == "0"
    assert (await store.get_task("t6")).state is State.QUEUED


async def test_acquire_with_start_grants_running_in_one_write(store: Store) -> None:
    """start=True grants the task RUNNING (token+1, attempt+1, same history); SUCCEED follows."""
    await submit(store, "t1")
    got = await store.acquire_lease(
        queue="q", node_id="n1", agent_id="a", lease_id="l", now_ms=NOW, sign=sign, start=True
    )
    assert got is not None
    task, envelope = got
    assert (task.task_id, task.state, task.fencing_token, task.attempt) == (
        "t1",
        State.RUNNING,
        1,
        1,
    )
    assert (envelope, task.lease_expires_unix_ms) == (b"lease:t1:1", NOW + 1000)
    history = await store.lease_history("t1")
    assert [(h.kind, h.outcome, h.fencing_token) for h in history] == [("grant", "active", 1)]
    with pytest.raises(InvalidTransition):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW + 1
        )
    done = await store.transition(
        task_id="t1",
        event=Event.SUCCEED,
        fencing_token=1,
        node_id="n1",
        now_ms=NOW + 2,
        result=b"ok",
    )
    assert (done.state, done.result) == (State.SUCCEEDED, b"ok")
    assert [h.outcome for h in await store.lease_history("t1")] == ["finished"]


async def test_count_tasks_by_state_counts_every_state_in_one_query(store: Store) -> None:
    """The metrics aggregate matches the tasks actually stored, state by state."""
    assert await store.count_tasks_by_state() == {}
    for i in range(4):
        await submit(store, f"t{i}")
    await lease(store)
    await lease(store)
    assert await store.count_tasks_by_state() == {State.QUEUED: 2, State.LEASED: 2}


async def test_acquire_breaks_ties_in_submission_order(store: Store) -> None:
    """Tasks submitted in the same millisecond are leased in submission order."""
    for i in range(5):
        await submit(store, f"t{i}", now=NOW)
    assert [(await lease(store)).task_id for _ in range(5)] == [f"t{i}" for i in range(5)]


async def test_acquire_skips_tasks_in_backoff(store: Store) -> None:
    """A task whose not_before lies in the future is not leased yet."""
    await submit(store, "t1")
    await lease(store)
    await store.sweep_lapsed(now_ms=NOW + 5000, backoff_base_ms=1000, backoff_cap_ms=10_000)
    none = await store.acquire_lease(
        queue="q", node_id="n", agent_id="a", lease_id="l2", now_ms=NOW + 5500, sign=sign
    )
    assert none is None
    again = await lease(store, now=NOW + 6000)
    assert (again.fencing_token, again.attempt) == (2, 2)


async def test_idempotent_submit_returns_the_first_task(store: Store) -> None:
    """A repeat submission with the same key returns the first task; other content conflicts."""
    new = NewTask(queue="q", payload=b"x", max_attempts=3, lease_ttl_ms=1000, idempotency_key="k")
    first, created = await store.submit_task(new, "t1", NOW)
    again, created2 = await store.submit_task(new, "t2", NOW + 1)
    assert created
    assert not created2
    assert again.task_id == first.task_id
    with pytest.raises(IdempotencyConflict):
        await store.submit_task(
            NewTask(
                queue="q", payload=b"y", max_attempts=3, lease_ttl_ms=1000, idempotency_key="k"
            ),
            "t3",
            NOW,
        )


async def test_concurrent_idempotent_submits_create_one_task(store: Store) -> None:
    """Many concurrent submissions with one idempotency key create exactly one task."""
    new = NewTask(queue="q", payload=b"x", max_attempts=3, lease_ttl_ms=1000, idempotency_key="k")
    results = await asyncio.gather(*(store.submit_task(new, f"t{i}", NOW) for i in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({t.task_id for t, _ in results}) == 1
    assert len(await store.list_tasks(queue="q", state=None, after_seq=0, limit=100)) == 1


async def test_get_and_list_tasks_page_in_creation_order(store: Store) -> None:
    """list_tasks pages by seq and filters by queue and state; get_task names a missing task."""
    for i in range(5):
        await submit(store, f"t{i}", queue="q" if i % 2 == 0 else "r", now=NOW + i)
    await lease(store, now=NOW + 10)
    page = await store.list_tasks(queue="", state=None, after_seq=0, limit=3)
    assert [t.task_id for t in page] == ["t0", "t1", "t2"]
    rest = await store.list_tasks(queue="", state=None, after_seq=page[-1].seq, limit=10)
    assert [t.task_id for t in rest] == ["t3", "t4"]
    queued_q = await store.list_tasks(queue="q", state=State.QUEUED, after_seq=0, limit=10)
    assert [t.task_id for t in queued_q] == ["t2", "t4"]
    assert (await store.get_task("t0")).state is State.LEASED
    with pytest.raises(NotFound):
        await store.get_task("nope")


async def test_transition_refusals_name_the_reason(store: Store) -> None:
    """Stale token, wrong node, lapsed lease, bad state and unknown task each get their error."""
    await submit(store, "t1")
    await lease(store)
    with pytest.raises(StaleFencingToken, match="current token is 1"):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=7, node_id="n1", now_ms=NOW
        )
    with pytest.raises(NotOwner):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=1, node_id="n2", now_ms=NOW
        )
    with pytest.raises(InvalidTransition):
        await store.transition(
            task_id="t1", event=Event.SUCCEED, fencing_token=1, node_id="n1", now_ms=NOW
        )
    with pytest.raises(LeaseExpired):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW + 1000
        )
    with pytest.raises(NotFound):
        await store.transition(
            task_id="nope", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW
        )
    with pytest.raises(InvalidTransition):
        await store.transition(
            task_id="t1", event=Event.CANCEL, fencing_token=1, node_id="n1", now_ms=NOW
        )


async def test_holder_runs_a_task_to_success(store: Store) -> None:
    """START then SUCCEED stores the result and closes the lease as finished."""
    await submit(store, "t1")
    await lease(store)
    running = await store.transition(
        task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW + 1
    )
    assert running.state is State.RUNNING
    done = await store.transition(
        task_id="t1",
        event=Event.SUCCEED,
        fencing_token=1,
        node_id="n1",
        now_ms=NOW + 2,
        result=b"ok",
    )
    assert (done.state, done.result, done.lease_expires_unix_ms) == (State.SUCCEEDED, b"ok", 0)
    assert [h.outcome for h in await store.lease_history("t1")] == ["finished"]
    assert await store.next_lease_expiry() is None


async def test_release_requeues_for_another_holder(store: Store) -> None:
    """RELEASE puts the task back in the queue; the next lease has a higher token."""
    await submit(store, "t1")
    await lease(store)
    back = await store.transition(
        task_id="t1", event=Event.RELEASE, fencing_token=1, node_id="n1", now_ms=NOW + 1
    )
    assert (back.state, back.node_id) == (State.QUEUED, "")
    again = await lease(store, node="n2", now=NOW + 2)
    assert (again.fencing_token, again.node_id) == (2, "n2")
    assert [h.outcome for h in await store.lease_history("t1")] == ["released", "active"]


async def test_release_counts_against_max_attempts(store: Store) -> None:
    """A released attempt counts like a lapsed one: with attempts spent the task expires
    instead of running once more (a graceful restart releases every lease)."""
    await submit(store, "t1", max_attempts=1)
    await lease(store)
    back = await store.transition(
        task_id="t1", event=Event.RELEASE, fencing_token=1, node_id="n1", now_ms=NOW + 1
    )
    assert (back.state, back.attempt, back.max_attempts) == (State.EXPIRED, 1, 1)
    assert (
        await store.acquire_lease(
            queue="q", node_id="n2", agent_id="a", lease_id="l2", now_ms=NOW + 2, sign=sign
        )
        is None
    )


async def test_only_one_of_concurrent_conflicting_writers_wins(store: Store) -> None:
    """Of many concurrent SUCCEED/FAIL/RELEASE calls on one running task, exactly one wins."""
    await submit(store, "t1")
    await lease(store)
    await store.transition(
        task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW
    )
    events = [Event.SUCCEED, Event.FAIL, Event.RELEASE] * 10
    results = await asyncio.gather(
        *(
            store.transition(task_id="t1", event=e, fencing_token=1, node_id="n1", now_ms=NOW)
            for e in events
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, TaskRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, InvalidTransition) for r in results if r not in winners)


async def test_renew_extends_a_live_lease_only(store: Store) -> None:
    """Renewal moves the expiry under the same token and is refused once the lease lapsed."""
    await submit(store, "t1")
    await lease(store)
    task, envelope = await store.renew_lease(
        task_id="t1", fencing_token=1, node_id="n1", now_ms=NOW + 500, sign=sign
    )
    assert (task.fencing_token, task.lease_expires_unix_ms) == (1, NOW + 1500)
    assert envelope == b"lease:t1:1"
    assert [h.kind for h in await store.lease_history("t1")] == ["grant", "renew"]
    with pytest.raises(LeaseExpired):
        await store.renew_lease(
            task_id="t1", fencing_token=1, node_id="n1", now_ms=NOW + 1500, sign=sign
        )
    await store.sweep_lapsed(now_ms=NOW + 1500, backoff_base_ms=1, backoff_cap_ms=1)
    with pytest.raises(LeaseExpired, match="lapsed"):
        await store.renew_lease(
            task_id="t1", fencing_token=1, node_id="n1", now_ms=NOW + 1501, sign=sign
        )


async def test_cancel_ends_a_task_once(store: Store) -> None:
    """Cancel works on a leased task, closes its lease, and is refused on a terminal task."""
    await submit(store, "t1")
    await lease(store)
    canceled = await store.cancel_task("t1", "operator", NOW + 1)
    assert (canceled.state, canceled.error) == (State.CANCELED, "operator")
    assert [h.outcome for h in await store.lease_history("t1")] == ["canceled"]
    with pytest.raises(InvalidTransition):
        await store.cancel_task("t1", "again", NOW + 2)
    with pytest.raises(NotFound):
        await store.cancel_task("nope", "x", NOW)
    with pytest.raises(InvalidTransition):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW + 3
        )


async def test_sweep_requeues_with_backoff_then_expires(store: Store) -> None:
    """A lapsed lease requeues with exponential backoff until max_attempts, then expires."""
    await submit(store, "t1", max_attempts=2)
    await lease(store)
    assert await store.next_lease_expiry() == NOW + 1000
    assert await store.sweep_lapsed(now_ms=NOW + 999, backoff_base_ms=100, backoff_cap_ms=150) == []
    [out] = await store.sweep_lapsed(now_ms=NOW + 1000, backoff_base_ms=100, backoff_cap_ms=150)
    assert out.state is State.QUEUED
    assert out.not_before_unix_ms == NOW + 1000 + 100
    await lease(store, now=NOW + 2000)
    [out] = await store.sweep_lapsed(now_ms=NOW + 3000, backoff_base_ms=100, backoff_cap_ms=150)
    assert out.state is State.EXPIRED
    assert [h.outcome for h in await store.lease_history("t1")] == ["lapsed", "lapsed"]


async def test_lapse_release_and_cancel_each_store_one_control_receipt(store: Store) -> None:
    """Each end the control plane decides stores the control receipt made of it in the same
    write, with the ended lease's last signed grant, or none when no lease was live."""
    ends: list[tuple[LapseOutcome, bytes]] = []

    def sign_end(end: LapseOutcome, lease: bytes) -> bytes:
        ends.append((end, lease))
        return f"end:{end.task_id}:{end.reason.name}:{len(ends)}".encode()

    await submit(store, "t1", max_attempts=2)
    await lease(store)
    await store.sweep_lapsed(
        now_ms=NOW + 1000, backoff_base_ms=1, backoff_cap_ms=1, sign_end=sign_end
    )
    await lease(store, now=NOW + 2000)
    await store.transition(
        task_id="t1",
        event=Event.RELEASE,
        fencing_token=2,
        node_id="n1",
        now_ms=NOW + 2001,
        error="shutting down",
        sign_end=sign_end,
    )
    await submit(store, "t2")
    await store.cancel_task("t2", "never mind", NOW + 3000, sign_end=sign_end)
    facts = [(e.reason, e.task_id, e.fencing_token, e.state, lease) for e, lease in ends]
    assert facts == [
        (EndReason.HEARTBEAT_TIMEOUT, "t1", 1, State.QUEUED, b"lease:t1:1"),
        (EndReason.RELEASED, "t1", 2, State.EXPIRED, b"lease:t1:2"),
        (EndReason.CANCELED, "t2", 0, State.CANCELED, b""),
    ]
    assert ends[1][0].note == "shutting down"
    assert ends[2][0].note == "never mind"
    assert await store.control_receipts("t1") == [
        b"end:t1:HEARTBEAT_TIMEOUT:1",
        b"end:t1:RELEASED:2",
    ]
    assert await store.control_receipts("t2") == [b"end:t2:CANCELED:3"]


async def test_a_refused_end_stores_no_control_receipt(store: Store) -> None:
    """A release under a stale token changes nothing and stores no control receipt."""
    await submit(store, "t1")
    await lease(store)
    with pytest.raises(StaleFencingToken):
        await store.transition(
            task_id="t1",
            event=Event.RELEASE,
            fencing_token=7,
            node_id="n1",
            now_ms=NOW + 1,
            sign_end=lambda end, lease: b"x",
        )
    assert await store.control_receipts("t1") == []


def test_backoff_doubles_and_caps() -> None:
    """Backoff is base * 2**(attempt-1), capped."""
    assert [backoff_ms(a, 100, 500) for a in (1, 2, 3, 4, 100)] == [100, 200, 400, 500, 500]


async def test_commits_survive_reopen(store: Store) -> None:
    """Acknowledged writes are in the database after the store is reopened."""
    await submit(store, "t1")
    await lease(store)
    await store.close()
    again = same_database(store)
    await again.open()
    try:
        task = await again.get_task("t1")
        assert (task.state, task.fencing_token) == (State.LEASED, 1)
    finally:
        await again.close()
        await store.open()  # the fixture closes it


async def test_nodes_are_put_and_replaced_by_id(store: Store) -> None:
    """A node is found by id, active by default; putting it again replaces every field."""
    await store.put_node(NodeRecord("n1", b"k" * 32, b"cert", NOW))
    assert await store.get_node("n1") == NodeRecord("n1", b"k" * 32, b"cert", NOW, "active", "", 0)
    replaced = NodeRecord("n1", b"j" * 32, b"cert2", NOW + 1, "revoked", "rekeyed", NOW + 1)
    await store.put_node(replaced)
    assert await store.get_node("n1") == replaced
    assert await store.get_node("n2") is None


async def test_node_status_is_set_and_nodes_are_listed_by_id(store: Store) -> None:
    """set_node_status stores status, reason and time; list_nodes returns all nodes by id."""
    ids = ["n2", "n10", "B", "a"]
    for i, node_id in enumerate(ids):
        await store.put_node(NodeRecord(node_id, bytes([i]) * 32, b"cert", NOW + i))
    listed = await store.list_nodes()
    assert [n.node_id for n in listed] == sorted(ids)  # byte order in every dialect
    assert {n.status for n in listed} == {"active"}
    revoked = await store.set_node_status("n2", "revoked", "key compromised", NOW + 9)
    assert revoked == NodeRecord(
        "n2", bytes([0]) * 32, b"cert", NOW, "revoked", "key compromised", NOW + 9
    )
    assert await store.get_node("n2") == revoked
    assert [n for n in await store.list_nodes() if n.status == "revoked"] == [revoked]
    again = await store.set_node_status("n2", "active", "reinstated", NOW + 10)
    assert again is not None
    assert (again.status, again.status_reason, again.updated_unix_ms) == (
        "active",
        "reinstated",
        NOW + 10,
    )
    assert await store.set_node_status("nope", "revoked", "x", NOW) is None
    assert await store.list_nodes() == sorted(
        [*(n for n in listed if n.node_id != "n2"), again], key=lambda n: n.node_id
    )


async def test_unknown_node_status_is_refused(store: Store) -> None:
    """set_node_status refuses a status other than active or revoked and changes nothing."""
    await store.put_node(NodeRecord("n1", b"k" * 32, b"cert", NOW))
    with pytest.raises(InvalidArgument):
        await store.set_node_status("n1", "paused", "", NOW + 1)
    assert await store.get_node("n1") == NodeRecord("n1", b"k" * 32, b"cert", NOW)


def test_node_and_join_token_records_check_their_values() -> None:
    """A node status, join token purpose or expiry outside what the records allow is refused."""
    with pytest.raises(ValueError, match="status"):
        NodeRecord("n1", b"k" * 32, b"cert", NOW, status="paused")
    with pytest.raises(ValueError, match="purpose"):
        JoinTokenRecord("sha", "n1", "login", NOW, NOW + 1)
    with pytest.raises(ValueError, match="expire"):
        JoinTokenRecord("sha", "n1", "enroll", NOW, NOW)


def _join(sha: str = "sha-j", node_id: str = "n1", purpose: str = "enroll") -> JoinTokenRecord:
    """A join token for `node_id` issued at NOW that expires at NOW + 1000."""
    return JoinTokenRecord(sha, node_id, purpose, NOW, NOW + 1000)


async def test_join_token_is_consumed_once(store: Store) -> None:
    """A join token is consumed once, marked used at that time; a second use gets None."""
    await store.put_join_token(_join(purpose="rekey"))
    got = await store.consume_join_token("sha-j", "n1", NOW + 10)
    assert got == JoinTokenRecord("sha-j", "n1", "rekey", NOW, NOW + 1000, NOW + 10)
    assert await store.consume_join_token("sha-j", "n1", NOW + 11) is None
    assert await store.consume_join_token("unknown", "n1", NOW + 11) is None


async def test_join_token_of_another_node_is_refused(store: Store) -> None:
    """A join token presented for another node is refused and stays usable by its own node."""
    await store.put_join_token(_join(node_id="n1"))
    assert await store.consume_join_token("sha-j", "n2", NOW + 1) is None
    got = await store.consume_join_token("sha-j", "n1", NOW + 2)
    assert got is not None
    assert got.used_unix_ms == NOW + 2


async def test_expired_join_token_is_refused(store: Store) -> None:
    """A join token is refused from its expiry time on, without being marked used."""
    await store.put_join_token(_join())
    assert await store.consume_join_token("sha-j", "n1", NOW + 1000) is None
    assert await store.consume_join_token("sha-j", "n1", NOW + 5000) is None
    got = await store.consume_join_token("sha-j", "n1", NOW + 999)  # nothing was changed
    assert got is not None
    assert got.used_unix_ms == NOW + 999


async def test_join_token_hash_is_stored_once(store: Store) -> None:
    """A second join token with a stored SHA-256 is refused and the first one is kept."""
    await store.put_join_token(_join(node_id="n1"))
    with pytest.raises(AlreadyExists):
        await store.put_join_token(_join(node_id="n2"))
    assert await store.consume_join_token("sha-j", "n2", NOW + 1) is None
    assert await store.consume_join_token("sha-j", "n1", NOW + 1) is not None


async def test_concurrent_consumers_of_one_join_token_have_one_winner(store: Store) -> None:
    """Ten concurrent consumers of one join token, over two stores on one database: one wins."""
    await store.put_join_token(_join())
    other = same_database(store)
    await other.open()
    try:
        results = await asyncio.gather(
            *((store, other)[i % 2].consume_join_token("sha-j", "n1", NOW + 1) for i in range(10))
        )
    finally:
        await other.close()
    assert [r for r in results if r is not None] == [
        JoinTokenRecord("sha-j", "n1", "enroll", NOW, NOW + 1000, NOW + 1)
    ]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_upgrade_from_0005_keeps_nodes_as_active(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migrating a database at 0005 keeps its node rows, each active, and drops the token index."""
    with new_database(kind, tmp_path) as make_store:
        with monkeypatch.context() as patch:
            only_migrations_up_to(patch, 5)
            old = make_store()
            await old.open()
            assert await old.applied_migrations() == [1, 2, 3, 4, 5]
            await old.close()
        for node_id, token in (("n2", "sha-2"), ("n1", "sha-1")):
            execute_outside(
                old,
                "INSERT INTO nodes (node_id, public_key, certificate, token_sha256,"
                " registered_unix_ms) VALUES (?, ?, ?, ?, ?)",
                (node_id, b"k" * 32, f"cert-{node_id}".encode(), token, NOW),
            )
        new = make_store()
        await new.open()
        try:
            assert (await new.applied_migrations())[:6] == [1, 2, 3, 4, 5, 6]
            assert await new.list_nodes() == [
                NodeRecord("n1", b"k" * 32, b"cert-n1", NOW, "active", "", 0),
                NodeRecord("n2", b"k" * 32, b"cert-n2", NOW, "active", "", 0),
            ]
            # Every write now puts '' in the old token column: it is no longer unique.
            await new.put_node(NodeRecord("n3", b"j" * 32, b"c", NOW + 1))
            await new.put_node(NodeRecord("n4", b"j" * 32, b"c", NOW + 1))
            assert [n.node_id for n in await new.list_nodes()] == ["n1", "n2", "n3", "n4"]
            await new.put_join_token(_join())
            assert await new.consume_join_token("sha-j", "n1", NOW + 1) is not None
        finally:
            await new.close()


async def test_policies_and_sealed_secrets_are_versioned(store: Store) -> None:
    """Policies and secrets get increasing versions; the latest is returned by default."""
    p1 = await store.put_policy("a", "d1", NOW)
    p2 = await store.put_policy("b", "d2", NOW)
    assert (p1.version, p2.version) == (1, 2)
    latest = await store.get_policy()
    assert latest is not None
    assert latest.document == "b"
    first = await store.get_policy(1)
    assert first is not None
    assert first.document == "a"
    by_digest = await store.get_policy_by_digest("d1")
    assert by_digest is not None
    assert by_digest.version == 1
    assert await store.get_policy(9) is None
    sec = SealedSecret("api", 0, "kek1", b"dek", b"nonce", b"ct", NOW)
    assert await store.put_secret(sec) == 1
    assert await store.put_secret(sec) == 2
    got = await store.get_secret("api")
    assert got is not None
    assert (got.version, got.ciphertext) == (2, b"ct")
    v1 = await store.get_secret("api", 1)
    assert v1 is not None
    assert v1.version == 1
    assert await store.get_secret("other") is None


async def test_concurrent_versioned_puts_get_distinct_versions(store: Store) -> None:
    """Concurrent policy and secret puts each get their own version, none is lost."""
    policies = await asyncio.gather(*(store.put_policy(f"p{i}", f"d{i}", NOW) for i in range(10)))
    assert sorted(p.version for p in policies) == list(range(1, 11))

    def sealer(version: int) -> SealedSecret:
        return SealedSecret("api", version, "kek1", b"dek", b"n", f"ct{version}".encode(), NOW)

    versions = await asyncio.gather(*(store.put_sealed_secret("api", sealer) for _ in range(10)))
    assert sorted(versions) == list(range(1, 11))
    got = await store.get_secret("api", 7)
    assert got is not None
    assert got.ciphertext == b"ct7"


async def test_rewrap_is_all_or_nothing(store: Store) -> None:
    """rewrap_secrets changes every returned row, and none when the callback raises."""
    for name in ("a", "b"):
        await store.put_secret(SealedSecret(name, 0, "old", b"dek", b"n", b"ct", NOW))

    def fail_on_b(s: SealedSecret) -> SealedSecret | None:
        if s.name == "b":
            raise RuntimeError("boom")
        return SealedSecret(s.name, s.version, "new", b"dek2", b"n2", b"ct2", s.created_unix_ms)

    with pytest.raises(RuntimeError):
        await store.rewrap_secrets(fail_on_b)
    a = await store.get_secret("a")
    assert a is not None
    assert a.kek_id == "old"

    def rewrap(s: SealedSecret) -> SealedSecret | None:
        if s.kek_id == "new":
            return None
        return SealedSecret(s.name, s.version, "new", b"dek2", b"n2", b"ct2", s.created_unix_ms)

    assert await store.rewrap_secrets(rewrap) == 2
    assert await store.rewrap_secrets(rewrap) == 0
    b = await store.get_secret("b")
    assert b is not None
    assert (b.kek_id, b.wrapped_dek, b.ciphertext) == ("new", b"dek2", b"ct2")


async def test_secret_versions_are_listed_without_their_sealed_bytes(store: Store) -> None:
    """list_secret_versions gives name, version, KEK id and time of every version, in order."""
    assert await store.list_secret_versions() == []
    await store.put_secret(SealedSecret("b", 0, "k1", b"dek", b"n", b"ct", NOW))
    await store.put_secret(SealedSecret("a", 0, "k1", b"dek", b"n", b"ct", NOW))
    await store.put_secret(SealedSecret("a", 0, "k2", b"dek", b"n", b"ct", NOW + 1))
    listed = await store.list_secret_versions()
    assert [(v.name, v.version, v.kek_id, v.created_unix_ms) for v in listed] == [
        ("a", 1, "k1", NOW),
        ("a", 2, "k2", NOW + 1),
        ("b", 1, "k1", NOW),
    ]
    assert not any(hasattr(v, "ciphertext") or hasattr(v, "wrapped_dek") for v in listed)


async def test_check_live_lease_names_why_not(store: Store) -> None:
    """check_live_lease returns the task for the holder and refuses others with the reason."""
    await submit(store, "t1")
    await lease(store)
    task = await store.check_live_lease(task_id="t1", fencing_token=1, node_id="n1", now_ms=NOW)
    assert task.task_id == "t1"
    with pytest.raises(StaleFencingToken):
        await store.check_live_lease(task_id="t1", fencing_token=2, node_id="n1", now_ms=NOW)
    with pytest.raises(NotOwner):
        await store.check_live_lease(task_id="t1", fencing_token=1, node_id="n2", now_ms=NOW)
    with pytest.raises(LeaseExpired):
        await store.check_live_lease(task_id="t1", fencing_token=1, node_id="n1", now_ms=NOW + 1000)


async def _budget_task(store: Store, limit: int) -> None:
    new = NewTask(queue="q", payload=b"p", max_attempts=3, lease_ttl_ms=1000)
    if limit:
        new = NewTask(
            queue="q", payload=b"p", max_attempts=3, lease_ttl_ms=1000, budget_limit_micros=limit
        )
    await store.submit_task(new, "t1", NOW)
    await lease(store)


def _reserve(store: Store, rid: str, amount: int, *, token: int = 1, node: str = "n1"):  # type: ignore[no-untyped-def]
    return store.reserve_budget(
        task_id="t1",
        fencing_token=token,
        node_id=node,
        reservation_id=rid,
        amount_micros=amount,
        default_limit_micros=1000,
        now_ms=NOW,
    )


async def test_budget_reserve_and_settle(store: Store) -> None:
    """Reservations count against the limit, repeat idempotently, and settle to actual cost."""
    await _budget_task(store, 0)  # the default limit, 1000, applies
    state = await _reserve(store, "r1", 600)
    assert (state.limit_micros, state.spent_micros, state.existed) == (1000, 600, False)
    again = await _reserve(store, "r1", 600)
    assert (again.spent_micros, again.existed) == (600, True)
    with pytest.raises(IdempotencyConflict):
        await _reserve(store, "r1", 700)
    with pytest.raises(BudgetExhausted) as exc:
        await _reserve(store, "r2", 500)
    assert exc.value.metadata["remaining_micros"] == "400"
    settle = dict(task_id="t1", reservation_id="r1", default_limit_micros=1000, now_ms=NOW + 1)
    with pytest.raises(InvalidArgument):
        await store.settle_budget(fencing_token=1, node_id="n1", actual_micros=601, **settle)  # type: ignore[arg-type]
    with pytest.raises(StaleFencingToken):
        await store.settle_budget(fencing_token=2, node_id="n1", actual_micros=100, **settle)  # type: ignore[arg-type]
    with pytest.raises(NotOwner):
        await store.settle_budget(fencing_token=1, node_id="n2", actual_micros=100, **settle)  # type: ignore[arg-type]
    done = await store.settle_budget(fencing_token=1, node_id="n1", actual_micros=100, **settle)  # type: ignore[arg-type]
    assert (done.spent_micros, done.remaining_micros, done.existed) == (100, 900, False)
    repeat = await store.settle_budget(fencing_token=1, node_id="n1", actual_micros=100, **settle)  # type: ignore[arg-type]
    assert (repeat.spent_micros, repeat.existed) == (100, True)
    with pytest.raises(IdempotencyConflict):
        await store.settle_budget(fencing_token=1, node_id="n1", actual_micros=50, **settle)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await store.settle_budget(
            fencing_token=1,
            node_id="n1",
            actual_micros=1,
            **{**settle, "reservation_id": "x"},  # type: ignore[arg-type]
        )


async def test_concurrent_reservations_never_overspend(store: Store) -> None:
    """Of many concurrent reservations, only as many as the limit covers succeed."""
    await _budget_task(store, 1000)
    results = await asyncio.gather(
        *(_reserve(store, f"r{i}", 300) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert all(isinstance(r, BudgetExhausted) for r in results if isinstance(r, Exception))
    assert (await store.get_task("t1")).budget_spent_micros == 900


async def test_budget_needs_the_live_lease(store: Store) -> None:
    """A reservation under a stale token or after the lease lapsed is refused."""
    await _budget_task(store, 0)
    with pytest.raises(StaleFencingToken):
        await _reserve(store, "r1", 1, token=5)
    await store.cancel_task("t1", "stop", NOW)
    with pytest.raises(InvalidTransition):
        await _reserve(store, "r1", 1)


def _write(phase: ToolCallPhase, **kw: object) -> ToolCallWrite:
    base: dict[str, object] = dict(
        task_id="t1",
        fencing_token=1,
        node_id="n1",
        idempotency_key="k1",
        tool="http",
        arguments_sha256="aa",
        phase=phase,
    )
    base.update(kw)
    return ToolCallWrite(**base)  # type: ignore[arg-type]


async def test_tool_call_records_start_then_complete_once(store: Store) -> None:
    """STARTED inserts once, COMPLETED fills it in once, and another tool/arguments conflict."""
    await submit(store, "t1")
    await lease(store)
    rec, existed = await store.record_tool_call(_write(ToolCallPhase.STARTED), NOW)
    assert (rec.phase, existed) == (ToolCallPhase.STARTED, False)
    rec, existed = await store.record_tool_call(_write(ToolCallPhase.STARTED), NOW)
    assert existed
    done, existed = await store.record_tool_call(
        _write(ToolCallPhase.COMPLETED, result=b"out", status="ok", cost_micros=5), NOW + 1
    )
    assert (done.phase, done.result, done.cost_micros, existed) == (
        ToolCallPhase.COMPLETED,
        b"out",
        5,
        True,
    )
    again, existed = await store.record_tool_call(
        _write(ToolCallPhase.COMPLETED, result=b"other", status="ok"), NOW + 2
    )
    assert (again.result, existed) == (b"out", True)
    with pytest.raises(IdempotencyConflict):
        await store.record_tool_call(_write(ToolCallPhase.STARTED, arguments_sha256="bb"), NOW)
    with pytest.raises(StaleFencingToken):
        await store.record_tool_call(
            _write(ToolCallPhase.STARTED, idempotency_key="k2", fencing_token=9), NOW
        )
    looked = await store.lookup_tool_call("t1", "k1")
    assert looked is not None
    assert looked.status == "ok"
    assert await store.lookup_tool_call("t1", "nope") is None


async def test_a_lost_lease_still_records_its_own_started_call(store: Store) -> None:
    """After its lease lapsed, the node that wrote STARTED under token 1 records the outcome it
    knows (once; a repeat returns it); another node, or another token, cannot."""
    await submit(store, "t1", max_attempts=2)
    await lease(store)
    await store.record_tool_call(_write(ToolCallPhase.STARTED), NOW)
    await store.sweep_lapsed(now_ms=NOW + 1000, backoff_base_ms=1, backoff_cap_ms=1)
    done = _write(ToolCallPhase.COMPLETED, result=b"known", status="ok")
    for late in (done.__class__(**{**done.__dict__, "node_id": "n2"}),):
        with pytest.raises(LeaseExpired):
            await store.record_tool_call(late, NOW + 1001)
    rec, existed = await store.record_tool_call(done, NOW + 1002)
    assert (rec.phase, rec.result, rec.fencing_token, existed) == (
        ToolCallPhase.COMPLETED,
        b"known",
        1,
        True,
    )
    again, _ = await store.record_tool_call(done, NOW + 1003)
    assert again.result == b"known"
    await lease(store, node="n2", now=NOW + 2000)  # attempt 2 finds the outcome
    found, existed = await store.record_tool_call(
        _write(ToolCallPhase.STARTED, fencing_token=2, node_id="n2", take_over=True), NOW + 2001
    )
    assert (found.phase, found.result, existed) == (ToolCallPhase.COMPLETED, b"known", True)


async def test_a_taken_over_call_refuses_the_stale_holder(store: Store) -> None:
    """Once a new lease took a STARTED key over (it re-runs an idempotent tool), the earlier
    holder can no longer record an outcome for it; the new holder can."""
    await submit(store, "t1", max_attempts=3)
    await lease(store)
    await store.record_tool_call(_write(ToolCallPhase.STARTED), NOW)
    await store.sweep_lapsed(now_ms=NOW + 1000, backoff_base_ms=1, backoff_cap_ms=1)
    await lease(store, node="n2", now=NOW + 2000)
    mine = _write(ToolCallPhase.STARTED, fencing_token=2, node_id="n2")
    taken, existed = await store.record_tool_call(
        mine.__class__(**{**mine.__dict__, "take_over": True}), NOW + 2002
    )
    assert (taken.phase, taken.fencing_token, taken.node_id, existed) == (
        ToolCallPhase.STARTED,
        2,
        "n2",
        True,
    )
    with pytest.raises(StaleFencingToken):
        await store.record_tool_call(
            _write(ToolCallPhase.COMPLETED, result=b"stale", status="ok"), NOW + 2003
        )
    rec, _ = await store.record_tool_call(
        _write(ToolCallPhase.COMPLETED, fencing_token=2, node_id="n2", result=b"new", status="ok"),
        NOW + 2004,
    )
    assert (rec.result, rec.fencing_token) == (b"new", 2)


async def test_concurrent_tool_call_starts_record_once(store: Store) -> None:
    """Concurrent STARTED records of one key insert exactly one row."""
    await submit(store, "t1")
    await lease(store)
    results = await asyncio.gather(
        *(store.record_tool_call(_write(ToolCallPhase.STARTED), NOW) for _ in range(10))
    )
    assert sum(not existed for _, existed in results) == 1


async def test_the_submitter_is_recorded_and_scopes_idempotency_keys(store: Store) -> None:
    """submitted_by is stored and read back by get and list; the same idempotency key from
    another operator is a conflict, never the first operator's task."""
    new = NewTask(
        queue="q",
        payload=b"x",
        max_attempts=3,
        lease_ttl_ms=1000,
        idempotency_key="k",
        submitted_by="submitter:alice-ci",
    )
    first, created = await store.submit_task(new, "t1", NOW)
    assert created
    assert first.submitted_by == "submitter:alice-ci"
    assert (await store.get_task("t1")).submitted_by == "submitter:alice-ci"
    listed = await store.list_tasks(queue="q", state=None, after_seq=0, limit=10)
    assert [t.submitted_by for t in listed] == ["submitter:alice-ci"]
    again, created2 = await store.submit_task(new, "t2", NOW + 1)
    assert (again.task_id, created2) == ("t1", False)
    mallory = NewTask(
        queue="q",
        payload=b"x",
        max_attempts=3,
        lease_ttl_ms=1000,
        idempotency_key="k",
        submitted_by="submitter:mallory-ci",
    )
    with pytest.raises(IdempotencyConflict):
        await store.submit_task(mallory, "t3", NOW + 2)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_upgrade_to_0011_leaves_old_tasks_without_a_submitter(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task stored before migration 0011 reads back with submitted_by "" (admin-only)."""
    with new_database(kind, tmp_path) as make_store:
        with monkeypatch.context() as patch:
            only_migrations_up_to(patch, 10)
            old = make_store()
            await old.open()
            assert (await old.applied_migrations())[-1] == 10
            await old.close()
        execute_outside(
            old,
            "INSERT INTO tasks (task_id, queue, state, payload, max_attempts, lease_ttl_ms,"
            " created_unix_ms, updated_unix_ms, not_before_unix_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("t-old", "q", int(State.QUEUED), b"x", 3, 1000, NOW, NOW, NOW),
        )
        new = make_store()
        await new.open()
        try:
            assert 11 in await new.applied_migrations()
            assert (await new.get_task("t-old")).submitted_by == ""
        finally:
            await new.close()

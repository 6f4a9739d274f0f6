"""The Store contract, run against every store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest
from contract_helpers import NOW, lease, same_database, sign, submit

from tether.core.errors import (
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
from tether.store.base import (
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


async def test_nodes_are_found_by_id_and_token_and_reenrolment_rotates(store: Store) -> None:
    """A node is found by id and token hash; re-registering replaces its token."""
    await store.put_node(NodeRecord("n1", b"k" * 32, b"cert", "sha-a", NOW))
    got = await store.get_node_by_token("sha-a")
    assert got is not None
    assert (got.node_id, got.public_key, got.certificate) == ("n1", b"k" * 32, b"cert")
    await store.put_node(NodeRecord("n1", b"j" * 32, b"cert2", "sha-b", NOW + 1))
    assert await store.get_node_by_token("sha-a") is None
    again = await store.get_node("n1")
    assert again is not None
    assert (again.public_key, again.token_sha256) == (b"j" * 32, "sha-b")
    assert await store.get_node("n2") is None


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


async def test_concurrent_tool_call_starts_record_once(store: Store) -> None:
    """Concurrent STARTED records of one key insert exactly one row."""
    await submit(store, "t1")
    await lease(store)
    results = await asyncio.gather(
        *(store.record_tool_call(_write(ToolCallPhase.STARTED), NOW) for _ in range(10))
    )
    assert sum(not existed for _, existed in results) == 1

"""Time limits and the retry policy in the Store contract, against SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from contract_helpers import NOW, lease

from tether.core.errors import LeaseExpired
from tether.core.states import Event, State
from tether.core.timeouts import EndReason, RetryPolicy
from tether.store.base import NewTask, Store

BASE, CAP = 1_000, 60_000


async def new(
    store: Store,
    task_id: str,
    *,
    attempts: int = 3,
    ttl: int = 10_000,
    attempt_timeout: int = 0,
    deadline: int = 0,
    to_start: int = 0,
    retry: RetryPolicy | None = None,
) -> None:
    await store.submit_task(
        NewTask(
            queue="q",
            payload=b"{}",
            max_attempts=attempts,
            lease_ttl_ms=ttl,
            attempt_timeout_ms=attempt_timeout,
            deadline_ms=deadline,
            schedule_to_start_ms=to_start,
            retry=retry,
        ),
        task_id,
        NOW,
    )


async def sweep(store: Store, now: int) -> list[tuple[str, State, EndReason]]:
    out = await store.sweep_lapsed(now_ms=now, backoff_base_ms=BASE, backoff_cap_ms=CAP)
    out += await store.sweep_limits(now_ms=now, backoff_base_ms=BASE, backoff_cap_ms=CAP)
    return [(o.task_id, o.state, o.reason) for o in out]


async def outcome(store: Store, task_id: str, token: int) -> str:
    return [h.outcome for h in await store.lease_history(task_id) if h.fencing_token == token][-1]


async def test_limits_and_retry_policy_round_trip(store: Store) -> None:
    """Submitted limits and retry fields come back as given; the deadline is absolute."""
    retry = RetryPolicy(500, 3.0, 4_000, 4, ("bad-input", "quota"), True)
    await new(
        store, "t1", attempts=4, attempt_timeout=2_000, deadline=9_000, to_start=3_000, retry=retry
    )
    t = await store.get_task("t1")
    assert (t.attempt_timeout_ms, t.deadline_unix_ms, t.schedule_to_start_ms) == (
        2_000,
        NOW + 9_000,
        3_000,
    )
    assert t.retry_policy() == retry
    assert t.end_reason == 0


async def test_deadline_expires_a_running_task_and_fences_its_lease(store: Store) -> None:
    """Past the deadline a running task is expired with reason DEADLINE; its token is refused."""
    await new(store, "t1", deadline=5_000)
    task = await lease(store)
    await store.transition(
        task_id="t1", event=Event.START, fencing_token=task.fencing_token, node_id="n1", now_ms=NOW
    )
    assert await sweep(store, NOW + 4_999) == []
    assert await sweep(store, NOW + 5_000) == [("t1", State.EXPIRED, EndReason.DEADLINE)]
    t = await store.get_task("t1")
    assert (t.state, t.end_reason) == (State.EXPIRED, EndReason.DEADLINE)
    assert await outcome(store, "t1", task.fencing_token) == "deadline"
    with pytest.raises(LeaseExpired):
        await store.transition(
            task_id="t1",
            event=Event.SUCCEED,
            fencing_token=task.fencing_token,
            node_id="n1",
            now_ms=NOW + 5_001,
        )


async def test_deadline_expires_a_queued_task(store: Store) -> None:
    """A task never leased still ends at its deadline (schedule-to-close)."""
    await new(store, "t1", deadline=2_000)
    assert await sweep(store, NOW + 2_000) == [("t1", State.EXPIRED, EndReason.DEADLINE)]
    assert (
        await store.acquire_lease(
            queue="q",
            node_id="n1",
            agent_id="a",
            lease_id="l",
            now_ms=NOW + 2_001,
            sign=lambda t: b"",
        )
        is None
    )


async def test_attempt_timeout_requeues_with_the_retry_delay_then_expires(store: Store) -> None:
    """An attempt held past its timeout, renewals or not, is requeued after the policy's delay."""
    retry = RetryPolicy(700, 3.0, 60_000, 2)
    await new(store, "t1", attempts=2, attempt_timeout=3_000, retry=retry)
    first = await lease(store)
    await store.renew_lease(
        task_id="t1",
        fencing_token=first.fencing_token,
        node_id="n1",
        now_ms=NOW + 2_500,
        sign=lambda t: b"r",
    )
    assert await sweep(store, NOW + 3_000) == [("t1", State.QUEUED, EndReason.ATTEMPT_TIMEOUT)]
    t = await store.get_task("t1")
    assert (t.not_before_unix_ms, t.end_reason) == (NOW + 3_000 + 700, EndReason.ATTEMPT_TIMEOUT)
    assert await outcome(store, "t1", first.fencing_token) == "attempt_timeout"
    second = await lease(store, now=NOW + 3_700)
    assert second.attempt_started_unix_ms == NOW + 3_700
    assert await sweep(store, NOW + 6_700) == [("t1", State.EXPIRED, EndReason.ATTEMPT_TIMEOUT)]


async def test_schedule_to_start_expires_a_task_left_waiting(store: Store) -> None:
    """A ready task not leased within its schedule-to-start timeout expires; a leased one not."""
    await new(store, "waits", to_start=1_000)
    await new(store, "taken", to_start=1_000)
    taken = await lease(store)  # the older of the two by submission order
    assert taken.task_id == "waits"
    assert await sweep(store, NOW + 1_000) == [
        ("taken", State.EXPIRED, EndReason.SCHEDULE_TO_START_TIMEOUT)
    ]
    assert (await store.get_task("waits")).state is State.LEASED


async def test_lapse_backs_off_by_the_tasks_retry_policy(store: Store) -> None:
    """A lapsed lease requeues after the task's own delay (coefficient and cap), not the default."""
    await new(store, "t1", attempts=4, ttl=1_000, retry=RetryPolicy(300, 4.0, 2_000, 4))
    now = NOW
    delays = []
    for _ in range(3):
        got = await lease(store, now=now)
        now += 1_000
        assert await sweep(store, now) == [("t1", State.QUEUED, EndReason.HEARTBEAT_TIMEOUT)]
        t = await store.get_task("t1")
        delays.append(t.not_before_unix_ms - now)
        now = t.not_before_unix_ms
        assert got.attempt == len(delays)
    assert delays == [300, 1_200, 2_000]


async def test_failure_is_retried_only_when_the_policy_says_and_not_if_non_retryable(
    store: Store,
) -> None:
    """FAIL requeues under retry_failures; a non-retryable mark or listed type fails at once."""
    retry = RetryPolicy(500, 2.0, 10_000, 3, ("bad-input",), True)
    for task_id in ("plain", "marked", "listed"):
        await new(store, task_id, retry=retry)
    await new(store, "default")  # no retry policy: failures are final
    got = {}
    for _ in range(4):
        t = await lease(store)
        got[t.task_id] = t
    plain = await store.transition(
        task_id="plain",
        event=Event.FAIL,
        fencing_token=got["plain"].fencing_token,
        node_id="n1",
        now_ms=NOW + 10,
        error="flaky",
        failure_type="io",
    )
    assert (plain.state, plain.end_reason, plain.not_before_unix_ms) == (
        State.QUEUED,
        EndReason.FAILED,
        NOW + 10 + 500,
    )
    assert await outcome(store, "plain", got["plain"].fencing_token) == "failed"
    marked = await store.transition(
        task_id="marked",
        event=Event.FAIL,
        fencing_token=got["marked"].fencing_token,
        node_id="n1",
        now_ms=NOW + 10,
        non_retryable=True,
    )
    assert (marked.state, marked.end_reason) == (State.FAILED, EndReason.NON_RETRYABLE)
    listed = await store.transition(
        task_id="listed",
        event=Event.FAIL,
        fencing_token=got["listed"].fencing_token,
        node_id="n1",
        now_ms=NOW + 10,
        failure_type="bad-input",
    )
    assert (listed.state, listed.end_reason) == (State.FAILED, EndReason.NON_RETRYABLE)
    default = await store.transition(
        task_id="default",
        event=Event.FAIL,
        fencing_token=got["default"].fencing_token,
        node_id="n1",
        now_ms=NOW + 10,
    )
    assert (default.state, default.end_reason) == (State.FAILED, EndReason.FAILED)


async def test_cancel_and_success_record_their_end_reason(store: Store) -> None:
    """A cancel records CANCELED and a success SUCCEEDED on the task."""
    await new(store, "c")
    await new(store, "s")
    c, s = await lease(store), await lease(store)
    await store.transition(
        task_id="s", event=Event.START, fencing_token=s.fencing_token, node_id="n1", now_ms=NOW
    )
    done = await store.transition(
        task_id="s", event=Event.SUCCEED, fencing_token=s.fencing_token, node_id="n1", now_ms=NOW
    )
    canceled = await store.cancel_task("c", "operator", NOW)
    assert (done.end_reason, canceled.end_reason) == (EndReason.SUCCEEDED, EndReason.CANCELED)
    assert c.task_id == "c"


async def test_limits_are_judged_by_the_databases_clock_on_postgresql(store: Store) -> None:
    """With a real clock the sweeper asks PostgreSQL for the time (replicas never compare
    their own clocks); SQLite has none, and the control plane's clock decides."""
    import time

    from tether.control.service import ControlService
    from tether.crypto.signing import SigningKey
    from tether.store.postgres import PostgresStore

    service = ControlService(store, SigningKey.generate())
    now, clock = await service.sweep_clock()
    if isinstance(store, PostgresStore):
        assert clock == "database"
        assert abs(now - time.time() * 1000) < 60_000  # same host: the same wall time, roughly
        assert await store.database_now_ms() is not None
    else:
        assert clock == "control-plane"
        assert await store.database_now_ms() is None

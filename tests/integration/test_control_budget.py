"""Budgets: atomic ReserveBudget and SettleBudget over real gRPC and real SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import POLICY, leased

from tether.control.client import ControlClient
from tether.core.clock import FakeClock
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
from tether.core.states import Event
from tether.testing import ControlHandle, start_control


@pytest.fixture
async def cp(tmp_path: Path) -> Any:
    async with start_control(tmp_path, clock=FakeClock()) as handle:
        await handle.client.put_policy(POLICY)  # queue "work": budget_micros = 1000
        yield handle


@pytest.fixture
async def node(cp: ControlHandle) -> Any:
    client = await cp.node_client("node-1")
    yield client
    await client.close()


async def test_twenty_concurrent_reservations_against_room_for_ten(
    cp: ControlHandle, node: ControlClient
) -> None:
    """20 concurrent ReserveBudget calls of 100 against a 1000 budget: exactly 10 succeed."""
    task = await leased(cp, node)
    # Several channels, all authenticated as the holder node (its client certificate).
    clients = [ControlClient(cp.address, tls=node.tls) for _ in range(4)]

    async def reserve(i: int) -> int | BudgetExhausted:
        client = clients[i % len(clients)]
        try:
            return await client.reserve_budget(
                task.task_id, task.fencing_token, f"r{i}", 100, "node-1"
            )
        except BudgetExhausted as err:
            return err

    try:
        results = await asyncio.gather(*(reserve(i) for i in range(20)))
    finally:
        for c in clients:
            await c.close()
    ok = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, BudgetExhausted)]
    assert len(ok) == 10
    assert len(refused) == 10
    assert {r.metadata["remaining_micros"] for r in refused} == {"0"}
    assert sorted(ok) == list(range(0, 1000, 100))
    got = await cp.client.get_task(task.task_id)
    assert got.task.budget_spent_micros == 1000


async def test_exhaustion_reports_what_remains(cp: ControlHandle, node: ControlClient) -> None:
    """A reservation that does not fit is RESOURCE_EXHAUSTED with the remaining amount."""
    task = await leased(cp, node)
    assert await node.reserve_budget(task.task_id, task.fencing_token, "a", 700, "node-1") == 300
    with pytest.raises(BudgetExhausted, match="300 of 1000 remaining") as info:
        await node.reserve_budget(task.task_id, task.fencing_token, "b", 301, "node-1")
    assert info.value.metadata["remaining_micros"] == "300"
    assert await node.reserve_budget(task.task_id, task.fencing_token, "c", 300, "node-1") == 0


async def test_task_limit_overrides_the_policy_and_no_policy_budget_means_free_calls_only(
    cp: ControlHandle, node: ControlClient
) -> None:
    """A task's own limit wins over the queue's; a queue without a budget allows no spend."""
    task = await leased(cp, node, budget_limit_micros=50)
    with pytest.raises(BudgetExhausted):
        await node.reserve_budget(task.task_id, task.fencing_token, "a", 51, "node-1")
    assert await node.reserve_budget(task.task_id, task.fencing_token, "b", 50, "node-1") == 0
    other = await leased(cp, node, queue="other")  # policy: budget_micros = 0
    with pytest.raises(BudgetExhausted):
        await node.reserve_budget(other.task_id, other.fencing_token, "a", 1, "node-1")


async def test_reservation_id_is_idempotent(cp: ControlHandle, node: ControlClient) -> None:
    """A repeated reservation counts once; the same id with another amount is a conflict."""
    task = await leased(cp, node)
    for _ in range(3):
        assert (
            await node.reserve_budget(task.task_id, task.fencing_token, "r1", 400, "node-1") == 600
        )
    with pytest.raises(IdempotencyConflict):
        await node.reserve_budget(task.task_id, task.fencing_token, "r1", 500, "node-1")
    assert (await cp.client.get_task(task.task_id)).task.budget_spent_micros == 400


async def test_settle_refunds_the_difference_even_after_the_lease_ended(
    cp: ControlHandle, node: ControlClient
) -> None:
    """Settling below the reservation returns the rest, also once the lease was released."""
    task = await leased(cp, node)
    tid, tok = task.task_id, task.fencing_token
    await node.reserve_budget(tid, tok, "r1", 600, "node-1")
    await node.reserve_budget(tid, tok, "r2", 300, "node-1")
    assert await node.settle_budget(tid, tok, "r1", 250, "node-1") == 450
    await node.transition(tid, tok, Event.RELEASE, "node-1")
    assert await node.settle_budget(tid, tok, "r2", 0, "node-1") == 750
    assert await node.settle_budget(tid, tok, "r2", 0, "node-1") == 750  # repeat: same answer
    with pytest.raises(IdempotencyConflict):
        await node.settle_budget(tid, tok, "r2", 10, "node-1")
    assert (await cp.client.get_task(tid)).task.budget_spent_micros == 250


async def test_settle_refusals(cp: ControlHandle, node: ControlClient) -> None:
    """Over-settling, unknown ids, other tokens and other nodes are refused."""
    task = await leased(cp, node)
    tid, tok = task.task_id, task.fencing_token
    await node.reserve_budget(tid, tok, "r1", 100, "node-1")
    with pytest.raises(InvalidArgument) as info:
        await node.settle_budget(tid, tok, "r1", 101, "node-1")
    assert info.value.field == "actual_micros"
    with pytest.raises(NotFound):
        await node.settle_budget(tid, tok, "nope", 1, "node-1")
    with pytest.raises(StaleFencingToken):
        await node.settle_budget(tid, tok + 1, "r1", 1, "node-1")
    other = await cp.node_client("node-2")
    try:
        with pytest.raises(NotOwner):
            await other.settle_budget(tid, tok, "r1", 1, "node-2")
    finally:
        await other.close()


async def test_reserve_needs_the_live_lease(cp: ControlHandle, node: ControlClient) -> None:
    """Stale token, lapsed lease and a released task are FAILED_PRECONDITION, and spend nothing."""
    task = await leased(cp, node)
    tid, tok = task.task_id, task.fencing_token
    with pytest.raises(StaleFencingToken):
        await node.reserve_budget(tid, tok + 1, "r", 1, "node-1")
    clock = cp.service.clock
    assert isinstance(clock, FakeClock)
    clock.advance(task.lease_ttl_ms)
    with pytest.raises(LeaseExpired):
        await node.reserve_budget(tid, tok, "r", 1, "node-1")
    await cp.service.sweep()
    clock.advance(120_000)
    again = (await node.acquire_lease("work", "node-1", "alice")).task
    await node.transition(tid, again.fencing_token, Event.RELEASE, "node-1")
    with pytest.raises(InvalidTransition):
        await node.reserve_budget(tid, again.fencing_token, "r", 1, "node-1")
    assert (await cp.client.get_task(tid)).task.budget_spent_micros == 0


async def test_budget_edge_validation(cp: ControlHandle, node: ControlClient) -> None:
    """Non-positive amounts, negative actual costs and bad reservation ids name their field."""
    for args, field in (
        (("t", 1, "r", 0, "node-1"), "amount_micros"),
        (("t", 1, "r", -5, "node-1"), "amount_micros"),
        (("t", 1, "", 5, "node-1"), "reservation_id"),
        (("t", 1, "a b", 5, "node-1"), "reservation_id"),
        (("t", 0, "r", 5, "node-1"), "fencing_token"),
    ):
        with pytest.raises(InvalidArgument) as info:
            await node.reserve_budget(*args)
        assert info.value.field == field
    with pytest.raises(InvalidArgument) as info:
        await node.settle_budget("t", 1, "r", -1, "node-1")
    assert info.value.field == "actual_micros"

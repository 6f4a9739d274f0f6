"""Property: every (state, event) pair is applied per the transition table or refused,
over a real gRPC control plane on a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.control.service import ControlService
from tether.core.clock import FakeClock
from tether.core.states import HOLDER_EVENTS, TRANSITIONS, Event, State, next_state
from tether.crypto.pki import Role
from tether.grpcutil.tls import ClientTLS
from tether.testing import default_test_policy, start_control
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc

MAX_QUEUES = 1000

T = TypeVar("T")
TTL_MS = 1000
DEADLINE_MS = 2000
NODE = "prop-node"


class Harness:
    """A control plane on its own event-loop thread, driven by a synchronous gRPC client."""

    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.admin_tls: ClientTLS
        self.node_tls: ClientTLS
        self._thread = threading.Thread(target=self._run, args=(tmp,), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)
        # Operator RPCs on an admin's channel, node RPCs on the enrolled node's.
        self.channel = grpc.secure_channel(self.address, self.admin_tls.credentials())
        self.stub = pb_grpc.ControlServiceStub(self.channel)
        self.node_channel = grpc.secure_channel(self.address, self.node_tls.credentials())
        self.node_stub = pb_grpc.ControlServiceStub(self.node_channel)
        self.queues = itertools.count()

    def _run(self, tmp: Path) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            # Every pair runs alone in a fresh queue; the policy must declare them all.
            queues = [f"q{i}" for i in range(MAX_QUEUES)]
            policy = default_test_policy(queues=queues, agents=["a"])
            async with start_control(tmp, clock=self.clock, policy=policy) as cp:
                node = await cp.node_client(NODE)
                await node.close()
                assert node.tls is not None
                self.address, self.service = cp.address, cp.service
                self.admin_tls, self.node_tls = cp.pki.operator_tls(Role.ADMIN), node.tls
                self._ready.set()
                await self._stop.wait()

        self.loop.run_until_complete(main())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.channel.close()
        self.node_channel.close()
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def svc(self) -> ControlService:
        return self.service

    # -- driving a fresh task into a state ------------------------------------------

    def get(self, task_id: str) -> pb.Task:
        return self.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).task

    def acquire(self, queue: str) -> pb.AcquireLeaseResponse:
        return self.node_stub.AcquireLease(
            pb.AcquireLeaseRequest(queue=queue, node_id=NODE, agent_id="a")
        )

    def holder(self, task: pb.Task, event: Event) -> pb.Task:
        return self.node_stub.TransitionTask(
            pb.TransitionTaskRequest(
                task_id=task.task_id,
                fencing_token=max(task.fencing_token, 1),
                event=int(event),  # type: ignore[arg-type]
                node_id=NODE,
            )
        ).task

    def task_in(self, state: State, *, deadline: bool = False) -> pb.Task:
        """A new task (alone in its queue) brought to `state` through real RPCs.

        With `deadline`, its lease outlives a deadline of DEADLINE_MS (TIME_OUT's pairs).
        """
        n = next(self.queues)
        assert n < MAX_QUEUES, "raise MAX_QUEUES: the policy declares too few queues"
        queue = f"q{n}"
        # A released attempt counts against max_attempts: QUEUED-with-a-token needs two.
        attempts = 2 if state is State.QUEUED else 1
        task = self.stub.SubmitTask(
            pb.SubmitTaskRequest(
                queue=queue,
                payload=b"{}",
                max_attempts=attempts,
                lease_ttl_ms=10 * DEADLINE_MS if deadline else TTL_MS,
                deadline_ms=DEADLINE_MS if deadline else 0,
            )
        ).task
        if state is State.QUEUED:
            task = self.acquire(queue).task
            return self.holder(task, Event.RELEASE)  # queued with a current token of 1
        task = self.acquire(queue).task
        if state is State.RUNNING:
            return self.holder(task, Event.START)
        if state is State.SUCCEEDED:
            return self.holder(self.holder(task, Event.START), Event.SUCCEED)
        if state is State.FAILED:
            return self.holder(task, Event.FAIL)
        if state is State.CANCELED:
            return self.stub.CancelTask(pb.CancelTaskRequest(task_id=task.task_id)).task
        if state is State.EXPIRED:
            self.lapse(10 * DEADLINE_MS if deadline else TTL_MS)
            return self.get(task.task_id)
        return task

    def lapse(self, ms: int = TTL_MS) -> None:
        self.clock.advance(ms)
        self.call(self.svc.sweep())


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("prop"))
    yield h
    h.close()


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def check_pair(harness: Harness, state: State, event: Event) -> None:
    """Applies `event` to a fresh task in `state` through its real entry point and checks it."""
    task = harness.task_in(state, deadline=event is Event.TIME_OUT)
    assert task.state == state
    allowed = (state, event) in TRANSITIONS
    expected = (
        next_state(state, event, attempt=task.attempt, max_attempts=task.max_attempts)
        if allowed
        else state
    )
    refused: grpc.RpcError | None = None
    if event in HOLDER_EVENTS or event is Event.CANCEL:
        try:
            if event is Event.CANCEL:
                harness.stub.CancelTask(pb.CancelTaskRequest(task_id=task.task_id))
            else:
                harness.holder(task, event)
        except grpc.RpcError as err:
            refused = err
        if allowed:
            assert refused is None, f"{state.name} --{event.name}--> refused: {refused}"
        else:
            assert refused is not None, f"{state.name} --{event.name}--> was accepted"
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert _reason(refused) in {"INVALID_TRANSITION", "LEASE_EXPIRED"}
    elif event is Event.LEASE:  # AcquireLease leases the task only if it is queued
        assert harness.acquire(task.queue).HasField("task") == allowed
    elif event is Event.TIME_OUT:  # the sweeper's too: let the deadline pass and sweep
        harness.lapse(DEADLINE_MS)
    else:  # LAPSE belongs to the sweeper: let the lease run out and sweep
        harness.lapse()
    assert harness.get(task.task_id).state == expected


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(state=st.sampled_from(list(State)), event=st.sampled_from(list(Event)))
def test_random_state_event_pairs_follow_the_table(
    harness: Harness, state: State, event: Event
) -> None:
    """A random allowed pair lands in the table's target state; any other is FAILED_PRECONDITION."""
    check_pair(harness, state, event)


def test_all_state_event_pairs_follow_the_table(harness: Harness) -> None:
    """Every one of the 7x7 (state, event) pairs is applied per the table or refused."""
    for state, event in itertools.product(State, Event):
        check_pair(harness, state, event)

"""A task's wire form: the fields left out when zero change no byte of the message."""

from __future__ import annotations

import dataclasses

from tether.control.grpc_api import retry_to_proto, task_fields
from tether.core.states import State
from tether.store.base import TaskRecord
from tether.v1 import control_pb2 as pb

BARE = TaskRecord(
    task_id="t_1",
    queue="q",
    state=State.RUNNING,
    payload=b"{}",
    attempt=1,
    max_attempts=3,
    fencing_token=7,
    node_id="n",
    agent_id="a",
    lease_id="l_1",
    lease_expires_unix_ms=2_000,
    lease_ttl_ms=1_000,
    result=b"",
    error="",
    created_unix_ms=1_000,
    updated_unix_ms=1_001,
    not_before_unix_ms=0,
    idempotency_key="",
    budget_limit_micros=0,
    budget_spent_micros=0,
    submitted_by="submitter:ci",
)
FULL = dataclasses.replace(
    BARE,
    state=State.FAILED,
    result=b"r",
    error="e",
    end_reason=2,
    not_before_unix_ms=5,
    idempotency_key="k",
    budget_limit_micros=9,
    budget_spent_micros=4,
    attempt_timeout_ms=60_000,
    deadline_unix_ms=9_000,
    schedule_to_start_ms=3_000,
)


def every_field(t: TaskRecord) -> pb.Task:
    """The task with all 26 fields given, zero or not (the builder before fields were
    left out)."""
    return pb.Task(
        task_id=t.task_id,
        queue=t.queue,
        state=int(t.state),  # type: ignore[arg-type]
        payload=t.payload,
        attempt=t.attempt,
        max_attempts=t.max_attempts,
        fencing_token=t.fencing_token,
        node_id=t.node_id,
        agent_id=t.agent_id,
        lease_expires_unix_ms=t.lease_expires_unix_ms,
        lease_ttl_ms=t.lease_ttl_ms,
        result=t.result,
        error=t.error,
        created_unix_ms=t.created_unix_ms,
        updated_unix_ms=t.updated_unix_ms,
        not_before_unix_ms=t.not_before_unix_ms,
        idempotency_key=t.idempotency_key,
        budget_limit_micros=t.budget_limit_micros,
        budget_spent_micros=t.budget_spent_micros,
        attempt_timeout_ms=t.attempt_timeout_ms,
        deadline_unix_ms=t.deadline_unix_ms,
        schedule_to_start_timeout_ms=t.schedule_to_start_ms,
        retry_policy=retry_to_proto(t.retry_policy()),
        end_reason=t.end_reason,  # type: ignore[arg-type]
        attempt_started_unix_ms=t.attempt_started_unix_ms,
        submitted_by=t.submitted_by,
    )


def test_task_fields_give_the_same_bytes_as_every_field_given() -> None:
    """A task built from `task_fields` serializes exactly as one with all 26 fields set,
    whether its optional fields are zero (left out) or set (each one carried)."""
    for t in (BARE, FULL):
        assert pb.Task(**task_fields(t)).SerializeToString() == every_field(t).SerializeToString()
    full = pb.Task(**task_fields(FULL))
    assert full.result == b"r"
    assert full.schedule_to_start_timeout_ms == 3_000
    assert full.end_reason == 2
    assert full.budget_spent_micros == 4

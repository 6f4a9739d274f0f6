"""Rows to records: the fast path that skips the frozen dataclass's constructor."""

from __future__ import annotations

import dataclasses

import pytest

from tether.core.states import State
from tether.store.base import TaskRecord
from tether.store.common import TASK_COLS, row_to_task


def test_row_to_task_builds_what_the_constructor_builds() -> None:
    """A stored row becomes the same frozen record the keyword constructor makes, with
    each column converted (state, blobs, float, bool, reason list) and nothing shared."""
    names = [c.strip() for c in TASK_COLS.split(",")]
    stored = {
        **{name: 0 for name in names},
        "task_id": "t1", "queue": "q", "state": int(State.RUNNING), "payload": memoryview(b"p"),
        "node_id": "n", "agent_id": "a", "lease_id": "l", "result": bytearray(b"r"),
        "error": "", "idempotency_key": "k", "retry_coefficient": 2, "retry_failures": 1,
        "non_retryable": "timeout\noom", "submitted_by": "admin:x", "attempt": 2,
    }  # fmt: skip
    task = row_to_task(tuple(stored[n] for n in names))
    expected = TaskRecord(**{
        **stored, "state": State.RUNNING, "payload": b"p", "result": b"r",
        "retry_coefficient": 2.0, "retry_failures": True, "non_retryable": ("timeout", "oom"),
    })  # fmt: skip
    assert task == expected
    assert (type(task.state), type(task.payload), type(task.result)) == (State, bytes, bytes)
    assert type(task.retry_coefficient) is float
    assert task.retry_failures is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.state = State.QUEUED  # type: ignore[misc]
    with pytest.raises(ValueError, match="99"):
        row_to_task(tuple({**stored, "state": 99}[n] for n in names))

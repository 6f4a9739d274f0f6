"""The batch items' checks: the quick path takes exactly what the field-by-field checks take."""

from __future__ import annotations

from typing import Any

import pytest

from tether.control.grpc_api import (
    MAX_INT64,
    _check_transition,
    _plain_completion,
)
from tether.core.errors import InvalidArgument
from tether.v1 import control_pb2 as pb

_GOOD: list[dict[str, Any]] = [
    {"task_id": "t-1", "fencing_token": 1, "event": pb.TASK_EVENT_SUCCEED, "result": b"{}"},
    {"task_id": "A.b_c-9", "fencing_token": MAX_INT64, "event": pb.TASK_EVENT_SUCCEED},
    {"task_id": "t", "fencing_token": 7, "event": pb.TASK_EVENT_FAIL, "error": "e" * 4096},
    {"task_id": "t", "fencing_token": 7, "event": pb.TASK_EVENT_FAIL, "non_retryable": True},
    {"task_id": "x" * 128, "fencing_token": 2, "event": pb.TASK_EVENT_SUCCEED,
     "result": b"r" * (1 << 20)},
]  # fmt: skip

_NOT_PLAIN: list[dict[str, Any]] = [
    {"event": pb.TASK_EVENT_START},
    {"event": pb.TASK_EVENT_RELEASE},
    {"event": 0},
    {"event": 99},
    {"non_retryable": True},  # on SUCCEED
    {"event": pb.TASK_EVENT_FAIL, "failure_type": "Timeout"},  # valid, but the full checks
    {"failure_type": "x"},
    {"fencing_token": 0},
    {"task_id": ""},
    {"task_id": "bad id"},
    {"task_id": "x" * 129},
    {"result": b"r" * ((1 << 20) + 1)},
    {"error": "e" * 4097},
]


@pytest.mark.parametrize("fields", _GOOD)
def test_a_plain_completion_is_taken_as_the_full_checks_take_it(fields: dict[str, Any]) -> None:
    """A valid SUCCEED or FAIL without a failure type gives the same transition both ways."""
    c = pb.TaskCompletion(**fields)
    assert _plain_completion(c) == _check_transition(c)


@pytest.mark.parametrize("change", _NOT_PLAIN)
def test_anything_else_goes_to_the_full_checks(change: dict[str, Any]) -> None:
    """Every refused field, and a failure type, leaves the item to the full checks, which
    refuse it naming the field (all but the valid FAIL with a failure type)."""
    c = pb.TaskCompletion(**{**_GOOD[0], **change})
    assert _plain_completion(c) is None
    if change.get("event") in (pb.TASK_EVENT_START, pb.TASK_EVENT_RELEASE):
        return  # holder events the batch check refuses after _check_transition
    if "failure_type" in change and change.get("event") == pb.TASK_EVENT_FAIL:
        assert _check_transition(c).failure_type == change["failure_type"]
        return
    with pytest.raises(InvalidArgument):
        _check_transition(c)

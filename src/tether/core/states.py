"""The task state machine: the single source of truth for transitions.

Every store applies a transition as one conditional write on (state, fencing
token); this module only says which (state, event) pairs are allowed and where
they lead. Anything not in the table is refused.
"""

from __future__ import annotations

import enum

from tether.core.errors import InvalidTransition


class State(enum.IntEnum):
    """Task states; values match `tether.v1.TaskState`."""

    QUEUED = 1
    LEASED = 2
    RUNNING = 3
    SUCCEEDED = 4
    FAILED = 5
    EXPIRED = 6
    CANCELED = 7

    @property
    def terminal(self) -> bool:
        """True for states no event leaves."""
        return self in TERMINAL


class Event(enum.IntEnum):
    """State-machine inputs; values match `tether.v1.TaskEvent`."""

    LEASE = 1
    START = 2
    SUCCEED = 3
    FAIL = 4
    RELEASE = 5
    LAPSE = 6
    CANCEL = 7
    TIME_OUT = 8


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.EXPIRED, State.CANCELED})

# LAPSE and RELEASE lead to QUEUED while attempts remain, else EXPIRED (see
# `next_state`): a released attempt counts against max_attempts like a lapsed one.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.QUEUED, Event.LEASE): State.LEASED,
    (State.QUEUED, Event.CANCEL): State.CANCELED,
    (State.LEASED, Event.START): State.RUNNING,
    (State.LEASED, Event.FAIL): State.FAILED,
    (State.LEASED, Event.RELEASE): State.QUEUED,
    (State.LEASED, Event.LAPSE): State.QUEUED,
    (State.LEASED, Event.CANCEL): State.CANCELED,
    (State.RUNNING, Event.SUCCEED): State.SUCCEEDED,
    (State.RUNNING, Event.FAIL): State.FAILED,
    (State.RUNNING, Event.RELEASE): State.QUEUED,
    (State.RUNNING, Event.LAPSE): State.QUEUED,
    (State.RUNNING, Event.CANCEL): State.CANCELED,
    # A limit the control plane enforces that ends the task whatever its state (the
    # deadline, the schedule-to-start timeout); see tether.core.timeouts.
    (State.QUEUED, Event.TIME_OUT): State.EXPIRED,
    (State.LEASED, Event.TIME_OUT): State.EXPIRED,
    (State.RUNNING, Event.TIME_OUT): State.EXPIRED,
}

# A FAIL the task's retry policy retries (attempts permitting) leads here instead.
RETRY_STATE = State.QUEUED

# Events a lease holder may send through TransitionTask; the rest belong to
# AcquireLease (LEASE), the sweeper (LAPSE, TIME_OUT) and operators (CANCEL).
HOLDER_EVENTS = frozenset({Event.START, Event.SUCCEED, Event.FAIL, Event.RELEASE})

# States in which a lease is live (and a fencing token must match).
LEASED_STATES = frozenset({State.LEASED, State.RUNNING})


def state_name(value: int, default: str = "unspecified") -> str:
    """The lower-case name of a state value (as on the wire), or `default` if unknown."""
    try:
        return State(value).name.lower()
    except ValueError:
        return default


def next_state(
    state: State, event: Event, *, attempt: int = 0, max_attempts: int = 1, retry: bool = False
) -> State:
    """Returns where `event` takes a task in `state`.

    LAPSE and RELEASE requeue while attempts remain; FAIL requeues only with
    `retry` (the retry policy retries this failure) while attempts remain.

    Raises:
        InvalidTransition: the pair is not in the table.
    """
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise InvalidTransition(
            f"cannot {event.name.lower()} a task that is {state.name.lower()}",
            metadata={"state": state.name, "event": event.name},
        )
    if event in (Event.LAPSE, Event.RELEASE) and attempt >= max_attempts:
        return State.EXPIRED
    if event is Event.FAIL and retry and attempt < max_attempts:
        return RETRY_STATE
    return target


def sources(event: Event) -> frozenset[State]:
    """States from which `event` is allowed; stores use it in conditional writes."""
    return frozenset(s for (s, e) in TRANSITIONS if e is event)

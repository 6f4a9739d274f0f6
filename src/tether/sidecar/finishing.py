"""Final transitions journaled, so a task the control plane ended always gets its receipt.

A task's end is two writes in two places: the control plane commits SUCCEED or FAIL,
then the node signs `task_finished`. If the sidecar dies between them, or the agent
hangs up and its handler is cancelled, the control plane says "succeeded" while the
node's chain holds no end, and an honest bundle fails `lease.closed` and `task.final`.
Signing first is no better: a refused transition would leave a signed end that did not
happen.

So the sidecar journals the final transition durably before it leaves (the receipt's
facts, its time taken while the lease was live, and the request), runs it in a task
no caller's cancellation can stop, and signs the receipt once the control plane's
answer is known. A restart finds what the journal still holds and asks again: the
same fencing token makes the repeat safe, and its answer ("applied under your token",
or "not yours") decides whether the receipt is signed. Unreachable control planes
are retried with backoff until they answer; nothing is guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tether.core import errors as E
from tether.core.receipts import Receipt, ReceiptKind
from tether.core.states import Event, State
from tether.crypto.receipts import parse_receipt
from tether.sidecar.receipts import Slot

log = logging.getLogger("tether.sidecar.finishing")

# Answers that say nothing about whether the transition applied (an unreachable or
# overloaded control plane; a call's deadline maps to Unavailable): ask again.
TRANSIENT = (E.Unavailable, E.Overloaded)
RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0


@dataclass(frozen=True)
class PendingFinish:
    """A final transition the agent asked for, and the receipt it ends in."""

    receipt: Receipt
    """The `task_finished` receipt, timed while the lease was live; `final_state` is
    filled in from the control plane's answer."""
    event: Event
    result: bytes
    error: str
    non_retryable: bool
    failure_type: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.receipt.task_id, self.receipt.fencing_token)

    def target(self) -> State:
        return State.SUCCEEDED if self.event == Event.SUCCEED else State.FAILED

    def encode(self) -> bytes:
        body = dataclasses.asdict(self.receipt)
        return json.dumps(
            {
                "receipt": body,
                "event": int(self.event),
                "error": self.error,
                "non_retryable": self.non_retryable,
                "failure_type": self.failure_type,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes, result: bytes) -> PendingFinish:
        doc = json.loads(data)
        fields = dict(doc["receipt"])
        fields["kind"] = ReceiptKind(fields["kind"])
        return cls(
            receipt=Receipt(**fields),
            event=Event(doc["event"]),
            result=result,
            error=str(doc["error"]),
            non_retryable=bool(doc["non_retryable"]),
            failure_type=str(doc["failure_type"]),
        )


class FinishJournal:
    """Final transitions in flight, on local disk (SQLite, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS finishing ("
            " task_id TEXT NOT NULL, fencing_token INTEGER NOT NULL,"
            " body BLOB NOT NULL, result BLOB NOT NULL,"
            " PRIMARY KEY (task_id, fencing_token))"
        )

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            self._db.execute(sql, args)

    async def record(self, pending: PendingFinish) -> None:
        """Durable before it returns: the transition may leave only after this."""
        task_id, token = pending.key
        await asyncio.to_thread(
            self._write,
            "INSERT OR REPLACE INTO finishing VALUES (?, ?, ?, ?)",
            (task_id, token, pending.encode(), pending.result),
        )

    async def clear(self, pending: PendingFinish) -> None:
        await asyncio.to_thread(
            self._write,
            "DELETE FROM finishing WHERE task_id = ? AND fencing_token = ?",
            pending.key,
        )

    def pending(self) -> list[PendingFinish]:
        with self._lock:
            rows = self._db.execute("SELECT body, result FROM finishing ORDER BY rowid").fetchall()
        return [PendingFinish.decode(bytes(body), bytes(result)) for body, result in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# (pending) -> the task's state after the transition; raises the control plane's refusal.
Transition = Callable[[PendingFinish], Awaitable[State]]
# Signs and spools the receipt (in the room promised, if any); returns its seq.
Emit = Callable[[Receipt, Slot | None], Awaitable[int]]
# The envelopes of one task the node's chain still holds (`ReceiptSink.envelopes`).
Chain = Callable[[str], list[bytes]]


class Finisher:
    """Runs journaled final transitions to a known outcome, once each."""

    def __init__(
        self, journal: FinishJournal, transition: Transition, emit: Emit, chain: Chain
    ) -> None:
        self.journal = journal
        self._transition = transition
        self._emit = emit
        self._chain = chain
        self._running: dict[tuple[str, int], asyncio.Task[tuple[State, int]]] = {}

    def start(
        self, pending: PendingFinish, slot: Slot | None = None, resumed: bool = False
    ) -> asyncio.Task[tuple[State, int]]:
        """The task that ends `pending` (already journaled); one per task and token."""
        task = self._running.get(pending.key)
        if task is None:
            task = asyncio.create_task(
                self._run(pending, slot, resumed), name=f"finish-{pending.receipt.task_id}"
            )
            self._running[pending.key] = task
            task.add_done_callback(functools.partial(self._done, pending.key))
        return task

    def _done(self, key: tuple[str, int], task: asyncio.Task[tuple[State, int]]) -> None:
        self._running.pop(key, None)
        err = None if task.cancelled() else task.exception()
        if err is not None:  # also seen by whoever awaits it; logged for resumed ends
            log.warning(
                "final transition refused (not applied): %s",
                err,
                extra={"task_id": key[0], "fencing_token": key[1]},
            )

    def resume(self) -> int:
        """Starts every transition a previous run journaled and did not see answered."""
        found = self.journal.pending()
        for pending in found:
            log.warning(
                "resuming a final transition journaled before a restart",
                extra={"task_id": pending.receipt.task_id, "event": pending.event.name},
            )
            self.start(pending, resumed=True)
        return len(found)

    async def _run(
        self, pending: PendingFinish, slot: Slot | None, resumed: bool
    ) -> tuple[State, int]:
        """Asks until the control plane answers; signs the receipt if the end applied.

        `resumed`: journaled by an earlier run, which may have died after signing
        the receipt and before dropping the entry; an end already on the node's
        chain under this token is not signed again (one end per lease).

        Returns:
            (state after the transition, seq of the task_finished receipt).

        Raises:
            TetherError: the control plane refused the transition (not applied; the
                journal entry is dropped and no receipt is signed).
        """
        delay = RETRY_MIN_S
        while True:
            try:
                state = await self._transition(pending)
                break
            except TRANSIENT as err:
                log.warning(
                    "final transition not confirmed (%s); asking again in %.1f s",
                    err.message,
                    delay,
                    extra={"task_id": pending.receipt.task_id},
                )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, RETRY_MAX_S)
            except E.TetherError:
                await self.journal.clear(pending)
                raise
        seq = self._signed(pending) if resumed else None
        if seq is None:
            receipt = dataclasses.replace(pending.receipt, final_state=int(state))
            seq = await self._emit(receipt, slot)
        await self.journal.clear(pending)
        return state, seq

    def _signed(self, pending: PendingFinish) -> int | None:
        """Seq of the task_finished the node's chain already holds under `pending`'s token."""
        task_id, token = pending.key
        for envelope in self._chain(task_id):
            receipt = parse_receipt(envelope)[1]
            if receipt.kind is ReceiptKind.TASK_FINISHED and receipt.fencing_token == token:
                return receipt.seq
        return None

    async def close(self) -> None:
        """Stops what is still asking; the journal keeps it for the next start."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):  # ended or refused: the journal decides
                await task
        await asyncio.to_thread(self.journal.close)

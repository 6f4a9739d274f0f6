"""Receipt facts, free of any encoding (tether.crypto.receipts signs and parses them).

Fields mirror `tether.v1.Receipt` in receipt.proto, which is the schema.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tether.core.timeouts import EndReason

RECEIPT_VERSION = 1


class ReceiptKind(enum.IntEnum):
    """What a receipt records; values match `tether.v1.ReceiptKind`."""

    LEASE_GRANTED = 1
    TASK_STARTED = 2
    TOOL_CALL = 3
    TOOL_DENIED = 4
    ARTIFACT = 5
    MEMORY_WRITE = 6
    BUDGET = 7
    TASK_FINISHED = 8
    LEASE_LOST = 9


@dataclass(frozen=True)
class Receipt:
    """One recorded action. `seq` and `prev` are assigned by the node's chain."""

    kind: ReceiptKind
    node_id: str
    task_id: str
    attempt: int
    fencing_token: int
    agent_id: str
    lease_id: str
    lease_issued_unix_ms: int
    lease_expires_unix_ms: int
    time_unix_ms: int
    seq: int = 0
    prev: str = ""
    policy_digest: str = ""
    tool: str = ""
    arguments_sha256: str = ""
    result_sha256: str = ""
    duration_ms: int = 0
    cost_micros: int = 0
    status: str = ""
    reason: str = ""
    final_state: int = 0  # tether.core.states.State value for TASK_FINISHED
    artifact_name: str = ""
    artifact_size: int = 0
    artifact_sha256: str = ""
    idempotency_key: str = ""
    memory_key: str = ""
    version: int = RECEIPT_VERSION


@dataclass(frozen=True)
class ControlReceipt:
    """How a lease or task ended without its holder, signed by the control plane.

    `end_reason` says what ended it (a `tether.core.timeouts.EndReason` the
    control plane decides, or RELEASED). `lease_id` (with node and agent) names
    the lease the event ended; empty when none was live. `state` is the task's
    state after the event: queued, or a terminal state, which makes this the
    task's final record. Fields mirror `tether.v1.ControlReceipt`.
    """

    end_reason: EndReason
    task_id: str
    attempt: int
    fencing_token: int
    state: int  # tether.core.states.State value
    time_unix_ms: int
    reason: str = ""
    lease_id: str = ""
    node_id: str = ""
    agent_id: str = ""
    limit_unix_ms: int = 0
    clock: str = ""
    version: int = RECEIPT_VERSION

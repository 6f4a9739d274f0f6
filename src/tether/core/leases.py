"""Lease facts, free of any encoding (tether.crypto.leases signs and parses them)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TTL_MS = 30_000
MIN_TTL_MS = 1_000
MAX_TTL_MS = 3_600_000


@dataclass(frozen=True)
class Lease:
    """One node/agent's ownership of one task attempt, until `expires_unix_ms`.

    The fencing token only grows per task; a renewal keeps it and moves the
    expiry. Expiry is judged by the control plane's clock only.
    """

    lease_id: str
    task_id: str
    attempt: int
    node_id: str
    agent_id: str
    fencing_token: int
    issued_unix_ms: int
    expires_unix_ms: int
    policy_digest: str = ""
    queue: str = ""
    tools: tuple[str, ...] = field(default_factory=tuple)
    attempt_deadline_unix_ms: int = 0
    """The attempt timeout's due time (control-plane clock); 0: none."""
    task_deadline_unix_ms: int = 0
    """The task deadline's due time (control-plane clock); 0: none."""

    def __post_init__(self) -> None:
        check_lease_times(self.fencing_token, self.issued_unix_ms, self.expires_unix_ms)

    def live_at(self, now_ms: int) -> bool:
        """True while the lease has not lapsed at `now_ms`."""
        return now_ms < self.expires_unix_ms


def check_lease_times(fencing_token: int, issued_unix_ms: int, expires_unix_ms: int) -> None:
    """What every lease must be (a `Lease`, or one signed from its fields).

    Raises:
        ValueError: no positive fencing token, or no expiry after issue.
    """
    if fencing_token <= 0:
        raise ValueError("a lease needs a positive fencing token")
    if expires_unix_ms <= issued_unix_ms:
        raise ValueError("a lease must expire after it is issued")

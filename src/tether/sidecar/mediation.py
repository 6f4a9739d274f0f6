"""Tool-call mediation: the one path from an agent's CallTool to a side effect.

This phase's Mediator enforces what must hold before anything runs:

* fencing at the point of action: a lost, lapsed or finished lease is refused
  *before* the tool runs, checked against the signed expiry right then;
* the tool must be in the lease's scope (the tools the control plane signed
  into the lease); anything else is PERMISSION_DENIED with a TOOL_DENIED receipt;
* the arguments must be a JSON object of at most 1 MiB.

Running a granted tool needs its policy spec and an adapter: `PolicyToolRunner`
finds the exact policy the lease names and runs the tool through
`tether.sidecar.tools.run_tool` (timeout, redaction). Without a runner, a
granted tool is refused with a clear reason and a receipt, never a fake result.
Budgets, idempotency records and credentials plug in here next.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tether.core import errors as E
from tether.core.clock import Clock
from tether.core.policy import Policy, load_policy, parse_policy
from tether.core.receipts import ReceiptKind
from tether.sidecar.leases import HeldLease
from tether.sidecar.receipts import ReceiptSink, sha256_hex
from tether.sidecar.tools import Tool, ToolContext, build_tool, run_tool

MAX_ARGUMENTS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ToolOutcome:
    """What CallTool returns to the agent (already redacted)."""

    result_json: str
    status: str = "ok"
    replayed: bool = False
    cost_micros: int = 0
    budget_remaining_micros: int = 0


class ToolRunner(Protocol):
    """Runs one granted tool for a held lease; raises TetherError on refusal."""

    async def run(self, held: HeldLease, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Runs the tool and returns its redacted outcome."""
        ...


def parse_arguments(arguments_json: str) -> dict[str, Any]:
    """Parses CallTool arguments.

    Raises:
        InvalidArgument: too large, not JSON, or not a JSON object.
    """
    if len(arguments_json.encode()) > MAX_ARGUMENTS_BYTES:
        raise E.InvalidArgument("arguments_json", "larger than 1 MiB")
    try:
        value = json.loads(arguments_json or "{}")
    except ValueError as err:
        raise E.InvalidArgument("arguments_json", f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise E.InvalidArgument("arguments_json", "must be a JSON object")
    return value


class Mediator:
    """Checks a tool call against its lease, runs it, and records it."""

    def __init__(self, *, sink: ReceiptSink, clock: Clock, runner: ToolRunner | None = None):
        self._sink = sink
        self._clock = clock
        self._runner = runner

    async def _deny(
        self, held: HeldLease, tool: str, args_digest: str, key: str, err: E.TetherError
    ) -> E.TetherError:
        await self._sink.emit(
            held.receipt(
                ReceiptKind.TOOL_DENIED,
                self._clock.now_ms(),
                tool=tool,
                arguments_sha256=args_digest,
                idempotency_key=key,
                status=err.reason,
                reason=err.message,
            )
        )
        return err

    async def call_tool(
        self,
        agent: str,
        held: HeldLease,
        tool: str,
        arguments_json: str,
        idempotency_key: str,
    ) -> ToolOutcome:
        """Runs `tool` for `agent` under `held`, refusing before any side effect.

        Raises:
            NotOwner: `agent` does not hold the lease.
            LeaseLost: the lease is lost or lapsed (checked right before running).
            PolicyDenied: the tool is outside the lease's scope or cannot run here.
            InvalidArgument: malformed arguments.
        """
        if held.agent != agent:
            raise E.NotOwner(f"task {held.task_id!r} is leased to another agent")
        arguments = parse_arguments(arguments_json)
        args_digest = sha256_hex(arguments_json.encode())
        if held.lost_reason or held.finished or self._clock.now_ms() >= held.lease.expires_unix_ms:
            raise E.LeaseLost(
                f"lease lost on task {held.task_id!r}: "
                f"{held.lost_reason or 'finished or lapsed'}; the tool did not run"
            )
        if tool not in held.lease.tools:
            raise await self._deny(
                held,
                tool,
                args_digest,
                idempotency_key,
                E.PolicyDenied(
                    f"tool {tool!r} is not granted by the lease on task {held.task_id!r} "
                    f"(granted: {', '.join(held.lease.tools) or 'none'})",
                    metadata={"tool": tool},
                ),
            )
        if self._runner is None:
            raise await self._deny(
                held,
                tool,
                args_digest,
                idempotency_key,
                E.PolicyDenied(
                    f"tool {tool!r} is granted but this sidecar has no adapter to run it",
                    metadata={"tool": tool},
                ),
            )
        started = time.monotonic()
        try:
            outcome = await self._runner.run(held, tool, arguments)
        except E.TetherError as err:
            if isinstance(err, E.PolicyDenied | E.BudgetExhausted):
                raise await self._deny(held, tool, args_digest, idempotency_key, err) from err
            raise
        await self._sink.emit(
            held.receipt(
                ReceiptKind.TOOL_CALL,
                self._clock.now_ms(),
                tool=tool,
                arguments_sha256=args_digest,
                result_sha256=sha256_hex(outcome.result_json.encode()),
                duration_ms=int((time.monotonic() - started) * 1000),
                cost_micros=outcome.cost_micros,
                status="replayed" if outcome.replayed else outcome.status,
                idempotency_key=idempotency_key,
            )
        )
        return outcome


class PolicySource:
    """The policy a lease names, by digest: a local copy, else the control plane's.

    A lease carries the digest of the policy it was granted under; a tool runs
    only under exactly that document, so a policy change never silently widens
    an existing lease.
    """

    def __init__(self, uplink: Any, local_file: Path | None = None) -> None:
        self._uplink = uplink
        self._by_digest: dict[str, Policy] = {}
        if local_file is not None:
            policy = load_policy(local_file)
            self._by_digest[policy.digest] = policy

    async def get(self, digest: str) -> Policy:
        """Returns the policy with `digest`.

        Raises:
            PolicyDenied: no policy with that digest is available to this node.
        """
        if not digest:
            raise E.PolicyDenied("the lease names no policy; no tool may run")
        policy = self._by_digest.get(digest)
        if policy is None:
            from tether.v1 import control_pb2 as pb

            try:
                response = await self._uplink.call("GetPolicy", pb.GetPolicyRequest(version=0))
                fetched = parse_policy(response.document)
            except (E.Unauthenticated, E.NotFound, E.ConfigError) as err:
                raise E.PolicyDenied(
                    f"policy {digest[:12]} is not available to this node ({err.message}); "
                    "give the sidecar --policy"
                ) from err
            self._by_digest[fetched.digest] = fetched
            policy = self._by_digest.get(digest)
        if policy is None:
            raise E.PolicyDenied(
                f"the lease was granted under policy {digest[:12]}, which is no longer in force"
            )
        return policy


class PolicyToolRunner:
    """Runs a granted tool through its policy adapter (`tether.sidecar.tools`).

    Tools that need credentials are refused until credential issuance is wired
    into mediation; nothing runs without what its policy requires.
    """

    def __init__(self, policies: PolicySource, workspaces: Path, clock: Clock) -> None:
        self._policies = policies
        self._workspaces = workspaces
        self._clock = clock
        self._tools: dict[tuple[str, str], Tool] = {}

    async def run(self, held: HeldLease, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        policy = await self._policies.get(held.lease.policy_digest)
        spec = policy.granted_tool(held.queue, tool)
        if spec.credentials:
            raise E.PolicyDenied(
                f"tool {tool!r} needs credentials, which this sidecar cannot issue yet",
                metadata={"tool": tool},
            )
        adapter = self._tools.get((policy.digest, tool))
        if adapter is None:
            adapter = self._tools[(policy.digest, tool)] = build_tool(spec)
        workspace = self._workspaces / held.task_id
        workspace.mkdir(parents=True, exist_ok=True, mode=0o700)
        left_s = (held.lease.expires_unix_ms - self._clock.now_ms()) / 1000
        queue = policy.queues.get(held.queue)
        ctx = ToolContext(
            task_id=held.task_id,
            attempt=held.lease.attempt,
            fencing_token=held.lease.fencing_token,
            agent_id=held.agent,
            workspace=workspace,
            timeout_s=max(left_s, 0.0),
            network_allowlist=queue.network_allowlist if queue is not None else (),
            tool_name=tool,
        )
        result = await run_tool(adapter, ctx, arguments)
        return ToolOutcome(
            result_json=json.dumps(result.value),
            status=result.status,
            cost_micros=result.cost_micros if result.cost_micros is not None else spec.cost_micros,
        )

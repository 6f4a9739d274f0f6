"""Fuzzing ControlService: no generated request gets UNKNOWN or INTERNAL; health answers.

Every RPC is called as each kind of principal (admin, auditor and submitter
operators, an enrolled node, an anonymous caller on the enrolment address) with
structured, extreme, mutated, raw, invalid-UTF-8 and wire-confused requests and
junk metadata. TETHER_FUZZ_REQUESTS sets the count (default 2,000; `make fuzz`
runs 20,000) and TETHER_FUZZ_SEED replays a run.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from pathlib import Path

import grpc
from protofuzz import (
    Caller,
    Generator,
    Method,
    Pool,
    TracebackCounter,
    fuzz_requests,
    fuzz_seed,
    methods_of,
    run_fuzz,
)

from tether.control.authz import RULES
from tether.crypto.pki import Role
from tether.grpcutil.tls import open_channel
from tether.testing import default_test_policy, start_control
from tether.v1 import control_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ControlService"]
NODE = "node-fz"

POLICY = (
    default_test_policy()
    + """
[credentials.api_token]
tools = ["fetch"]

[tools.fetch]
adapter = "http"
credential = "api_token"
cost_micros = 10
[tools.fetch.http]
base_url = "http://127.0.0.1:9/api"

[queues.fz]
tools = ["fetch"]
network_allowlist = ["127.0.0.1:9"]
budget_micros = 100000
"""
).replace('queues = ["work"', 'queues = ["fz", "work"')


def _allowed(*roles: str) -> frozenset[str]:
    return frozenset(rpc for rpc, who in RULES.items() if who & set(roles))


def _stream_receipts(gen: Generator, method: Method) -> tuple[str, list[bytes]]:
    """StreamReceipts out of order: node_id changing mid-stream, empty batches, garbage."""
    rng = gen.rng
    messages = []
    for _ in range(rng.randint(0, 6)):
        request = pb.StreamReceiptsRequest(node_id=rng.choice((NODE, NODE, "other-node", "")))
        for _ in range(rng.choice((0, 1, 3))):
            request.receipts.add(
                seq=rng.choice((0, 1, 2, 2**63 - 1, 2**63, 2**64 - 1)),
                envelope=rng.choice((b"", b"{}", rng.randbytes(40), b'{"payloadType":"x"}')),
            )
        data = request.SerializeToString()
        messages.append(gen.mutate(data) if rng.random() < 0.2 else data)
    return "stream-order", messages


async def test_control_service_fuzz(tmp_path: Path) -> None:
    """Generated requests to every ControlService RPC get no UNKNOWN/INTERNAL; health answers."""
    seed, count = fuzz_seed(), fuzz_requests()
    print(f"fuzz seed {seed} (TETHER_FUZZ_SEED={seed} replays), {count} requests")
    tracebacks = TracebackCounter()
    logging.getLogger().addHandler(tracebacks)
    try:
        async with start_control(tmp_path, policy=POLICY) as cp:
            pool = Pool()
            pool.exclude[("RevokeNode", "node_id")] = {NODE}  # keep the fuzzing node enrolled
            await cp.client.put_secret("api_token", b"fuzz-secret-" + secrets.token_bytes(8))
            node = await cp.node_client(NODE)
            principals = {
                "admin": (cp.address, cp.pki.operator_tls(Role.ADMIN)),
                "auditor": (cp.address, cp.pki.operator_tls(Role.AUDITOR)),
                "submitter": (cp.address, cp.pki.operator_tls(Role.SUBMITTER)),
                "node": (cp.address, node.tls),
                "anonymous": (cp.enroll_address, cp.pki.anonymous_tls),
            }
            channels = {name: open_channel(*where) for name, where in principals.items()}
            blocking = {
                name: grpc.secure_channel(address, tls.credentials())
                for name, (address, tls) in principals.items()
            }
            for name, value in (
                ("queue", "work"),
                ("queue", "fz"),
                ("node_id", NODE),
                ("agent_id", "alice"),
                ("name", "api_token"),
                ("tool", "fetch"),
                ("document", POLICY),
                ("arguments_sha256", hashlib.sha256(b"{}").hexdigest()),
                ("status", "ok"),
            ):
                pool.add(name, value)
            for name, value in (("page_size", 5), ("version", 1), ("wait_ms", 0), ("ttl_ms", 0)):
                pool.add(name, value)
            pool.add("amount_micros", 10)
            pool.add("actual_micros", 5)

            async def refresh(i: int) -> None:
                """New tasks and leases, so node RPCs keep finding live ones."""
                for _ in range(3):
                    submitted = await cp.client.submit("fz", b"{}")
                    pool.add("task_id", submitted.task.task_id)
                    pool.add("task_ids", submitted.task.task_id)
                for _ in range(2):
                    got = await node.acquire_lease("fz", NODE, "alice")
                    if got.HasField("task"):
                        pool.add("fencing_token", got.task.fencing_token)
                        pool.add("reservation_id", f"r-{got.task.task_id}-{i}")
                        pool.add("idempotency_key", f"k-{i}")
                listed = await cp.client.list_tasks(page_size=2)
                if listed.next_page_token:
                    pool.add("page_token", listed.next_page_token)

            await refresh(0)
            only = {
                "auditor": _allowed(Role.AUDITOR.value),
                "submitter": _allowed(Role.SUBMITTER.value),
                "node": _allowed("node"),
            }
            callers = [
                Caller(name, channels[name], blocking[name], only=only.get(name))
                for name in principals
            ]
            try:
                outcome = await run_fuzz(
                    seed=seed,
                    requests=count,
                    methods=methods_of(SERVICE),
                    callers=callers,
                    pool=pool,
                    health=channels["admin"],
                    metadata_keys=("x-tether-agent-token", "authorization", "x-tether-node"),
                    stream_builder=_stream_receipts,
                    refresh=refresh,
                )
                after = await cp.client.health()
            finally:
                for channel in channels.values():
                    await channel.close()
                for sync in blocking.values():
                    sync.close()
                await node.close()
    finally:
        logging.getLogger().removeHandler(tracebacks)
    print(f"ControlService: {outcome.summary()}; {tracebacks.count} tracebacks logged")
    replay = f"(seed {seed}; rerun with TETHER_FUZZ_SEED={seed})"
    assert outcome.sent == count
    assert not outcome.forbidden, f"{len(outcome.forbidden)} UNKNOWN/INTERNAL {replay}: " + (
        "; ".join(outcome.forbidden[:20])
    )
    assert not outcome.health_failures, f"health failed {replay}: {outcome.health_failures[:5]}"
    assert after == 1  # SERVING after the run
    assert tracebacks.count == 0, f"tracebacks logged {replay}: {tracebacks.examples}"

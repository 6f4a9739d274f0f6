"""Attacks on the control plane's trust boundaries: each test plays the attacker.

Real servers over real TLS: the enrolment listener (TLS, no client certificate)
and the main listener (mTLS, node and operator certificates of the test CA).
Every refusal is asserted with its exact gRPC status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from tether.control.client import ControlClient, node_client_tls
from tether.control.service import MAX_NODE_CHECK_CACHE_MS, ControlConfig
from tether.core.clock import FakeClock
from tether.core.errors import ConfigError, TetherError
from tether.core.states import Event, State
from tether.crypto.enrollment import STATEMENT_PAYLOAD_TYPE, make_challenge, make_statement
from tether.crypto.envelopes import from_proto, to_proto
from tether.crypto.pki import (
    CertificateAuthority,
    Role,
    cert_pem,
    generate_tls_key,
    key_pem,
    spki_der,
)
from tether.crypto.signing import Envelope, SigningKey
from tether.grpcutil.tls import ClientTLS
from tether.metrics import AUTH_REFUSALS
from tether.testing import TEST_TRUST_DOMAIN, ControlHandle, start_control
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

POLICY = """\
version = 1

[agents.alice]
queues = ["work"]

[credentials.api_token]
tools = ["echo"]

[tools.echo]
adapter = "python"
credential = "api_token"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"

[queues.work]
tools = ["echo"]
"""


async def refused(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message the call failed with (fails the test if it succeeded)."""
    failure: BaseException | None = None
    try:
        await call
    except grpc.aio.AioRpcError as err:
        failure = err
    except TetherError as err:  # ControlClient maps statuses; the RpcError is the cause
        failure = err.__cause__
    assert failure is not None, "the call succeeded; it should have been refused"
    assert isinstance(failure, grpc.aio.AioRpcError), repr(failure)
    return failure.code(), failure.details() or ""


def enroll_stub(cp: ControlHandle) -> tuple[grpc.aio.Channel, pb_grpc.ControlServiceAsyncStub]:
    """A raw stub on the enrolment listener, with no client certificate (what an attacker has)."""
    channel = grpc.aio.secure_channel(cp.enroll_address, cp.pki.anonymous_tls.credentials())
    return channel, pb_grpc.ControlServiceStub(channel)


async def get_challenge(stub: pb_grpc.ControlServiceAsyncStub, node_id: str) -> Envelope:
    got = await stub.GetEnrollmentChallenge(
        pb.GetEnrollmentChallengeRequest(node_id=node_id), timeout=10
    )
    return from_proto(got.challenge)


async def register(
    stub: pb_grpc.ControlServiceAsyncStub,
    node_id: str,
    public_key: bytes,
    statement: Envelope,
    challenge: Envelope,
    token: str = "",
) -> pb.RegisterNodeResponse:
    response: pb.RegisterNodeResponse = await stub.RegisterNode(
        pb.RegisterNodeRequest(
            node_id=node_id,
            public_key=public_key,
            enrollment_token=token,
            statement=to_proto(statement),
            challenge=to_proto(challenge),
        ),
        timeout=10,
    )
    return response


async def honest_register(
    stub: pb_grpc.ControlServiceAsyncStub, node_id: str, key: SigningKey, token: str = ""
) -> pb.RegisterNodeResponse:
    challenge = await get_challenge(stub, node_id)
    statement = make_statement(key, node_id, spki_der(generate_tls_key().public_key()), challenge)
    return await register(stub, node_id, key.public.raw, statement, challenge, token)


def statement_naming(
    signer: SigningKey, named_public: bytes, node_id: str, challenge: Envelope
) -> Envelope:
    """A statement that names `named_public` as the node's key but is signed by `signer`."""
    doc = {
        "node_id": node_id,
        "public_key": base64.b64encode(named_public).decode(),
        "tls_public_key": base64.b64encode(spki_der(generate_tls_key().public_key())).decode(),
        "challenge_sha256": hashlib.sha256(challenge.payload).hexdigest(),
    }
    payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return signer.sign_envelope(STATEMENT_PAYLOAD_TYPE, payload)


def refusals(kind: str, reason: str) -> float:
    return float(AUTH_REFUSALS.labels(kind=kind, reason=reason).value)


# -- enrolment: proof of possession ------------------------------------------------------


async def test_known_public_key_without_its_private_key_is_refused(tmp_path: Path) -> None:
    """A statement naming an allow-listed public key but signed by another key enrols nobody."""
    victim = SigningKey.generate()
    attacker = SigningKey.generate()
    async with start_control(tmp_path, allowed_node_keys=[("node-v", victim.public.raw)]) as cp:
        channel, stub = enroll_stub(cp)
        async with channel:
            challenge = await get_challenge(stub, "node-v")
            forged = statement_naming(attacker, victim.public.raw, "node-v", challenge)
            code, msg = await refused(
                register(stub, "node-v", victim.public.raw, forged, challenge)
            )
            assert code == UNAUTHENTICATED
            assert "proof of possession" in msg
            # The attacker's own honest statement, sent under the victim's public key.
            challenge = await get_challenge(stub, "node-v")
            own = make_statement(
                attacker, "node-v", spki_der(generate_tls_key().public_key()), challenge
            )
            code, msg = await refused(register(stub, "node-v", victim.public.raw, own, challenge))
            assert code == UNAUTHENTICATED
            assert "another key" in msg
            # The holder of the private key enrols with no token (it is allow-listed).
            ok = await honest_register(stub, "node-v", victim)
            assert ok.spiffe_id == f"spiffe://{TEST_TRUST_DOMAIN}/node/node-v"


async def test_forged_statement_signature_is_refused(tmp_path: Path) -> None:
    """A statement whose signature bytes are forged is refused even with a valid join token."""
    victim = SigningKey.generate()
    async with start_control(tmp_path) as cp:
        token = await cp.join_token("node-1")
        channel, stub = enroll_stub(cp)
        async with channel:
            challenge = await get_challenge(stub, "node-1")
            good = make_statement(
                victim, "node-1", spki_der(generate_tls_key().public_key()), challenge
            )
            forged = Envelope(
                good.payload, good.payload_type, ((victim.keyid, secrets.token_bytes(64)),)
            )
            code, _ = await refused(
                register(stub, "node-1", victim.public.raw, forged, challenge, token)
            )
            assert code == UNAUTHENTICATED
        async with cp.operator() as admin:
            assert [n.node_id for n in await admin.list_nodes()] == []


async def test_stale_challenge_is_refused(tmp_path: Path) -> None:
    """A challenge older than five minutes by the control plane's clock is refused."""
    clock = FakeClock(time.time_ns() // 1_000_000)
    async with start_control(tmp_path, clock=clock) as cp:
        token = await cp.join_token("node-1")
        key = SigningKey.generate()
        channel, stub = enroll_stub(cp)
        async with channel:
            challenge = await get_challenge(stub, "node-1")
            statement = make_statement(
                key, "node-1", spki_der(generate_tls_key().public_key()), challenge
            )
            clock.advance(5 * 60 * 1000 + 1)
            code, msg = await refused(
                register(stub, "node-1", key.public.raw, statement, challenge, token)
            )
            assert code == UNAUTHENTICATED
            assert "stale" in msg


async def test_foreign_challenge_is_refused(tmp_path: Path) -> None:
    """A challenge signed by another control key, or issued for another node, is refused."""
    async with start_control(tmp_path) as cp:
        key = SigningKey.generate()
        token = await cp.join_token("node-1")
        channel, stub = enroll_stub(cp)
        async with channel:
            # Minted by the attacker's own "control plane" key.
            foreign = make_challenge(SigningKey.generate(), "node-1", time.time_ns() // 1_000_000)
            statement = make_statement(
                key, "node-1", spki_der(generate_tls_key().public_key()), foreign
            )
            code, _ = await refused(
                register(stub, "node-1", key.public.raw, statement, foreign, token)
            )
            assert code == UNAUTHENTICATED
            # A genuine challenge, but issued for node-2.
            other = await get_challenge(stub, "node-2")
            statement = make_statement(
                key, "node-1", spki_der(generate_tls_key().public_key()), other
            )
            code, msg = await refused(
                register(stub, "node-1", key.public.raw, statement, other, token)
            )
            assert code == UNAUTHENTICATED
            assert "another node" in msg
            # A statement answering one challenge, sent with another.
            first = await get_challenge(stub, "node-1")
            second = await get_challenge(stub, "node-1")
            statement = make_statement(
                key, "node-1", spki_der(generate_tls_key().public_key()), first
            )
            code, msg = await refused(
                register(stub, "node-1", key.public.raw, statement, second, token)
            )
            assert code == UNAUTHENTICATED
            assert "another challenge" in msg


# -- enrolment: join tokens ----------------------------------------------------------------


async def test_enrolled_node_id_cannot_be_taken_over_with_a_second_join_token(
    tmp_path: Path,
) -> None:
    """A second enrolment token for an already-enrolled node id cannot bind a new key to it."""
    async with start_control(tmp_path) as cp:
        async with cp.operator() as admin:
            first = (await admin.create_join_token("node-1")).token
            second = (await admin.create_join_token("node-1")).token  # made before enrolment
        channel, stub = enroll_stub(cp)
        async with channel:
            owner = SigningKey.generate()
            await honest_register(stub, "node-1", owner, first)
            attacker = SigningKey.generate()
            # The enrolment voided every other outstanding token of the node.
            code, msg = await refused(honest_register(stub, "node-1", attacker, second))
            assert code == UNAUTHENTICATED
            assert "join token refused" in msg
            # Without a token, a new key for the enrolled id is refused as well.
            code, msg = await refused(honest_register(stub, "node-1", attacker))
            assert code == PERMISSION_DENIED
            assert "another key" in msg
        async with cp.operator() as admin:
            code, _ = await refused(admin.create_join_token("node-1"))
            assert code == grpc.StatusCode.ALREADY_EXISTS
            nodes = await admin.list_nodes()
        assert [(n.node_id, n.keyid) for n in nodes] == [("node-1", owner.keyid)]


async def test_used_join_token_is_refused(tmp_path: Path) -> None:
    """A join token works once; replaying it with a fresh key for the same node is refused."""
    async with start_control(tmp_path) as cp:
        token = await cp.join_token("node-1")
        channel, stub = enroll_stub(cp)
        async with channel:
            await honest_register(stub, "node-1", SigningKey.generate(), token)
            code, msg = await refused(honest_register(stub, "node-1", SigningKey.generate(), token))
            assert code == UNAUTHENTICATED
            assert "join token refused" in msg


async def test_expired_join_token_is_refused(tmp_path: Path) -> None:
    """A join token past its expiry by the control plane's clock is refused."""
    clock = FakeClock(time.time_ns() // 1_000_000)
    async with start_control(tmp_path, clock=clock) as cp:
        async with cp.operator() as admin:
            made = await admin.create_join_token("node-1", ttl_ms=60_000)
        assert made.expires_unix_ms == clock.now_ms() + 60_000
        clock.advance(60_000)
        channel, stub = enroll_stub(cp)
        async with channel:
            code, msg = await refused(
                honest_register(stub, "node-1", SigningKey.generate(), made.token)
            )
            assert code == UNAUTHENTICATED
            assert "expired" in msg


async def test_join_token_of_one_node_does_not_enrol_another(tmp_path: Path) -> None:
    """A join token bound to node A is refused for node B (and stays usable by A)."""
    async with start_control(tmp_path) as cp:
        token_a = await cp.join_token("node-a")
        channel, stub = enroll_stub(cp)
        async with channel:
            code, _ = await refused(honest_register(stub, "node-b", SigningKey.generate(), token_a))
            assert code == UNAUTHENTICATED
            await honest_register(stub, "node-a", SigningKey.generate(), token_a)


async def test_node_without_token_or_allow_listed_key_is_refused(tmp_path: Path) -> None:
    """A valid proof of possession alone does not enrol an unknown node."""
    async with start_control(tmp_path) as cp:
        channel, stub = enroll_stub(cp)
        async with channel:
            code, msg = await refused(honest_register(stub, "node-1", SigningKey.generate()))
            assert code == UNAUTHENTICATED
            assert "not enrolled" in msg


async def test_node_cannot_enrol_or_renew_another_node(tmp_path: Path) -> None:
    """Node A's certificate cannot enrol node B, even with B's own join token."""
    async with start_control(tmp_path) as cp:
        token_b = await cp.join_token("node-b")
        node_a = await cp.node_client("node-a")
        async with node_a:
            code, msg = await refused(
                node_a.register_node("node-b", SigningKey.generate(), token_b)
            )
            assert code == PERMISSION_DENIED
            assert "may not enrol" in msg


async def test_refused_enrolment_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused enrolment increments tether_auth_refusals and logs why, with its reason."""
    async with start_control(tmp_path) as cp:
        before = refusals("enrollment", "UNAUTHENTICATED")
        channel, stub = enroll_stub(cp)
        with caplog.at_level(logging.WARNING, logger="tether.control.authz"):
            async with channel:
                await refused(honest_register(stub, "node-x", SigningKey.generate(), "tj_bogus"))
        assert refusals("enrollment", "UNAUTHENTICATED") == before + 1
        logged = [r for r in caplog.records if getattr(r, "refusal", "") == "enrollment"]
        assert len(logged) == 1
        record = logged[0]
        assert record.levelno == logging.WARNING
        assert record.reason == "UNAUTHENTICATED"  # type: ignore[attr-defined]
        assert record.node_id == "node-x"  # type: ignore[attr-defined]
        assert "enrolment of node node-x refused" in record.getMessage()
        assert "join token refused" in record.getMessage()
        assert "tj_bogus" not in record.getMessage()  # the presented secret is never logged


# -- transport: TLS and client certificates -------------------------------------------------


async def test_main_port_refuses_a_client_without_certificate(tmp_path: Path) -> None:
    """The main listener refuses a TLS client that presents no certificate."""
    async with (
        start_control(tmp_path) as cp,
        ControlClient(cp.address, tls=cp.pki.anonymous_tls, timeout_s=5) as anon,
    ):
        code, _ = await refused(anon.submit("work", b"{}"))
        assert code == UNAVAILABLE  # the TLS handshake fails: no RPC is ever served
        code, _ = await refused(anon.list_tasks())
        assert code == UNAVAILABLE


async def test_enrolment_port_serves_only_enrolment(tmp_path: Path) -> None:
    """Without a client certificate, the enrolment listener answers nothing but enrolment."""
    async with start_control(tmp_path) as cp:
        await cp.client.submit("work", b"secret payload")
        async with ControlClient(cp.enroll_address, tls=cp.pki.anonymous_tls) as anon:
            for call in (
                anon.list_tasks(),
                anon.submit("work", b"{}"),
                anon.acquire_lease("work", "node-1", "alice"),
                anon.export_bundle(),
                anon.create_join_token("node-1"),
            ):
                code, _ = await refused(call)
                assert code == UNAUTHENTICATED


async def test_client_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    """An admin certificate issued by another CA (even of the same trust domain) is refused."""
    rogue = CertificateAuthority.create(TEST_TRUST_DOMAIN)
    key = generate_tls_key()
    cert = rogue.issue_operator("mallory", Role.ADMIN, key.public_key())
    async with start_control(tmp_path) as cp:
        tls = ClientTLS(cert_pem(cp.pki.ca.cert), cert_pem(cert), key_pem(key))
        async with ControlClient(cp.address, tls=tls, timeout_s=5) as client:
            code, _ = await refused(client.put_policy(POLICY))
            assert code == UNAVAILABLE
            code, _ = await refused(client.create_join_token("node-1"))
            assert code == UNAVAILABLE


async def test_certificate_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    """A certificate our CA signed for another trust domain's SPIFFE ID names nobody here."""
    async with start_control(tmp_path) as cp:
        foreign = CertificateAuthority(cp.pki.ca.cert, cp.pki.ca.key, "other.example")
        key = generate_tls_key()
        cert = foreign.issue_operator("mallory", Role.ADMIN, key.public_key())
        tls = ClientTLS(cert_pem(cp.pki.ca.cert), cert_pem(cert), key_pem(key))
        async with ControlClient(cp.address, tls=tls) as client:
            code, msg = await refused(client.list_tasks())
            assert code == UNAUTHENTICATED
            assert "trust domain" in msg


async def test_plaintext_client_cannot_talk_to_the_control_plane(tmp_path: Path) -> None:
    """An insecure (plaintext) channel gets no answer from either TLS listener."""
    async with start_control(tmp_path) as cp:
        for address in (cp.address, cp.enroll_address):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.ControlServiceStub(channel)
                code, _ = await refused(
                    stub.GetEnrollmentChallenge(
                        pb.GetEnrollmentChallengeRequest(node_id="node-1"), timeout=5
                    )
                )
                assert code == UNAVAILABLE
                code, _ = await refused(stub.ListTasks(pb.ListTasksRequest(), timeout=5))
                assert code == UNAVAILABLE


# -- authorization: roles ---------------------------------------------------------------


async def test_node_certificate_cannot_call_operator_rpcs(tmp_path: Path) -> None:
    """A node's certificate is refused every operator RPC."""
    async with start_control(tmp_path) as cp:
        node = await cp.node_client("node-1")
        async with node:
            for call in (
                node.put_policy(POLICY),
                node.submit("work", b"{}"),
                node.export_bundle(),
                node.put_secret("api_token", b"s3cret"),
                node.create_join_token("node-2"),
                node.rekey_node("node-1"),
                node.revoke_node("node-1"),
                node.list_tasks(),
                node.list_nodes(),
                node.cancel("t_x"),
                node.get_task("t_x"),
            ):
                code, msg = await refused(call)
                assert code == PERMISSION_DENIED, msg
                assert "node 'node-1' may not call" in msg


async def test_auditor_cannot_change_anything(tmp_path: Path) -> None:
    """An auditor may read evidence but not write policy, submit, cancel or manage nodes."""
    async with start_control(tmp_path) as cp:
        task = (await cp.client.submit("work", b"{}")).task
        async with cp.operator(Role.AUDITOR) as auditor:
            for call in (
                auditor.put_policy(POLICY),
                auditor.submit("work", b"{}"),
                auditor.cancel(task.task_id),
                auditor.put_secret("api_token", b"s3cret"),
                auditor.create_join_token("node-1"),
                auditor.revoke_node("node-1"),
                auditor.acquire_lease("work", "node-1", "alice"),
            ):
                code, msg = await refused(call)
                assert code == PERMISSION_DENIED, msg
            await auditor.export_bundle()  # reading evidence is what an auditor is for
            assert (await auditor.get_task(task.task_id)).task.task_id == task.task_id


async def test_submitter_cannot_export_or_change_policy(tmp_path: Path) -> None:
    """A submitter may submit tasks but not export bundles, write policy or secrets."""
    async with start_control(tmp_path) as cp, cp.operator(Role.SUBMITTER) as submitter:
        assert (await submitter.submit("work", b"{}")).created
        for call in (
            submitter.export_bundle(),
            submitter.put_policy(POLICY),
            submitter.put_secret("api_token", b"s3cret"),
            submitter.list_tasks(),
            submitter.create_join_token("node-1"),
        ):
            code, msg = await refused(call)
            assert code == PERMISSION_DENIED, msg


async def test_listings_carry_no_payloads(tmp_path: Path) -> None:
    """ListTasks never returns payloads or results; an auditor's GetTask does not either."""
    async with start_control(tmp_path) as cp:
        task = (await cp.client.submit("work", b"top secret payload")).task
        node = await cp.node_client("node-1")
        async with node:
            leased = (await node.acquire_lease("work", "node-1", "alice", start=True)).task
            await node.transition(
                leased.task_id,
                leased.fencing_token,
                Event.SUCCEED,
                "node-1",
                result=b"secret result",
            )
        async with cp.operator(Role.AUDITOR) as auditor:
            for lister in (cp.client, auditor):
                listed = (await lister.list_tasks()).tasks
                assert [t.task_id for t in listed] == [task.task_id]
                assert listed[0].payload == b""
                assert listed[0].result == b""
            seen = (await auditor.get_task(task.task_id)).task
            assert (seen.payload, seen.result) == (b"", b"")
        full = (await cp.client.get_task(task.task_id)).task
        assert (full.payload, full.result) == (b"top secret payload", b"secret result")


# -- authorization: a node acts only as itself, on its own tasks ----------------------------


async def test_node_cannot_reach_another_nodes_task(tmp_path: Path) -> None:
    """Node A cannot read the policy, tool-call records or credentials of node B's task."""
    async with start_control(tmp_path) as cp:
        await cp.client.put_policy(POLICY)
        await cp.client.put_secret("api_token", b"s3cret")
        await cp.client.submit("work", b"{}")
        node_a = await cp.node_client("node-a")
        node_b = await cp.node_client("node-b")
        async with node_a, node_b:
            task = (await node_b.acquire_lease("work", "node-b", "alice", start=True)).task
            tid, token = task.task_id, task.fencing_token
            # B itself may do each of these (the refusals below are about who asks).
            assert (await node_b.get_policy(task_id=tid, fencing_token=token)).document == POLICY
            cred = await node_b.issue_credential(tid, token, "api_token", "echo", "node-b")
            assert cred.value == b"s3cret"
            await node_b.record_tool_call(tid, token, "k1", "echo", "a" * 64, 1, "node-b")
            assert await node_b.lookup_tool_call(tid, "k1") is not None

            code, _ = await refused(node_a.get_policy(task_id=tid, fencing_token=token))
            assert code == PERMISSION_DENIED
            code, _ = await refused(node_a.lookup_tool_call(tid, "k1"))
            assert code == PERMISSION_DENIED
            code, _ = await refused(
                node_a.issue_credential(tid, token, "api_token", "echo", "node-a")
            )
            assert code == PERMISSION_DENIED
            # A node reads no policy version outside a lease it holds.
            code, _ = await refused(node_a.get_policy())
            assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_node_cannot_act_as_another_node(tmp_path: Path) -> None:
    """Every node RPC naming node_id B, sent with node A's certificate, is refused."""
    async with start_control(tmp_path) as cp:
        await cp.client.submit("work", b"{}")
        node_a = await cp.node_client("node-a")
        node_b = await cp.node_client("node-b")
        async with node_a, node_b:
            task = (await node_b.acquire_lease("work", "node-b", "alice", start=True)).task
            tid, token = task.task_id, task.fencing_token
            for call in (
                node_a.acquire_lease("work", "node-b", "alice"),
                node_a.renew_lease(tid, token, "node-b"),
                node_a.transition(tid, token, Event.SUCCEED, "node-b"),
                node_a.issue_credential(tid, token, "api_token", "echo", "node-b"),
                node_a.reserve_budget(tid, token, "r1", 10, "node-b"),
                node_a.settle_budget(tid, token, "r1", 10, "node-b"),
                node_a.record_tool_call(tid, token, "k1", "echo", "a" * 64, 1, "node-b"),
            ):
                code, msg = await refused(call)
                assert code == PERMISSION_DENIED, msg
                assert "node 'node-a'" in msg
            # A receipt stream opened under B's name.
            stream = node_a.stub.StreamReceipts(
                iter([pb.StreamReceiptsRequest(node_id="node-b")]), timeout=10
            )
            code, _ = await refused(_drain(stream))
            assert code == PERMISSION_DENIED
            # B's task was untouched by all of it.
            after = (await cp.client.get_task(tid)).task
            assert (after.node_id, after.fencing_token, State(after.state)) == (
                "node-b",
                token,
                State.RUNNING,
            )


async def test_node_learns_nothing_of_another_nodes_task_from_a_refusal(tmp_path: Path) -> None:
    """Tool-call records (one or a batch of 256) and budget calls on a task a node never
    held are refused as a task that does not exist is: one uniform NOT_OWNER naming
    neither the holder nor its fencing token, so no task id, holder or token leaks."""
    async with start_control(tmp_path) as cp:
        await cp.client.put_policy(POLICY)
        await cp.client.submit("work", b"{}")
        await cp.client.submit("work", b"{}")
        node_a = await cp.node_client("node-a")
        node_b = await cp.node_client("node-b")
        async with node_a, node_b:
            theirs = (await node_b.acquire_lease("work", "node-b", "alice", start=True)).task
            mine = (await node_a.acquire_lease("work", "node-a", "alice", start=True)).task
            tid, token = theirs.task_id, theirs.fencing_token

            def probes(task_id: str, tok: int) -> list[Awaitable[object]]:
                return [
                    node_a.record_tool_call(task_id, tok, "k1", "echo", "a" * 64, 1, "node-a"),
                    node_a.reserve_budget(task_id, tok, "r1", 10, "node-a"),
                    node_a.settle_budget(task_id, tok, "r1", 10, "node-a"),
                ]

            seen: list[list[tuple[grpc.StatusCode, str]]] = []
            for task_id, tok in ((tid, token), (tid, token + 7), ("t_no_such_task", token)):
                got = [await refused(call) for call in probes(task_id, tok)]
                assert all(code == PERMISSION_DENIED for code, _ in got), got
                for _, msg in got:
                    assert "node-b" not in msg, msg
                    assert "current" not in msg, msg
                seen.append([(c, m.replace(task_id, "T").replace(str(tok), "N")) for c, m in got])
            assert seen[0] == seen[1] == seen[2], seen

            def start(task_id: str, tok: int) -> pb.RecordToolCallRequest:
                return pb.RecordToolCallRequest(
                    task_id=task_id, fencing_token=tok, idempotency_key="k", tool="echo",
                    arguments_sha256="a" * 64, phase=pb.TOOL_CALL_PHASE_STARTED, node_id="node-a",
                )  # fmt: skip

            resp = await node_a.stub.StartToolCalls(
                pb.StartToolCallsRequest(
                    node_id="node-a",
                    calls=[
                        start(mine.task_id, mine.fencing_token),
                        start(tid, token),
                        start("t_no_such_task", token),
                    ],
                ),
                timeout=10,
            )
            assert resp.results[0].HasField("recorded")
            answers = []
            for result, task_id in zip(resp.results[1:], (tid, "t_no_such_task"), strict=True):
                r = result.refused
                assert (r.reason, r.code) == ("NOT_OWNER", PERMISSION_DENIED.value[0]), r
                assert "node-b" not in r.message
                assert "current_fencing_token" not in r.metadata
                answers.append((r.message.replace(task_id, "T"), sorted(r.metadata)))
            assert answers[0] == answers[1], answers
            # B's task was untouched, and B itself still gets its own diagnosis.
            assert await node_b.lookup_tool_call(tid, "k") is None
            code, msg = await refused(
                node_b.record_tool_call(tid, token + 7, "k1", "echo", "a" * 64, 1, "node-b")
            )
            assert "stale" in msg, (code, msg)


async def _drain(stream: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
    async for _ in stream:
        pass


# -- revocation and re-keying ----------------------------------------------------------------


async def test_rekeyed_node_old_certificate_is_refused(tmp_path: Path) -> None:
    """Once a node enrols a new key with a RekeyNode token, its old certificate is refused."""
    async with start_control(tmp_path) as cp:
        old = await cp.node_client("node-1")
        async with old:
            assert not (await old.acquire_lease("work", "node-1", "alice")).HasField("task")
            async with cp.operator() as admin:
                token = (await admin.rekey_node("node-1")).token
            # Before the new key enrols, the old certificate still works.
            assert not (await old.acquire_lease("work", "node-1", "alice")).HasField("task")
            new_key = SigningKey.generate()
            new = await cp.endpoint.node_client("node-1", new_key, join_token=token)
            async with new:
                code, msg = await refused(old.acquire_lease("work", "node-1", "alice"))
                assert code == UNAUTHENTICATED
                assert "re-keyed" in msg
                assert not (await new.acquire_lease("work", "node-1", "alice")).HasField("task")
        async with cp.operator() as admin:
            (info,) = await admin.list_nodes()
        assert (info.keyid, info.status) == (new_key.keyid, "active")


async def test_revoked_node_is_refused_and_cannot_re_enrol(tmp_path: Path) -> None:
    """A revoked node's certificate is refused at once, and it cannot renew or re-enrol."""
    async with start_control(tmp_path) as cp:
        key = SigningKey.generate()
        node = await cp.node_client("node-1", key)
        async with node:
            async with cp.operator() as admin:
                info = await admin.revoke_node("node-1", "key compromised")
            assert info.status == "revoked"
            code, msg = await refused(node.acquire_lease("work", "node-1", "alice"))
            assert code == UNAUTHENTICATED
            assert "revoked" in msg
        channel, stub = enroll_stub(cp)
        async with channel:
            code, msg = await refused(honest_register(stub, "node-1", key))
            assert code == PERMISSION_DENIED
            assert "key compromised" in msg


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    """A fresh `tether_test_<random>` database on the test PostgreSQL server; dropped after."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    admin = os.environ.get(
        "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    try:
        psycopg.connect(admin, connect_timeout=3).close()
    except psycopg.Error as err:
        pytest.skip(f"PostgreSQL server cannot be reached: {err}")
    name = f"tether_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(admin)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.postgres
async def test_revocation_holds_on_every_replica(tmp_path: Path) -> None:
    """A node revoked through one replica is refused by that replica from the next call and by
    the other once its node check's documented bound (node_check_cache_ms, at most 1 s) has
    passed, both replicas of one PostgreSQL store."""
    key = SigningKey.generate()
    pki = tmp_path / "pki"
    with fresh_postgres() as url:
        async with (
            start_control(tmp_path / "r1", key=key, db=url, pki_dir=pki, vault=False) as r1,
            start_control(tmp_path / "r2", key=key, db=url, pki_dir=pki, vault=False) as r2,
        ):
            node_key = SigningKey.generate()
            tls_key = generate_tls_key()
            async with ControlClient(r1.enroll_address, tls=r1.pki.anonymous_tls) as anon:
                reg = await anon.register_node(
                    "node-1", node_key, await r1.join_token("node-1"), tls_key
                )
            tls = node_client_tls(cert_pem(r1.pki.ca.cert), reg, tls_key)
            on_r1 = ControlClient(r1.address, tls=tls)
            on_r2 = ControlClient(r2.address, tls=tls)  # the same certificate, the other replica
            async with on_r1, on_r2:
                for client in (on_r1, on_r2):
                    assert not (await client.acquire_lease("work", "node-1", "a")).HasField("task")
                async with r2.operator() as admin:
                    await admin.revoke_node("node-1", "decommissioned")
                code, msg = await refused(on_r2.acquire_lease("work", "node-1", "a"))
                assert (code, "revoked" in msg) == (UNAUTHENTICATED, True)
                await asyncio.sleep(MAX_NODE_CHECK_CACHE_MS / 1000)  # r1's documented bound
                for client in (on_r1, on_r2):
                    code, msg = await refused(client.acquire_lease("work", "node-1", "a"))
                    assert code == UNAUTHENTICATED
                    assert "revoked" in msg
            for replica in (r1, r2):
                channel, stub = enroll_stub(replica)
                async with channel:
                    code, _ = await refused(honest_register(stub, "node-1", node_key))
                    assert code == PERMISSION_DENIED


async def test_node_check_without_reuse_sees_a_revocation_written_by_anyone(
    tmp_path: Path,
) -> None:
    """With node_check_cache_ms=0 a revocation written straight to the store (as another
    replica would) is refused on the next call; the bound cannot be set above 1 s."""
    with pytest.raises(ConfigError, match="node_check_cache_ms"):
        ControlConfig(node_check_cache_ms=MAX_NODE_CHECK_CACHE_MS + 1)
    async with start_control(tmp_path, config=ControlConfig(node_check_cache_ms=0)) as cp:
        node = await cp.node_client("node-1")
        try:
            assert not (await node.acquire_lease("work", "node-1", "a")).HasField("task")
            await cp.service.store.set_node_status("node-1", "revoked", "elsewhere", 1)
            code, msg = await refused(node.acquire_lease("work", "node-1", "a"))
            assert (code, "revoked" in msg) == (UNAUTHENTICATED, True)
        finally:
            await node.close()


# -- found by red-teaming the first cut: each was a way through ------------------------


async def test_allow_listed_key_enrols_only_its_node_ids_and_dies_with_a_revocation(
    tmp_path: Path,
) -> None:
    """An allow-listed key enrols only ids matching its glob, and once a node enrolled with it
    is revoked the key cannot come back under any other id."""
    key = SigningKey.generate()
    async with start_control(tmp_path, allowed_node_keys=[("pod-*", key.public.raw)]) as cp:
        channel, stub = enroll_stub(cp)
        async with channel:
            await honest_register(stub, "pod-1", key)
            for other in ("node-b", "admin", "pod"):
                code, _ = await refused(honest_register(stub, other, key))
                assert code == UNAUTHENTICATED, other
            async with cp.operator() as admin:
                await admin.revoke_node("pod-1", "key compromised")
            code, msg = await refused(honest_register(stub, "pod-2", key))
            assert code == PERMISSION_DENIED
            assert "revoked" in msg
            # Another key allow-listed for the same ids is unaffected.


async def test_join_tokens_die_with_revocation_and_with_a_newer_rekey_token(
    tmp_path: Path,
) -> None:
    """A re-key token issued before a revocation, or superseded by a newer one, enrols nobody."""
    async with start_control(tmp_path) as cp:
        node = await cp.node_client("node-1")
        await node.close()
        channel, stub = enroll_stub(cp)
        async with channel, cp.operator() as admin:
            leaked = (await admin.rekey_node("node-1")).token
            await admin.revoke_node("node-1", "compromised")
            code, _ = await refused(honest_register(stub, "node-1", SigningKey.generate(), leaked))
            assert code == UNAUTHENTICATED
            assert [n.status for n in await admin.list_nodes()] == ["revoked"]
            first = (await admin.rekey_node("node-1")).token
            second = (await admin.rekey_node("node-1")).token
            code, _ = await refused(honest_register(stub, "node-1", SigningKey.generate(), first))
            assert code == UNAUTHENTICATED
            new_key = SigningKey.generate()
            await honest_register(stub, "node-1", new_key, second)  # the newest one works
            code, _ = await refused(honest_register(stub, "node-1", SigningKey.generate(), second))
            assert code == UNAUTHENTICATED  # used: single use


async def test_node_cannot_write_receipts_about_tasks_it_never_held(tmp_path: Path) -> None:
    """Receipts naming another node's task (or a made-up one) are refused at ingest, so the
    append-only ledger and every honest export stay verifiable."""
    from tether.core.receipts import Receipt, ReceiptKind
    from tether.crypto.receipts import sign_receipt

    async with start_control(tmp_path) as cp:
        task = (await cp.client.submit("work", b"{}")).task
        key_a = SigningKey.generate()
        node_a = await cp.node_client("node-a", key_a)
        node_b = await cp.node_client("node-b")
        async with node_a, node_b:
            got = await node_b.acquire_lease("work", "node-b", "alice")
            assert got.task.task_id == task.task_id
            before = (await cp.client.export_bundle([])).entries
            for task_id in (task.task_id, "t_000000000000_0000000000000000"):
                forged = Receipt(
                    kind=ReceiptKind.TASK_FINISHED, node_id="node-a", task_id=task_id,
                    attempt=1, fencing_token=1, agent_id="alice", lease_id="l_x",
                    lease_issued_unix_ms=1, lease_expires_unix_ms=2, time_unix_ms=1, seq=1,
                    final_state=int(State.FAILED), status="error",
                )  # fmt: skip
                stream = node_a.stub.StreamReceipts(
                    iter(
                        [
                            pb.StreamReceiptsRequest(
                                node_id="node-a",
                                receipts=[
                                    pb.SpooledReceipt(seq=1, envelope=sign_receipt(forged, key_a))
                                ],
                            )
                        ]
                    ),
                    timeout=10,
                )
                code, msg = await refused(_drain(stream))
                assert code == PERMISSION_DENIED
                assert "never leased to this node" in msg
            after = (await cp.client.export_bundle([])).entries
            assert len(after) == len(before)


async def test_oversized_carried_outcome_is_refused_before_anything_is_appended(
    tmp_path: Path,
) -> None:
    """A node streams its own keyed tool_call receipt carrying an outcome over the 1 MiB
    limit (whose digest the receipt does sign): refused, nothing appended, and the key's
    STARTED record is left as it was."""
    from tether.core.receipts import Receipt, ReceiptKind
    from tether.crypto.receipts import sign_receipt

    async with start_control(tmp_path) as cp:
        task = (await cp.client.submit("work", b"{}")).task
        key = SigningKey.generate()
        node = await cp.node_client("node-a", key)
        async with node:
            got = await node.acquire_lease("work", "node-a", "alice")
            token = got.task.fencing_token
            args = "a" * 64
            await node.record_tool_call(task.task_id, token, "k", "t", args, 1, "node-a")
            big = b"x" * ((1 << 20) + 1)
            receipt = Receipt(
                kind=ReceiptKind.TOOL_CALL, node_id="node-a", task_id=task.task_id,
                attempt=1, fencing_token=token, agent_id="alice", lease_id="l_x",
                lease_issued_unix_ms=1, lease_expires_unix_ms=2, time_unix_ms=1, seq=1,
                tool="t", idempotency_key="k", arguments_sha256=args,
                result_sha256=hashlib.sha256(big).hexdigest(), status="ok",
            )  # fmt: skip
            before = (await cp.client.export_bundle([])).entries
            stream = node.stub.StreamReceipts(
                iter(
                    [
                        pb.StreamReceiptsRequest(
                            node_id="node-a",
                            receipts=[
                                pb.SpooledReceipt(
                                    seq=1,
                                    envelope=sign_receipt(receipt, key),
                                    tool_call_result=big,
                                )
                            ],
                        )
                    ]
                ),
                timeout=10,
            )
            code, msg = await refused(_drain(stream))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
            assert "tool_call_result" in msg, msg
            assert len((await cp.client.export_bundle([])).entries) == len(before)
            record = await cp.service.lookup_tool_call(task.task_id, "k")
            assert record is not None
            assert (record.phase.name, record.result) == ("STARTED", b"")


async def test_plaintext_is_refused_on_a_network_address(tmp_path: Path) -> None:
    """--insecure-plaintext serves loopback or a Unix socket only, never a network address."""
    from tether.control.server import start_server
    from tether.control.service import Auth
    from tether.core.errors import ConfigError

    with pytest.raises(ConfigError, match="loopback or a Unix socket only"):
        await start_server(
            db=tmp_path / "c.db", listen="0.0.0.0:0", key=SigningKey.generate(),
            auth=Auth(insecure=True),
        )  # fmt: skip


def test_secret_files_are_not_written_through_a_planted_temporary(tmp_path: Path) -> None:
    """A file planted where a naive writer would put its temporary gets none of the secret."""
    from tether.crypto.pki import write_private

    target = tmp_path / "join.token"
    planted = tmp_path / "join.token.tmp"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    write_private(target, b"tj_secret\n")
    assert planted.read_bytes() == b""
    assert target.read_bytes() == b"tj_secret\n"
    assert target.stat().st_mode & 0o777 == 0o600


async def test_expired_node_certificate_is_refused_on_an_open_connection(tmp_path: Path) -> None:
    """A node certificate that expires while its connection (and a StreamLeases stream on
    it) stays open is refused from then on: the next step of the stream and a new call on
    the same channel alike, and nothing is ended or granted; a renewed one works."""
    async with start_control(tmp_path, node_cert_ttl_ms=3000) as cp:
        await cp.client.put_policy(POLICY)
        for _ in range(3):
            await cp.client.submit("work", b"{}")
        key = SigningKey.generate()
        node = await cp.node_client("node-1", key)
        expires = node.registration.tls_expires_unix_ms  # type: ignore[attr-defined]
        async with node:
            async with node.lease_stream("node-1") as stream:
                _, got = await stream.step(queue="work", agent_id="alice", start=True)
                assert got is not None
                held = got.task
                await asyncio.sleep(max(0.0, (expires + 200) / 1000 - time.time()))
                end = pb.TaskCompletion(
                    task_id=held.task_id,
                    fencing_token=held.fencing_token,
                    event=pb.TASK_EVENT_SUCCEED,
                    result=b"ok",
                )
                code, msg = await refused(stream.step([end], queue="work", agent_id="alice"))
                assert code == UNAUTHENTICATED, msg
                assert "expired" in msg
            code, msg = await refused(node.acquire_lease("work", "node-1", "alice"))
            assert code == UNAUTHENTICATED, msg
            assert "expired" in msg
        task = (await cp.client.get_task(held.task_id)).task
        assert (State(task.state), task.fencing_token) == (State.RUNNING, held.fencing_token)
        queued = await cp.client.list_all_tasks(queue="work", state=State.QUEUED)
        assert len(queued) == 2
        renewed = await cp.endpoint.node_client("node-1", key, join_token="")
        async with renewed:
            done, _ = await renewed.complete_tasks("node-1", [end])
            assert [State(t.state) for t in done] == [State.SUCCEEDED]


async def test_a_long_poll_grants_nothing_after_a_revocation_or_policy_change(
    tmp_path: Path,
) -> None:
    """A grant that follows a wait is checked again: a node revoked while its StreamLeases
    step or AcquireLease long-polls, or an agent the policy stopped letting claim meanwhile,
    gets no lease when a task arrives (it stays queued for others)."""
    async with start_control(tmp_path) as cp:
        await cp.client.put_policy(POLICY)
        node = await cp.node_client("node-1")
        other = await cp.node_client("node-2")
        async with node, other:
            async with node.lease_stream("node-1") as stream:
                polls = [
                    asyncio.ensure_future(
                        stream.step(queue="work", agent_id="alice", wait_ms=8000)
                    ),
                    asyncio.ensure_future(
                        node.acquire_lease("work", "node-1", "alice", wait_ms=8000)
                    ),
                ]
                await asyncio.sleep(0.5)  # both are waiting
                async with cp.operator() as admin:
                    await admin.revoke_node("node-1", "key compromised")
                await cp.client.submit("work", b"{}")
                for poll in polls:
                    code, msg = await refused(poll)
                    assert code == UNAUTHENTICATED, msg
                    assert "revoked" in msg
            # The policy: alice may no longer claim from "work" once node-2 waits (on an
            # empty queue: node-2 takes the task the revoked node could not).
            taken = await other.acquire_lease("work", "node-2", "alice")
            assert taken.HasField("task")
            poll = asyncio.ensure_future(
                other.acquire_lease("work", "node-2", "alice", wait_ms=8000, max_tasks=2)
            )
            await asyncio.sleep(0.5)
            await cp.client.put_policy(POLICY.replace('queues = ["work"]', "queues = []", 1))
            await cp.client.submit("work", b"{}")
            code, msg = await refused(poll)
            assert code == PERMISSION_DENIED, msg
            assert "may not claim" in msg
        queued = await cp.client.list_all_tasks(queue="work", state=State.QUEUED)
        assert len(queued) == 1

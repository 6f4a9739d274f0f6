"""The credential vault and IssueCredential over real gRPC and real SQLite."""

from __future__ import annotations

import base64
import logging
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import POLICY, db_bytes, leased, operator_args, run_cli

from tether.control.client import ControlClient
from tether.control.server import start_server
from tether.control.service import Auth
from tether.core.clock import FakeClock
from tether.core.errors import (
    ConfigError,
    Forbidden,
    InvalidArgument,
    InvalidTransition,
    LeaseExpired,
    NotFound,
    NotOwner,
    PolicyDenied,
    StaleFencingToken,
    TetherError,
    Unauthenticated,
)
from tether.core.states import Event
from tether.crypto.signing import SigningKey
from tether.testing import (
    TEST_TRUST_DOMAIN,
    ControlHandle,
    endpoint,
    make_pki,
    spawn_control_cli,
    start_control,
)

SECRET = b"s3cr3t-Value/with+base64=chars&url?"


def forms(secret: bytes) -> list[bytes]:
    """The secret raw, base64 (std and url-safe) and URL-encoded."""
    return [
        secret,
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        urllib.parse.quote(secret, safe="").encode(),
    ]


@pytest.fixture
async def cp(tmp_path: Path) -> Any:
    clock = FakeClock()
    async with start_control(tmp_path, clock=clock) as handle:
        await handle.client.put_policy(POLICY)
        yield handle


@pytest.fixture
async def node(cp: ControlHandle) -> Any:
    client = await cp.node_client("node-1")
    yield client
    await client.close()


def clock_of(cp: ControlHandle) -> FakeClock:
    clock = cp.service.clock
    assert isinstance(clock, FakeClock)
    return clock


async def test_issue_credential_returns_the_latest_value_until_lease_expiry(
    cp: ControlHandle, node: ControlClient
) -> None:
    """A holder granted the credential gets its newest version, valid until the lease expires."""
    assert await cp.client.put_secret("api_token", b"old-value") == 1
    assert await cp.client.put_secret("api_token", SECRET) == 2
    task = await leased(cp, node)
    resp = await node.issue_credential(
        task.task_id, task.fencing_token, "api_token", "fetch", "node-1"
    )
    assert resp.value == SECRET
    assert resp.expires_unix_ms == task.lease_expires_unix_ms


async def test_secret_never_stored_logged_or_echoed_in_plaintext(
    cp: ControlHandle, node: ControlClient, caplog: pytest.LogCaptureFixture
) -> None:
    """After put, issue and refusals, no form of the secret is in the DB, the logs or an error."""
    caplog.set_level(logging.DEBUG)
    await cp.client.put_secret("api_token", SECRET)
    await cp.client.put_secret("missing_other", SECRET)
    task = await leased(cp, node)
    await node.issue_credential(task.task_id, task.fencing_token, "api_token", "fetch", "node-1")
    errors: list[str] = []
    for name, tool in (("api_token", "echo"), ("api_token", "fetch_other"), ("nope", "fetch")):
        with pytest.raises(TetherError) as info:
            await node.issue_credential(task.task_id, task.fencing_token, name, tool, "node-1")
        errors.append(str(info.value) + repr(info.value.metadata))
    with pytest.raises(InvalidArgument) as too_big:
        await cp.client.put_secret("api_token", SECRET * 4000)
    errors.append(str(too_big.value))
    # Checkpoint the WAL too, so both the WAL and the main file are searched.
    blob = db_bytes(cp.db_path)
    logs = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records).encode()
    for form in forms(SECRET):
        assert form not in blob
        assert form not in logs
        assert all(form not in e.encode() for e in errors)
    conn = sqlite3.connect(cp.db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    blob = db_bytes(cp.db_path)
    assert all(form not in blob for form in forms(SECRET))
    assert b"api_token" in blob  # the search did read the table


async def test_denials_name_credential_and_tool(cp: ControlHandle, node: ControlClient) -> None:
    """An ungranted tool or credential is PERMISSION_DENIED naming both credential and tool."""
    await cp.client.put_secret("api_token", SECRET)
    task = await leased(cp, node)
    with pytest.raises(PolicyDenied) as not_in_queue:
        await node.issue_credential(
            task.task_id, task.fencing_token, "api_token", "fetch_other", "node-1"
        )
    assert "'api_token'" in str(not_in_queue.value)
    assert "'fetch_other'" in str(not_in_queue.value)
    assert not_in_queue.value.metadata["tool"] == "fetch_other"
    with pytest.raises(PolicyDenied) as not_granted:
        await node.issue_credential(task.task_id, task.fencing_token, "api_token", "echo", "node-1")
    assert "'api_token'" in str(not_granted.value)
    assert "'echo'" in str(not_granted.value)
    assert not_granted.value.metadata["credential"] == "api_token"


async def test_granted_credential_without_a_stored_secret_is_not_found(
    cp: ControlHandle, node: ControlClient
) -> None:
    """The policy grants missing_token to fetch_missing, but nothing is stored: NOT_FOUND."""
    task = await leased(cp, node)
    with pytest.raises(NotFound, match="missing_token"):
        await node.issue_credential(
            task.task_id, task.fencing_token, "missing_token", "fetch_missing", "node-1"
        )


async def test_credential_needs_the_live_lease_of_the_calling_node(
    cp: ControlHandle, node: ControlClient
) -> None:
    """Stale token, another node, a finished task and a lapsed lease are all refused."""
    await cp.client.put_secret("api_token", SECRET)
    task = await leased(cp, node)
    tok = task.fencing_token
    with pytest.raises(StaleFencingToken):
        await node.issue_credential(task.task_id, tok + 1, "api_token", "fetch", "node-1")
    other = await cp.node_client("node-2")
    try:
        with pytest.raises(NotOwner):
            await other.issue_credential(task.task_id, tok, "api_token", "fetch", "node-2")
        with pytest.raises(NotOwner):  # node-2's token cannot act as node-1
            await other.issue_credential(task.task_id, tok, "api_token", "fetch", "node-1")
    finally:
        await other.close()
    # No client certificate (only the enrolment address takes such calls at all).
    anonymous = ControlClient(cp.enroll_address, tls=cp.pki.anonymous_tls)
    try:
        with pytest.raises(Unauthenticated):
            await anonymous.issue_credential(task.task_id, tok, "api_token", "fetch", "node-1")
    finally:
        await anonymous.close()
    with pytest.raises(Forbidden):  # an operator, even an admin, is no node
        await cp.client.issue_credential(task.task_id, tok, "api_token", "fetch", "node-1")
    clock_of(cp).advance(task.lease_ttl_ms)
    with pytest.raises(LeaseExpired):
        await node.issue_credential(task.task_id, tok, "api_token", "fetch", "node-1")
    await cp.service.sweep()
    with pytest.raises(LeaseExpired):
        await node.issue_credential(task.task_id, tok, "api_token", "fetch", "node-1")
    clock_of(cp).advance(120_000)
    again = await node.acquire_lease("work", "node-1", "alice")
    await node.transition(again.task.task_id, again.task.fencing_token, Event.RELEASE, "node-1")
    with pytest.raises(InvalidTransition, match="no live lease"):
        await node.issue_credential(
            again.task.task_id, again.task.fencing_token, "api_token", "fetch", "node-1"
        )


async def test_grants_follow_the_policy_the_lease_was_signed_under(
    cp: ControlHandle, node: ControlClient
) -> None:
    """A policy applied after the grant does not change it until the lease is renewed under it."""
    await cp.client.put_secret("api_token", SECRET)
    task = await leased(cp, node)
    revoked = POLICY.replace('tools = ["fetch", "fetch_other"]', 'tools = ["fetch_other"]')
    revoked = revoked.replace('credential = "api_token"\n[tools.fetch.http]', "[tools.fetch.http]")
    await cp.client.put_policy(revoked)
    resp = await node.issue_credential(
        task.task_id, task.fencing_token, "api_token", "fetch", "node-1"
    )
    assert resp.value == SECRET
    await node.renew_lease(task.task_id, task.fencing_token, "node-1")
    with pytest.raises(PolicyDenied):
        await node.issue_credential(
            task.task_id, task.fencing_token, "api_token", "fetch", "node-1"
        )


async def test_put_secret_edge_validation(cp: ControlHandle) -> None:
    """Bad names, empty and oversized values are INVALID_ARGUMENT naming the field."""
    for name, value, field in (
        ("", b"x", "name"),
        ("bad name", b"x", "name"),
        ("ok", b"", "value"),
        ("ok", b"x" * (64 * 1024 + 1), "value"),
    ):
        with pytest.raises(InvalidArgument) as info:
            await cp.client.put_secret(name, value)
        assert info.value.field == field


async def test_issue_credential_edge_validation(cp: ControlHandle, node: ControlClient) -> None:
    """Missing or malformed fields of IssueCredential are INVALID_ARGUMENT naming the field."""
    cases = (
        (("", 1, "api_token", "fetch", "node-1"), "task_id"),
        (("t", 0, "api_token", "fetch", "node-1"), "fencing_token"),
        (("t", 1, "", "fetch", "node-1"), "name"),
        (("t", 1, "api_token", "a b", "node-1"), "tool"),
        (("t", 1, "api_token", "fetch", ""), "node_id"),
    )
    for args, field in cases:
        with pytest.raises(InvalidArgument) as info:
            await node.issue_credential(*args)
        assert info.value.field == field
    assert await cp.client.health() == 1


async def test_vault_off_without_kek_file(tmp_path: Path) -> None:
    """Without --kek-file, PutSecret says the vault is not configured (and stores nothing)."""
    async with start_control(tmp_path, vault=False) as cp:
        with pytest.raises(TetherError, match="--kek-file"):
            await cp.client.put_secret("api_token", SECRET)


async def test_control_refuses_a_kek_file_readable_by_others(tmp_path: Path) -> None:
    """A KEK file with group/other permissions stops the control plane from starting."""
    kek = tmp_path / "kek"
    rc, _, _ = await run_cli("secrets", "init-kek", "--file", str(kek))
    assert rc == 0
    assert kek.stat().st_mode & 0o777 == 0o600
    kek.chmod(0o644)
    key = SigningKey.generate()
    pki = make_pki(tmp_path / "pki", [key])
    with pytest.raises(ConfigError, match="too open"):
        await start_server(
            db=tmp_path / "c.db",
            listen="127.0.0.1:0",
            key=key,
            kek_file=kek,
            auth=Auth(ca=pki.ca, trust_domain=TEST_TRUST_DOMAIN),
            tls=pki.server_tls,
        )


async def test_cli_put_reads_stdin_or_file_and_rotate_kek_rewraps_live(
    cp: ControlHandle, node: ControlClient, tmp_path: Path
) -> None:
    """`secrets put` reads stdin or a file; `rotate-kek` re-wraps all rows while serving."""
    assert cp.kek_file is not None
    rc, out, err = await run_cli(
        "secrets", "put", "api_token", *operator_args(cp), stdin=SECRET + b"\n"
    )
    assert rc == 0, err
    assert SECRET.decode() not in out + err
    task = await leased(cp, node)
    got = await node.issue_credential(
        task.task_id, task.fencing_token, "api_token", "fetch", "node-1"
    )
    assert got.value == SECRET  # the trailing newline was dropped
    value_file = tmp_path / "value"
    value_file.write_bytes(b"from-a-file")
    rc, _, err = await run_cli(
        "secrets", "put", "other", *operator_args(cp), "--from-file", str(value_file)
    )
    assert rc == 0, err

    def kek_ids() -> set[str]:
        conn = sqlite3.connect(cp.db_path)
        try:
            return {r[0] for r in conn.execute("SELECT kek_id FROM secrets")}
        finally:
            conn.close()

    before = kek_ids()
    assert len(before) == 1
    rc, out, err = await run_cli(
        "secrets", "rotate-kek", "--kek-file", str(cp.kek_file), "--db", str(cp.db_path)
    )
    assert rc == 0, err
    assert "re-wrapped 2 secret version(s)" in out
    after = kek_ids()
    assert len(after) == 1
    assert after != before
    # The running control plane re-reads the KEK file: old rows re-wrapped under the
    # new KEK open, and new secrets are sealed under it.
    got = await node.issue_credential(
        task.task_id, task.fencing_token, "api_token", "fetch", "node-1"
    )
    assert got.value == SECRET
    await cp.client.put_secret("api_token", b"v3")
    assert kek_ids() == after
    rc, out, _ = await run_cli(
        "secrets", "rotate-kek", "--kek-file", str(cp.kek_file), "--db", str(cp.db_path)
    )
    assert rc == 0
    assert "re-wrapped 3 secret version(s)" in out
    got = await node.issue_credential(
        task.task_id, task.fencing_token, "api_token", "fetch", "node-1"
    )
    assert got.value == b"v3"


async def test_cli_control_serves_the_vault_from_kek_file(tmp_path: Path) -> None:
    """`tether control --kek-file` (as spawned by spawn_control_cli) seals secrets into its DB."""
    proc, address = spawn_control_cli(tmp_path)
    try:
        async with endpoint(address).admin() as client:
            assert await client.put_secret("api_token", SECRET) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert all(form not in db_bytes(tmp_path / "control.db") for form in forms(SECRET))
    assert SECRET.decode() not in (tmp_path / "control.log").read_text()

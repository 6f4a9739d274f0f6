"""The `tether control` process and operator CLI, run as real subprocesses."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from control_fixtures import operator_args

from tether.control.client import ControlClient
from tether.core.states import Event, State
from tether.crypto.envelopes import from_proto
from tether.crypto.leases import verify_lease
from tether.crypto.pki import Role
from tether.crypto.signing import SigningKey, VerifyKey
from tether.testing import endpoint, spawn_control_cli


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


async def test_sigkill_and_restart_keeps_every_acknowledged_task_and_lease(
    tmp_path: Path,
) -> None:
    """After SIGKILL and a restart on the same database, every acknowledged write is there."""
    proc, address = spawn_control_cli(tmp_path)
    try:
        ep = endpoint(address)
        node = await ep.node_client("node-1")
        async with ep.admin() as admin:
            submitted = [
                (await admin.submit("crash", f'{{"n":{i}}}'.encode(), idempotency_key=f"k{i}")).task
                for i in range(40)
            ]
        leases = [await node.acquire_lease("crash", "node-1", "a") for _ in range(15)]
        first = leases[0].task
        await node.renew_lease(first.task_id, first.fencing_token, "node-1")
        await node.transition(first.task_id, first.fencing_token, Event.START, "node-1")
        node_tls = node.tls
        await node.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    proc, address = spawn_control_cli(tmp_path)
    try:
        key = VerifyKey.load(tmp_path / "keys" / "control.pub")
        async with (
            endpoint(address).admin() as client,
            ControlClient(address, tls=node_tls) as node,
        ):
            tasks = {t.task_id: t for t in await client.list_all_tasks(queue="crash")}
            assert set(tasks) == {t.task_id for t in submitted}
            for lease in leases:
                got = await client.get_task(lease.task.task_id)
                assert got.task.state in (State.LEASED, State.RUNNING)
                assert got.task.fencing_token == lease.task.fencing_token
                signed = [verify_lease(from_proto(r.lease), {key.keyid: key}) for r in got.leases]
                assert signed[0] == verify_lease(from_proto(lease.lease), {key.keyid: key})
            assert tasks[first.task_id].state == State.RUNNING
            assert len((await client.get_task(first.task_id)).leases) == 2
            # the node's certificate survives the restart (the node record is stored)
            await node.renew_lease(first.task_id, first.fencing_token, "node-1")
            again = await client.submit("crash", b'{"n":0}', idempotency_key="k0")
            assert not again.created
            assert again.task.task_id == submitted[0].task_id
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # graceful stop on SIGTERM


async def test_operator_commands_submit_list_and_show(tmp_path: Path) -> None:
    """`tether submit`, `tether tasks` and `tether task show` talk to a running control plane."""
    proc, address = spawn_control_cli(tmp_path)
    try:
        ep = endpoint(address)
        out = await asyncio.to_thread(
            _cli, "submit", *operator_args(ep), "--queue", "work", "--payload", '{"x":1}'
        )
        assert out.returncode == 0, out.stderr
        task_id = out.stdout.strip()
        listed = await asyncio.to_thread(
            _cli, "tasks", *operator_args(ep, Role.AUDITOR), "--state", "queued"
        )
        assert listed.returncode == 0, listed.stderr
        assert task_id in listed.stdout
        shown = await asyncio.to_thread(_cli, "task", "show", task_id, *operator_args(ep))
        assert shown.returncode == 0, shown.stderr
        assert "queued" in shown.stdout
        assert "attempt 0/3" in shown.stdout
        bad = await asyncio.to_thread(
            _cli, "submit", *operator_args(ep), "--queue", "bad queue", "--payload", "{}"
        )
        assert bad.returncode == 2  # INVALID_ARGUMENT from the server is a usage error
        assert "queue" in bad.stderr
    finally:
        _stop(proc)


def test_keys_init_writes_private_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    """`tether keys init` writes NAME.key (0600) and NAME.pub, and never overwrites them."""
    out = _cli("keys", "init", "--dir", str(tmp_path), "--name", "cp")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cp.key").stat().st_mode & 0o777 == 0o600
    key = SigningKey.load(tmp_path / "cp.key")
    assert VerifyKey.load(tmp_path / "cp.pub").raw == key.public.raw
    again = _cli("keys", "init", "--dir", str(tmp_path), "--name", "cp")
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr


def _keys(tmp_path: Path) -> Path:
    """A trust domain from `tether keys init`; returns its control.key."""
    out = _cli("keys", "init", "--dir", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    return tmp_path / "keys" / "control.key"


def test_control_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    """A malformed --listen is a usage error (exit 2) naming the address."""
    out = _cli(
        "control",
        "--db",
        str(tmp_path / "d.db"),
        "--listen",
        "nonsense",
        "--key",
        str(_keys(tmp_path)),
    )
    assert out.returncode == 2
    assert "nonsense" in out.stderr


@pytest.mark.parametrize(
    "flag", ["--ca-cert", "--ca-key", "--tls-cert", "--tls-key", "--client-ca"]
)
def test_control_refuses_missing_tls_files(tmp_path: Path, flag: str) -> None:
    """A CA or TLS file that cannot be read stops the control plane with exit 2, naming it."""
    out = _cli(
        "control",
        "--db",
        str(tmp_path / "d.db"),
        "--listen",
        "127.0.0.1:0",
        "--key",
        str(_keys(tmp_path)),
        flag,
        str(tmp_path / "missing"),
    )
    assert out.returncode == 2
    assert "missing" in out.stderr

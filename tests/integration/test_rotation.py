"""Key and certificate rotation under load: nothing stalls, nothing is lost, bundles verify.

Real in-process control planes and sidecars over mTLS; the control plane listens
on a Unix socket so a restart keeps its address, and `tether verify` runs as a
real process on the exported bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tether.core.states import State
from tether.crypto.pki import TrustBundle, write_public
from tether.crypto.signing import Envelope, SigningKey, VerifyKey
from tether.sidecar.spool import ReceiptSpool
from tether.testing import SidecarHandle, start_control, start_sidecar
from tether.verify import encode_bundle, verify_bundle
from tether.verify.bundle import Bundle, bundle_from_proto

RECEIPTS_PER_TASK = 3  # lease granted, task started, task finished


async def until(cond: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0) -> None:
    """Polls `cond()` until true; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


def spool_of(side: SidecarHandle) -> ReceiptSpool:
    spool = side.sidecar.deps.sink
    assert isinstance(spool, ReceiptSpool)
    return spool


def signer(envelope: bytes) -> str:
    """The keyid of the one signature on a stored DSSE envelope."""
    ((keyid, _),) = Envelope.from_json_bytes(envelope).signatures
    return keyid


async def work(side: SidecarHandle, n: int, wait_ms: int = 5000) -> list[str]:
    """Claims and completes `n` tasks as agent alice; returns their ids."""
    done = []
    async with side.agent("alice") as agent:
        for _ in range(n):
            task = await agent.claim("work", wait_ms=wait_ms)
            assert task is not None
            state, _ = await agent.complete(task.task_id, result=b"ok")
            assert state == "succeeded"
            done.append(task.task_id)
    return done


async def tether_verify(bundle: Bundle, tmp_path: Path, *keys: VerifyKey) -> tuple[int, str]:
    """Runs `tether verify` as a process on the bundle; returns (exit code, output)."""
    path = tmp_path / f"bundle-{time.monotonic_ns()}.json"
    path.write_bytes(encode_bundle(bundle))
    args = [sys.executable, "-m", "tether.cli", "verify", str(path), "--quiet"]
    for i, key in enumerate(keys):
        pub = tmp_path / f"trusted-{i}.pub"
        pub.write_bytes(key.pem())
        args += ["--trust", str(pub)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def check_bundle(bundle: Bundle, trusted: list[VerifyKey], receipts: int) -> None:
    report = verify_bundle(bundle, trusted)
    assert report.ok, [f.to_dict() for f in report.failures]
    assert len(bundle.entries) == receipts


async def test_control_key_rotation_while_tasks_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A control plane restarted under a new key keeps in-flight tasks on their first attempt."""
    k1, k2 = SigningKey.generate(), SigningKey.generate()
    caplog.set_level(logging.INFO, logger="tether.sidecar")
    async with contextlib.AsyncExitStack() as outer:
        control = contextlib.AsyncExitStack()
        cp = await control.enter_async_context(
            start_control(tmp_path, key=k1, unix_socket=True, vault=False)
        )
        address = cp.address
        for _ in range(4):
            await cp.client.submit("work", b"{}", lease_ttl_ms=5000)
        side = await outer.enter_async_context(start_sidecar(tmp_path, address))
        # The operator stages the new key in the sidecar's trust bundle first.
        bundle = TrustBundle.load(cp.trust_bundle)
        assert set(bundle.control_keys_by_id()) == {k1.keyid}
        write_public(cp.trust_bundle, bundle.to_pem() + k2.public.pem())
        agent = await outer.enter_async_context(side.agent("alice"))
        in_flight = [await agent.claim("work", wait_ms=2000) for _ in range(2)]
        assert all(t is not None and t.attempt == 1 for t in in_flight)
        ids = [t.task_id for t in in_flight if t is not None]

        await control.aclose()  # control plane down with two leases held
        control = contextlib.AsyncExitStack()
        outer.push_async_callback(lambda: control.aclose())
        cp = await control.enter_async_context(
            start_control(tmp_path, key=k2, unix_socket=True, vault=False)
        )
        assert cp.address == address

        async def renewed_under_k2() -> bool:
            for task_id in ids:
                await agent.heartbeat(task_id)  # the agent is alive: keep renewing
            held = side.sidecar.deps.leases.active()
            return len(held) == 2 and all(h.envelope.signatures[0][0] == k2.keyid for h in held)

        await until(renewed_under_k2, "the held leases renewed under the new key")
        assert any("trust bundle re-read" in r.getMessage() for r in caplog.records)
        for task_id in ids:
            state, _ = await agent.complete(task_id, result=b"ok")
            assert state == "succeeded"
        ids += await work(side, 2)

        tasks = {t.task_id: t for t in await cp.client.list_all_tasks(queue="work")}
        assert set(tasks) == set(ids)
        assert {(State(t.state), t.attempt) for t in tasks.values()} == {(State.SUCCEEDED, 1)}

        spool = spool_of(side)
        assert await spool.wait_acked(spool.last_seq, 15)
        exported = bundle_from_proto(await cp.client.export_bundle(ids))
        lease_signers = {e.signatures[0][0] for e in exported.leases}
        assert lease_signers == {k1.keyid, k2.keyid}
        check_bundle(exported, [k1.public, k2.public], len(ids) * RECEIPTS_PER_TASK)
        code, out = await tether_verify(exported, tmp_path, k1.public, k2.public)
        assert code == 0, out
        # Trusting only the new key, the evidence signed before the rotation fails.
        code, out = await tether_verify(exported, tmp_path, k2.public)
        assert code == 1, out


async def test_rekeyed_node_delivers_receipts_spooled_under_its_old_key(tmp_path: Path) -> None:
    """Receipts spooled under a node's old key are ingested after an operator re-keys it."""
    async with start_control(tmp_path, vault=False) as cp:
        for _ in range(4):
            await cp.client.submit("work", b"{}")
        async with start_sidecar(tmp_path, cp.address, receipt_ack_timeout_ms=200) as side:
            old_key = SigningKey.load(tmp_path / "node-1" / "node.key")
            done = await work(side, 1)
            spool = spool_of(side)
            assert await spool.wait_acked(spool.last_seq, 10)
            # The receipt uplink stops (the ledger is unreachable); work goes on.
            side.sidecar._receipts_stop.set()
            assert side.sidecar._receipts_task is not None
            await side.sidecar._receipts_task
            done += await work(side, 2)
            assert await spool.pending() == 2 * RECEIPTS_PER_TASK
        # The node's key is replaced: the operator re-keys it, the node restarts with a new key.
        token = (await cp.client.rekey_node("node-1")).token
        key_path = tmp_path / "node-1" / "node.key"
        key_path.unlink()
        key_path.with_suffix(".pub").unlink()
        new_key = SigningKey.generate()
        new_key.save(key_path, key_path.with_suffix(".pub"))
        async with start_sidecar(tmp_path, cp.address, enrollment_token=token) as side:
            spool = spool_of(side)
            assert await spool.wait_acked(spool.last_seq, 10), "old-key receipts not ingested"
            done += await work(side, 1)
            assert await spool.wait_acked(spool.last_seq, 10)
            total = spool.last_seq
        assert total == len(done) * RECEIPTS_PER_TASK
        (node,) = await cp.client.list_nodes()
        assert node.keyid == new_key.keyid
        exported = bundle_from_proto(await cp.client.export_bundle())
        signers = [signer(e.envelope) for e in exported.entries]
        # One chain, switching keys at the re-key point.
        n_old = 3 * RECEIPTS_PER_TASK
        assert signers == [old_key.keyid] * n_old + [new_key.keyid] * RECEIPTS_PER_TASK
        check_bundle(exported, [cp.key.public], total)


async def test_certificate_renewal_during_an_open_receipt_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sidecar renewing short-lived certificates twice while streaming receipts loses none."""
    caplog.set_level(logging.WARNING)
    async with start_control(tmp_path, vault=False, node_cert_ttl_ms=3000) as cp:
        for _ in range(60):
            await cp.client.submit("work", b"{}")
        async with start_sidecar(tmp_path, cp.address) as side:
            uplink = side.sidecar.uplink
            assert uplink is not None
            seen: list[int] = []

            def expiry() -> int:
                assert uplink.registration is not None
                return int(uplink.registration.tls_expires_unix_ms)

            seen.append(expiry())
            done: list[str] = []
            deadline = time.monotonic() + 20
            while len(seen) < 3:  # the first certificate and two renewals
                assert time.monotonic() < deadline, f"renewals seen: {len(seen) - 1}"
                done += await work(side, 1)
                if expiry() != seen[-1]:
                    seen.append(expiry())
                await asyncio.sleep(0.1)
            # Past the first two certificates' expiry: still working, still streaming.
            while time.time() * 1000 < seen[1] + 100:
                done += await work(side, 1)
                await asyncio.sleep(0.1)
            done += await work(side, 1)
            spool = spool_of(side)
            assert await spool.wait_acked(spool.last_seq, 10)
            assert spool.last_seq == len(done) * RECEIPTS_PER_TASK
        exported = bundle_from_proto(await cp.client.export_bundle())
        check_bundle(exported, [cp.key.public], len(done) * RECEIPTS_PER_TASK)
        assert sorted(e.seq for e in _receipts(exported)) == list(range(1, len(done) * 3 + 1))
        # Renewals were seamless: none refused, and the one receipt stream never broke.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
            "no --kek-file: the credential vault is off"
        ]


async def test_sidecar_restart_with_its_spent_join_token(tmp_path: Path) -> None:
    """A sidecar restarted with the join token it already spent renews by proof of possession."""
    async with start_control(tmp_path, vault=False) as cp:
        for _ in range(2):
            await cp.client.submit("work", b"{}")
        token = await cp.join_token("node-1")
        async with start_sidecar(tmp_path, cp.address, enrollment_token=token) as side:
            done = await work(side, 1)
        async with start_sidecar(tmp_path, cp.address, enrollment_token=token) as side:
            done += await work(side, 1)
            spool = spool_of(side)
            assert await spool.wait_acked(spool.last_seq, 10)
        # Renewed, not re-keyed: still the key it enrolled with.
        (node,) = await cp.client.list_nodes()
        assert node.keyid == SigningKey.load(tmp_path / "node-1" / "node.key").keyid
        exported = bundle_from_proto(await cp.client.export_bundle(done))
        check_bundle(exported, [cp.key.public], len(done) * RECEIPTS_PER_TASK)


def _receipts(bundle: Bundle) -> list[Any]:
    from tether.crypto.receipts import parse_statement

    return [parse_statement(Envelope.from_json_bytes(e.envelope).payload) for e in bundle.entries]

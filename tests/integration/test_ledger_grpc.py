"""End to end over gRPC: a leased task's receipts stream from a spool into the ledger,
`tether receipts export` writes a bundle, and `tether verify` accepts it."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from pathlib import Path

from control_fixtures import operator_args

from tether.core.receipts import Receipt, ReceiptKind
from tether.core.states import Event
from tether.crypto.envelopes import from_proto
from tether.crypto.leases import verify_lease
from tether.crypto.note import verify_checkpoint
from tether.crypto.pki import Role
from tether.crypto.signing import SigningKey
from tether.sidecar.spool import GrpcReceiptStream, ReceiptSpool, stream_receipts
from tether.testing import start_control
from tether.v1 import control_pb2 as pb


async def test_stream_export_verify(tmp_path: Path) -> None:
    """Receipts acked over StreamReceipts export into a bundle the offline verifier accepts."""
    async with start_control(tmp_path) as cp:
        node_key = SigningKey.generate()
        node = await cp.node_client("node-1", key=node_key)
        task_id = (await cp.client.submit("q", b"{}")).task.task_id
        resp = await node.acquire_lease("q", "node-1", "agent-1")
        lease = verify_lease(from_proto(resp.lease), {cp.key.keyid: cp.key.public})
        token = resp.task.fencing_token
        spool = ReceiptSpool(tmp_path / "spool.db", "node-1", node_key)

        def receipt(kind: ReceiptKind, **kw: object) -> Receipt:
            now = max(lease.issued_unix_ms, int(time.time() * 1000))
            return Receipt(
                kind=kind,
                node_id="node-1",
                task_id=task_id,
                attempt=lease.attempt,
                fencing_token=token,
                agent_id="agent-1",
                lease_id=lease.lease_id,
                lease_issued_unix_ms=lease.issued_unix_ms,
                lease_expires_unix_ms=lease.expires_unix_ms,
                time_unix_ms=now,
                **kw,
            )  # type: ignore[arg-type]

        await spool.append(receipt(ReceiptKind.LEASE_GRANTED))
        await node.transition(task_id, token, Event.START, "node-1")
        await spool.append(receipt(ReceiptKind.TASK_STARTED))
        for i in range(5):
            await spool.append(
                receipt(
                    ReceiptKind.TOOL_CALL,
                    tool="http.get",
                    status="ok",
                    result_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                )
            )
        await node.transition(task_id, token, Event.SUCCEED, "node-1", result=b"ok")
        await spool.append(receipt(ReceiptKind.TASK_FINISHED, final_state=4))

        stop = asyncio.Event()
        streamer = asyncio.create_task(
            stream_receipts(
                spool, lambda: GrpcReceiptStream.open(node.stub, "node-1"), stop, batch=3
            )
        )
        for _ in range(500):
            if await spool.pending() == 0:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await streamer
        assert await spool.pending() == 0

        cp_resp = await cp.client.stub.GetCheckpoint(pb.GetCheckpointRequest(fresh=True))
        body = verify_checkpoint(cp_resp.checkpoint.note, [cp.key.public])
        assert body.tree_size == 8
        proof = await cp.client.stub.GetInclusionProof(pb.GetInclusionProofRequest(leaf_index=3))
        assert proof.proof.tree_size == 8
        assert len(proof.proof.hashes) == 3

        (tmp_path / "control.pub").write_bytes(cp.key.public.pem())
        out = tmp_path / "bundle.json"
        exported = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "tether.cli",
                "receipts",
                "export",
                *operator_args(cp, Role.AUDITOR),
                "--task",
                task_id,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert exported.returncode == 0, exported.stderr
        verified = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "tether.cli",
                "verify",
                str(out),
                "--trust",
                str(tmp_path / "control.pub"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "VALID: 8 receipts" in verified.stdout
        await spool.close()
        await node.close()

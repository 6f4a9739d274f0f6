"""`--previous-checkpoint` end to end: a checkpoint saved from a running control plane is
proven a prefix of a later export's, and a forked one is refused."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from control_fixtures import operator_args, run_cli

from tether.control.client import ControlClient
from tether.core.receipts import ReceiptKind
from tether.core.states import Event
from tether.crypto.envelopes import from_proto
from tether.crypto.leases import verify_lease
from tether.crypto.note import CheckpointBody, parse_checkpoint, parse_note, sign_checkpoint
from tether.crypto.pki import Role
from tether.testing import ControlHandle, start_control
from tether.v1 import control_pb2 as pb
from tether.verify.builder import BundleBuilder


async def _run_task(cp: ControlHandle, node: ControlClient, b: BundleBuilder) -> str:
    """One task leased to node-a, its receipts streamed into the ledger; returns its id."""
    task_id = (await cp.client.submit("work", b"{}")).task.task_id
    resp = await node.acquire_lease("work", "node-a", "alice")
    lease = verify_lease(from_proto(resp.lease), {cp.key.keyid: cp.key.public})
    t = lease.issued_unix_ms
    first = len(b.ledger)
    b.receipt(ReceiptKind.LEASE_GRANTED, lease, t)
    await node.transition(task_id, lease.fencing_token, Event.START, "node-a")
    b.receipt(ReceiptKind.TASK_STARTED, lease, t + 1)
    b.receipt(ReceiptKind.TOOL_CALL, lease, t + 2, tool="http.get", status="ok")
    await node.transition(task_id, lease.fencing_token, Event.SUCCEED, "node-a", result=b"ok")
    b.receipt(ReceiptKind.TASK_FINISHED, lease, t + 3, final_state=4)
    batch = [
        pb.SpooledReceipt(seq=first + k + 1, envelope=e) for k, e in enumerate(b.ledger[first:])
    ]

    async def requests() -> AsyncIterator[pb.StreamReceiptsRequest]:
        yield pb.StreamReceiptsRequest(node_id="node-a", receipts=batch)

    async for ack in node.stub.StreamReceipts(requests()):
        if ack.acked_seq == len(b.ledger):
            break
    return task_id


async def test_previous_checkpoint_real_and_forked(tmp_path: Path) -> None:
    """A checkpoint saved with `tether receipts checkpoint` before more receipts arrived is
    proven consistent with a later per-task export made with --previous-checkpoint; a
    forked note (same size, other root, signed by the control key), an export without the
    proof, and a size beyond the ledger are refused with exit 1, 1 and 2."""
    b = BundleBuilder(seed="export-consistency")
    async with start_control(tmp_path) as cp:
        node = await cp.node_client("node-a", key=b.node("node-a").key)
        try:
            await _run_task(cp, node, b)
            auditor = operator_args(cp, Role.AUDITOR)
            seen = tmp_path / "seen.note"
            rc, _, err = await run_cli(
                "receipts", "checkpoint", *auditor, "--fresh", "--out", str(seen)
            )
            assert rc == 0, err
            old = parse_checkpoint(parse_note(seen.read_text()).body)
            assert old.tree_size == 4
            later = await _run_task(cp, node, b)
        finally:
            await node.close()
        trust = tmp_path / "control.pub"
        trust.write_bytes(cp.key.public.pem())
        bundle = tmp_path / "later.json"
        rc, _, err = await run_cli(
            "receipts", "export", *auditor, "--task", later, "--previous-checkpoint", str(seen),
            "--out", str(bundle),
        )  # fmt: skip
        assert rc == 0, err
        assert "consistency proof from size 4" in err

        def verify(path: Path, note: Path) -> tuple[str, ...]:
            return ("verify", str(path), "--trust", str(trust), "--previous-checkpoint", str(note))

        rc, out, err = await run_cli(*verify(bundle, seen))
        assert rc == 0, out + err
        assert "per-task export of" in out
        assert "consistent with the previous checkpoint at size 4" in out

        forked = tmp_path / "forked.note"
        other = hashlib.sha256(b"a history the auditor never saw").digest()
        forked.write_text(sign_checkpoint(CheckpointBody(old.origin, 4, other), cp.key))
        rc, out, err = await run_cli(*verify(bundle, forked))
        assert rc == 1, out + err
        assert "consistency" in out.splitlines()[0]
        assert "the log forked or was rewritten" in out
        assert "Traceback" not in err

        plain = tmp_path / "plain.json"
        rc, _, err = await run_cli(
            "receipts", "export", *auditor, "--task", later, "--out", str(plain)
        )
        assert rc == 0, err
        rc, out, err = await run_cli(*verify(plain, seen))
        assert rc == 1, out + err
        assert "export it with --previous-checkpoint" in out

        future = tmp_path / "future.note"
        future.write_text(sign_checkpoint(CheckpointBody(old.origin, 10_000, other), cp.key))
        rc, out, err = await run_cli(
            "receipts", "export", *auditor, "--task", later, "--previous-checkpoint",
            str(future), "--out", str(tmp_path / "never.json"),
        )  # fmt: skip
        assert rc == 2, out + err
        assert "previous_tree_size" in err
        assert not (tmp_path / "never.json").exists()
        assert not (tmp_path / "never.json.partial").exists()

"""The ledger names its own log: the origin comes from the trust domain (or --log-origin),
and `tether keys vkey` prints the C2SP verifier key that checks its checkpoints."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tether.control.service import ControlConfig
from tether.crypto.note import verify_checkpoint
from tether.testing import TEST_TRUST_DOMAIN, start_control
from tether.v1 import control_pb2 as pb


async def test_checkpoint_origin_is_the_trust_domains_log(tmp_path: Path) -> None:
    """A fresh checkpoint is signed for "<trust domain>/ledger", and `keys vkey` on the
    deployment's trust.pem prints the verifier key of exactly that name and key."""
    async with start_control(tmp_path) as cp:
        got = await cp.client.stub.GetCheckpoint(pb.GetCheckpointRequest(fresh=True))
        note = got.checkpoint.note
        body = verify_checkpoint(note, [cp.key.public])
        assert body.origin == f"{TEST_TRUST_DOMAIN}/ledger"
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tether.cli", "keys", "vkey", "--key", str(cp.trust_bundle)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        out = out.stdout.split()
        assert len(out) == 1
        name, key_hash, _ = out[0].split("+", 2)
        assert name == body.origin
        signature_lines = [ln for ln in note.splitlines() if ln.startswith("— ")]
        assert any(ln.split()[1] == name for ln in signature_lines)
        assert len(key_hash) == 8


async def test_log_origin_can_be_configured(tmp_path: Path) -> None:
    """--log-origin (ControlConfig.log_origin) names the log in every checkpoint."""
    async with start_control(tmp_path, config=ControlConfig(log_origin="example.com/agents")) as cp:
        got = await cp.client.stub.GetCheckpoint(pb.GetCheckpointRequest(fresh=True))
        assert verify_checkpoint(got.checkpoint.note, [cp.key.public]).origin == (
            "example.com/agents"
        )

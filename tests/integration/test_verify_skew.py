"""A real sidecar whose wall clock runs 3 s behind the control plane's: its bundle verifies.

Receipt times come from the node's clock; lease windows and certificates from
the control plane's. The verifier compares like with like and accepts node
times off by at most `--max-clock-skew` (default 5 s), with a warning.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from tether.sidecar.spool import ReceiptSpool
from tether.testing import start_control, start_sidecar
from tether.verify import encode_bundle, verify_bundle
from tether.verify.bundle import bundle_from_proto

BEHIND_MS = 3_000


class BehindClock:
    """The system clock, `behind_ms` slow on the wall (monotonic time is unaffected)."""

    def __init__(self, behind_ms: int) -> None:
        self.behind_ms = behind_ms

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 - self.behind_ms

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


def _verify_cli(path: Path, pub: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", "verify", str(path), "--trust", str(pub), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_sidecar_3s_behind_yields_a_bundle_that_verifies_with_a_warning(
    tmp_path: Path,
) -> None:
    """A task run by a sidecar 3 s slow exports a bundle `tether verify` accepts with a warning."""
    async with start_control(tmp_path, vault=False) as cp:
        await cp.client.submit("work", b"{}")
        async with start_sidecar(tmp_path, cp.address, clock=BehindClock(BEHIND_MS)) as side:
            async with side.agent("alice") as agent:
                task = await agent.claim("work", wait_ms=5000)
                assert task is not None
                state, _ = await agent.complete(task.task_id, result=b"ok")
                assert state == "succeeded"
            spool = side.sidecar.deps.sink
            assert isinstance(spool, ReceiptSpool)
            assert await spool.wait_acked(spool.last_seq, 15)
        bundle = bundle_from_proto(await cp.client.export_bundle([task.task_id]))
        key = cp.key.public

    report = verify_bundle(bundle, [key])
    assert report.ok, report.failures
    skewed = [w for w in report.warnings if w.check == "lease.window"]
    assert skewed, report.warnings
    worst = max(int(w.why.split("up to ")[1].split(" ms")[0]) for w in skewed)
    assert BEHIND_MS - 1_000 < worst <= BEHIND_MS, skewed
    # Compared with zero tolerance, as before, the same honest bundle would fail.
    assert "lease.window" in verify_bundle(bundle, [key], max_clock_skew_ms=0).checks_failed()

    path = tmp_path / "bundle.json"
    path.write_bytes(encode_bundle(bundle))
    pub = tmp_path / "control.pub"
    pub.write_bytes(key.pem())
    proc = await asyncio.to_thread(_verify_cli, path, pub)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("VALID:")
    assert "WARN" in proc.stdout
    assert "accepted as clock skew, within the 5000 ms bound" in proc.stdout
    strict = await asyncio.to_thread(_verify_cli, path, pub, "--max-clock-skew", "1s")
    assert strict.returncode == 1, strict.stdout

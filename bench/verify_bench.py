"""`tether verify` as a whole process on a bundle of real signed receipts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tether.verify.builder import BundleBuilder
from tether.verify.bundle import encode_bundle


def build_bundle(dir: Path, receipts: int) -> tuple[Path, Path, dict[str, Any]]:
    """Writes a valid bundle of about `receipts` receipts (typical 7-receipt task runs).

    Tasks alternate over 8 nodes and 16 agents; returns (bundle, trusted key, facts).
    """
    dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    b = BundleBuilder(seed="bench-verify")
    i = 0
    while len(b.ledger) < receipts:
        b.task(f"task-{i:07d}", node_id=f"node-{i % 8}", agent_id=f"agent-{i % 16}")
        i += 1
    data = encode_bundle(b.build())
    bundle = dir / f"bundle-{receipts}.json"
    bundle.write_bytes(data)
    trust = dir / "control.pub"
    trust.write_bytes(b.control.public.pem())
    return (
        bundle,
        trust,
        {
            "receipts": len(b.ledger),
            "leases": len(b.leases),
            "bytes": len(data),
            "build_s": time.perf_counter() - t0,
        },
    )


def verify_run(dir: Path, receipts: int) -> dict[str, Any]:
    """Builds the bundle, then times `python -m tether.cli verify` end to end."""
    bundle, trust, facts = build_bundle(dir, receipts)
    argv = [sys.executable, "-m", "tether.cli", "verify", str(bundle), "--trust", str(trust)]
    t0 = time.perf_counter()
    proc = subprocess.run([*argv, "--quiet"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"verify failed ({proc.returncode}): {proc.stdout[-500:]}")
    bundle.unlink()
    return {**facts, "seconds": elapsed, "per_s": facts["receipts"] / elapsed}

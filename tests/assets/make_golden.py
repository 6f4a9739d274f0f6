"""Writes the golden bundles in tests/assets/bundles/ (run from the repo root).

    .venv/bin/python tests/assets/make_golden.py

Keys come from fixed seeds and Ed25519 signatures are deterministic, so the
output is byte-for-byte reproducible; tests/integration/test_verify_golden.py
checks that it still is, which pins the receipt and bundle formats. expected.json
maps each file to the exit code and failing check `tether verify` must report.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from tether.core.receipts import ReceiptKind
from tether.crypto.manifest import sign_manifest, verify_manifest
from tether.crypto.receipts import parse_receipt, sign_receipt
from tether.verify import Bundle, encode_bundle
from tether.verify.builder import T0, BundleBuilder, seeded_key

OUT = Path(__file__).parent / "bundles"


def _valid() -> BundleBuilder:
    b = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    b.task("task-1", "node-a", "agent-1", tool_calls=2, start=T0)
    b.foreign_leaf(b"a receipt of another task, not exported")
    b.task("task-2", "node-b", "agent-2", tool_calls=1, start=T0 + 1_000)
    return b


def build_all() -> dict[str, bytes]:
    """Every golden file's name and bytes."""
    b = _valid()
    valid = b.build()
    files: dict[str, bytes] = {
        "control.pub": b.control.public.pem(),
        "valid.json": encode_bundle(valid, indent=1),
    }

    def put(name: str, bundle: Bundle) -> None:
        files[name] = encode_bundle(bundle, indent=1)

    entries = list(valid.entries)
    flipped = bytearray(entries[3].envelope)
    flipped[40] ^= 0x01  # inside the base64 payload
    put(
        "tampered-byte-flip.json",
        dataclasses.replace(
            valid,
            entries=[
                *entries[:3],
                dataclasses.replace(entries[3], envelope=bytes(flipped)),
                *entries[4:],
            ],
        ),
    )
    put("tampered-deleted.json", dataclasses.replace(valid, entries=entries[:2] + entries[3:]))
    put(
        "tampered-swapped.json",
        dataclasses.replace(valid, entries=[*entries[:3], entries[4], entries[3], *entries[5:]]),
    )
    _, r = parse_receipt(entries[1].envelope)
    forged = sign_receipt(r, seeded_key("golden/mallory"))
    put(
        "tampered-resigned.json",
        dataclasses.replace(
            valid,
            entries=[entries[0], dataclasses.replace(entries[1], envelope=forged), *entries[2:]],
        ),
    )
    assert valid.checkpoint is not None
    put(
        "tampered-wrong-root.json",
        dataclasses.replace(
            valid, checkpoint=dataclasses.replace(valid.checkpoint, root_hash=bytes(32))
        ),
    )

    # The last receipt of node-a's chain (task-1's task_finished) cut off.
    last_a = max(
        i for i, e in enumerate(entries) if parse_receipt(e.envelope)[1].node_id == "node-a"
    )
    put(
        "tampered-deleted-last.json",
        dataclasses.replace(valid, entries=entries[:last_a] + entries[last_a + 1 :]),
    )
    put("tampered-no-manifest.json", dataclasses.replace(valid, manifest=None))
    assert valid.manifest is not None
    manifest = verify_manifest(valid.manifest, {b.control.keyid: b.control.public})
    put(
        "tampered-manifest-resigned.json",
        dataclasses.replace(valid, manifest=sign_manifest(manifest, seeded_key("golden/mallory"))),
    )

    late = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    lease = late.lease("task-late", "node-a", "agent-1", issued=T0, ttl_ms=30_000)
    late.receipt(ReceiptKind.LEASE_GRANTED, lease, T0)
    late.receipt(ReceiptKind.TOOL_CALL, lease, T0 + 45_000, tool="http.get", status="ok")
    late.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 20_000, final_state=4)
    put("tampered-after-lease.json", late.build())

    expected = {
        "valid.json": [0, ""],
        "tampered-byte-flip.json": [1, "signature"],
        "tampered-deleted.json": [1, "chain.gap"],
        "tampered-deleted-last.json": [1, "manifest"],
        "tampered-no-manifest.json": [1, "manifest"],
        "tampered-manifest-resigned.json": [1, "manifest"],
        "tampered-swapped.json": [1, "chain.order"],
        "tampered-resigned.json": [1, "signature"],
        "tampered-wrong-root.json": [1, "checkpoint"],
        "tampered-after-lease.json": [1, "lease.window"],
    }
    files["expected.json"] = (json.dumps(expected, indent=1, sort_keys=True) + "\n").encode()
    return files


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in build_all().items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(build_all())} files to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

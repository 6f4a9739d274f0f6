"""Offline verification of exported receipt bundles (no grpc, no network, no database).

from tether.verify import verify_bundle, decode_bundle
report = verify_bundle(path.read_bytes(), [VerifyKey.load(Path("control.pub"))])
if not report.ok: print(report.failures[0])
"""

from tether.verify.bundle import (
    BUNDLE_VERSION,
    Bundle,
    BundleFormatError,
    CheckpointInfo,
    Entry,
    decode_bundle,
    encode_bundle,
)
from tether.verify.verifier import CHECKS, Event, Failure, Report, TaskReport, verify_bundle

__all__ = [
    "BUNDLE_VERSION",
    "CHECKS",
    "Bundle",
    "BundleFormatError",
    "CheckpointInfo",
    "Entry",
    "Event",
    "Failure",
    "Report",
    "TaskReport",
    "decode_bundle",
    "encode_bundle",
    "verify_bundle",
]

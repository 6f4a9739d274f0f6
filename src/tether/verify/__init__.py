"""Offline verification of exported receipt bundles (no grpc, no network, no database).

from tether.verify import verify_bundle, decode_bundle
report = verify_bundle(path.read_bytes(), [VerifyKey.load(Path("control.pub"))])
if not report.ok: print(report.failures[0])
for w in report.warnings: print(w)  # e.g. node clocks skewed within the bound
"""

from tether.verify.bundle import (
    BUNDLE_VERSION,
    Bundle,
    BundleFormatError,
    BundleTooLarge,
    CheckpointInfo,
    Entry,
    Limits,
    decode_bundle,
    encode_bundle,
    read_bundle,
)
from tether.verify.verifier import (
    CHECKS,
    DEFAULT_MAX_CLOCK_SKEW_MS,
    Event,
    Failure,
    Report,
    TaskReport,
    verify_bundle,
)

__all__ = [
    "BUNDLE_VERSION",
    "CHECKS",
    "DEFAULT_MAX_CLOCK_SKEW_MS",
    "Bundle",
    "BundleFormatError",
    "BundleTooLarge",
    "CheckpointInfo",
    "Entry",
    "Event",
    "Failure",
    "Limits",
    "Report",
    "TaskReport",
    "decode_bundle",
    "encode_bundle",
    "read_bundle",
    "verify_bundle",
]

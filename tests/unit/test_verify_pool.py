"""The verifier's worker-process path gives the same verdict as the inline one."""

from __future__ import annotations

import dataclasses

from tether.verify import encode_bundle, verify_bundle
from tether.verify.builder import BundleBuilder


def _bundle() -> BundleBuilder:
    b = BundleBuilder(seed="verify-pool")
    for i in range(6):
        b.task(f"task-{i}", node_id=f"node-{i % 2}", agent_id="agent-1")
    return b


def test_pool_and_raw_chunks_match_inline_on_tampered_bundles() -> None:
    """Compact bundle bytes parsed and checked by worker processes fail exactly as inline does."""
    b = _builder = _bundle()
    bundle = _builder.build()
    keys = [b.control.public]
    e = bundle.entries[5]
    flipped = bytearray(e.envelope)
    flipped[-20] ^= 1
    cases = [
        bundle,
        dataclasses.replace(bundle, entries=bundle.entries[:3] + bundle.entries[4:]),
        dataclasses.replace(
            bundle,
            entries=[*bundle.entries[:5], dataclasses.replace(e, envelope=bytes(flipped)),
                     *bundle.entries[6:]],
        ),
    ]  # fmt: skip
    for case in cases:
        inline = verify_bundle(case, keys, threads=1).to_dict()
        pooled = verify_bundle(encode_bundle(case), keys, threads=2).to_dict()
        inline.pop("seconds")
        pooled.pop("seconds")
        assert pooled == inline
    assert verify_bundle(encode_bundle(bundle), keys, threads=2).ok


def test_irregular_compact_file_takes_the_full_parser() -> None:
    """A compact file that strays from the fast grammar (a numeric leafIndex) is refused alike."""
    b = _bundle()
    data = encode_bundle(b.build())
    loose = data.replace(b'"leafIndex":"3"', b'"leafIndex":3', 2)
    assert loose != data
    for threads in (1, 2):
        report = verify_bundle(loose, [b.control.public], threads=threads)
        assert report.checks_failed() == {"bundle.format"}
        assert "canonical encoding" in report.failures[0].why

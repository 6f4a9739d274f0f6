"""The verifier's worker-process path gives the same verdict as the inline one."""

from __future__ import annotations

import dataclasses
from typing import Any

from tether.crypto.signing import Envelope
from tether.verify import encode_bundle, verify_bundle
from tether.verify.builder import BundleBuilder, seeded_key
from tether.verify.bundle import BundleFormatError, decode_bundle
from tether.verify.verifier import Failure, Report


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


def _general(data: bytes, keys: list[Any]) -> dict[str, Any]:
    """The verdict of the general path: the whole file decoded strictly, then verified."""
    try:
        bundle = decode_bundle(data)
    except BundleFormatError as err:
        report = Report([Failure("bundle.format", "bundle", err.message)])
    else:
        report = verify_bundle(bundle, keys, threads=1)
    out = report.to_dict()
    out.pop("seconds")
    return out


def test_leases_cut_out_of_a_compact_file_give_the_general_parsers_verdict() -> None:
    """The leases the main process parses from the raw file (while the workers check the
    entries) are read and refused exactly as the strict parser of the whole file would."""
    b = _bundle()
    bundle = b.build()
    second = seeded_key("verify-pool/second-control")
    keys = [b.control.public, second.public]
    env = bundle.leases[1]
    twice = Envelope(env.payload, env.payload_type, (*env.signatures, *second.sign_envelope(
        env.payload_type, env.payload).signatures))  # fmt: skip
    data = encode_bundle(bundle)
    lease = encode_bundle(dataclasses.replace(bundle, entries=[])).split(b'"leases":[')[1]
    first = lease[: lease.index(b"}]}") + 3]  # the first lease envelope, as written
    payload = first.split(b'"payload":"')[1].split(b'"')[0]
    sig = first.split(b'"sig":"')[1].split(b'"')[0]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    loose_sig = sig[:-3] + bytes([alphabet[alphabet.index(sig[-3]) ^ 1]]) + b"=="
    cases = {
        "as written": data,
        "two signatures": encode_bundle(
            dataclasses.replace(bundle, leases=[bundle.leases[0], twice, *bundle.leases[2:]])
        ),
        "no leases": encode_bundle(dataclasses.replace(bundle, leases=[])),
        "one lease": encode_bundle(dataclasses.replace(bundle, leases=bundle.leases[:1])),
        "a space": data.replace(first, first.replace(b'","sig"', b'", "sig"'), 1),
        "a trailing comma": data.replace(b'}]}],"controlKeyids"', b'}]},],"controlKeyids"', 1),
        "loose base64": data.replace(sig, loose_sig, 1),
        "unpadded signature": data.replace(sig, sig.rstrip(b"="), 1),
        "a payload byte flipped": data.replace(payload, payload[:8] + b"A" + payload[9:], 1),
        "uppercase keyid": data.replace(first, first.replace(b'"keyid":"', b'"keyid":"A', 1), 1),
        "an unknown field": data.replace(first, first[:-1] + b',"x":1}', 1),
        "a second leases member": data.replace(
            b'],"controlKeyids"', b'],"leases":[' + first + b'],"controlKeyids"', 1
        ),
    }
    for name, case in cases.items():
        assert name == "as written" or case != data, name
    for name, case in cases.items():
        expected = _general(case, keys)
        assert expected["valid"] == (name in ("as written", "two signatures")), name
        for threads in (1, 2):
            got = verify_bundle(case, keys, threads=threads).to_dict()
            got.pop("seconds")
            assert got == expected, (name, threads)

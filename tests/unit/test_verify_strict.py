"""The verifier is strict and bounded: crafted bundles fail cleanly and cheaply, every byte counts.

Issue 13: seq bombs, deep nesting, duplicate keys, zeros, unauthenticated
bytes (keyids, controlKeyids, times, non-canonical encodings), clock skew
between nodes and the control plane, and what the CLI prints first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.certs import issue_cert
from tether.crypto.leases import decode_lease, encode_lease
from tether.crypto.receipts import parse_receipt, sign_receipt, statement_bytes
from tether.crypto.signing import LEASE_PAYLOAD_TYPE, Envelope
from tether.verify import Bundle, decode_bundle, encode_bundle, verify_bundle
from tether.verify.builder import T0, BundleBuilder, seeded_key
from tether.verify.bundle import (
    BundleFormatError,
    BundleTooLarge,
    Limits,
    read_bundle,
    spool_bundle,
)

BUNDLES = Path(__file__).parents[1] / "assets" / "bundles"
PUB = str(BUNDLES / "control.pub")

# Runs the real CLI and reports how long `main` took and the process's peak memory.
_MEASURED = (
    "import resource, sys, time\n"
    "from tether.cli import main\n"
    "t = time.perf_counter()\n"
    "code = main(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "sys.stderr.write(f'\\nMEASURED {time.perf_counter() - t:.3f} {peak}\\n')\n"
    "sys.exit(code)\n"
)


def _cli(
    *args: str, stdin: bytes | None = None
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """(process, seconds in `main`, peak RSS in MB) of `tether ARGS`."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=120,
    )
    m = re.search(r"MEASURED ([0-9.]+) ([0-9]+)", proc.stderr)
    assert m is not None, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, float(m[1]), int(m[2]) / 1024


def _builder(seed: str = "strict") -> BundleBuilder:
    b = BundleBuilder(seed=seed)
    b.task("t1", "node-a", "agent-1", tool_calls=2)
    b.task("t2", "node-b", "agent-2", tool_calls=1, start=T0 + 1_000)
    return b


@pytest.fixture(scope="module")
def built() -> tuple[BundleBuilder, Bundle, bytes]:
    b = _builder()
    bundle = b.build()
    return b, bundle, encode_bundle(bundle)


def _checks(
    b: BundleBuilder,
    bundle: Bundle | bytes,
    *,
    max_clock_skew_ms: int = 5_000,
    limits: Limits | None = None,
) -> set[str]:
    report = verify_bundle(
        bundle, [b.control.public], threads=1, max_clock_skew_ms=max_clock_skew_ms, limits=limits
    )
    return report.checks_failed()


def _why(b: BundleBuilder, bundle: Bundle | bytes, check: str) -> str:
    report = verify_bundle(bundle, [b.control.public], threads=1)
    return " | ".join(f.why for f in report.failures if f.check == check)


# --- bounded work --------------------------------------------------------------


def test_seq_bomb_is_rejected_with_gaps_named_as_ranges() -> None:
    """Receipts claiming seq 16,000,000 and 2^62 fail, the gaps named as ranges (work follows
    the input's size, not the claimed seq: a per-seq walk would never finish)."""
    proc, seconds, mb = _cli("verify", str(BUNDLES / "crafted-seq-bomb.json"), "--trust", PUB)
    assert proc.returncode == 1, proc.stdout
    assert "FAIL node-a#7-15999999: chain.gap" in proc.stdout
    assert f"FAIL node-x#1-{(1 << 62) - 1}: chain.gap" in proc.stdout
    # Time and memory are figures, not assertions (machines differ): printed for the log.
    print(f"seq bomb: {seconds:.2f} s, peak {mb:.0f} MB")


def test_deep_nesting_fails_without_recursion(built: tuple[BundleBuilder, Bundle, bytes]) -> None:
    """Nesting a million deep, in the file or in a signed statement, fails as a format error."""
    b, _bundle, data = built
    for depth in (17, 1_000_000):
        deep = b'{"version":1,"entries":' + b"[" * depth + b"]" * depth + b"}\n"
        assert _checks(b, deep) == {"bundle.format"}
        with pytest.raises(BundleFormatError, match="nested deeper than 16"):
            decode_bundle(deep)
    unbalanced = b'{"version":1,"entries":' + b"[" * 100_000 + b"}\n"
    assert _checks(b, unbalanced) == {"bundle.format"}
    golden = (BUNDLES / "crafted-deep-statement.json").read_bytes()
    report = verify_bundle(golden, [seeded_key("golden/control").public])
    assert "nested deeper than 16" in " ".join(
        f.why for f in report.failures if f.check == "receipt.format"
    )
    # The cap is configurable; real bundles nest 5 deep.
    assert verify_bundle(data, [b.control.public], limits=Limits(max_depth=5)).ok
    assert _checks(b, data, limits=Limits(max_depth=4)) == {"bundle.format"}


def test_zeros_are_refused_at_the_first_block(tmp_path: Path) -> None:
    """A 1 GiB file of zeros fails at once: the reader stops at the first block."""
    zeros = tmp_path / "zeros.json"
    with zeros.open("wb") as f:
        f.truncate(1 << 30)  # sparse: costs no disk
    proc, seconds, mb = _cli("verify", str(zeros), "--trust", PUB, "--json")
    assert proc.returncode == 1, proc.stdout
    assert '"check": "bundle.format"' in proc.stdout
    print(f"1 GiB of zeros: {seconds:.2f} s, peak {mb:.0f} MB")
    stream = io.BytesIO(b" \n" + bytes(10 << 20))
    with pytest.raises(BundleFormatError, match="JSON object"):
        read_bundle(stream)
    assert stream.tell() <= 1 << 20
    with pytest.raises(BundleFormatError, match="control byte 0x00 at offset 5"):
        read_bundle(io.BytesIO(b'{"a":\x00}'))


def test_size_cap_is_enforced_before_reading_everything(
    built: tuple[BundleBuilder, Bundle, bytes], tmp_path: Path
) -> None:
    """Input over --max-bytes exits 2 without reading it all; the library reports bundle.format."""
    b, _bundle, data = built
    path = tmp_path / "bundle.json"
    path.write_bytes(data)
    pub = tmp_path / "control.pub"
    pub.write_bytes(b.control.public.pem())
    proc, _s, _mb = _cli("verify", str(path), "--trust", str(pub), "--max-bytes", "1000")
    assert proc.returncode == 2
    assert "larger than 1000 bytes" in proc.stderr
    stream = io.BytesIO(data)
    with pytest.raises(BundleTooLarge):
        read_bundle(stream, Limits(max_bytes=1000))
    assert stream.tell() == 1001
    assert _checks(b, data, limits=Limits(max_bytes=1000)) == {"bundle.format"}


def test_token_dense_json_is_refused_before_parsing(
    built: tuple[BundleBuilder, Bundle, bytes],
) -> None:
    """Megabytes of tiny JSON values (which would cost many times their size parsed) are refused."""
    b, _bundle, _data = built
    dense = b'{"version":1,"entries":[' + b"{}," * 1_000_000 + b"{}]}\n"
    report = verify_bundle(dense, [b.control.public])
    assert report.checks_failed() == {"bundle.format"}
    assert "too dense" in report.failures[0].why


def test_lease_and_certificate_lookups_do_not_grow_with_repeats() -> None:
    """Thousands of repeated leases and certificates cost linear time, not leases x receipts."""
    b = BundleBuilder(seed="repeats")
    lease = b.lease("t", "n", "a", ttl_ms=3_600_000)
    b.receipt(ReceiptKind.LEASE_GRANTED, lease, T0)
    for i in range(300):
        b.receipt(ReceiptKind.TOOL_CALL, lease, T0 + 10 + i, tool="x", status="ok")
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 400, final_state=4)
    bundle = b.build()
    many = dataclasses.replace(
        bundle, leases=bundle.leases * 3000, node_certificates=bundle.node_certificates * 3000
    )
    report = verify_bundle(encode_bundle(many), [b.control.public], threads=1)
    assert report.ok, report.failures[:3]
    assert report.seconds < 5, report.seconds


# --- one meaning per byte ------------------------------------------------------


def test_duplicate_keys_are_refused(built: tuple[BundleBuilder, Bundle, bytes]) -> None:
    """A repeated key (entries, a field of a lease, of a statement) fails instead of picking one."""
    b, _bundle, data = built
    report = verify_bundle(
        (BUNDLES / "crafted-duplicate-entries.json").read_bytes(),
        [seeded_key("golden/control").public],
    )
    assert report.checks_failed() == {"bundle.format"}
    assert "key 'entries' appears twice" in report.failures[0].why
    twice = data.replace(b'"leases":[{"payload":', b'"leases":[{"payload":"","payload":', 1)
    assert "appears twice" in _why(b, twice, "bundle.format")
    golden = (BUNDLES / "crafted-duplicate-key-statement.json").read_bytes()
    report = verify_bundle(golden, [seeded_key("golden/control").public])
    assert "key 'taskId' appears twice" in " ".join(
        f.why for f in report.failures if f.check == "receipt.format"
    )


def test_any_whitespace_or_alternative_encoding_is_refused(
    built: tuple[BundleBuilder, Bundle, bytes],
) -> None:
    """Inserting or removing a space or newline anywhere, or a number for a string, fails."""
    b, _bundle, data = built
    rng = random.Random(13)
    cuts = {0, 1, len(data) - 1, len(data)} | {rng.randrange(len(data)) for _ in range(40)}
    for at in sorted(cuts):
        for ins in (b" ", b"\n"):
            # Between tokens: not the canonical encoding; inside a string: another value.
            assert _checks(b, data[:at] + ins + data[at:]), at
    between = data.index(b'"entries"')
    assert _checks(b, data[:between] + b" " + data[between:]) == {"bundle.format"}
    assert _checks(b, data[:-1]) == {"bundle.format"}
    assert _checks(b, data.replace(b'"version":1', b'"version":"1"', 1)) == {"bundle.format"}
    assert _checks(b, data.replace(b'"leafIndex":"0"', b'"leafIndex":"00"', 1)) == {"bundle.format"}


def test_noncanonical_base64_is_refused(built: tuple[BundleBuilder, Bundle, bytes]) -> None:
    """Base64 with set trailing bits, URL-safe letters or no padding fails wherever it is."""
    b, bundle, data = built
    h = bundle.entries[0].proof_b64[0]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    loose = h[:42] + alphabet[alphabet.index(h[42]) | 1] + "="
    assert _checks(b, data.replace(h.encode(), loose.encode(), 1)) == {"bundle.format"}
    assert _checks(b, data.replace(h.encode(), h[:-1].encode(), 1)) == {"bundle.format"}
    sig = encode_bundle(bundle).split(b'"sig":"')[1].split(b'"')[0]
    assert sig.endswith(b"==")
    changed = sig[:-3] + alphabet[alphabet.index(chr(sig[-3])) ^ 1].encode() + b"=="
    assert _checks(b, data.replace(sig, changed, 1)) == {"bundle.format"}
    urlsafe = data.replace(b"+", b"-", 1)
    assert urlsafe != data
    assert _checks(b, urlsafe) == {"bundle.format"}


def test_checkpoint_time_is_not_accepted(built: tuple[BundleBuilder, Bundle, bytes]) -> None:
    """A checkpoint time (signed by nothing) in a bundle fails; the writer never puts one in."""
    b, bundle, data = built
    assert b"timestampUnixMs" not in data
    timed = data.replace(b'"note":', b'"timestampUnixMs":"1","note":', 1)
    assert "signed by nothing" in _why(b, timed, "bundle.format")
    assert bundle.checkpoint is not None
    in_memory = dataclasses.replace(
        bundle, checkpoint=dataclasses.replace(bundle.checkpoint, timestamp_unix_ms=123)
    )
    assert encode_bundle(in_memory) == data


def test_keyids_must_name_the_key_that_signed(built: tuple[BundleBuilder, Bundle, bytes]) -> None:
    """A lease, certificate or manifest whose keyid names another key fails, saying which."""
    b, bundle, _data = built
    mallory = seeded_key("strict/mallory")

    def rekey(env: Envelope, keyid: str) -> Envelope:
        return Envelope(env.payload, env.payload_type, ((keyid, env.signatures[0][1]),))

    assert bundle.manifest is not None
    edits = [
        ("lease.signature", dataclasses.replace(
            bundle, leases=[rekey(bundle.leases[0], mallory.keyid), *bundle.leases[1:]])),
        ("certificate", dataclasses.replace(bundle, node_certificates=[
            rekey(bundle.node_certificates[0], mallory.keyid), *bundle.node_certificates[1:]])),
        ("manifest", dataclasses.replace(bundle, manifest=rekey(bundle.manifest, mallory.keyid))),
    ]  # fmt: skip
    for check, edited in edits:
        why = _why(b, encode_bundle(edited), check)
        expected = f"signed by keyid {mallory.keyid[:16]}, expected one of {b.control.keyid[:16]}"
        assert expected in why
        assert f"the signature is by trusted key {b.control.keyid[:16]}" in why


def test_control_keyids_and_export_time_must_match_the_signed_facts(
    built: tuple[BundleBuilder, Bundle, bytes],
) -> None:
    """controlKeyids must name the signers, and exportedUnixMs must equal the manifest's."""
    b, bundle, _data = built
    other = seeded_key("strict/other").keyid
    for keyids in ([], [other], [b.control.keyid, b.control.keyid], [b.control.keyid, other]):
        edited = encode_bundle(dataclasses.replace(bundle, control_keyids=keyids))
        assert _checks(b, edited) == {"control.keyids"}, keyids
    late = encode_bundle(dataclasses.replace(bundle, exported_unix_ms=bundle.exported_unix_ms + 1))
    assert "is not the manifest's" in _why(b, late, "manifest")


def test_signed_payloads_must_be_canonical(built: tuple[BundleBuilder, Bundle, bytes]) -> None:
    """A control-signed lease with an unknown protobuf field, or a mis-issued certificate, fails."""
    b, bundle, _data = built
    lease = decode_lease(bundle.leases[0].payload)
    padded = encode_lease(lease) + b"\xa8\x06\x01"  # field 100, varint 1: unknown to Lease
    env = b.control.sign_envelope(LEASE_PAYLOAD_TYPE, padded)
    edited = dataclasses.replace(bundle, leases=[env, *bundle.leases[1:]])
    assert "canonical encoding" in _why(b, encode_bundle(edited), "lease.signature")
    node = b.nodes["node-a"]
    _cert, foreign = issue_cert(seeded_key("strict/old-control"), "node-a", node.key.public.raw, T0)
    resigned = b.control.sign_envelope(foreign.payload_type, foreign.payload)
    edited = dataclasses.replace(bundle, node_certificates=[resigned])
    assert "names issuer" in _why(b, encode_bundle(edited), "certificate")


def test_receipt_envelopes_carry_exactly_one_signature() -> None:
    """A receipt with a second signature (even by the same node) fails envelope.format."""
    b = BundleBuilder(seed="two-sigs")
    lease = b.lease("t", "n", "a")
    data = b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 1, final_state=4)
    env, _r = parse_receipt(data)
    doubled = Envelope(env.payload, env.payload_type, env.signatures * 2).to_json_bytes()
    bundle = b.build()
    edited = dataclasses.replace(
        bundle, entries=[dataclasses.replace(bundle.entries[0], envelope=doubled)]
    )
    assert "envelope.format" in _checks(b, edited)


# --- time, like with like -------------------------------------------------------


def _skewed(offset_ms: int) -> BundleBuilder:
    """A node whose clock is `offset_ms` off the control plane's: certified and leased at T0."""
    b = BundleBuilder(seed="skew")
    node = b.node("n")
    _, node.cert = issue_cert(b.control, "n", node.key.public.raw, T0)
    lease = b.lease("t", "n", "a", issued=T0, ttl_ms=30_000)
    b.receipt(ReceiptKind.LEASE_GRANTED, lease, T0 + offset_ms)
    b.receipt(ReceiptKind.TOOL_CALL, lease, T0 + offset_ms + 20, tool="x", status="ok")
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + offset_ms + 30, final_state=4)
    return b


def test_a_node_3s_behind_verifies_with_skew_warnings() -> None:
    """Receipts stamped by a clock 3 s behind verify, warning about lease window and certificate."""
    b = _skewed(-3_000)
    report = verify_bundle(encode_bundle(b.build()), [b.control.public])
    assert report.ok, report.failures
    got = {(w.check, w.ref) for w in report.warnings}
    assert got == {("lease.window", "n#1"), ("certificate", "n#1")}
    assert all("within the 5000 ms bound" in w.why for w in report.warnings)
    assert "up to 3000 ms" in report.warnings[0].why or "up to 3000 ms" in report.warnings[1].why


def test_skew_beyond_the_bound_fails_and_the_bound_is_configurable() -> None:
    """6 s behind fails lease.window and certificate; a 10 s bound accepts it; 0 is exact."""
    b = _skewed(-6_000)
    assert _checks(b, b.build()) == {"lease.window", "certificate"}
    assert verify_bundle(b.build(), [b.control.public], max_clock_skew_ms=10_000).ok
    exact = _skewed(-1)
    assert _checks(exact, exact.build(), max_clock_skew_ms=0) == {"lease.window", "certificate"}
    assert verify_bundle(_skewed(0).build(), [b.control.public]).warnings == []
    with pytest.raises(ValueError, match="negative"):
        verify_bundle(b.build(), [b.control.public], max_clock_skew_ms=-1)


def test_a_receipt_must_name_a_window_its_lease_has() -> None:
    """The lease window a receipt copies (control-stamped) must match a signed one exactly."""
    b = BundleBuilder(seed="named-window")
    lease = b.lease("t", "n", "a", issued=T0, ttl_ms=30_000)
    b.receipt(ReceiptKind.LEASE_GRANTED, lease, T0)
    stretched = dataclasses.replace(lease, expires_unix_ms=lease.expires_unix_ms + 1)
    b.receipt(ReceiptKind.TASK_FINISHED, stretched, T0 + 10, final_state=4)
    report = verify_bundle(b.build(), [b.control.public])
    assert [(f.check, f.ref) for f in report.failures] == [("lease.window", "n#2")]
    assert "which no signed lease of the task has" in report.failures[0].why


# --- what the CLI prints ---------------------------------------------------------


def test_cli_prints_the_verdict_first_and_reads_stdin() -> None:
    """The verdict comes first, an invalid bundle's timeline is marked unverified; - is stdin."""
    valid = (BUNDLES / "valid.json").read_bytes()
    proc, _s, _mb = _cli("verify", "-", "--trust", PUB, stdin=valid)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("VALID: 11 receipts")
    bad = (BUNDLES / "tampered-deleted.json").read_bytes()
    proc, _s, _mb = _cli("verify", "-", "--trust", PUB, "--timeline", stdin=bad)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("INVALID: 1 failure(s); first: node-a#3: chain.gap")
    assert lines.index(
        "Receipts as the bundle claims them (NOT verified: the bundle is invalid):"
    ) > lines.index("FAIL node-a#3: chain.gap: missing from the bundle")
    proc, _s, _mb = _cli("verify", "-", "--trust", PUB, stdin=bytes(100_000))
    assert proc.returncode == 1
    assert proc.stdout.startswith("INVALID: 1 failure(s); first: bundle: bundle.format")


def test_cli_escapes_terminal_control_characters(tmp_path: Path) -> None:
    """Text from receipts cannot drive the terminal: control characters are printed escaped."""
    b = BundleBuilder(seed="escapes")
    lease = b.lease("t\x1b[2J", "n", "a")
    b.receipt(ReceiptKind.TOOL_CALL, lease, T0 + 1, tool="x\x1b]0;owned\x07", status="ok")
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 2, final_state=4)
    path = tmp_path / "bundle.json"
    path.write_bytes(encode_bundle(b.build()))
    pub = tmp_path / "control.pub"
    pub.write_bytes(b.control.public.pem())
    proc, _s, _mb = _cli("verify", str(path), "--trust", str(pub), "--timeline")
    assert proc.returncode == 0, proc.stdout
    assert "\x1b" not in proc.stdout
    assert "\x07" not in proc.stdout
    assert "task t\\x1b[2J" in proc.stdout


def test_clock_skew_flag_accepts_durations() -> None:
    """--max-clock-skew takes 5s, 500ms, 2m or plain seconds, and refuses anything else."""
    from tether.verify.cmd import duration_ms

    assert [duration_ms(x) for x in ("5s", "500ms", "2m", "1.5", "0")] == [
        5000,
        500,
        120_000,
        1500,
        0,
    ]
    import argparse

    for bad in ("-1s", "5h", "soon", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            duration_ms(bad)


# --- robustness -------------------------------------------------------------------


def test_random_edits_never_crash_and_never_pass(
    built: tuple[BundleBuilder, Bundle, bytes],
) -> None:
    """Random byte insertions, deletions and replacements all fail verification, none raises."""
    b, _bundle, data = built
    rng = random.Random(9162)
    for _ in range(400):
        at = rng.randrange(len(data))
        op = rng.randrange(3)
        if op == 0:
            edited = data[:at] + bytes([rng.randrange(256)]) + data[at:]
        elif op == 1:
            edited = data[:at] + data[at + 1 :]
        else:
            value = rng.randrange(255)
            edited = data[:at] + bytes([value if value < data[at] else value + 1]) + data[at + 1 :]
        assert not verify_bundle(edited, [b.control.public], threads=1).ok, (op, at)


def test_statement_bytes_round_trip_still_parse() -> None:
    """The strict statement parser accepts exactly what nodes sign (no false rejections)."""
    r = Receipt(
        kind=ReceiptKind.TOOL_CALL, node_id="n", task_id="t-é✓", attempt=1, fencing_token=1,
        agent_id="a", lease_id="L", lease_issued_unix_ms=1, lease_expires_unix_ms=2,
        time_unix_ms=1, seq=1, reason='quote " and \\ and \n newline',
    )  # fmt: skip
    from tether.verify.verifier import _statement

    assert _statement(statement_bytes(r), 16) == r
    assert parse_receipt(sign_receipt(r, seeded_key("n")))[1] == r


def _peak_anon_mb(args: list[str], stdin: bytes | None) -> tuple[int, float]:
    """(exit code, peak anonymous resident MB) of `tether ARGS`, sampled every 5 ms: what
    the process itself holds, without the file pages of a mapped bundle (page cache)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    feeder = None
    if stdin is not None:

        def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin)
            proc.stdin.close()

        feeder = threading.Thread(target=feed)
        feeder.start()
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        time.sleep(0.005)
    if feeder is not None:
        feeder.join()
    return proc.wait(), peak / 1024


def test_stdin_is_spooled_to_a_file_not_held_in_memory(tmp_path: Path) -> None:
    """`tether verify -` holds a block of its input at a time (the rest goes to an unlinked
    temporary file that is mapped, as a bundle file is), not the whole input (twice, with
    the join): its peak anonymous memory is the file path's, give or take, for 56 MB."""
    b = BundleBuilder(seed="spool")
    for i in range(1500):
        b.task(f"t{i}", "node-a", "agent-1", tool_calls=10, start=T0 + i * 1000)
    data = encode_bundle(b.build())
    path = tmp_path / "bundle.json"
    path.write_bytes(data)
    pub = tmp_path / "control.pub"
    pub.write_bytes(b.control.public.pem())
    args = ["verify", "--trust", str(pub), "--quiet"]
    code, file_mb = _peak_anon_mb([*args, str(path)], None)
    assert code == 0
    code, pipe_mb = _peak_anon_mb([*args, "-"], data)
    assert code == 0
    assert pipe_mb - file_mb < len(data) / 2**20 / 2, (len(data), file_mb, pipe_mb)
    assert spool_bundle(io.BytesIO(b"")) == b""
    assert bytes(spool_bundle(io.BytesIO(data))) == read_bundle(io.BytesIO(data))
    with pytest.raises(BundleFormatError, match="control byte 0x00 at offset 5"):
        spool_bundle(io.BytesIO(b'{"a":\x00}'))
    with pytest.raises(BundleTooLarge):
        spool_bundle(io.BytesIO(data), Limits(max_bytes=1000))

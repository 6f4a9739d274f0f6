"""The literal redaction matcher replaces exactly what one longest-first regex would.

The redactor stopped compiling every form of every secret into one regular
expression (seconds of event-loop time for a 64 KiB secret); these tests hold
the replacement to the regex's semantics on random secrets and texts, and the
URL-encoded forms to `urllib.parse`.
"""

from __future__ import annotations

import random
import re
import time
from urllib.parse import quote, quote_plus

from protofuzz import fuzz_seed

from tether.sidecar.redaction import REDACTED, Redactor, secret_forms


def reference(secrets: list[bytes], blob: bytes) -> tuple[bytes, str]:
    """What the regex-based redactor returned for `blob` as bytes and as text (decoded
    with surrogateescape): the forms as one alternation, longest first."""
    forms = set().union(*(secret_forms(s) for s in secrets))
    ordered = sorted(forms, key=lambda f: (-len(f), f))
    as_bytes = re.compile(b"|".join(re.escape(f) for f in ordered)).sub(REDACTED.encode(), blob)
    texts = sorted(
        {f.decode("utf-8", "surrogateescape") for f in forms}, key=lambda t: (-len(t), t)
    )
    text = blob.decode("utf-8", "surrogateescape")
    return as_bytes, re.compile("|".join(re.escape(t) for t in texts)).sub(REDACTED, text)


def test_url_forms_match_urllib() -> None:
    """The URL-encoded forms are urllib's quote, quote(safe=""), quote_plus, upper and lower."""
    rng = random.Random(fuzz_seed())
    for _ in range(500):
        secret = bytes(rng.choice((rng.randrange(256), *b" /+%~_-.aZ09")) for _ in range(20))
        forms = secret_forms(secret)
        for text in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
            assert text.encode() in forms
            lower = re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)
            assert lower.encode() in forms


def test_matcher_equals_the_longest_first_regex() -> None:
    """On random secrets (short and past 128 bytes) and texts built from their forms, pieces
    of forms and noise, bytes and text redaction equal the regex reference."""
    seed = fuzz_seed()
    rng = random.Random(seed)
    for _ in range(500):
        alphabet = rng.choice((b"ab/+=", bytes(range(256))))
        secrets = [
            bytes(rng.choice(alphabet) for _ in range(rng.choice((1, 2, 3, 8, 40, 150))))
            for _ in range(rng.randint(1, 3))
        ]
        forms = sorted(set().union(*(secret_forms(s) for s in secrets)))
        parts = []
        for _ in range(rng.randint(0, 8)):
            roll = rng.random()
            if roll < 0.4:
                parts.append(rng.choice(forms))
            elif roll < 0.6:
                form = rng.choice(forms)
                i = rng.randrange(len(form))
                parts.append(form[i : i + rng.randint(1, len(form))])
            else:
                parts.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 20))))
        blob = b"".join(parts)
        redactor = Redactor(secrets)
        as_bytes, as_text = reference(secrets, blob)
        assert redactor.redact_bytes(blob) == as_bytes, f"seed {seed}"
        text = blob.decode("utf-8", "surrogateescape")
        assert redactor.redact_text(text) == as_text, f"seed {seed}"


def test_large_secret_set_up_and_scan_are_fast() -> None:
    """A 64 KiB secret: the redactor is built and scans a 1 MiB text in well under a second."""
    rng = random.Random(fuzz_seed())
    secret = rng.randbytes(64 * 1024)
    t0 = time.monotonic()
    redactor = Redactor([secret])
    built = time.monotonic() - t0
    text = "x" * (1 << 20) + secret.hex() + "y"
    t0 = time.monotonic()
    out = redactor.redact_text(text)
    scanned = time.monotonic() - t0
    assert out == "x" * (1 << 20) + REDACTED + "y"
    assert built < 0.5, f"set-up took {built:.3f}s"
    assert scanned < 0.5, f"scan took {scanned:.3f}s"

"""`tether verify BUNDLE --trust trust.pem`: offline bundle verification.

Exit 0 valid, 1 invalid (every failure printed, first first, then the count),
2 usage error, an unreadable bundle or trust key, or a bundle over the size
limit. The verdict comes first, then failures and warnings; with --timeline,
each task's receipts follow: what the receipts claim, proven only when the
verdict is VALID.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError
from tether.crypto.note import MAX_NOTE_BYTES
from tether.crypto.pki import TrustBundle
from tether.verify.bundle import (
    BundleFormatError,
    BundleTooLarge,
    Limits,
    open_bundle,
    spool_bundle,
)
from tether.verify.verifier import (
    DEFAULT_MAX_CLOCK_SKEW_MS,
    Failure,
    Report,
    verify_bundle,
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?")


def duration_ms(text: str) -> int:
    """Parses "5s", "500ms", "2m" or plain seconds ("1.5") into milliseconds.

    Raises:
        argparse.ArgumentTypeError: not a non-negative duration.
    """
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 5s, 500ms, 2m)")
    scale = {"ms": 1, "s": 1000, "m": 60_000, None: 1000}[m[2]]
    return round(float(m[1]) * scale)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return n


def register(sub: Any) -> None:
    """Adds the `verify` subcommand."""
    p = sub.add_parser(
        "verify",
        help="verify an exported receipt bundle offline",
        description="Verify an exported receipt bundle offline (no network, no database): "
        "signatures, hash chains, inclusion in a signed checkpoint, the signed export "
        "manifest, and what happened under which lease.",
    )
    p.add_argument(
        "bundle", help="bundle file (proto3 JSON of tether.v1.Bundle), or - to read stdin"
    )
    p.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        required=True,
        metavar="PUBKEY",
        help="trusted control-plane public key(s): a PEM public key or a trust bundle "
        "(trust.pem); repeat for several",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--allow-open",
        action="store_true",
        help="accept tasks that have no task_finished receipt yet",
    )
    p.add_argument(
        "--timeline",
        action="store_true",
        help="after the verdict, list each task's receipts: what happened under which lease",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no timeline (the default; kept for scripts that pass it)",
    )
    p.add_argument(
        "--max-clock-skew",
        type=duration_ms,
        default=DEFAULT_MAX_CLOCK_SKEW_MS,
        metavar="DURATION",
        help="how far a node's clock may be off: a receipt time (node clock) outside its "
        "lease window or certificate validity (control-plane clock) by at most this much "
        "is a warning, beyond it a failure (default 5s; e.g. 500ms, 30s, 0)",
    )
    p.add_argument(
        "--max-bytes",
        type=_positive,
        default=Limits.max_bytes,
        metavar="N",
        help=f"refuse bundles larger than N bytes (default {Limits.max_bytes}, 1 GiB)",
    )
    p.add_argument(
        "--max-depth",
        type=_positive,
        default=Limits.max_depth,
        metavar="N",
        help=f"refuse JSON nested deeper than N levels (default {Limits.max_depth}; "
        "bundles nest 5)",
    )
    p.add_argument(
        "--previous-checkpoint",
        type=Path,
        metavar="FILE",
        help="a signed checkpoint note seen before (`tether receipts checkpoint`): prove the "
        "bundle's checkpoint extends it (the bundle must be exported with the same "
        "--previous-checkpoint, so its signed manifest carries the consistency proof)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verifies the bundle and prints the verdict."""
    # The report of a large bundle is millions of small acyclic objects: a cyclic GC
    # pass over them while it is rendered would only cost time (about 0.1 s per 30,000
    # receipts), so collection waits until the command is done.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(args)
    finally:
        if gc_was_enabled:
            gc.enable()


def _run(args: argparse.Namespace) -> int:
    try:
        keys = [
            key for path in args.trust for key in TrustBundle.load(path, need_ca=False).control_keys
        ]
    except ConfigError as err:
        print(f"tether verify: {err.message}", file=sys.stderr)
        return 2
    if not keys:
        print("tether verify: no control-plane public key in --trust", file=sys.stderr)
        return 2
    try:
        limits = Limits(max_bytes=args.max_bytes, max_depth=min(args.max_depth, 512))
    except ValueError as err:
        print(f"tether verify: {err}", file=sys.stderr)
        return 2
    previous = None
    if args.previous_checkpoint is not None:
        try:
            with open(args.previous_checkpoint, "rb") as f:
                raw = f.read(MAX_NOTE_BYTES + 1)
            previous = raw.decode("utf-8")
        except OSError as err:
            print(
                f"tether verify: cannot read {args.previous_checkpoint}: {err.strerror}",
                file=sys.stderr,
            )
            return 2
        except UnicodeDecodeError:
            previous = raw.decode("utf-8", "replace")  # the verifier names it as malformed
    name = "stdin" if args.bundle == "-" else args.bundle
    try:
        if args.bundle == "-":
            data = spool_bundle(sys.stdin.buffer, limits)
        else:
            data = open_bundle(args.bundle, limits)
    except OSError as err:
        print(f"tether verify: cannot read {name}: {err.strerror}", file=sys.stderr)
        return 2
    except BundleTooLarge as err:
        print(f"tether verify: {name}: {err.message}", file=sys.stderr)
        return 2
    except BundleFormatError as err:
        report = Report([Failure("bundle.format", "bundle", err.message)])
    else:
        try:
            report = verify_bundle(
                data,
                keys,
                allow_open=args.allow_open,
                max_clock_skew_ms=args.max_clock_skew,
                limits=limits,
                previous_checkpoint=previous,
                # Receipt lines only where they are shown: --json and --timeline.
                details=args.json or (args.timeline and not args.quiet),
            )
        except Exception as err:  # a verifier bug must still end in a clear, failing exit
            print(
                f"tether verify: internal error (please report it): {type(err).__name__}: "
                f"{str(err)[:200]}",
                file=sys.stderr,
            )
            return 2
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report, timeline=args.timeline and not args.quiet))
        if not args.timeline and report.task_count and sys.stdout.isatty():
            print("(--timeline lists each task's receipts)")
    return 0 if report.ok else 1


def _ts(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return f"@{ms}ms"


def safe(text: str) -> str:
    """Text from a bundle made harmless for a terminal: controls and odd code points escaped."""
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable()
        else c.encode("unicode_escape", "backslashreplace").decode("ascii", "replace")
        for c in text
    )


def render(report: Report, timeline: bool = True) -> str:
    """The human-readable report: verdict first, then failures, warnings and the timeline.

    Nothing a bundle merely claims comes before the verdict; when the verdict
    is INVALID the timeline is labelled as unproven.
    """
    cp = (
        f"checkpoint {safe(report.origin)} size {report.tree_size}"
        if report.origin
        else "no checkpoint"
    )
    scope = ""
    if report.exported_tasks:
        names = ", ".join(safe(t) for t in report.exported_tasks[:3])
        more = (
            f" and {len(report.exported_tasks) - 3} more" if len(report.exported_tasks) > 3 else ""
        )
        scope = f"per-task export of {names}{more}, "
    if report.consistent_with:
        cp += f" (consistent with the previous checkpoint at size {report.consistent_with})"
    summary = (
        f"{report.entries} receipts, {report.nodes} nodes, {report.task_count} tasks, {scope}"
        f"{cp}, {report.seconds:.2f}s"
    )
    lines: list[str] = []
    if report.ok:
        lines.append(f"VALID: {summary}")
    else:
        first = report.failures[0]
        lines.append(
            f"INVALID: {len(report.failures)} failure(s); first: {safe(first.ref)}: "
            f"{first.check}: {safe(first.why)}"
        )
        lines.append(f"  {summary}")
    for f in report.failures:
        lines.append(f"FAIL {safe(f.ref)}: {f.check}: {safe(f.why)}")
    for w in report.warnings:
        lines.append(f"WARN {safe(w.ref)}: {w.check}: {safe(w.why)}")
    if timeline and report.tasks:
        lines.append("")
        if not report.ok:
            lines.append(
                "Receipts as the bundle claims them (NOT verified: the bundle is invalid):"
            )
            lines.append("")
        for task in report.tasks:
            final = task.final_state or "open"
            lines.append(f"task {safe(task.task_id)}  [{final}]")
            for limit in task.limits:
                lines.append(f"  limit (signed lease)  {safe(limit)}")
            for e in task.events:
                lines.append(
                    f"  {_ts(e.time_unix_ms)}  {safe(e.ref):<20} {e.kind:<14} {safe(e.detail)}"
                )
            lines.append("")
    return "\n".join(lines) + "\n"

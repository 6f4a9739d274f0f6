"""`tether verify BUNDLE --trust trust.pem`: offline bundle verification.

Exit 0 valid, 1 invalid (every failure printed, first first, then the count),
2 usage error, an unreadable bundle or trust key, or a bundle over the size
limit. The verdict comes first; the timeline after it is what the receipts
claim, proven only when the verdict is VALID.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError
from tether.crypto.pki import TrustBundle
from tether.verify.bundle import BundleFormatError, BundleTooLarge, Limits, read_bundle
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
        "--quiet", action="store_true", help="no timeline: the verdict, failures and warnings"
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
    p.set_defaults(func=run)

    r = sub.add_parser("receipts", help="receipt ledger commands")
    rsub = r.add_subparsers(dest="receipts_command", metavar="COMMAND", required=True)
    e = rsub.add_parser("export", help="export an offline-verifiable bundle")
    from tether.control.cmd import add_client_args

    add_client_args(e)
    sel = e.add_mutually_exclusive_group(required=True)
    sel.add_argument("--task", action="append", default=[], metavar="ID", help="task id (repeat)")
    sel.add_argument("--since", type=int, metavar="UNIX_MS", help="receipts stored since then")
    sel.add_argument("--all", action="store_true", help="every receipt in the ledger")
    e.add_argument("--out", type=Path, required=True, help="bundle file to write")
    e.set_defaults(func=run_export)


def run(args: argparse.Namespace) -> int:
    """Verifies the bundle and prints the verdict."""
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
    name = "stdin" if args.bundle == "-" else args.bundle
    try:
        if args.bundle == "-":
            data = read_bundle(sys.stdin.buffer, limits)
        else:
            with open(args.bundle, "rb") as f:
                data = read_bundle(f, limits)
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
        sys.stdout.write(render(report, timeline=not args.quiet))
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
    summary = (
        f"{report.entries} receipts, {report.nodes} nodes, {len(report.tasks)} tasks, {cp}, "
        f"{report.seconds:.2f}s"
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
            for e in task.events:
                lines.append(
                    f"  {_ts(e.time_unix_ms)}  {safe(e.ref):<20} {e.kind:<14} {safe(e.detail)}"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def run_export(args: argparse.Namespace) -> int:
    """Fetches a bundle from the control plane and writes it (the only networked command here)."""
    import asyncio

    from tether.control.cmd import client_from_args
    from tether.grpcutil.status import from_rpc_error
    from tether.v1 import control_pb2 as pb
    from tether.verify.bundle import bundle_from_proto, encode_bundle

    async def go() -> Any:
        import grpc

        async with client_from_args(args) as client:
            request = pb.ExportBundleRequest(task_ids=args.task, since_unix_ms=args.since or 0)
            try:
                return await client.stub.ExportBundle(request, timeout=client.timeout_s)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err

    resp = asyncio.run(go())
    bundle = bundle_from_proto(resp.bundle)
    args.out.write_bytes(encode_bundle(bundle))
    print(
        f"wrote {args.out}: {len(bundle.entries)} receipts, {len(bundle.node_certificates)} "
        f"nodes, {len(bundle.leases)} leases, tree size "
        f"{bundle.checkpoint.tree_size if bundle.checkpoint else 0}",
        file=sys.stderr,
    )
    return 0

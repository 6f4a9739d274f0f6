"""`tether verify BUNDLE --trust trust.pem`: offline bundle verification.

Exit 0 valid, 1 invalid (every failure printed, first first, then the count),
2 usage error or unreadable bundle/trust key.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError
from tether.crypto.pki import TrustBundle
from tether.verify.verifier import Report, verify_bundle


def register(sub: Any) -> None:
    """Adds the `verify` subcommand."""
    p = sub.add_parser(
        "verify",
        help="verify an exported receipt bundle offline",
        description="Verify an exported receipt bundle offline (no network, no database).",
    )
    p.add_argument("bundle", type=Path, help="bundle file (proto3 JSON of tether.v1.Bundle)")
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
    p.add_argument("--quiet", action="store_true", help="no timeline, only the verdict")
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
    try:
        data = args.bundle.read_bytes()
    except OSError as err:
        print(f"tether verify: cannot read {args.bundle}: {err.strerror}", file=sys.stderr)
        return 2
    report = verify_bundle(data, keys, allow_open=args.allow_open)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report, timeline=not args.quiet))
    return 0 if report.ok else 1


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def render(report: Report, timeline: bool = True) -> str:
    """The human-readable report: per-task timeline, failures, verdict."""
    lines: list[str] = []
    if timeline:
        for task in report.tasks:
            final = task.final_state or "open"
            lines.append(f"task {task.task_id}  [{final}]")
            for e in task.events:
                lines.append(f"  {_ts(e.time_unix_ms)}  {e.ref:<20} {e.kind:<14} {e.detail}")
            lines.append("")
    for f in report.failures:
        lines.append(f"FAIL {f.ref}: {f.check}: {f.why}")
    cp = f"checkpoint {report.origin} size {report.tree_size}" if report.origin else "no checkpoint"
    summary = (
        f"{report.entries} receipts, {report.nodes} nodes, {len(report.tasks)} tasks, {cp}, "
        f"{report.seconds:.2f}s"
    )
    if report.ok:
        lines.append(f"VALID: {summary}")
    else:
        first = report.failures[0]
        lines.append(
            f"INVALID: {len(report.failures)} failure(s); first: {first.ref}: {first.check}: "
            f"{first.why}"
        )
        lines.append(f"  {summary}")
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

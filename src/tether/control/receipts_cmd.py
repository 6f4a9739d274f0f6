"""`tether receipts …`: export bundles and save checkpoints from a running control plane.

These are the networked receipt commands (an operator's, with the admin or
auditor role); `tether verify` stays offline and never imports them.

`receipts export` streams the bundle (StreamExportBundle) straight to disk: a
page arrives, is written, and is dropped, so the command's memory does not grow
with the bundle. It writes `FILE.partial` beside FILE and renames it only once
the trailer (checkpoint and signed manifest) arrived and the file is synced, so
an interrupted export never leaves a truncated bundle under FILE's name.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError, Unavailable, VerificationError
from tether.crypto.note import parse_checkpoint, parse_note

PROGRESS_EVERY = 10_000  # receipts between progress lines


def register(sub: Any) -> None:
    """Adds the `receipts` subcommands."""
    from tether.control.cmd import add_client_args

    r = sub.add_parser("receipts", help="export receipt bundles and checkpoints")
    rsub = r.add_subparsers(dest="receipts_command", metavar="COMMAND", required=True)
    e = rsub.add_parser(
        "export",
        help="export an offline-verifiable bundle (streamed to disk, any size)",
        description="Export an offline-verifiable bundle. With --task, a per-task bundle: "
        "only those tasks' receipts, each with an inclusion proof, and a signed manifest "
        "of exactly which receipts belong to them (nothing of other tasks). With --since "
        "or --all, whole node chains.",
    )
    add_client_args(e)
    sel = e.add_mutually_exclusive_group(required=True)
    sel.add_argument(
        "--task", action="append", default=[], metavar="ID", help="task id (repeat): per-task"
    )
    sel.add_argument(
        "--since",
        type=int,
        metavar="UNIX_MS",
        help="whole chains of the nodes that stored receipts since then",
    )
    sel.add_argument("--all", action="store_true", help="every receipt in the ledger")
    e.add_argument(
        "--out",
        type=Path,
        required=True,
        help="bundle file to write, or - for stdout (e.g. to pipe into `tether verify -`)",
    )
    e.add_argument(
        "--previous-checkpoint",
        type=Path,
        metavar="FILE",
        help="a checkpoint seen before (a signed note, e.g. from `tether receipts "
        "checkpoint`): the bundle then carries a consistency proof from it, which "
        "`tether verify --previous-checkpoint FILE` checks",
    )
    e.set_defaults(func=run_export)
    c = rsub.add_parser(
        "checkpoint",
        help="save the ledger's latest signed checkpoint (to prove consistency later)",
    )
    add_client_args(c)
    c.add_argument("--out", type=Path, required=True, help="file for the signed note")
    c.add_argument(
        "--fresh", action="store_true", help="sign a checkpoint covering every receipt now"
    )
    c.set_defaults(func=run_checkpoint)


def checkpoint_size(path: Path) -> int:
    """The tree size a saved checkpoint note names (its signature is checked by verify).

    Raises:
        ConfigError: unreadable, or not a checkpoint note.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the checkpoint {path}: {err}") from err
    try:
        return parse_checkpoint(parse_note(text).body).tree_size
    except VerificationError as err:
        raise ConfigError(f"{path} is not a signed checkpoint note: {err.message}") from err


def run_export(args: argparse.Namespace) -> int:
    """Streams a bundle from the control plane to --out."""
    from tether.control.cmd import client_from_args

    previous = checkpoint_size(args.previous_checkpoint) if args.previous_checkpoint else 0
    out: Path = args.out
    to_stdout = str(out) == "-"
    partial = out.with_name(out.name + ".partial")
    if not to_stdout and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the directory {out.parent} does not exist")

    async def go() -> Any:
        from tether.verify.bundle import (
            BundleWriter,
            bundle_from_proto,
            entries_from_proto,
        )

        tty = sys.stderr.isatty()
        async with client_from_args(args) as client:
            # (ASYNC230: the CLI runs this one stream; a page is written before the next is read.)
            # stdout: written as it comes (a reader sees a partial bundle if the stream breaks,
            # and `tether verify` refuses one without its trailer).
            sink = (
                os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=1 << 20)
                if to_stdout
                else open(partial, "wb", buffering=1 << 20)  # noqa: ASYNC230, SIM115
            )
            with sink as f:
                w = BundleWriter(f)
                shown = 0
                trailer = None
                async for part in client.export_stream(args.task, args.since or 0, previous):
                    if trailer is not None:
                        raise Unavailable("export stream sent more after its trailer")
                    if part.entries:
                        w.entries(entries_from_proto(part.entries))
                        n = w.counts["entries"]
                        if n - shown >= PROGRESS_EVERY:
                            shown = n
                            end = "\r" if tty else "\n"
                            print(f"exported {n} receipts…", end=end, file=sys.stderr, flush=True)
                    elif part.node_certificates:
                        w.node_certificates(bundle_from_proto_envelopes(part.node_certificates))
                    elif part.leases:
                        w.leases(bundle_from_proto_envelopes(part.leases))
                    elif part.HasField("trailer"):
                        trailer = bundle_from_proto(part.trailer)
                if trailer is None:
                    raise Unavailable(
                        "the export stream ended before its trailer; no bundle was written"
                    )
                w.finish(trailer)
                f.flush()
                if not to_stdout:
                    os.fsync(f.fileno())
            if not to_stdout:
                os.replace(partial, out)
            return w, trailer

    from tether.control.cmd import explain_client_errors

    try:
        with explain_client_errors(args):
            w, trailer = asyncio.run(go())
    except ValueError as err:  # pages out of file order
        if not to_stdout:
            partial.unlink(missing_ok=True)
        raise Unavailable(f"the export stream is malformed: {err}") from err
    except BaseException:
        if not to_stdout:
            partial.unlink(missing_ok=True)
        raise
    scope = f"tasks {', '.join(sorted(set(args.task)))}" if args.task else "whole chains"
    print(
        f"wrote {'stdout' if to_stdout else out}: {w.counts['entries']} receipts ({scope}), "
        f"{w.counts['nodeCertificates']} node certificates, {w.counts['leases']} leases, "
        f"{w.bytes_written} bytes, tree size "
        f"{trailer.checkpoint.tree_size if trailer.checkpoint else 0}"
        + (f", consistency proof from size {previous}" if previous else ""),
        file=sys.stderr,
    )
    return 0


def bundle_from_proto_envelopes(msgs: Any) -> list[Any]:
    """Envelopes from `tether.v1.Envelope` messages, bytes as they came."""
    from tether.crypto.envelopes import from_proto

    return [from_proto(m) for m in msgs]


def run_checkpoint(args: argparse.Namespace) -> int:
    """Saves the latest signed checkpoint note to --out."""
    from tether.control.cmd import client_from_args

    async def go() -> Any:
        async with client_from_args(args) as client:
            return await client.checkpoint(fresh=args.fresh)

    from tether.control.cmd import explain_client_errors

    with explain_client_errors(args):
        cp = asyncio.run(go())
    args.out.write_text(cp.note, encoding="utf-8")
    print(
        f"wrote {args.out}: checkpoint of {cp.origin} at tree size {cp.tree_size}", file=sys.stderr
    )
    return 0

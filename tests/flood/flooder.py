"""A flood of header-only calls against one gRPC server, run as its own process.

Opens `--calls` calls spread over `--connections` connections (each channel its
own connection), at most `--window` unfinished at once, and never sends a
request message: each call is only headers. A call the server sheds ends with a
status; a call it admits stays open (idle) until the flooder lets go. Once no
call has ended for `--settle-s`, the flooder writes "holding" to
`--status-file`, keeps the open calls for `--hold-s` seconds, cancels them and
writes its JSON summary: status codes seen (before and after letting go), how
many refusals carried a retry hint, how many calls were held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections import Counter
from pathlib import Path

import grpc

PUSHBACK = "grpc-retry-pushback-ms"


async def flood(args: argparse.Namespace) -> dict[str, object]:
    metadata = (("x-tether-agent-token", args.token),) if args.token else ()
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    if args.ca:
        creds = grpc.ssl_channel_credentials(*_pems(args))
        channels = [
            grpc.aio.secure_channel(args.target, creds, options=options)
            for _ in range(args.connections)
        ]
    else:
        channels = [
            grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.connections)
        ]
    callables = [ch.stream_unary(args.method) for ch in channels]
    codes: Counter[str] = Counter()
    hinted = 0
    open_calls: set[grpc.aio.StreamUnaryCall[bytes, bytes]] = set()
    window = asyncio.Semaphore(args.window)
    status = Path(args.status_file)
    details: dict[str, str] = {}  # one message per status code

    async def settle(call: grpc.aio.StreamUnaryCall[bytes, bytes]) -> None:
        nonlocal hinted
        try:
            await call
            codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            codes[err.code().name] += 1
            trailers = dict(err.trailing_metadata() or ())
            if (
                err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and int(trailers.get(PUSHBACK, "0")) > 0
            ):
                hinted += 1
            details.setdefault(err.code().name, err.details() or "")
        except asyncio.CancelledError:
            codes["CANCELLED"] += 1
        finally:
            open_calls.discard(call)
            window.release()

    started = time.monotonic()
    settlers = []
    for i in range(args.calls):
        await window.acquire()
        call = callables[i % len(callables)](metadata=metadata)
        open_calls.add(call)
        settlers.append(asyncio.ensure_future(settle(call)))
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let settled calls free the window
    opened_s = time.monotonic() - started
    quiet_since, last = time.monotonic(), -1
    while time.monotonic() - quiet_since < args.settle_s:  # until only held calls remain
        if len(open_calls) != last:
            quiet_since, last = time.monotonic(), len(open_calls)
        await asyncio.sleep(0.2)
    held = len(open_calls)
    codes_held = dict(codes)
    _report(status, {"phase": "holding", "held": held})
    await asyncio.sleep(args.hold_s)
    for call in list(open_calls):
        call.cancel()
    await asyncio.gather(*settlers, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {
        "calls": args.calls,
        "connections": args.connections,
        "codes": dict(codes),
        "hinted": hinted,
        "held": held,
        "opened_s": round(opened_s, 2),
        "details": details,
        "codes_before_release": codes_held,
        "flooder_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def _pems(args: argparse.Namespace) -> tuple[bytes, bytes, bytes]:
    """CA, client key and client certificate, as `grpc.ssl_channel_credentials` takes them."""
    return Path(args.ca).read_bytes(), Path(args.key).read_bytes(), Path(args.cert).read_bytes()


def _report(path: Path, payload: dict[str, object]) -> None:
    """Replaces the status file in one rename (the test never reads half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--method", default="/tether.v1.BrokerService/PutArtifact")
    p.add_argument("--token", default="", help="agent token (sidecar)")
    p.add_argument("--ca", help="CA bundle (PEM) for TLS (control plane)")
    p.add_argument("--cert", help="client certificate (PEM) for mTLS")
    p.add_argument("--key", help="client key (PEM) for mTLS")
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--window", type=int, default=10_000)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument("--hold-s", type=float, default=3.0)
    p.add_argument("--status-file", required=True)
    args = p.parse_args()
    summary = asyncio.run(flood(args))
    _report(Path(args.status_file), {"phase": "done", **summary})


if __name__ == "__main__":
    main()

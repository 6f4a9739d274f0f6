"""`tether health`: ask a Tether server's gRPC health service whether it is serving.

Used by the container HEALTHCHECK and Kubernetes probes, so it needs nothing but
the installed wheel. With no --socket or --address it checks the sidecar socket
the environment configures (TETHER_SOCKET), the same variable the sidecar reads.
Exit 0 SERVING, 1 anything else (unreachable, NOT_SERVING, unknown service).
A control plane serves TLS only: give --tls-ca (its enrolment address needs no
client certificate; its main address also needs --tls-cert/--tls-key); with
--address and no --tls-* flag, TETHER_TLS_CA, TETHER_TLS_CERT and
TETHER_TLS_KEY are used when set, as by the operator commands. --wait DURATION
retries until SERVING (for scripts that just started a server in the background).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

DEFAULT_SOCKET = "tether.sock"


def register(sub: Any) -> None:
    """Adds the `health` subcommand."""
    p = sub.add_parser(
        "health",
        help="check a control plane or sidecar through the gRPC health service",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="sidecar Unix socket (default: $TETHER_SOCKET)")
    where.add_argument("--address", help="host:port or unix:/path of any Tether server")
    p.add_argument("--service", default="", help='service name (default "": the server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")
    p.add_argument(
        "--wait",
        type=_duration_s,
        default=0.0,
        metavar="DURATION",
        help="keep checking until SERVING or this much time passed (e.g. 10s, 2m; "
        "default: check once)",
    )
    p.add_argument("--tls-ca", help="trust bundle or CA certificate: dial with TLS")
    p.add_argument("--tls-cert", help="client certificate (the control plane's main address)")
    p.add_argument("--tls-key", help="client key")
    p.set_defaults(func=run)


def target_of(args: argparse.Namespace) -> str:
    """The gRPC target to check, from the arguments or the environment."""
    if args.address:
        return str(args.address)
    socket = args.socket or os.environ.get("TETHER_SOCKET") or DEFAULT_SOCKET
    return f"unix:{os.path.abspath(socket)}"


def _duration_s(text: str) -> float:
    from tether.verify.cmd import duration_ms

    return duration_ms(text) / 1000


def run(args: argparse.Namespace) -> int:
    """Checks health (until SERVING, with --wait); prints the status on one line."""
    deadline = time.monotonic() + args.wait
    while True:
        code = check_once(args, quiet=time.monotonic() < deadline)
        if code == 0 or time.monotonic() >= deadline:
            return code
        time.sleep(0.25)


def check_once(args: argparse.Namespace, *, quiet: bool = False) -> int:
    """Checks health once; prints the status on one line (failures only unless `quiet`)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tether.grpcutil.tls import ClientTLS, client_tls_from_env

    target = target_of(args)
    tls = None
    if args.tls_ca:
        tls = ClientTLS.load(args.tls_ca, args.tls_cert, args.tls_key)
    elif args.address and not (args.tls_cert or args.tls_key):
        tls = client_tls_from_env()
    if tls is not None:
        options = []
        if target.startswith("unix:"):  # no host name: check the certificate's "localhost"
            options.append(("grpc.ssl_target_name_override", "localhost"))
        channel = grpc.secure_channel(target, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type it for grpc.aio only
        try:
            resp = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            if not quiet:
                print(f"{target}: {getattr(code, 'name', 'ERROR')}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    if serving or not quiet:
        print(f"{target}: {status}")
    return 0 if serving else 1

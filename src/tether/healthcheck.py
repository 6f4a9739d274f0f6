"""`tether health`: ask a Tether server's gRPC health service whether it is serving.

Used by the container HEALTHCHECK and Kubernetes probes, so it needs nothing but
the installed wheel. With no --socket or --address it checks the sidecar socket
the environment configures (TETHER_SOCKET), the same variable the sidecar reads.
Exit 0 SERVING, 1 anything else (unreachable, NOT_SERVING, unknown service).
A control plane serves TLS only: give --tls-ca (its enrolment address needs no
client certificate; its main address also needs --tls-cert/--tls-key).
"""

from __future__ import annotations

import argparse
import os
import sys
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
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
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


def run(args: argparse.Namespace) -> int:
    """Checks health once; prints the status on one line."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tether.grpcutil.tls import ClientTLS

    target = target_of(args)
    if args.tls_ca:
        tls = ClientTLS.load(args.tls_ca, args.tls_cert, args.tls_key)
        channel = grpc.secure_channel(target, tls.credentials())
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
            print(f"{target}: {getattr(code, 'name', 'ERROR')}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{target}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1

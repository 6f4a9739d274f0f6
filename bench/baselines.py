"""Raw baselines measured in the same run as Tether's figures.

Every target is a ratio to one of these, so figures hold on a noisy machine.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import empty_pb2
from nacl.bindings import crypto_sign_open

ECHO_METHOD = "/bench.Echo/Echo"


def _echo_handler() -> grpc.GenericRpcHandler:
    async def echo(request: empty_pb2.Empty, context: object) -> empty_pb2.Empty:
        return request

    handler = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=empty_pb2.Empty.FromString,
        response_serializer=empty_pb2.Empty.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})


async def start_echo_server(path: str) -> grpc.aio.Server:
    """Starts an empty unary echo service on a Unix socket."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_echo_handler(),))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    return server


async def _serve_forever(path: str) -> None:
    server = await start_echo_server(path)
    await server.wait_for_termination()


async def _serve_tls_forever(pki_dir: str) -> None:
    """The echo service on 127.0.0.1:0 with mutual TLS, as the control plane listens.

    Writes the bound port to `pki_dir`/port once it serves.
    """
    from tether.grpcutil.tls import ServerTLS

    d = Path(pki_dir)
    tls = ServerTLS.load(d / "server.crt", d / "server.key", d / "ca.crt")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = server.add_secure_port("127.0.0.1:0", tls.credentials(require_client_cert=True))
    await server.start()
    (d / "port.tmp").write_text(str(port))
    os.replace(d / "port.tmp", d / "port")
    await server.wait_for_termination()


def _spawn_echo_server(path: str, mode: str = "serve-echo") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            mode,
            os.path.dirname(path) if mode == "serve-echo-tls" else path,
        ]
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("echo server did not start")
        time.sleep(0.01)
    return proc


def _open_channel(tmp: str, tls: bool) -> grpc.aio.Channel:
    if not tls:
        return grpc.aio.insecure_channel(f"unix:{os.path.join(tmp, 'echo.sock')}")
    from tether.crypto.signing import SigningKey
    from tether.grpcutil.tls import open_channel
    from tether.testing import make_pki

    pki = make_pki(Path(tmp), [SigningKey.generate()])
    port = (Path(tmp) / "port").read_text()
    return open_channel(f"127.0.0.1:{port}", pki.operator_tls())


async def grpc_echo(
    concurrency: int, total: int, *, subprocess_server: bool, tls: bool = False
) -> dict[str, float]:
    """Empty grpc.aio unary echo over a Unix socket, or over TCP with mutual TLS.

    With `subprocess_server` the server is its own process, the topology of
    every Tether figure (servers run as their own processes); otherwise client
    and server share one process and one core. With `tls` the server listens on
    127.0.0.1 and requires a client certificate from the same kind of CA, key
    types and channel setup (`open_channel`) as a node's calls to the control
    plane: the same-transport baseline of the lease and control-plane figures.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "echo.sock")
        proc: subprocess.Popen[bytes] | None = None
        server: grpc.aio.Server | None = None
        if tls:
            from tether.crypto.signing import SigningKey
            from tether.testing import make_pki

            make_pki(Path(tmp), [SigningKey.generate()])
            proc = _spawn_echo_server(os.path.join(tmp, "port"), "serve-echo-tls")
        elif subprocess_server:
            proc = _spawn_echo_server(path)
        else:
            server = await start_echo_server(path)
        async with _open_channel(tmp, tls) as channel:
            call = channel.unary_unary(
                ECHO_METHOD,
                request_serializer=empty_pb2.Empty.SerializeToString,
                response_deserializer=empty_pb2.Empty.FromString,
            )
            for _ in range(200):
                await call(empty_pb2.Empty())
            latencies: list[float] = []
            per_worker = max(1, total // concurrency)

            async def worker() -> None:
                for _ in range(per_worker):
                    t0 = time.perf_counter()
                    await call(empty_pb2.Empty())
                    latencies.append(time.perf_counter() - t0)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
        if server is not None:
            await server.stop(None)
        if proc is not None:
            proc.terminate()
            proc.wait()
    latencies.sort()
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def ed25519(n: int) -> dict[str, float]:
    """Raw Ed25519 sign and verify rates of the cryptography package (OpenSSL), one core.

    Also libsodium's verify rate (PyNaCl), the implementation `VerifyKey.verify`
    uses, so a ratio can be read against either.
    """
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    msg = os.urandom(300)
    start = time.perf_counter()
    sigs = [key.sign(msg) for _ in range(n)]
    sign_s = time.perf_counter() - start
    start = time.perf_counter()
    for sig in sigs:
        pub.verify(sig, msg)
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    for sig in sigs:
        crypto_sign_open(sig + msg, raw)
    sodium_s = time.perf_counter() - start
    return {
        "sign_per_s": n / sign_s,
        "verify_per_s": n / verify_s,
        "libsodium_verify_per_s": n / sodium_s,
    }


def sqlite_wal_commits(n: int) -> float:
    """Single-row INSERT + COMMIT rate of SQLite in WAL mode (synchronous=NORMAL)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "bench.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        payload = os.urandom(200)
        start = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN")
            db.execute("INSERT INTO t (v) VALUES (?)", (payload,))
            db.execute("COMMIT")
        elapsed = time.perf_counter() - start
        db.close()
    return n / elapsed


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve-echo":
        asyncio.run(_serve_forever(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "serve-echo-tls":
        asyncio.run(_serve_tls_forever(sys.argv[2]))

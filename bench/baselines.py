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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import empty_pb2

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


def _spawn_echo_server(path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "serve-echo", path])
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("echo server did not start")
        time.sleep(0.01)
    return proc


async def grpc_echo(concurrency: int, total: int, *, subprocess_server: bool) -> dict[str, float]:
    """Empty grpc.aio unary echo over a Unix socket.

    With `subprocess_server` the server is its own process, the topology of
    every Tether figure (servers run as their own processes); otherwise client
    and server share one process and one core.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "echo.sock")
        proc: subprocess.Popen[bytes] | None = None
        server: grpc.aio.Server | None = None
        if subprocess_server:
            proc = _spawn_echo_server(path)
        else:
            server = await start_echo_server(path)
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
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
    """Raw Ed25519 sign and verify rates of the cryptography package."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    msg = os.urandom(300)
    start = time.perf_counter()
    sigs = [key.sign(msg) for _ in range(n)]
    sign_s = time.perf_counter() - start
    start = time.perf_counter()
    for sig in sigs:
        pub.verify(sig, msg)
    verify_s = time.perf_counter() - start
    return {"sign_per_s": n / sign_s, "verify_per_s": n / verify_s}


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

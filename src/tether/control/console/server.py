"""The console's listener: uvicorn inside the control plane's loop, TLS with client certificates.

Why client certificates on the listener (not a login form): operators already
hold one (`tether operators add`), the browser presents it in the TLS
handshake, and the console reads the same verified certificate gRPC does, so
there is no password, no session store and nothing a replica must share. A
connection without a certificate of the trust domain's CA never completes the
handshake; a node's certificate completes it and is refused by the
authorization table (nodes are not operators).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tether.core.errors import ConfigError
from tether.grpcutil.tls import ServerTLS

log = logging.getLogger("tether.control.console")

PEER_CERT = "tether_peer_der"
"""Key of the verified client certificate (DER) in each request's ASGI state."""


class _PeerCertProtocol(H11Protocol):
    """HTTP/1.1 that hands each request the connection's verified client certificate.

    The TLS handshake (with `CERT_REQUIRED`) has completed when
    `connection_made` runs, so the certificate read here is the one the CA
    bundle verified; it is copied into every request's `scope["state"]`.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        self.app_state = {**self.app_state, PEER_CERT: der}


class _QuietServer(uvicorn.Server):
    """uvicorn inside the control plane's loop: the control plane owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def ssl_context(tls: ServerTLS) -> ssl.SSLContext:
    """A TLS 1.2+ server context that requires a client certificate of the trust domain.

    The key is loaded through an anonymous in-memory file (memfd), so it is
    never written anywhere new.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=tls.client_ca_pem.decode())
    fd = os.memfd_create("tether-console-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, tls.cert_chain_pem + b"\n" + tls.key_pem)
        path = f"/proc/self/fd/{fd}"
        ctx.load_cert_chain(path, path)
    finally:
        os.close(fd)
    return ctx


def _listen_socket(address: str) -> socket.socket:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--console-listen {address!r} is not host:port (e.g. 127.0.0.1:7480)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--console-listen: cannot listen on {address}: {err.strerror}") from err
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ConsoleServer:
    """Serves the console's ASGI app on one TLS listener in the running loop."""

    def __init__(self, app: Any, listen: str, tls: ServerTLS) -> None:
        self._app = app
        self._listen = listen
        self._tls = tls
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""
        self.on_stop: Callable[[], None] | None = None
        """Called first by `stop` (ends the live event streams)."""

    async def start(self) -> None:
        """Binds and serves; `url` is then https://host:port/.

        Raises:
            ConfigError: the address cannot be bound.
        """
        sock = _listen_socket(self._listen)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"https://{shown}:{port}/"
        config = uvicorn.Config(
            self._app,
            http=_PeerCertProtocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=1,
        )
        config.load()
        config.ssl = ssl_context(self._tls)
        server = self._server = _QuietServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="tether-console")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise ConfigError("the console stopped while starting")
            await asyncio.sleep(0.01)
        log.info("console serving", extra={"console_url": self.url})

    async def stop(self) -> None:
        """Stops serving; live event streams are ended."""
        if self.on_stop is not None:
            self.on_stop()
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 3)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception:
            log.exception("console stopped with an error")

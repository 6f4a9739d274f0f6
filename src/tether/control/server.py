"""The control-plane gRPC server: ControlService, health and reflection."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.control.authz import AuthzInterceptor, CallerNames
from tether.control.grpc_api import ControlServicer
from tether.control.leader import CHECKPOINTER, SWEEPER, Leadership, default_replica_id
from tether.control.service import Auth, ControlConfig, ControlService
from tether.control.sweeper import DEFAULT_SWEEP_INTERVAL_MS, Sweeper
from tether.control.vault import Vault
from tether.core.clock import Clock
from tether.core.errors import ConfigError
from tether.crypto.signing import SigningKey
from tether.grpcutil.guard import DecodeGuard
from tether.grpcutil.limits import CONTROL_LIMITS, MAX_MESSAGE_BYTES, LoadShedder, ServerLimits
from tether.grpcutil.tls import ServerTLS
from tether.metrics import MetricsServer, TasksCollector
from tether.metrics import serve as serve_metrics
from tether.store import store_from_url
from tether.store.base import Store
from tether.store.postgres_settings import PostgresSettings
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc

DEFAULT_CHECKPOINT_INTERVAL_MS = 10_000
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ControlService"].full_name

log = logging.getLogger("tether.control.server")


def grpc_target(listen: str, what: str = "listen address") -> str:
    """The grpc bind/dial target of "host:port" or "unix:/path".

    Raises:
        ConfigError: not such an address, or a port outside 0..65535.
    """
    if "://" in listen:
        raise ConfigError(
            f"{what} {listen!r}: give host:port (e.g. 127.0.0.1:7400) or unix:/path, "
            "without a scheme such as http://"
        )
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if not path:
            raise ConfigError(f"unix {what} needs a path: unix:/path/to.sock")
        return f"unix:{path}"
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{what} {listen!r} is not host:port or unix:/path")
    if int(port) > 65535:
        raise ConfigError(f"{what} {listen!r}: port must be 0..65535")
    return listen


def bind_problem(target: str) -> str:
    """Why gRPC could not bind `target`, in the operating system's words.

    gRPC says only "Failed to bind"; binding a plain socket the same way names
    the cause (address in use, permission denied, not a local address).
    """
    import socket

    hint = "; stop what holds it or choose another address"
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        if Path(path).exists():
            return f"{path} exists{hint}"
        return f"cannot create a socket at {path} (does its directory exist and allow it?)"
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as err:
        return f"cannot resolve {host!r}: {getattr(err, 'strerror', None) or err}"
    for family, kind, proto, _, sockaddr in infos:
        probe = socket.socket(family, kind, proto)
        try:
            probe.bind(sockaddr)
        except OSError as err:
            return f"{err.strerror}{hint if err.errno == errno.EADDRINUSE else ''}"
        finally:
            probe.close()
    return "gRPC could not bind it (run with --debug for gRPC's own log)"


def is_local(target: str) -> bool:
    """True for a Unix socket or a loopback host (127.0.0.0/8, ::1, localhost)."""
    if target.startswith("unix:"):
        return True
    host = target.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningControl:
    """A started control plane; `address` is what clients dial."""

    address: str
    server: grpc.aio.Server
    service: ControlService
    store: Store
    sweeper: Sweeper | None
    health: health.aio.HealthServicer
    checkpointer: asyncio.Task[None] | None = None
    checkpointer_stop: asyncio.Event | None = None
    metrics: MetricsServer | None = None
    """The /metrics endpoint, when started with `metrics_listen`."""
    servicer: ControlServicer | None = None
    """The gRPC servicer; owns the ledger and its worker processes."""
    enroll_address: str = ""
    """Where nodes without a certificate yet enrol (TLS, no client certificate)."""
    leaders: tuple[Leadership, ...] = ()
    """This replica's campaigns for the singleton jobs (sweeper, checkpointer)."""
    shedder: LoadShedder | None = None
    """Admission of calls (load shedding)."""
    console: Any = None
    """The operator console (`tether.control.console`), when started with `console_listen`."""
    console_url: str = ""
    """Where the console serves (https://host:port/), or ""."""

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stops serving (letting calls finish for `grace_s`), then closes the store."""
        await self.health.enter_graceful_shutdown()
        if self.console is not None:
            await self.console.stop()
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self.checkpointer is not None and self.checkpointer_stop is not None:
            self.checkpointer_stop.set()
            await self.checkpointer
        for leader in self.leaders:  # resigned: another replica takes over at once
            await leader.stop()
        await self.service.close()
        await self.server.stop(grace_s)
        if self.servicer is not None:
            self.servicer.close_ledger()
        if self.metrics is not None:
            self.metrics.close()
        await self.store.close()


async def start_server(
    *,
    db: Path | str,
    listen: str,
    key: SigningKey,
    clock: Clock | None = None,
    auth: Auth | None = None,
    config: ControlConfig | None = None,
    sweep_interval_ms: int | None = DEFAULT_SWEEP_INTERVAL_MS,
    store: Store | None = None,
    kek_file: Path | str | None = None,
    checkpoint_interval_ms: int | None = DEFAULT_CHECKPOINT_INTERVAL_MS,
    metrics_listen: str | None = None,
    tls: ServerTLS | None = None,
    enroll_listen: str | None = None,
    sqlite_synchronous: str = "FULL",
    postgres: PostgresSettings | None = None,
    limits: ServerLimits = CONTROL_LIMITS,
    console_listen: str | None = None,
) -> RunningControl:
    """Opens the store and starts serving on `listen` ("host:port", port 0 ok, or "unix:/path").

    `sweep_interval_ms=None` disables the background sweeper (tests call
    `service.sweep()` themselves). Without `kek_file` the credential vault is
    off: PutSecret and IssueCredential fail with VAULT_NOT_CONFIGURED. The
    ledger signs a checkpoint every `checkpoint_interval_ms` while it grew
    (None: only on demand). With `metrics_listen` ("host:port") Prometheus
    metrics are served on http://host:port/metrics.

    With `tls`, `listen` requires a client certificate (nodes and operators)
    and `enroll_listen` (default: the same host, an ephemeral port) serves TLS
    without one, where only enrolment is allowed. Without `tls`, `auth.insecure`
    must be set: plaintext, no identities (development only). `limits` bound
    calls, streams and connections (both listeners share them; the caller of
    per-caller limits is the node or operator named by the client certificate).

    The sweeper and the scheduled checkpoint signer run only on the replica
    that leads each job (elected through the store; see `tether.control.leader`).
    `postgres`: pool size and timeouts when `db` is a PostgreSQL URL.
    `console_listen` ("host:port") serves the operator console there, over TLS
    with operators' client certificates (`tether.control.console`); off by default.

    Raises:
        ConfigError: bad listen address, the port cannot be bound, or no TLS
            without the explicit insecure opt-out.
    """
    target = grpc_target(listen, what="--listen")
    auth = auth or Auth()
    if tls is None and not auth.insecure:
        raise ConfigError(
            "the control plane serves TLS only: give --tls-cert/--tls-key/--client-ca "
            "(or run `tether keys init`), or --insecure-plaintext for local development"
        )
    if tls is None and not is_local(target):
        raise ConfigError(
            f"refusing to serve plaintext on {listen}: --insecure-plaintext is for loopback "
            "or a Unix socket only (it makes every caller admin and any node); serve TLS "
            "(`tether keys init`) on a network address"
        )
    if console_listen and tls is None:
        raise ConfigError(
            "--console-listen needs TLS: the console authenticates operators by their "
            "client certificates (run `tether keys init`; not with --insecure-plaintext)"
        )
    if tls is not None and auth.ca is None:
        raise ConfigError("TLS needs the CA (--ca-cert/--ca-key) to issue node certificates")
    enroll_target = ""
    if tls is not None:
        if enroll_listen:
            enroll_target = grpc_target(enroll_listen, what="--enroll-listen")
        elif target.startswith("unix:"):
            enroll_target = target + ".enroll"
        else:
            enroll_target = f"{target.rpartition(':')[0]}:0"
    vault = Vault(kek_file) if kek_file is not None else None  # ConfigError before any I/O
    # The replica's name is known before the store opens: its sessions carry it.
    config = config or ControlConfig()
    if not config.replica_id:
        config = dataclasses.replace(config, replica_id=default_replica_id())
    if postgres is not None and not postgres.replica_id:
        postgres = dataclasses.replace(postgres, replica_id=config.replica_id)
    store = store or store_from_url(db, sqlite_synchronous=sqlite_synchronous, postgres=postgres)
    await store.open()
    service = ControlService(store, key, clock, config=config, auth=auth, vault=vault)
    if vault is None:
        log.warning("no --kek-file: the credential vault is off")
    try:
        await service.start()
    except BaseException:
        await store.close()  # a process that cannot serve must be able to exit
        raise
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        *limits.grpc_options(),
    ]
    shedder = LoadShedder(limits, "control")
    server = grpc.aio.server(
        options=options,
        interceptors=[
            # First: a flood is shed before authorization or decoding costs anything.
            shedder.interceptor(CallerNames(auth.trust_domain, insecure=auth.insecure)),
            AuthzInterceptor(f"/{SERVICE_NAME}/", auth.trust_domain, insecure=auth.insecure),
            DecodeGuard(),  # health and reflection too: garbage is INVALID_ARGUMENT everywhere
        ],
    )
    servicer = ControlServicer(service)
    pb_grpc.add_ControlServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    def bind(where: str, creds: grpc.ServerCredentials | None, flag: str) -> str:
        try:
            if creds is None:
                port = server.add_insecure_port(where)
            else:
                port = server.add_secure_port(where, creds)
        except RuntimeError as err:
            raise ConfigError(f"{flag}: cannot listen on {where}: {bind_problem(where)}") from err
        return where if where.startswith("unix:") else f"{where.rpartition(':')[0]}:{port}"

    try:
        if tls is None:
            log.warning(
                "--insecure-plaintext: serving WITHOUT TLS or authentication on %s; "
                "anyone who reaches the port is admin and any node",
                listen,
            )
            address = bind(target, None, "--listen")
            enroll_address = ""
        else:
            address = bind(target, tls.credentials(require_client_cert=True), "--listen")
            enroll_address = bind(
                enroll_target, tls.credentials(require_client_cert=False), "--enroll-listen"
            )
    except ConfigError:
        await store.close()
        raise
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    cfg = service.config
    leaders: list[Leadership] = []
    sweeper = None
    if sweep_interval_ms is not None:
        sweep_leader = Leadership(store, SWEEPER, service.replica_id, cfg.leader_ttl_ms)
        leaders.append(sweep_leader)
        sweeper = Sweeper(service, sweep_interval_ms, leader=sweep_leader)
    running = RunningControl(
        address,
        server,
        service,
        store,
        sweeper,
        health_servicer,
        servicer=servicer,
        enroll_address=enroll_address,
        shedder=shedder,
    )
    if checkpoint_interval_ms is not None:
        ledger = await servicer.get_ledger()
        cp_leader = Leadership(store, CHECKPOINTER, service.replica_id, cfg.leader_ttl_ms)
        leaders.append(cp_leader)
        running.checkpointer_stop = stop = asyncio.Event()
        running.checkpointer = asyncio.create_task(
            ledger.run_checkpointer(stop, checkpoint_interval_ms / 1000, leader=cp_leader),
            name="tether-checkpointer",
        )
    running.leaders = tuple(leaders)
    for leader in leaders:
        await leader.campaign_once()  # a lone replica leads from its first tick
        leader.start()
    if sweeper is not None:
        sweeper.start()
    if metrics_listen:
        try:
            running.metrics = serve_metrics(
                metrics_listen,
                [TasksCollector(service, asyncio.get_running_loop())],
                server="control",
            )
        except ConfigError:
            await running.stop(grace_s=0)
            raise
    if console_listen:
        assert tls is not None
        from tether.control.console import start_console

        try:
            running.console = await start_console(running, console_listen, tls)
        except ConfigError:
            await running.stop(grace_s=0)
            raise
        running.console_url = running.console.url
    log.info("control plane serving on %s (enrolment on %s)", address, enroll_address or "-")
    return running


async def serve_forever(running: RunningControl, ready_file: Path | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        # Line 1: the mTLS address; line 2: the enrolment address ("" in plaintext);
        # line 3: the console's URL ("" when off).
        tmp.write_text(f"{running.address}\n{running.enroll_address}\n{running.console_url}\n")
        tmp.replace(ready_file)  # atomic: readers never see a partial address
    try:
        await stop.wait()
        log.info("control plane stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.stop()

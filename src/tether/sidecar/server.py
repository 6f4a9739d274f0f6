"""The sidecar runtime: registration, sockets, and graceful shutdown.

Start: load the node key, read agent tokens, register with the control plane
(keeping the node token and certificate), then serve BrokerService (plus
health and reflection) on the shared Unix socket, each agent's own socket and
an optional TCP address. A stale socket file is removed; a live one (something
answers a connect) makes start fail.

Stop (SIGTERM): refuse new claims, let running calls finish within the grace
period, hand every held lease back (TransitionTask RELEASE), flush receipts.

Receipts: every receipt is signed into the durable spool (state_dir/spool.db)
before the call that caused it returns; a background task streams unacked
envelopes to the control plane (StreamReceipts), reconnecting with backoff and
jitter and replaying after any reconnect or restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.core import errors as E
from tether.core.clock import Clock, SystemClock
from tether.core.leases import Lease
from tether.core.receipts import ReceiptKind
from tether.core.states import Event
from tether.crypto.leases import verify_lease
from tether.crypto.pki import TrustBundle
from tether.crypto.signing import Envelope, SigningKey
from tether.grpcutil.guard import DecodeGuard
from tether.grpcutil.limits import LoadShedder
from tether.metrics import MetricsServer, SpoolCollector
from tether.metrics import serve as serve_metrics
from tether.sidecar.config import SidecarConfig, split_addresses
from tether.sidecar.finishing import Finisher, FinishJournal
from tether.sidecar.grpc_api import BrokerDeps, BrokerServicer, final_transition
from tether.sidecar.identity import AgentRegistry, read_token_file
from tether.sidecar.leases import LeaseTable
from tether.sidecar.mediation import Mediator, PolicySource, PolicyToolRunner, ToolRunner
from tether.sidecar.memory import MemoryStore
from tether.sidecar.receipts import ReceiptSink
from tether.sidecar.spool import GrpcReceiptStream, ReceiptSpool, stream_receipts
from tether.sidecar.uplink import Registration, Uplink
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc
from tether.v1 import control_pb2 as pb

log = logging.getLogger("tether.sidecar")
SOCKET_MODE = 0o660


def prepare_socket(path: Path) -> None:
    """Removes a stale socket file; refuses a live socket or a non-socket file.

    Raises:
        ConfigError: something is listening on `path`, or it is not a socket.
    """
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not path.is_socket():
        raise E.ConfigError(f"socket: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        log.info("removing stale socket %s", path)
        path.unlink()
        return
    finally:
        probe.close()
    raise E.ConfigError(f"socket: {path} is live (another sidecar serves it); refusing to start")


class Sidecar:
    """One node's sidecar: call `start()`, then `stop()`."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        clock: Clock | None = None,
        runner: ToolRunner | None = None,
        sink: ReceiptSink | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._runner = runner
        self._sink = sink
        self._servers: list[tuple[grpc.aio.Server, Path | None]] = []
        self.tcp_port: int | None = None
        self.deps: BrokerDeps | None = None
        self.uplink: Uplink | None = None
        self.certificate: Envelope | None = None
        self._stopped = asyncio.Event()
        self._receipts_stop = asyncio.Event()
        self._receipts_task: asyncio.Task[None] | None = None
        self.metrics: MetricsServer | None = None
        self._healths: list[health.aio.HealthServicer] = []
        self._health_task: asyncio.Task[None] | None = None
        self.shedder = LoadShedder(config.limits, "sidecar")
        """Admission of Broker calls, shared by every socket (limits are per node)."""

    async def start(self) -> None:
        """Registers the node and starts serving.

        Raises:
            ConfigError: bad key, token file or socket.
            Unauthenticated: the control plane refused the node.
            Unavailable: the control plane was unreachable.
        """
        cfg = self.config
        node_key = SigningKey.load(cfg.node_key_path)
        registry = AgentRegistry(cfg.agents)
        enrollment = ""
        if cfg.enrollment_token_file is not None:
            enrollment = read_token_file(
                cfg.enrollment_token_file, "enrollment_token_file", private=True
            ).decode()
        bundle_path = cfg.trust_bundle_path
        if bundle_path is None:
            raise E.ConfigError(
                "the sidecar needs --trust-bundle (the trust.pem from `tether keys init`): "
                "it trusts no control plane on first use"
            )
        bundle = TrustBundle.load(bundle_path)
        controls = cfg.control_addresses
        enrolls = (
            split_addresses(cfg.enroll_address)
            if cfg.enroll_address
            else tuple(default_enroll_address(c) for c in controls)
        )
        self.uplink = uplink = Uplink(
            controls,
            cfg.node_id,
            node_key,
            enroll_address=enrolls,
            ca_pem=bundle.ca_pem,
            enrollment_token=enrollment,
            retry_budget_ms=cfg.uplink_retry_budget_ms,
            timeout_ms=cfg.uplink_timeout_ms,
        )
        self._preflight()  # refuse what cannot work before waiting on the control plane
        registration = await self._register_until_reachable(uplink)
        self.certificate = registration.certificate
        trust = _TrustedKeys(bundle_path, bundle)

        def verify(envelope: Envelope) -> Lease:
            return trust.verify_lease(envelope)

        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        sink = self._sink or ReceiptSpool(
            state / "spool.db", cfg.node_id, node_key, max_unacked=cfg.spool_max_unacked
        )
        self._sink = sink
        if isinstance(sink, ReceiptSpool):
            self._receipts_task = asyncio.create_task(
                self._stream_receipts(sink, uplink), name="tether-receipt-uplink"
            )
        leases = LeaseTable(
            uplink=uplink,
            verify=verify,
            sink=sink,
            clock=self.clock,
            node_id=cfg.node_id,
            agent_liveness_ms=cfg.agent_liveness_ms,
            renew_divisor=cfg.renew_divisor,
        )
        policies = PolicySource(uplink, cfg.policy_file)
        runner = self._runner or PolicyToolRunner(
            policies, state / "workspaces", self.clock, workspace_max_bytes=cfg.workspace_max_bytes
        )
        self.deps = deps = BrokerDeps(
            node_id=cfg.node_id,
            uplink=uplink,
            leases=leases,
            registry=registry,
            memory=MemoryStore(
                state / "memory.db",
                max_keys=cfg.memory_max_keys,
                max_bytes=cfg.memory_max_bytes,
            ),
            sink=sink,
            mediator=Mediator(
                sink=sink,
                clock=self.clock,
                runner=runner,
                control=uplink,
                leases=leases,
                denied_receipts_per_minute=cfg.denied_receipts_per_minute,
            ),
            clock=self.clock,
            artifacts_dir=state / "artifacts",
            max_artifact_bytes=cfg.max_artifact_bytes,
            artifact_max_task_bytes=cfg.artifact_max_task_bytes,
            default_queue=cfg.default_queue,
            receipt_ack_timeout_ms=cfg.receipt_ack_timeout_ms,
            policies=policies,
        )

        deps.finisher = Finisher(
            FinishJournal(state / "finishing.db"), final_transition(deps), sink.emit, sink.envelopes
        )
        resumed = deps.finisher.resume()  # ends a crash left unconfirmed, before serving
        if resumed:
            log.warning("resuming %d final transition(s) from before a restart", resumed)

        if cfg.mcp:
            from tether.sidecar.mcp_front import McpFront  # the MCP SDK loads only when used

            mcp_socket = cfg.mcp_socket or cfg.socket_path.with_name(
                f"{cfg.socket_path.stem}-mcp.sock"
            )
            deps.mcp = McpFront(
                deps, socket_path=mcp_socket, listen=cfg.mcp_listen, shedder=self.shedder
            )
            await deps.mcp.start()
        await self._serve(BrokerServicer(deps), cfg.socket_path, cfg.listen_tcp)
        for agent in cfg.agents:
            if agent.socket_path is not None:
                await self._serve(
                    BrokerServicer(deps, bound_agent=agent.name), agent.socket_path, None
                )
        if cfg.metrics_listen:
            collectors = []
            if isinstance(sink, ReceiptSpool):
                collectors.append(SpoolCollector(sink, self.clock, asyncio.get_running_loop()))
            self.metrics = serve_metrics(cfg.metrics_listen, collectors, server="sidecar")
        log.info("sidecar serving", extra={"node_id": cfg.node_id})
        if cfg.ready_file is not None:
            cfg.ready_file.write_text(f"{os.getpid()}\n")

    def _preflight(self) -> None:
        """Checks the state directory, sockets and TCP ports this sidecar will use.

        A sidecar may wait a long time for the control plane at start-up; a
        mistake it can find alone must end it at once, with the key to fix.

        Raises:
            ConfigError: names the key and the problem.
        """
        cfg = self.config
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise E.ConfigError(
                f"state_dir: {cfg.state_dir} exists and is not a directory"
            ) from err
        except OSError as err:
            raise E.ConfigError(
                f"state_dir: cannot create {cfg.state_dir}: {err.strerror}"
            ) from err
        if not os.access(cfg.state_dir, os.W_OK | os.X_OK):
            raise E.ConfigError(f"state_dir: {cfg.state_dir} is not writable by this user")
        prepare_socket(cfg.socket_path)
        for agent in cfg.agents:
            if agent.socket_path is not None:
                prepare_socket(agent.socket_path)
        for key, address in (
            ("listen_tcp", cfg.listen_tcp),
            ("metrics_listen", cfg.metrics_listen),
        ):
            if address:
                check_tcp_free(key, address)

    async def _stream_receipts(self, spool: ReceiptSpool, uplink: Uplink) -> None:
        """Streams the spool to the ledger until stop; re-registers if the token is refused."""

        async def open_stream() -> GrpcReceiptStream:
            return await GrpcReceiptStream.open(uplink.stub, self.config.node_id, ())

        async def on_error(err: BaseException) -> None:
            code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                await uplink._reregister()
            elif code in _UNREACHABLE or isinstance(err, TimeoutError):
                await uplink.failover()  # a replica gone or paused: stream to another

        # With replicas, an ack that does not come means a paused replica: give up on it
        # sooner than a lone control plane, which has nowhere else to go.
        ack_timeout_s = 10.0 if len(uplink.addresses) > 1 else 30.0
        await stream_receipts(
            spool, open_stream, self._receipts_stop, on_error=on_error, ack_timeout_s=ack_timeout_s
        )

    async def _flush_receipts(self, timeout_s: float) -> None:
        """Lets the uplink deliver what is spooled (bounded); the rest replays on restart."""
        sink = self._sink
        if self._receipts_task is None or not isinstance(sink, ReceiptSpool):
            return
        if not await sink.wait_acked(sink.last_seq, timeout_s):
            log.warning(
                "stopping with %d receipts not yet acknowledged; they replay on restart",
                await sink.pending(),
            )
        self._receipts_stop.set()
        task, self._receipts_task = self._receipts_task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), 2.0)
        except TimeoutError:  # a hung stream: cancel it; the spool keeps everything
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, servicer: BrokerServicer, path: Path, tcp: str | None) -> None:
        prepare_socket(path)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 2 * 1024 * 1024),
                *self.config.limits.grpc_options(),
            ],
            interceptors=[
                self.shedder.interceptor(servicer.agent_of),  # floods: shed, health exempt
                DecodeGuard(),  # undecodable requests: INVALID_ARGUMENT
            ],
        )
        bpb_grpc.add_BrokerServiceServicer_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                bpb.DESCRIPTOR.services_by_name["BrokerService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as err:
            raise E.ConfigError(f"socket: cannot listen on {path}") from err
        if tcp:
            try:
                self.tcp_port = server.add_insecure_port(tcp)
            except RuntimeError as err:
                check_tcp_free("listen_tcp", tcp)  # names the cause when it can
                raise E.ConfigError(f"listen_tcp: cannot listen on {tcp}") from err
        old_umask = os.umask(0o117)  # the socket is born 0660, never briefly wider
        try:
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("tether.v1.BrokerService", health_pb2.HealthCheckResponse.SERVING)
        self._healths.append(health_servicer)
        self._servers.append((server, path))
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._watch_health(), name="tether-health")

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for servicer in self._healths:
            await servicer.set("", status)
            await servicer.set("tether.v1.BrokerService", status)

    async def _watch_health(self) -> None:
        """NOT_SERVING while the control plane is unreachable or the sidecar drains.

        Calls under leases already held keep working meanwhile (until each lease's
        validity ends); health tells orchestrators not to send new work here.
        """
        serving = True
        while not self._stopped.is_set():
            uplink, deps = self.uplink, self.deps
            now = bool(
                uplink is not None
                and uplink.reachable
                and deps is not None
                and deps.accepting_claims
            )
            if now != serving:
                serving = now
                await self._set_health(serving)
                log.warning("health: %s", "SERVING" if serving else "NOT_SERVING")
            await asyncio.sleep(0.5)

    async def _register_until_reachable(self, uplink: Uplink) -> Registration:
        """Enrols, retrying with backoff (capped at 30 s) while the control plane is down.

        A sidecar restarted during an outage keeps its spool and waits, instead of
        exiting; a refusal (bad token, revoked node) is fatal and says why.
        """
        delay = 0.5
        while True:
            try:
                return await uplink.register()
            except E.Unavailable as err:
                cause = err.__cause__
                detail = getattr(cause, "details", lambda: "")() if cause is not None else ""
                log.warning(
                    "control plane %s unreachable at start-up (%s); retrying in %.1f s",
                    uplink.enroll_address,
                    detail or err.message,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def stop(self, grace_ms: int | None = None) -> None:
        """Graceful stop: no new claims, calls finish, leases go back, receipts flush."""
        if self._stopped.is_set():
            return
        grace = (self.config.grace_period_ms if grace_ms is None else grace_ms) / 1000
        deps = self.deps
        if deps is not None:
            deps.accepting_claims = False
        await self._set_health(False)  # draining: tell probes first
        if self._health_task is not None:
            self._health_task.cancel()
        stops = [server.stop(grace) for server, _ in self._servers]
        if deps is not None and deps.mcp is not None:
            stops.append(deps.mcp.stop())
        await asyncio.gather(*stops)
        if self.metrics is not None:
            self.metrics.close()
        if deps is not None:
            await self._release_all(deps)
            if deps.finisher is not None:
                await deps.finisher.close()  # unanswered ends stay journaled for next start
            await deps.leases.close()
            deps.memory.close()
        await self._flush_receipts(min(grace, 2.0))
        if self._sink is not None:
            await self._sink.close()
        if self.uplink is not None:
            await self.uplink.close()
        for _, path in self._servers:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        if self.config.ready_file is not None:
            with contextlib.suppress(OSError):
                self.config.ready_file.unlink()
        self._stopped.set()
        log.info("sidecar stopped", extra={"node_id": self.config.node_id})

    async def _release_all(self, deps: BrokerDeps) -> None:
        """Hands every held lease back so another node can take the task at once."""
        for held in deps.leases.active():
            await deps.mediator.end_lease(held)  # unspent budget back before the release
            request = pb.TransitionTaskRequest(
                task_id=held.task_id,
                fencing_token=held.lease.fencing_token,
                event=int(Event.RELEASE),  # type: ignore[arg-type]
                error="sidecar shutting down",
                node_id=deps.node_id,
            )
            try:
                await deps.uplink.call("TransitionTask", request, retry_budget_ms=1000)
                reason = "released: sidecar shutting down"
            except E.TetherError as err:
                reason = f"release failed ({err.message}); the lease will lapse"
            held.lost_reason = reason
            held.drop_credentials()
            await deps.sink.emit(
                held.receipt(ReceiptKind.LEASE_LOST, self.clock.now_ms(), reason=reason),
                held.end_slot,
            )
            log.info(reason, extra={"task_id": held.task_id})

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def check_tcp_free(key: str, address: str) -> None:
    """Binds `address` ("host:port") once and lets go, to name a busy or bad port early.

    Raises:
        ConfigError: the address cannot be bound (in the operating system's words).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as err:
        raise E.ConfigError(f"{key}: cannot resolve {address!r}") from err
    for family, kind, proto, _, sockaddr in infos[:1]:
        probe = socket.socket(family, kind, proto)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as err:
            raise E.ConfigError(
                f"{key}: cannot listen on {address}: {err.strerror}; stop what holds it or "
                "choose another port"
            ) from err
        finally:
            probe.close()


def default_enroll_address(control: str) -> str:
    """The enrolment address beside `control`: the next port, or "<socket>.enroll"."""
    if control.startswith("unix:"):
        return control + ".enroll"
    host, _, port = control.rpartition(":")
    if not port.isdigit():
        raise E.ConfigError(f"control address {control!r} is not host:port; give --enroll")
    return f"{host}:{int(port) + 1}"


class _TrustedKeys:
    """The control keys leases may be signed by: the trust bundle, re-read on an unknown key.

    An operator rotating the control key adds the new key to the bundle file
    first; a lease under it then verifies without restarting the sidecar.
    """

    def __init__(self, path: Path, bundle: TrustBundle) -> None:
        self._path = path
        self._keys = bundle.control_keys_by_id()
        self._mtime = self._stat()

    def _stat(self) -> float:
        try:
            return self._path.stat().st_mtime
        except OSError:
            return 0.0

    def verify_lease(self, envelope: Envelope) -> Lease:
        try:
            return verify_lease(envelope, self._keys)
        except E.VerificationError:
            mtime = self._stat()
            if mtime == self._mtime:
                raise
            try:
                self._keys = TrustBundle.load(self._path).control_keys_by_id()
            except E.ConfigError as err:
                log.warning("cannot re-read the trust bundle: %s", err.message)
                raise
            self._mtime = mtime
            log.info("trust bundle re-read: %d control keys", len(self._keys))
            return verify_lease(envelope, self._keys)

"""Helpers that start real Tether servers for tests and demos.

`start_control` runs the real gRPC control plane in-process on 127.0.0.1:0 (or
a Unix socket) over a fresh SQLite file; `spawn_control_cli` runs
`python -m tether.cli control` as a subprocess, for crash tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.control.client import ControlClient, node_client_tls
from tether.control.server import DEFAULT_CHECKPOINT_INTERVAL_MS, RunningControl, start_server
from tether.control.service import Auth, ControlConfig, ControlService
from tether.core.clock import Clock
from tether.core.errors import AlreadyExists
from tether.crypto.pki import (
    DEFAULT_NODE_CERT_TTL_MS,
    CertificateAuthority,
    Role,
    TrustBundle,
    cert_pem,
    generate_tls_key,
    key_pem,
    write_private,
    write_public,
)
from tether.crypto.signing import SigningKey
from tether.grpcutil.limits import CONTROL_LIMITS, ServerLimits
from tether.grpcutil.tls import ClientTLS, ServerTLS
from tether.store.base import Store

TEST_TRUST_DOMAIN = "test.tether.local"

TEST_QUEUES = ("work", "q", "q2", "pq", "other", "crash", "still-ok", "lp", "default", "bench")
TEST_AGENTS = (
    "alice", "bob", "carol", "a", "a1", "a2", "agent", "agent-1", "agent-2", "agent-3",
    "agent-a", "agent-b", "x",
)  # fmt: skip


def default_test_policy(
    queues: Sequence[str] = TEST_QUEUES, agents: Sequence[str] = TEST_AGENTS
) -> str:
    """A policy declaring the queues and agents the tests use (no tools).

    The control plane refuses submissions to and claims from undeclared queues
    and claims by agents the policy does not name, so test control planes start
    with this policy in force; tests about tools apply their own.
    """
    lines = ["version = 1", ""]
    for agent in agents:
        lines += [f"[agents.{agent}]", f"queues = {list(queues)!r}".replace("'", '"'), ""]
    for queue in queues:
        lines += [f"[queues.{queue}]", 'memory_scope = "agent"', ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class TestPKI:
    """A trust domain for tests: CA, server certificate, admin credential, trust bundle."""

    dir: Path
    ca: CertificateAuthority
    server_tls: ServerTLS
    trust_bundle: Path

    def operator_tls(self, role: Role = Role.ADMIN, name: str = "") -> ClientTLS:
        """A fresh operator credential with `role`, in memory."""
        key = generate_tls_key()
        cert = self.ca.issue_operator(name or f"test-{role.value}", role, key.public_key())
        return ClientTLS(cert_pem(self.ca.cert), cert_pem(cert), key_pem(key))

    @property
    def anonymous_tls(self) -> ClientTLS:
        """Trusts the CA, presents no certificate (what a node has before enrolment)."""
        return ClientTLS(cert_pem(self.ca.cert))

    def write_operator(self, role: Role = Role.ADMIN, name: str = "") -> tuple[Path, Path]:
        """Writes an operator credential under dir; returns (cert, key) paths."""
        name = name or f"test-{role.value}"
        tls = self.operator_tls(role, name)
        assert tls.cert_pem is not None
        assert tls.key_pem is not None
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        write_public(cert, tls.cert_pem)
        write_private(key, tls.key_pem)
        return cert, key


def make_pki(directory: Path, control_keys: Sequence[SigningKey]) -> TestPKI:
    """The trust domain under `directory`, created once and reused (restarts keep it)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    if ca_crt.exists():
        ca = CertificateAuthority.load(ca_crt, ca_key, TEST_TRUST_DOMAIN)
    else:
        ca = CertificateAuthority.create(TEST_TRUST_DOMAIN)
        write_private(ca_key, key_pem(ca.key))
        write_public(ca_crt, cert_pem(ca.cert))
    srv_crt, srv_key = directory / "server.crt", directory / "server.key"
    if not srv_crt.exists():
        k = generate_tls_key()
        write_private(srv_key, key_pem(k))
        write_public(srv_crt, cert_pem(ca.issue_server(k.public_key(), ["localhost", "127.0.0.1"])))
    trust = directory / "trust.pem"
    old = TrustBundle.parse(trust.read_bytes()) if trust.exists() else TrustBundle((), ())
    bundle = old.merge(TrustBundle((ca.cert,), tuple(k.public for k in control_keys)))
    write_public(trust, bundle.to_pem())
    return TestPKI(directory, ca, ServerTLS.load(srv_crt, srv_key, ca_crt), trust)


@dataclass(frozen=True)
class ControlEndpoint:
    """How to reach a running test control plane (in-process or a subprocess)."""

    address: str
    enroll_address: str
    pki: TestPKI
    console_url: str = ""
    """The operator console's URL, when the control plane serves one."""

    def admin(self) -> ControlClient:
        """A new admin ControlClient; caller closes it."""
        return ControlClient(self.address, tls=self.pki.operator_tls(Role.ADMIN))

    async def join_token(self, node_id: str) -> str:
        """A fresh join token for `node_id` (a re-key token if it is enrolled already)."""
        async with self.admin() as admin:
            try:
                return (await admin.create_join_token(node_id)).token
            except AlreadyExists:
                return (await admin.rekey_node(node_id)).token

    async def node_client(
        self, node_id: str = "node-1", key: SigningKey | None = None, join_token: str | None = None
    ) -> ControlClient:
        """A new mTLS client enrolled as `node_id` (fresh key by default); caller closes it."""
        key = key or SigningKey.generate()
        token = await self.join_token(node_id) if join_token is None else join_token
        tls_key = generate_tls_key()
        async with ControlClient(self.enroll_address, tls=self.pki.anonymous_tls) as anon:
            resp = await anon.register_node(node_id, key, token, tls_key)
        client = ControlClient(
            self.address, tls=node_client_tls(cert_pem(self.pki.ca.cert), resp, tls_key)
        )
        client.registration = resp  # type: ignore[attr-defined]
        return client


_ENDPOINTS: dict[str, ControlEndpoint] = {}
"""Running test control planes by address, so sidecar helpers find how to enrol."""


def register_endpoint(ep: ControlEndpoint) -> None:
    """Makes `ep` known to the sidecar helpers (e.g. a proxy in front of a control plane)."""
    _ENDPOINTS[ep.address] = ep


def endpoint(address: str) -> ControlEndpoint:
    """The test control plane serving `address`.

    Raises:
        KeyError: no control plane started by this module serves it.
    """
    return _ENDPOINTS[address]


@dataclass
class ControlHandle:
    """A running in-process control plane."""

    address: str
    client: ControlClient
    key: SigningKey
    service: ControlService
    running: RunningControl
    db_path: Path
    endpoint: ControlEndpoint
    kek_file: Path | None = None

    @property
    def enroll_address(self) -> str:
        return self.endpoint.enroll_address

    @property
    def pki(self) -> TestPKI:
        return self.endpoint.pki

    @property
    def trust_bundle(self) -> Path:
        return self.endpoint.pki.trust_bundle

    async def join_token(self, node_id: str) -> str:
        """A fresh join token for `node_id`."""
        return await self.endpoint.join_token(node_id)

    async def node_client(
        self, node_id: str = "node-1", key: SigningKey | None = None
    ) -> ControlClient:
        """A new client enrolled as `node_id` (with a fresh node key); caller closes it."""
        return await self.endpoint.node_client(node_id, key)

    def operator(self, role: Role = Role.ADMIN, name: str = "") -> ControlClient:
        """A new operator client with `role`, named `name` ("test-ROLE"); caller closes it."""
        return ControlClient(self.address, tls=self.pki.operator_tls(role, name))


@asynccontextmanager
async def start_control(
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    unix_socket: bool = False,
    config: ControlConfig | None = None,
    auth: Auth | None = None,
    sweep_interval_ms: int | None = None,
    db_name: str = "control.db",
    key: SigningKey | None = None,
    vault: bool = True,
    db: str | None = None,
    pki_dir: Path | None = None,
    allowed_node_keys: Sequence[tuple[str, bytes]] = (),
    node_cert_ttl_ms: int | None = None,
    metrics_listen: str | None = None,
    checkpoint_interval_ms: int | None = DEFAULT_CHECKPOINT_INTERVAL_MS,
    policy: str | None = None,
    store: Store | None = None,
    limits: ServerLimits | None = None,
    console_listen: str | None = None,
) -> AsyncIterator[ControlHandle]:
    """Starts the real control plane over mTLS; yields a handle; stops it on exit.

    A test trust domain (CA, server certificate, trust bundle) is made under
    `pki_dir` (default tmp_path/pki) and reused by later starts; `handle.client`
    is an admin operator. The background sweeper is off by default
    (`sweep_interval_ms=None`): tests sweep with `handle.service.sweep()` after
    moving a FakeClock. With `vault` (default) the credential vault runs on
    tmp_path/control.kek. `db` (e.g. a postgresql:// URL shared by several
    replicas) replaces tmp_path/db_name. With `metrics_listen` ("127.0.0.1:0")
    Prometheus metrics are served at `handle.running.metrics.address`; the
    ledger signs a checkpoint every `checkpoint_interval_ms` while receipts arrive.
    `limits` replaces the control plane's load-shedding defaults. With
    `console_listen` ("127.0.0.1:0") the operator console serves at
    `handle.running.console_url`.
    """
    key = key or SigningKey.generate()
    pki = make_pki(pki_dir or tmp_path / "pki", [key])
    listen = f"unix:{tmp_path / 'control.sock'}" if unix_socket else "127.0.0.1:0"
    if auth is None:
        auth = Auth(
            ca=pki.ca,
            trust_domain=TEST_TRUST_DOMAIN,
            allowed_node_keys=tuple(allowed_node_keys),
            node_cert_ttl_ms=node_cert_ttl_ms or DEFAULT_NODE_CERT_TTL_MS,
        )
    store_db: Path | str = db if db is not None else tmp_path / db_name
    kek_file = ensure_kek_file(tmp_path / "control.kek") if vault else None
    running = await start_server(
        db=store_db,
        listen=listen,
        key=key,
        clock=clock,
        auth=auth,
        config=config,
        sweep_interval_ms=sweep_interval_ms,
        kek_file=kek_file,
        tls=None if auth.insecure else pki.server_tls,
        metrics_listen=metrics_listen,
        checkpoint_interval_ms=checkpoint_interval_ms,
        store=store,
        limits=limits or CONTROL_LIMITS,
        console_listen=console_listen,
    )
    ep = ControlEndpoint(running.address, running.enroll_address, pki)
    _ENDPOINTS[running.address] = ep
    if await running.store.get_policy(0) is None:
        await running.service.put_policy(policy if policy is not None else default_test_policy())
    client = ControlClient(
        running.address, tls=None if auth.insecure else pki.operator_tls(Role.ADMIN)
    )
    try:
        yield ControlHandle(
            running.address,
            client,
            key,
            running.service,
            running,
            tmp_path / db_name,  # unused (no file) when `db` names another store
            ep,
            kek_file,
        )
    finally:
        _ENDPOINTS.pop(running.address, None)
        await client.close()
        await running.stop(grace_s=0.5)


@contextmanager
def _sync_admin(ep: ControlEndpoint) -> Iterator[Any]:
    """A blocking admin ControlService stub (for helpers called outside a coroutine)."""
    import grpc

    from tether.v1 import control_pb2_grpc as pb_grpc

    tls = ep.pki.operator_tls(Role.ADMIN)
    creds = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
    with grpc.secure_channel(ep.address, creds) as ch:
        yield pb_grpc.ControlServiceStub(ch)


def sync_join_token(ep: ControlEndpoint, node_id: str) -> str:
    """A join token from a blocking call (a re-key token if the node is enrolled)."""
    import grpc

    from tether.v1 import control_pb2 as pb

    with _sync_admin(ep) as stub:
        try:
            made = stub.CreateJoinToken(pb.CreateJoinTokenRequest(node_id=node_id), timeout=10)
            return str(made.token)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        return str(stub.RekeyNode(pb.RekeyNodeRequest(node_id=node_id), timeout=10).token)


def ensure_policy(ep: ControlEndpoint, document: str) -> None:
    """Puts `document` in force unless a policy already is (a blocking call)."""
    import grpc

    from tether.v1 import control_pb2 as pb

    with _sync_admin(ep) as stub:
        try:
            stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            stub.PutPolicy(pb.PutPolicyRequest(document=document), timeout=10)


def ensure_kek_file(path: Path) -> Path:
    """Creates a KEK file (mode 0600) at `path` unless one exists; returns the path."""
    from tether.crypto.sealing import generate_kek_file

    if not path.exists():
        generate_kek_file(path)
    return path


def spawn_control_cli(
    tmp_path: Path,
    *,
    db: Path | str | None = None,
    key_path: Path | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 20.0,
    vault: bool = True,
    policy: str | None = None,
    log_name: str = "control.log",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts `python -m tether.cli control` on 127.0.0.1:0; returns (process, address).

    Creates the key (tmp_path/keys/control.key) and the test trust domain
    (tmp_path/pki) when they do not exist yet, so a restart on the same
    tmp_path reuses both; likewise the KEK file tmp_path/control.kek (with
    `vault`). Waits for --ready-file. Registers the endpoint for `endpoint()`.
    `db` may be a postgresql:// URL; replicas started on one tmp_path share the
    key, trust domain and KEK, each logging to its own `log_name`.
    `env` replaces the process environment (default: this one's).

    Raises:
        RuntimeError: the process exited or did not become ready in time.
    """
    key_path = key_path or tmp_path / "keys" / "control.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path, key_path.with_suffix(".pub"))
    pki = make_pki(tmp_path / "pki", [SigningKey.load(key_path)])
    db = db or tmp_path / "control.db"
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    log_path = tmp_path / log_name
    argv = [
        sys.executable,
        "-m",
        "tether.cli",
        "control",
        "--db",
        str(db),
        "--listen",
        "127.0.0.1:0",
        "--key",
        str(key_path),
        "--ca-cert",
        str(pki.dir / "ca.crt"),
        "--ca-key",
        str(pki.dir / "ca.key"),
        "--tls-cert",
        str(pki.dir / "server.crt"),
        "--tls-key",
        str(pki.dir / "server.key"),
        "--enroll-listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        *(["--kek-file", str(ensure_kek_file(tmp_path / "control.kek"))] if vault else []),
        *extra_args,
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env or dict(os.environ))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            address, enroll, console = [*ready.read_text().splitlines(), "", "", ""][:3]
            _ENDPOINTS[address] = ep = ControlEndpoint(address, enroll, pki, console)
            ensure_policy(ep, policy if policy is not None else default_test_policy())
            return proc, address
        if proc.poll() is not None:
            raise RuntimeError(
                f"control plane exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(
        f"control plane not ready after {timeout_s}s: {log_path.read_text()[-2000:]}"
    )


# --------------------------------------------------------------------------- sidecar
# (added by the sidecar area)


def write_agent_token(path: Path) -> str:
    """Writes a fresh agent token file (mode 0600) and returns the token."""
    import secrets

    token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass
class SidecarHandle:
    """A running in-process sidecar and its agents' tokens."""

    sidecar: Any
    socket: Path
    tokens: dict[str, str]
    state_dir: Path

    def agent(self, name: str) -> Any:
        """A new `tether.agent.AgentClient` for agent `name` on the shared socket."""
        from tether.agent import AgentClient

        return AgentClient(self.socket, token=self.tokens[name])


@asynccontextmanager
async def start_sidecar(
    tmp_path: Path,
    control_address: str,
    *,
    node_id: str = "node-1",
    agents: Sequence[str] = ("alice",),
    enrollment_token: str | None = None,
    clock: Clock | None = None,
    runner: Any = None,
    **overrides: Any,
) -> AsyncIterator[SidecarHandle]:
    """Starts the real sidecar in-process on a Unix socket under tmp_path/node_id.

    Creates the node key, a fresh join token (unless `enrollment_token` is
    given) and one token file per agent; the trust bundle and enrolment address
    come from the test control plane at `control_address`. `overrides` are
    SidecarConfig fields (e.g. agent_liveness_ms=500).
    """
    from tether.sidecar.config import AgentSpec, SidecarConfig
    from tether.sidecar.server import Sidecar

    base = tmp_path / node_id
    base.mkdir(parents=True, exist_ok=True)
    key_path = base / "node.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path, key_path.with_suffix(".pub"))
    # Several replicas ("a,b"): one deployment; the first known one is asked for tokens
    # (a test may list an address where nothing runs).
    addresses = [a for a in control_address.split(",") if a]
    ep = endpoint(next((a for a in addresses if a in _ENDPOINTS), addresses[0]))
    if enrollment_token is None:
        enrollment_token = await ep.join_token(node_id)
    enroll = base / "join.token"
    write_private(enroll, (enrollment_token + "\n").encode())
    tokens: dict[str, str] = {}
    specs = []
    for name in agents:
        token_file = base / f"{name}.token"
        if token_file.exists():
            tokens[name] = token_file.read_text().strip()
        else:
            tokens[name] = write_agent_token(token_file)
        specs.append(AgentSpec(name=name, token_file=token_file))
    socket_path = base / "tether.sock"
    cfg = SidecarConfig(
        control_address=control_address,
        node_id=node_id,
        node_key_path=key_path,
        trust_bundle_path=overrides.pop("trust_bundle_path", ep.pki.trust_bundle),
        enroll_address=overrides.pop("enroll_address", None)
        or ",".join(endpoint(a).enroll_address for a in addresses),
        enrollment_token_file=enroll,
        state_dir=base / "state",
        socket_path=socket_path,
        agents=tuple(specs),
        **overrides,
    )
    sidecar = Sidecar(cfg, clock=clock, runner=runner)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.stop(grace_ms=0)
        raise
    try:
        yield SidecarHandle(sidecar, socket_path, tokens, cfg.state_dir)
    finally:
        await sidecar.stop(grace_ms=500)


def spawn_sidecar_cli(
    tmp_path: Path,
    control_address: str,
    *,
    node_id: str = "node-1",
    agents: Sequence[str] = ("alice",),
    extra_args: Sequence[str] = (),
    timeout_s: float = 20.0,
    join_token: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path, dict[str, Path]]:
    """Starts `python -m tether.cli sidecar`; returns (process, socket, agent token files).

    Reuses the node key and token files under tmp_path/node_id on a restart.
    `env` replaces the process environment (default: this one's), e.g. to
    preload libfaketime for a skewed clock.

    Raises:
        RuntimeError: the process exited or did not become ready in time.
    """
    base = tmp_path / node_id
    base.mkdir(parents=True, exist_ok=True)
    key_path = base / "node.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path, key_path.with_suffix(".pub"))
    # Several replicas ("a,b"): the first known one serves tokens and the trust bundle.
    addresses = [a for a in control_address.split(",") if a]
    ep = endpoint(next((a for a in addresses if a in _ENDPOINTS), addresses[0]))
    enroll_addresses = ",".join(endpoint(a).enroll_address for a in addresses)
    enroll = base / "join.token"
    token = join_token if join_token is not None else sync_join_token(ep, node_id)
    write_private(enroll, (token + "\n").encode())
    token_files: dict[str, Path] = {}
    argv = [
        sys.executable, "-m", "tether.cli", "sidecar",
        "--control", control_address, "--node-id", node_id, "--key", str(key_path),
        "--socket", str(base / "tether.sock"), "--state-dir", str(base / "state"),
        "--join-token-file", str(enroll), "--trust-bundle", str(ep.pki.trust_bundle),
        "--enroll", enroll_addresses,
    ]  # fmt: skip
    for name in agents:
        token_file = base / f"{name}.token"
        if not token_file.exists():
            write_agent_token(token_file)
        token_files[name] = token_file
        argv += ["--agent", f"{name}={token_file}"]
    ready = base / f"ready-{time.monotonic_ns()}"
    argv += ["--ready-file", str(ready), *extra_args]
    log_path = base / "sidecar.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env or dict(os.environ))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return proc, base / "tether.sock", token_files
        if proc.poll() is not None:
            raise RuntimeError(
                f"sidecar exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"sidecar not ready after {timeout_s}s: {log_path.read_text()[-2000:]}")

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
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.control.client import ControlClient
from tether.control.server import RunningControl, start_server
from tether.control.service import Auth, ControlConfig, ControlService
from tether.core.clock import Clock
from tether.crypto.signing import SigningKey

TEST_ENROLLMENT_TOKEN = "test-enrollment-token"


@dataclass
class ControlHandle:
    """A running in-process control plane."""

    address: str
    client: ControlClient
    key: SigningKey
    service: ControlService
    running: RunningControl
    db_path: Path
    enrollment_token: str
    kek_file: Path | None = None

    async def node_client(self, node_id: str = "node-1") -> ControlClient:
        """A new client registered as `node_id` (with a fresh node key); caller closes it."""
        client = ControlClient(self.address)
        await client.register_node(node_id, SigningKey.generate().public.raw, self.enrollment_token)
        return client


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
) -> AsyncIterator[ControlHandle]:
    """Starts the real control plane; yields a handle; stops it on exit.

    By default the enrolment token TEST_ENROLLMENT_TOKEN is accepted and the
    background sweeper is off (`sweep_interval_ms=None`): tests sweep with
    `handle.service.sweep()` after moving a FakeClock. With `vault` (default) the
    credential vault runs on tmp_path/control.kek (created when missing). `db`
    (e.g. a postgresql:// URL shared by several replicas) replaces tmp_path/db_name.
    """
    key = key or SigningKey.generate()
    listen = f"unix:{tmp_path / 'control.sock'}" if unix_socket else "127.0.0.1:0"
    auth = auth or Auth.from_tokens(enrollment_tokens=[TEST_ENROLLMENT_TOKEN])
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
    )
    client = ControlClient(running.address)
    try:
        yield ControlHandle(
            running.address,
            client,
            key,
            running.service,
            running,
            tmp_path / db_name,  # unused (no file) when `db` names another store
            TEST_ENROLLMENT_TOKEN,
            kek_file,
        )
    finally:
        await client.close()
        await running.stop(grace_s=0.5)


def ensure_kek_file(path: Path) -> Path:
    """Creates a KEK file (mode 0600) at `path` unless one exists; returns the path."""
    from tether.crypto.sealing import generate_kek_file

    if not path.exists():
        generate_kek_file(path)
    return path


def spawn_control_cli(
    tmp_path: Path,
    *,
    db: Path | None = None,
    key_path: Path | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 20.0,
    vault: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts `python -m tether.cli control` on 127.0.0.1:0; returns (process, address).

    Creates the key (tmp_path/keys/control.key) and an enrolment token file
    holding TEST_ENROLLMENT_TOKEN when they do not exist yet, so a restart on
    the same tmp_path reuses both; likewise the KEK file tmp_path/control.kek
    (with `vault`). Waits for --ready-file.

    Raises:
        RuntimeError: the process exited or did not become ready in time.
    """
    key_path = key_path or tmp_path / "keys" / "control.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path, key_path.with_suffix(".pub"))
    tokens = tmp_path / "enrollment.tokens"
    if not tokens.exists():
        tokens.write_text(TEST_ENROLLMENT_TOKEN + "\n")
    db = db or tmp_path / "control.db"
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    log_path = tmp_path / "control.log"
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
        "--enrollment-token-file",
        str(tokens),
        "--ready-file",
        str(ready),
        *(["--kek-file", str(ensure_kek_file(tmp_path / "control.kek"))] if vault else []),
        *extra_args,
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=dict(os.environ))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return proc, ready.read_text().strip()
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
    enrollment_token: str = TEST_ENROLLMENT_TOKEN,
    control_pub: Path | None = None,
    clock: Clock | None = None,
    runner: Any = None,
    **overrides: Any,
) -> AsyncIterator[SidecarHandle]:
    """Starts the real sidecar in-process on a Unix socket under tmp_path/node_id.

    Creates the node key, enrolment token file and one token file per agent;
    `overrides` are SidecarConfig fields (e.g. agent_liveness_ms=500).
    """
    from tether.sidecar.config import AgentSpec, SidecarConfig
    from tether.sidecar.server import Sidecar

    base = tmp_path / node_id
    base.mkdir(parents=True, exist_ok=True)
    key_path = base / "node.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path, key_path.with_suffix(".pub"))
    enroll = base / "enroll.token"
    enroll.write_text(enrollment_token + "\n")
    enroll.chmod(0o600)
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
        control_public_key_path=control_pub,
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
    control_pub: Path | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 20.0,
) -> tuple[subprocess.Popen[bytes], Path, dict[str, Path]]:
    """Starts `python -m tether.cli sidecar`; returns (process, socket, agent token files).

    Reuses the node key and token files under tmp_path/node_id on a restart.

    Raises:
        RuntimeError: the process exited or did not become ready in time.
    """
    base = tmp_path / node_id
    base.mkdir(parents=True, exist_ok=True)
    key_path = base / "node.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path, key_path.with_suffix(".pub"))
    enroll = base / "enroll.token"
    enroll.write_text(TEST_ENROLLMENT_TOKEN + "\n")
    enroll.chmod(0o600)
    token_files: dict[str, Path] = {}
    argv = [
        sys.executable, "-m", "tether.cli", "sidecar",
        "--control", control_address, "--node-id", node_id, "--key", str(key_path),
        "--socket", str(base / "tether.sock"), "--state-dir", str(base / "state"),
        "--enrollment-token-file", str(enroll),
    ]  # fmt: skip
    for name in agents:
        token_file = base / f"{name}.token"
        if not token_file.exists():
            write_agent_token(token_file)
        token_files[name] = token_file
        argv += ["--agent", f"{name}={token_file}"]
    if control_pub is not None:
        argv += ["--control-pub", str(control_pub)]
    ready = base / f"ready-{time.monotonic_ns()}"
    argv += ["--ready-file", str(ready), *extra_args]
    log_path = base / "sidecar.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=dict(os.environ))
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

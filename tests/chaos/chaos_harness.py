"""The chaos harness: real Tether processes under a seeded schedule of faults.

One run starts a fencing HTTP sink (`python -m tether.demo.api`), the control
plane(s) (`tether control`), several sidecars (`tether sidecar`, each reaching the
control plane through its own TCP proxy in this process) and several agent
processes (`chaos_agent.py`), submits tasks at a steady rate, and injects faults
drawn from `random.Random(seed)`:

- `sigkill-*`, `sigterm-*` (then a restart) and `sigstop-*` (held past the lease
  TTL, then SIGCONT) of agents, sidecars and the control plane;
- `partition`: a sidecar's proxy black-holes both directions (bytes are held, not
  dropped, as TCP would retransmit them; new connections wait) for a while;
- `delay`: the proxy adds latency to every chunk;
- `skew`: a sidecar (and its agents) restarts with its wall clock moved by up to
  ±`skew_s` (libfaketime, LD_PRELOAD; monotonic clocks are left alone).

Then it heals everything, waits for every task to end, and checks the invariants
(`Outcome.violations`): every task ended exactly once, no stale write reached the
sink, no keyed side effect ran twice, every spooled receipt is in the ledger once,
and `tether verify` accepts the untampered full export. The schedule is a pure
function of the seed; process timing is not, so a replay reproduces the faults,
not every interleaving.

The number of control planes, the store (sqlite, postgres) and the fault kinds are
parameters (`ChaosConfig`). See docs/testing.md.

Several replicas on PostgreSQL (`make chaos-replicas`) add, with `failover`, one
proxy per (sidecar, replica) so each sidecar fails over between replicas itself,
two replica faults (`REPLICA_FAULTS`: `sigstop-control-tx`, a replica SIGSTOPped
while one of its sessions is inside a transaction, and `pgkill-control`,
pg_terminate_backend of every session of a replica), a policy update through one
replica mid-run (every lease signed `policy_bound_ms` after it must carry the new
digest), one checkpoint signer at a time (from the replicas' logs), and the
agents' claim errors during replica faults, counted and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tether.control.client import ControlClient
from tether.core.errors import TetherError
from tether.core.receipts import ReceiptKind
from tether.core.states import TERMINAL, state_name
from tether.crypto.leases import decode_lease
from tether.crypto.pki import Role, write_private
from tether.crypto.receipts import parse_receipt
from tether.testing import (
    ControlEndpoint,
    make_pki,
    register_endpoint,
    spawn_control_cli,
    spawn_sidecar_cli,
    sync_join_token,
)
from tether.verify.bundle import decode_bundle

AGENT_PROGRAM = Path(__file__).with_name("chaos_agent.py")
QUEUE = "chaos"
FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)

PROCESS_FAULTS = tuple(
    f"{sig}-{target}"
    for sig in ("sigkill", "sigstop", "sigterm")
    for target in ("agent", "sidecar", "control")
)
NETWORK_FAULTS = ("partition", "delay", "outage")
ALL_FAULTS = (*PROCESS_FAULTS, *NETWORK_FAULTS, "skew")
REPLICA_FAULTS = ("sigstop-control-tx", "pgkill-control")
"""Faults of control-plane replicas on PostgreSQL (store="postgres" only)."""
TERMINAL_NAMES = frozenset(s.name.lower() for s in TERMINAL)


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run; every field has a default the CI mode uses."""

    seed: int
    """Drives the whole schedule (which fault, when, on what, for how long)."""
    root: Path
    """Where processes keep their state and logs (kept for a post-mortem)."""
    tasks: int = 60
    """Tasks submitted, evenly over the fault window."""
    faults: int = 40
    """Faults injected over the fault window."""
    duration_s: float = 100.0
    """The fault window: tasks arrive and faults fire during it."""
    sidecars: int = 3
    agents_per_sidecar: int = 2
    control_planes: int = 1
    """Control-plane replicas; more than one needs store="postgres"."""
    store: str = "sqlite"
    """"sqlite" (one file, one control plane) or "postgres" (a fresh database)."""
    fault_kinds: tuple[str, ...] = ALL_FAULTS
    lease_ttl_ms: int = 3_000
    max_attempts: int = 100
    """High so that tasks succeed in the end despite many lapses."""
    skew_s: float = 2.0
    """Largest wall-clock offset of a skewed node (within verify's --max-clock-skew 5s)."""
    steps: int = 2
    """Keyed sink writes per task."""
    settle_timeout_s: float = 240.0
    """How long tasks may take to end once the faults stop."""
    postgres_admin_url: str = os.environ.get(
        "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    failover: bool = False
    """Each sidecar is given every replica (one proxy each) and fails over by itself,
    instead of one proxy that forwards to any live replica."""
    policy_update_at_s: float = 0.0
    """When (into the window) a new policy version is applied through one replica; 0: never."""
    policy_bound_ms: int = 1_000
    """The replicas' --policy-max-staleness-ms: leases signed this long after the update
    must carry the new digest."""

    def __post_init__(self) -> None:
        known = (*ALL_FAULTS, *REPLICA_FAULTS)
        unknown = set(self.fault_kinds) - set(known)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {known}")
        if set(self.fault_kinds) & set(REPLICA_FAULTS) and self.store != "postgres":
            raise ValueError(f"{REPLICA_FAULTS} need store='postgres'")
        if self.store not in ("sqlite", "postgres"):
            raise ValueError("store must be sqlite or postgres")
        if self.control_planes > 1 and self.store != "postgres":
            raise ValueError("several control planes need store='postgres'")


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: when (seconds into the window), what, on which target."""

    at_s: float
    kind: str
    target: int
    hold_s: float = 0.0
    """How long a stop, partition or delay lasts."""
    delay_ms: int = 0
    skew_s: float = 0.0
    restart_after_s: float = 0.0

    def describe(self) -> str:
        extra = {
            "hold": f"{self.hold_s:.1f}s" if self.hold_s else "",
            "delay": f"{self.delay_ms}ms" if self.delay_ms else "",
            "skew": f"{self.skew_s:+.2f}s" if self.kind == "skew" else "",
        }
        more = " ".join(f"{k}={v}" for k, v in extra.items() if v)
        return f"t+{self.at_s:6.1f}s {self.kind}[{self.target}] {more}".rstrip()


def schedule(cfg: ChaosConfig) -> list[Fault]:
    """The run's faults: a pure function of the seed and the configuration."""
    rng = random.Random(cfg.seed)
    ttl = cfg.lease_ttl_ms / 1000
    kinds = sorted(cfg.fault_kinds)
    out = []
    for _ in range(cfg.faults):
        kind = rng.choice(kinds)
        target_kind = "control" if "control" in kind.split("-") else kind.split("-")[-1]
        count = {
            "agent": cfg.sidecars * cfg.agents_per_sidecar,
            "control": cfg.control_planes,
        }.get(target_kind, cfg.sidecars)
        out.append(
            Fault(
                at_s=round(rng.uniform(2.0, cfg.duration_s), 2),
                kind=kind,
                target=rng.randrange(count),
                hold_s=round(
                    rng.uniform(1.3 * ttl, 2.2 * ttl)
                    if kind.startswith("sigstop")
                    else rng.uniform(1.0, 2.5 * ttl)
                    if kind in ("partition", "outage")
                    else rng.uniform(2.0, 6.0)
                    if kind == "delay"
                    else 0.0,
                    2,
                ),
                delay_ms=rng.randrange(50, 400) if kind == "delay" else 0,
                skew_s=round(rng.uniform(-cfg.skew_s, cfg.skew_s), 2) if kind == "skew" else 0.0,
                restart_after_s=round(rng.uniform(0.0, 1.0), 2),
            )
        )
    return sorted(out, key=lambda f: f.at_s)


def faketime_lib() -> str | None:
    """The libfaketime shared object (Debian's `faketime` package), if installed."""
    return next((p for p in FAKETIME_LIBS if Path(p).exists()), None)


def skew_env(offset_s: float) -> dict[str, str]:
    """This process's environment with the wall clock moved by `offset_s` (0: untouched)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if offset_s:
        lib = faketime_lib()
        if lib is None:
            raise RuntimeError("clock skew needs libfaketime: apt-get install faketime")
        env["LD_PRELOAD"] = lib
        env["FAKETIME"] = f"{offset_s:+.3f}"
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"  # skew the wall clock only
    return env


def check_faketime(offset_s: float = 2.0) -> float:
    """Measures the skew a preloaded libfaketime gives Python's time.time()."""
    probe = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=skew_env(offset_s),
        capture_output=True,
        check=True,
        timeout=30,
    )
    return float(probe.stdout) - time.time()


# --------------------------------------------------------------------------- proxy


class LinkProxy:
    """A TCP proxy between one sidecar and the control plane(s) that can black-hole or delay.

    TLS passes through unchanged (the proxy only moves bytes). A black-hole holds
    bytes in both directions and holds new connections until healed, as a network
    partition does to TCP (which retransmits); a delay sleeps before every chunk.
    """

    def __init__(self, name: str, upstream: Callable[[], list[str]]) -> None:
        self.name = name
        self._upstream = upstream
        self._open = asyncio.Event()
        self._open.set()
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._rr = 0
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self.address

    def blackhole(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()
        self.delay_s = 0.0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)  # type: ignore[arg-type]
        try:
            await self._open.wait()
            targets = self._upstream()
            if not targets:
                return
            self._rr += 1
            host, port = targets[self._rr % len(targets)].rsplit(":", 1)
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
            except (OSError, TimeoutError):
                return
            try:
                await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer))
            finally:
                up_w.close()
        finally:
            writer.close()
            self._conns.discard(task)  # type: ignore[arg-type]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._open.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """One managed process; `lock` serialises the faults on it."""

    name: str
    kind: str
    index: int
    popen: subprocess.Popen[bytes] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    expected_exit: bool = False
    """Set while the harness itself stops the process."""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    async def wait(self, timeout_s: float) -> int | None:
        """Waits for the process to exit; its code, or None if it did not in time."""
        deadline = time.monotonic() + timeout_s
        while self.popen is not None and self.popen.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return None if self.popen is None else self.popen.returncode


@dataclass
class Outcome:
    """What a run found; `violations` empty means every invariant held."""

    seed: int
    config: dict[str, Any]
    faults_by_kind: Counter[str] = field(default_factory=Counter)
    faults_planned: int = 0
    tasks_submitted: int = 0
    tasks_by_state: Counter[str] = field(default_factory=Counter)
    attempts_max: int = 0
    sink_writes: int = 0
    sink_refused_stale: int = 0
    spooled: int = 0
    ledger_entries: int = 0
    verify_exit: int | None = None
    verify_failures: list[str] = field(default_factory=list)
    verify_warnings: int = 0
    violations: list[str] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    """Harness-side events worth knowing that are not invariant violations."""
    seconds: float = 0.0
    root: str = ""
    replicas: dict[str, Any] = field(default_factory=dict)
    """With several replicas: pauses inside transactions, checkpoint signers, the policy
    update and the claim errors during replica faults."""

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs.
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}

    def summary(self) -> str:
        ok = not self.violations and self.verify_exit == 0
        lines = [
            "─" * 72,
            f" chaos seed {self.seed}: {'ALL INVARIANTS HELD' if ok else 'VIOLATIONS'}"
            f"  ({self.seconds:.0f}s, state in {self.root})",
            "─" * 72,
            f" faults: {sum(self.faults_by_kind.values())} of {self.faults_planned} planned: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.faults_by_kind.items())),
            f" tasks: {self.tasks_submitted} submitted; "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.tasks_by_state.items()))
            + f"; highest attempt {self.attempts_max}",
            f" sink: {self.sink_writes} writes, {self.sink_refused_stale} refused as stale",
            f" receipts: {self.spooled} in sidecar spools, {self.ledger_entries} in the ledger",
            f" tether verify (full export): exit {self.verify_exit}"
            + (f", {self.verify_warnings} warnings" if self.verify_warnings else ""),
            *[f"   {f}" for f in self.verify_failures[:10]],
            f" invariant violations: {len(self.violations)}",
            *[f"   {v}" for v in self.violations[:20]],
        ]
        if self.replicas:
            r = self.replicas
            lines += [
                f" replicas: {r.get('sigstop_in_tx', 0)} of {r.get('sigstop_tx_faults', 0)}"
                " tx pauses caught a session inside a transaction; "
                f"{r.get('pgkill_sessions', 0)} sessions terminated by pgkill",
                f" checkpoint signings: {r.get('checkpoints_signed', 0)} by "
                f"{r.get('checkpoint_terms', 0)} terms ({r.get('checkpoint_signers', [])})",
                f" policy update: {r.get('policy_leases_after_bound', 0)} leases signed after the "
                f"{self.config.get('policy_bound_ms')} ms bound, all with the new digest"
                if r.get("policy_updated")
                else " policy update: none",
                f" claims: {r.get('claims', 0)} granted, {r.get('claim_errors', 0)} errors, "
                f"{r.get('claim_errors_in_replica_faults', 0)} during replica faults (while the "
                f"agent's own sidecar and link were up; {r.get('replica_fault_seconds', 0):.0f}s "
                "of replica faults)",
            ]
        if self.incidents:
            lines.append(f" incidents: {len(self.incidents)}")
            lines += [f"   {i}" for i in self.incidents[:10]]
        lines.append(
            f" replay: TETHER_CHAOS_SEED={self.seed} (tests/chaos/run_chaos.py --seed {self.seed})"
        )
        lines.append("─" * 72)
        return "\n".join(lines)


class Cluster:
    """The processes of one run and the faults on them."""

    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.root = cfg.root
        self.rng = random.Random(cfg.seed ^ 0x5EED)
        self.outcome = Outcome(seed=cfg.seed, config=_plain(asdict(cfg)), root=str(cfg.root))
        self.sink: Proc = Proc("sink", "sink", 0)
        self.sink_url = ""
        self.sink_token = secrets.token_urlsafe(24)
        self.controls = [Proc(f"control-{i}", "control", i) for i in range(cfg.control_planes)]
        self.control_addr: list[str] = [""] * cfg.control_planes
        self.enroll_addr: list[str] = [""] * cfg.control_planes
        self.sidecars = [Proc(f"node-{i}", "sidecar", i) for i in range(cfg.sidecars)]
        self.skews: list[float] = [0.0] * cfg.sidecars
        self.sockets: list[Path] = [Path()] * cfg.sidecars
        self.join_tokens: dict[str, str] = {}
        self.proxies: list[tuple[LinkProxy, LinkProxy]] = []
        self.replica_proxies: list[list[tuple[LinkProxy, LinkProxy]]] = []
        """With `failover`: per sidecar, one (control, enrol) proxy pair per replica."""
        self.replica_faults: list[tuple[float, float]] = []
        """Wall-clock windows of faults on replicas (for the claim-error count)."""
        self.sidecar_faults: dict[int, list[tuple[float, float]]] = defaultdict(list)
        """Per sidecar, windows when it (or its link, or the agent) was faulted."""
        self.policy_t0_ms = 0
        self.policy_new_digest = ""
        self.agents = [
            Proc(f"agent-{s}-{a}", "agent", s * cfg.agents_per_sidecar + a)
            for s in range(cfg.sidecars)
            for a in range(cfg.agents_per_sidecar)
        ]
        self.db_url = ""
        self.pki_dir = self.root / "control" / "pki"
        self.policy = ""
        self.task_ids: list[str] = []
        self._admin: ControlClient | None = None
        self._admin_addr = ""
        self._stopping = False

    # -- names ------------------------------------------------------------------------

    def node_id(self, i: int) -> str:
        return f"chaos-node-{i}"

    def agent_name(self, proc: Proc) -> str:
        return f"chaos-{proc.name}"

    def sidecar_of(self, agent: Proc) -> int:
        return agent.index // self.cfg.agents_per_sidecar

    def log(self, text: str) -> None:
        with open(self.root / "harness.log", "a") as f:
            f.write(f"{time.time():.3f} {text}\n")

    # -- set-up -----------------------------------------------------------------------

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        if "skew" in self.cfg.fault_kinds:
            got = await asyncio.to_thread(check_faketime, 2.0)
            if abs(got - 2.0) > 0.5:
                raise RuntimeError(f"libfaketime moved time.time() by {got:.2f}s, not 2s")
        await self._start_sink()
        self.policy = self._policy()
        if self.cfg.store == "postgres":
            self.db_url = await asyncio.to_thread(self._create_database)
        for proc in self.controls:
            await self._spawn_control(proc)
        async with self.admin() as admin:
            await admin.put_secret("sink_token", self.sink_token.encode())
        pki = make_pki(self.pki_dir, [])
        for i in range(self.cfg.sidecars):
            if self.cfg.failover:  # the sidecar itself chooses among the replicas
                pairs = []
                for r in range(self.cfg.control_planes):
                    ctl = LinkProxy(f"control{r}<-{self.node_id(i)}", self._replica(r, False))
                    enr = LinkProxy(f"enroll{r}<-{self.node_id(i)}", self._replica(r, True))
                    await ctl.start()
                    await enr.start()
                    register_endpoint(ControlEndpoint(ctl.address, enr.address, pki))
                    pairs.append((ctl, enr))
                self.replica_proxies.append(pairs)
                self.proxies.append(pairs[0])
                continue
            ctl = LinkProxy(f"control<-{self.node_id(i)}", self._control_targets)
            enr = LinkProxy(f"enroll<-{self.node_id(i)}", self._enroll_targets)
            await ctl.start()
            await enr.start()
            register_endpoint(ControlEndpoint(ctl.address, enr.address, pki))
            self.proxies.append((ctl, enr))
        await asyncio.gather(*(self._spawn_sidecar(p) for p in self.sidecars))
        for agent in self.agents:
            self._spawn_agent(agent)

    async def _start_sink(self) -> None:
        token_file = self.root / "sink.token"
        write_private(token_file, self.sink_token.encode())
        ready = self.root / "sink.url"
        log = open(self.root / "logs" / "sink.log", "ab")  # noqa: SIM115, ASYNC230 - the child's
        self.sink.popen = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant
            [sys.executable, "-m", "tether.demo.api", "--token-file", str(token_file),
             "--log", str(self.root / "sink.jsonl"), "--ready-file", str(ready)],
            stdout=log, stderr=log, env=skew_env(0),
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.sink.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the fencing sink did not start; see logs/sink.log")
            await asyncio.sleep(0.05)
        self.sink_url = ready.read_text().strip()

    def _policy(self) -> str:
        port = urlsplit(self.sink_url).port
        agents = "\n".join(
            f'[agents.{self.agent_name(a)}]\nqueues = ["{QUEUE}"]\n' for a in self.agents
        )
        return f"""version = 1

{agents}
[credentials.sink_token]
tools = ["sink_write"]
description = "bearer token of the fencing sink"

[tools.sink_write]
adapter = "http"
cost_micros = 1
idempotent = false
timeout_ms = 5000
credential = "sink_token"
[tools.sink_write.http]
base_url = "{self.sink_url}"
allowed_methods = ["POST"]

[queues.{QUEUE}]
tools = ["sink_write"]
network_allowlist = ["127.0.0.1:{port}"]
budget_micros = 1000000
lease_ttl_ms = {self.cfg.lease_ttl_ms}
max_attempts = {self.cfg.max_attempts}
memory_scope = "task"
"""

    def _create_database(self) -> str:
        import psycopg
        from psycopg import sql

        name = f"tether_chaos_{self.cfg.seed}_{secrets.token_hex(4)}"
        with psycopg.connect(self.cfg.postgres_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return urlsplit(self.cfg.postgres_admin_url)._replace(path=f"/{name}").geturl()

    def _drop_database(self) -> None:
        import psycopg
        from psycopg import sql

        name = urlsplit(self.db_url).path.lstrip("/")
        with psycopg.connect(self.cfg.postgres_admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _replica(self, r: int, enroll: bool) -> Callable[[], list[str]]:
        """Replica r's current address (it changes when the replica restarts)."""

        def targets() -> list[str]:
            addr = (self.enroll_addr if enroll else self.control_addr)[r]
            return [addr] if addr and self.controls[r].alive() else []

        return targets

    def links(self, sidecar: int) -> list[LinkProxy]:
        """Every proxy between sidecar `sidecar` and the replicas."""
        pairs = self.replica_proxies[sidecar] if self.cfg.failover else [self.proxies[sidecar]]
        return [p for pair in pairs for p in pair]

    def _control_targets(self) -> list[str]:
        return [a for p, a in zip(self.controls, self.control_addr, strict=True) if a and p.alive()]

    def _enroll_targets(self) -> list[str]:
        return [a for p, a in zip(self.controls, self.enroll_addr, strict=True) if a and p.alive()]

    async def _spawn_control(self, proc: Proc) -> None:
        popen, address = await asyncio.to_thread(
            spawn_control_cli,
            self.root / "control",
            db=self.db_url or self.root / "control" / "control.db",
            extra_args=[
                "--sweep-interval-ms",
                "200",
                "--checkpoint-interval-ms",
                "1000",
                "--replica-id",
                proc.name,
                "--policy-max-staleness-ms",
                str(self.cfg.policy_bound_ms),
            ],
            timeout_s=90,
            policy=self.policy,
            log_name=f"{proc.name}.log",
            env=skew_env(0),
        )
        proc.popen = popen
        self.control_addr[proc.index] = address
        self.enroll_addr[proc.index] = _ready_lines(self.root / "control", address)
        self.log(f"{proc.name} up at {address} (pid {popen.pid})")

    async def _spawn_sidecar(self, proc: Proc) -> None:
        i = proc.index
        node = self.node_id(i)
        ctl, _ = self.proxies[i]
        control = ctl.address
        if self.cfg.failover:  # sidecar i prefers replica i mod N: load spread over all
            pairs = self.replica_proxies[i]
            k = i % len(pairs)
            control = ",".join(c.address for c, _ in pairs[k:] + pairs[:k])
        if node not in self.join_tokens:
            ep = ControlEndpoint(
                self._any_control(), self._any_enroll(), make_pki(self.pki_dir, [])
            )
            self.join_tokens[node] = await asyncio.to_thread(sync_join_token, ep, node)
        names = [self.agent_name(a) for a in self.agents if self.sidecar_of(a) == i]
        for attempt in range(5):
            try:
                popen, sock, _ = await asyncio.to_thread(
                    spawn_sidecar_cli,
                    self.root,
                    control,
                    node_id=node,
                    agents=names,
                    timeout_s=90,
                    join_token=self.join_tokens[node],
                    env=skew_env(self.skews[i]),
                )
                break
            except RuntimeError as err:
                self.outcome.incidents.append(f"{node} start attempt {attempt + 1}: {err}"[:300])
                await asyncio.sleep(1)
        else:
            raise RuntimeError(f"{node} did not start in 5 attempts; see {self.root / node}")
        proc.popen = popen
        self.sockets[i] = sock
        self.log(f"{node} up (pid {popen.pid}, skew {self.skews[i]:+.2f}s)")

    def _spawn_agent(self, proc: Proc) -> None:
        i = self.sidecar_of(proc)
        token_file = self.root / self.node_id(i) / f"{self.agent_name(proc)}.token"
        log = open(self.root / "logs" / f"{proc.name}.log", "ab")  # noqa: SIM115 - the child's
        proc.popen = subprocess.Popen(
            [sys.executable, str(AGENT_PROGRAM), "--socket", str(self.sockets[i]),
             "--token-file", str(token_file), "--queue", QUEUE, "--steps", str(self.cfg.steps)],
            stdout=log, stderr=log, env=skew_env(self.skews[i]),
        )  # fmt: skip
        log.close()

    def _any_control(self) -> str:
        targets = self._control_targets()
        if not targets:
            raise TetherError("no control plane is running")
        return targets[0]

    def _any_enroll(self) -> str:
        return self._enroll_targets()[0]

    @contextlib.asynccontextmanager
    async def admin(self) -> Any:
        """An admin client of a running control plane (direct, not through a proxy)."""
        address = self._any_control()
        if self._admin is None or self._admin_addr != address:
            if self._admin is not None:
                await self._admin.close()
            pki = make_pki(self.pki_dir, [])
            self._admin = ControlClient(address, tls=pki.operator_tls(Role.ADMIN), timeout_s=10)
            self._admin_addr = address
        yield self._admin

    # -- workload ---------------------------------------------------------------------

    async def submit_all(self) -> None:
        """Submits the tasks evenly over the fault window, retrying through outages."""
        gap = self.cfg.duration_s / max(self.cfg.tasks, 1)
        start = time.monotonic()
        for n in range(self.cfg.tasks):
            await asyncio.sleep(max(0.0, start + n * gap - time.monotonic()))
            payload = json.dumps({"n": n, "seed": self.cfg.seed}).encode()
            while True:
                try:
                    async with self.admin() as admin:
                        resp = await admin.submit(
                            QUEUE, payload, idempotency_key=f"chaos-{self.cfg.seed}-{n}"
                        )
                    break
                except TetherError as err:
                    self.log(f"submit {n}: {err.reason}; retrying")
                    await asyncio.sleep(0.5)
            if resp.task.task_id not in self.task_ids:
                self.task_ids.append(resp.task.task_id)
        self.outcome.tasks_submitted = len(self.task_ids)

    # -- faults -----------------------------------------------------------------------

    def _target(self, fault: Fault) -> Proc:
        kind = fault.kind.split("-")[-1]
        if kind == "agent":
            return self.agents[fault.target]
        if kind == "control":
            return self.controls[fault.target]
        return self.sidecars[fault.target]

    async def _restart(self, proc: Proc) -> None:
        if proc.kind == "control":
            await self._spawn_control(proc)
        elif proc.kind == "sidecar":
            await self._spawn_sidecar(proc)
        else:
            self._spawn_agent(proc)

    async def _outage(self, fault: Fault) -> None:
        """Every sidecar cut from every control plane at once (the control plane keeps
        running: it sweeps the lapsed leases while no node can reach it)."""
        async with contextlib.AsyncExitStack() as stack:
            for sidecar in self.sidecars:  # in index order: no deadlock with one-lock faults
                await stack.enter_async_context(sidecar.lock)
            began = time.time()
            self.log(f"fault {fault.describe()}")
            links = [link for i in range(self.cfg.sidecars) for link in self.links(i)]
            for link in links:
                link.blackhole()
            await asyncio.sleep(fault.hold_s)
            for link in links:
                link.heal()
            for i in range(self.cfg.sidecars):
                self.sidecar_faults[i].append((began, time.time()))
        self.outcome.faults_by_kind[fault.kind] += 1

    async def inject(self, fault: Fault) -> None:
        """Runs one fault to its end (the process is back, the link healed)."""
        if fault.kind == "outage":
            await self._outage(fault)
            return
        if fault.kind in NETWORK_FAULTS:
            links = self.links(fault.target)
            began = time.time()
            async with self.sidecars[fault.target].lock:
                self.log(f"fault {fault.describe()}")
                for link in links:
                    if fault.kind == "partition":
                        link.blackhole()
                    else:
                        link.delay_s = fault.delay_ms / 1000
                await asyncio.sleep(fault.hold_s)
                for link in links:
                    link.heal()
            self.sidecar_faults[fault.target].append((began, time.time()))
            self.outcome.faults_by_kind[fault.kind] += 1
            return
        if fault.kind in REPLICA_FAULTS:
            await self._replica_fault(fault)
            self.outcome.faults_by_kind[fault.kind] += 1
            return
        proc = self._target(fault)
        began = time.time()
        async with proc.lock:
            if not proc.alive():
                self.outcome.incidents.append(f"{fault.describe()}: {proc.name} was not running")
                await self._restart(proc)
            self.log(f"fault {fault.describe()} on {proc.name} pid {proc.popen.pid}")  # type: ignore[union-attr]
            if fault.kind.startswith("sigstop"):
                proc.signal(signal.SIGSTOP)
                await asyncio.sleep(fault.hold_s)
                proc.signal(signal.SIGCONT)
            elif fault.kind.startswith("sigkill"):
                proc.expected_exit = True
                proc.signal(signal.SIGKILL)
                await proc.wait(30)
                await asyncio.sleep(fault.restart_after_s)
                await self._restart(proc)
                proc.expected_exit = False
            else:  # sigterm and skew: a graceful stop, then a restart
                proc.expected_exit = True
                if fault.kind == "skew":
                    self.skews[proc.index] = fault.skew_s
                proc.signal(signal.SIGTERM)
                if await proc.wait(20) is None:
                    self.outcome.incidents.append(f"{proc.name} ignored SIGTERM for 20s; killed")
                    proc.signal(signal.SIGKILL)
                    await proc.wait(10)
                code = proc.popen.returncode if proc.popen else None
                if proc.kind != "agent" and code not in (0, -signal.SIGTERM):
                    self.outcome.violations.append(
                        f"{proc.name} exited {code} on SIGTERM (seed {self.cfg.seed})"
                    )
                await asyncio.sleep(fault.restart_after_s)
                await self._restart(proc)
                proc.expected_exit = False
        if proc.kind == "control":
            self.replica_faults.append((began, time.time()))
        else:
            own = proc.index if proc.kind == "sidecar" else self.sidecar_of(proc)
            self.sidecar_faults[own].append((began, time.time()))
        self.outcome.faults_by_kind[fault.kind] += 1

    # -- replicas ---------------------------------------------------------------------

    def _sessions(self, r: int) -> list[tuple[int, str]]:
        """(pid, state) of replica r's database sessions (pool and listener)."""
        import psycopg

        name = self.controls[r].name
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid, coalesce(state, '') FROM pg_stat_activity"
                " WHERE application_name IN (%s, %s) AND datname = current_database()",
                (f"tether-control {name}", f"tether-control-listen {name}"),
            ).fetchall()
        return [(int(pid), str(state)) for pid, state in rows]

    def _pause_in_append(self, r: int, wait_s: float = 4.0) -> None:
        """SIGSTOPs replica r once one of its ledger appends waits on the ledger's lock,
        which this holds meanwhile: released, the append takes the lock and the replica
        sits paused inside its transaction holding it (or SIGSTOPs anyway after `wait_s`)."""
        import psycopg

        from tether.store.postgres import LEDGER_LOCK_KEY

        name = f"tether-control {self.controls[r].name}"
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (LEDGER_LOCK_KEY,))
            try:
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:
                    row = conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock' AND datname = current_database()",
                        (name,),
                    ).fetchone()
                    if row is not None:
                        break
                    time.sleep(0.005)
                self.controls[r].signal(signal.SIGSTOP)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LEDGER_LOCK_KEY,))

    def _terminate(self, r: int) -> int:
        import psycopg

        pids = [pid for pid, _ in self._sessions(r)]
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return len(pids)

    async def _replica_fault(self, fault: Fault) -> None:
        """sigstop-control-tx: pause a replica inside a transaction; pgkill-control:
        pg_terminate_backend every session of a replica (as a database failover would)."""
        proc = self.controls[fault.target]
        facts = self.outcome.replicas
        async with proc.lock:
            if not proc.alive():
                await self._restart(proc)
            began = time.time()
            self.log(f"fault {fault.describe()} on {proc.name}")
            if fault.kind == "pgkill-control":
                n = await asyncio.to_thread(self._terminate, fault.target)
                facts["pgkill_sessions"] = facts.get("pgkill_sessions", 0) + n
            else:
                facts["sigstop_tx_faults"] = facts.get("sigstop_tx_faults", 0) + 1
                await asyncio.to_thread(self._pause_in_append, fault.target)
                await asyncio.sleep(0.3)
                states = {st for _, st in await asyncio.to_thread(self._sessions, fault.target)}
                if "idle in transaction" in states:  # paused mid-transaction, locks held
                    facts["sigstop_in_tx"] = facts.get("sigstop_in_tx", 0) + 1
                await asyncio.sleep(fault.hold_s)
                proc.signal(signal.SIGCONT)
            self.replica_faults.append((began, time.time()))

    async def update_policy(self) -> None:
        """Applies a new policy version (same rules, a new digest) through one replica.

        A replica that is down or paused at that moment is skipped for another (tries
        for up to a minute; the faults go on meanwhile).
        """
        from tether.core.policy import parse_policy

        pki = make_pki(self.pki_dir, [])
        deadline = time.monotonic() + 60
        while True:
            r = self.rng.randrange(self.cfg.control_planes)
            text = self.policy + f"\n# revision 2, applied through {self.controls[r].name}\n"
            try:
                async with ControlClient(
                    self.control_addr[r], tls=pki.operator_tls(Role.ADMIN), timeout_s=5
                ) as admin:
                    await admin.put_policy(text)
                break
            except TetherError as err:
                if time.monotonic() > deadline:
                    raise
                self.log(f"policy update through {self.controls[r].name}: {err.reason}; retry")
                await asyncio.sleep(0.5)
        self.policy_t0_ms = int(time.time() * 1000)
        self.policy_new_digest = parse_policy(text).digest
        self.outcome.replicas["policy_updated"] = self.controls[r].name
        self.log(f"policy revision 2 applied through {self.controls[r].name}")

    def check_replicas(self, leases: list[Any]) -> None:
        """The policy bound, one checkpoint signer per term, claim errors in replica faults."""
        out, facts = self.outcome, self.outcome.replicas
        if self.policy_t0_ms:
            bound = self.policy_t0_ms + self.cfg.policy_bound_ms
            late = [lease for lease in leases if lease.issued_unix_ms > bound]
            stale = [x for x in late if x.policy_digest != self.policy_new_digest]
            facts["policy_leases_after_bound"] = len(late)
            for lease in stale[:5]:
                out.violations.append(
                    f"lease {lease.task_id}/{lease.fencing_token} signed "
                    f"{lease.issued_unix_ms - self.policy_t0_ms} ms after the policy update "
                    f"carries the old digest (bound {self.cfg.policy_bound_ms} ms)"
                )
            if len(stale) > 5:
                out.violations.append(f"{len(stale) - 5} more stale-policy leases")
        signings: list[tuple[int, str, int]] = []
        for proc in self.controls:
            log = self.root / "control" / f"{proc.name}.log"
            for line in log.read_text().splitlines() if log.exists() else []:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    doc = json.loads(line)
                    if doc.get("msg") == "checkpoint signed":
                        signings.append(
                            (int(doc["signed_unix_ms"]), str(doc["replica"]), int(doc["epoch"]))
                        )
        signings.sort()
        terms: dict[int, set[str]] = defaultdict(set)
        for _, replica, epoch in signings:
            terms[epoch].add(replica)
        facts["checkpoints_signed"] = len(signings)
        facts["checkpoint_terms"] = len(terms)
        facts["checkpoint_signers"] = sorted({r for rs in terms.values() for r in rs})
        for epoch, replicas in terms.items():
            if len(replicas) > 1:
                out.violations.append(f"checkpoint term {epoch} signed by {sorted(replicas)}")
        epochs = [e for _, _, e in signings]
        back = [(a, b) for a, b in itertools.pairwise(epochs) if b < a]
        if back:
            out.violations.append(
                f"a checkpoint of an earlier term signed after a later one: terms {back[:3]}"
            )
        claims = errors = during = 0
        for agent in self.agents:
            log = self.root / "logs" / f"{agent.name}.log"
            own = self.sidecar_faults[self.sidecar_of(agent)]
            for line in log.read_text().splitlines() if log.exists() else []:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("event") == "claimed":
                        claims += 1
                    elif doc.get("event") == "claim_failed":
                        errors += 1
                        t = float(doc.get("t", 0))
                        # A replica's fault, not the agent's own sidecar or link being down.
                        if any(a <= t <= b + 5 for a, b in self.replica_faults) and not any(
                            a <= t <= b + 10 for a, b in own
                        ):
                            during += 1
        facts.update(
            claims=claims,
            claim_errors=errors,
            claim_errors_in_replica_faults=during,
            replica_fault_seconds=sum(b - a for a, b in self.replica_faults),
        )

    async def watch(self) -> None:
        """Notes processes that exit without being told to, and restarts them."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            for proc in [*self.controls, *self.sidecars, *self.agents]:
                if proc.lock.locked() or proc.popen is None or proc.alive() or proc.expected_exit:
                    continue
                async with proc.lock:
                    if proc.alive() or self._stopping:
                        continue
                    log = self.root / "logs" / f"{proc.name}.log"
                    if proc.kind == "sidecar":
                        log = self.root / self.node_id(proc.index) / "sidecar.log"
                    elif proc.kind == "control":
                        log = self.root / "control" / f"{proc.name}.log"
                    self.outcome.violations.append(
                        f"{proc.name} exited on its own with {proc.popen.returncode} (see {log})"
                    )
                    await self._restart(proc)

    # -- the end ----------------------------------------------------------------------

    async def settle(self) -> dict[str, Any]:
        """Waits until every task ended; returns the control plane's view of them."""
        deadline = time.monotonic() + self.cfg.settle_timeout_s
        tasks: dict[str, Any] = {}
        while True:
            try:
                async with self.admin() as admin:
                    listed = await admin.list_all_tasks(queue=QUEUE)
                tasks = {t.task_id: t for t in listed}
            except TetherError as err:
                self.log(f"settle: {err.reason}")
            open_ = [t for t in tasks.values() if state_name(t.state) not in TERMINAL_NAMES]
            if tasks and not open_ and len(tasks) >= len(self.task_ids):
                return tasks
            if time.monotonic() > deadline:
                return tasks
            await asyncio.sleep(1.0)

    async def drain_spools(self, timeout_s: float = 60.0) -> None:
        """Waits until every sidecar's spool is acknowledged by the ledger."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(_spool_acked(self.root / self.node_id(i)) for i in range(self.cfg.sidecars)):
                return
            await asyncio.sleep(0.5)

    async def stop(self, procs: list[Proc]) -> None:
        """SIGTERM (SIGKILL after 20 s) to `procs`, waiting for each."""
        for proc in procs:
            proc.expected_exit = True
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        for proc in procs:
            if await proc.wait(20) is None:
                self.outcome.incidents.append(f"{proc.name} ignored SIGTERM at the end; killed")
                proc.signal(signal.SIGKILL)
                await proc.wait(10)

    async def stop_all(self) -> None:
        self._stopping = True
        for group in (self.agents, self.sidecars, self.controls, [self.sink]):
            await self.stop(group)
        for i in range(len(self.proxies)):
            for link in self.links(i):
                await link.close()
        if self._admin is not None:
            await self._admin.close()
        if self.db_url:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._drop_database)

    def operator_args(self) -> list[str]:
        pki = make_pki(self.pki_dir, [])
        cert, key = pki.write_operator(Role.ADMIN, "chaos-admin")
        return [
            "--control", self._any_control(), "--tls-ca", str(pki.trust_bundle),
            "--tls-cert", str(cert), "--tls-key", str(key),
        ]  # fmt: skip

    async def export_and_verify(self) -> bytes:
        """`tether receipts export --all`, then `tether verify` on it; returns the bundle."""
        bundle = self.root / "bundle.json"
        tether = [sys.executable, "-m", "tether.cli"]
        exported = await asyncio.to_thread(
            subprocess.run,
            [*tether, "receipts", "export", *self.operator_args(), "--all", "--out", str(bundle)],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        if exported.returncode != 0:
            self.outcome.violations.append(
                f"export failed ({exported.returncode}): {exported.stderr.decode()[-500:]}"
            )
            return b""
        trust = make_pki(self.pki_dir, []).trust_bundle
        checked = await asyncio.to_thread(
            subprocess.run,
            [*tether, "verify", str(bundle), "--trust", str(trust), "--json"],
            capture_output=True, timeout=600, check=False,
        )  # fmt: skip
        self.outcome.verify_exit = checked.returncode
        with contextlib.suppress(ValueError):
            report = json.loads(checked.stdout)
            self.outcome.verify_failures = [
                f"{f['ref']}: {f['check']}: {f['why']}" for f in report.get("failures", [])
            ]
            self.outcome.verify_warnings = len(report.get("warnings", []))
        if checked.returncode != 0 and not self.outcome.verify_failures:
            self.outcome.verify_failures = [checked.stderr.decode()[-500:]]
        return bundle.read_bytes()

    # -- invariants -------------------------------------------------------------------

    def check(self, tasks: dict[str, Any], bundle_bytes: bytes) -> None:
        """Checks every invariant; appends what fails to `outcome.violations`."""
        out = self.outcome
        seed = self.cfg.seed
        for t in tasks.values():
            out.tasks_by_state[state_name(t.state)] += 1
            out.attempts_max = max(out.attempts_max, int(t.attempt))
        missing = set(self.task_ids) - set(tasks)
        if missing:
            out.violations.append(f"{len(missing)} submitted tasks unknown to the control plane")
        if len(tasks) != len(self.task_ids):
            out.violations.append(
                f"{len(tasks)} tasks in the queue for {len(self.task_ids)} submitted"
            )
        for tid, t in tasks.items():
            if state_name(t.state) not in TERMINAL_NAMES:
                out.violations.append(
                    f"task {tid} did not end: {state_name(t.state)} attempt {t.attempt} "
                    f"(seed {seed})"
                )

        # What agents were told: one completion per task, matching the control plane.
        told: dict[str, list[str]] = defaultdict(list)
        for event in _agent_events(self.root / "logs"):
            if event.get("event") == "completed":
                told[str(event.get("task_id"))].append(str(event.get("state")))
        for tid, states in told.items():
            final = state_name(tasks[tid].state) if tid in tasks else "unknown"
            if len(states) > 1 or states[0] != final:
                out.violations.append(
                    f"task {tid}: agents were told {states}, the control plane says {final} "
                    f"(seed {seed})"
                )

        # The ledger: final receipts, leases.
        finals: dict[str, list[int]] = defaultdict(list)
        ledger: Counter[bytes] = Counter()
        grants: dict[str, list[tuple[int, int]]] = defaultdict(list)  # task -> (issued, token)
        if bundle_bytes:
            bundle = decode_bundle(bundle_bytes, canonical=False)
            for entry in bundle.entries:
                ledger[entry.envelope] += 1
                try:
                    _, receipt = parse_receipt(entry.envelope)
                except Exception:  # a control-signed entry of another shape
                    continue
                if receipt.kind == ReceiptKind.TASK_FINISHED:
                    finals[receipt.task_id].append(receipt.final_state)
            leases = []
            for env in bundle.leases:
                lease = decode_lease(env.payload)
                leases.append(lease)
                grants[lease.task_id].append((lease.issued_unix_ms, lease.fencing_token))
            if self.cfg.control_planes > 1:
                self.check_replicas(leases)
        out.ledger_entries = sum(ledger.values())
        for tid, t in tasks.items():
            if state_name(t.state) not in TERMINAL_NAMES:
                continue
            got = finals.get(tid, [])
            if len(got) != 1:
                out.violations.append(
                    f"task {tid} ({state_name(t.state)}) has {len(got)} final receipts in the "
                    f"ledger (seed {seed})"
                )
            elif got[0] != int(t.state):
                out.violations.append(
                    f"task {tid}: final receipt says {state_name(got[0])}, the control plane "
                    f"{state_name(t.state)} (seed {seed})"
                )
        dup = [e for e, n in ledger.items() if n > 1]
        if dup:
            out.violations.append(f"{len(dup)} envelopes appear more than once in the ledger")

        # The sink: stale writes and repeated side effects.
        records = _sink_records(self.root / "sink.jsonl")
        out.sink_writes = len(records)
        keyed: Counter[tuple[str, str]] = Counter()
        for rec in records:
            task_id = rec["resource"].rsplit("/", 1)[-1]
            keyed[(task_id, rec["key"])] += 1
            if not rec["accepted"]:
                out.sink_refused_stale += 1
                out.violations.append(
                    f"stale write reached the sink: task {task_id} token {rec['token']} < "
                    f"{rec['highest']} (key {rec['key']}, seed {seed})"
                )
                continue
            newer = [
                (issued, tok)
                for issued, tok in grants.get(task_id, [])
                if tok > rec["token"] and issued <= rec["unix_ms"]
            ]
            if newer:
                issued, tok = min(newer)
                out.violations.append(
                    f"stale write reached the sink: task {task_id} token {rec['token']} at "
                    f"{rec['unix_ms']}, after lease token {tok} was granted at {issued} "
                    f"(key {rec['key']}, seed {seed})"
                )
        for (task_id, key), n in keyed.items():
            if n > 1:
                out.violations.append(
                    f"keyed side effect ran {n} times: task {task_id} key {key} (seed {seed})"
                )

        # Spools against the ledger.
        for i in range(self.cfg.sidecars):
            node = self.node_id(i)
            spooled = _spool_envelopes(self.root / node)
            out.spooled += len(spooled)
            lost = [seq for seq, env in spooled if ledger[env] != 1]
            if lost:
                out.violations.append(
                    f"{node}: {len(lost)} spooled receipts not in the ledger exactly once "
                    f"(seqs {lost[:5]}..., seed {seed})"
                )
        if out.verify_exit != 0:
            out.violations.append(
                f"tether verify exited {out.verify_exit} on the untampered export "
                f"(seed {seed}): {'; '.join(out.verify_failures[:3])}"
            )


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _ready_lines(control_dir: Path, address: str) -> str:
    """The enrolment address written beside `address` in the newest ready file."""
    for ready in sorted(control_dir.glob("ready-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        lines = ready.read_text().splitlines()
        if lines and lines[0] == address and len(lines) > 1:
            return lines[1]
    raise RuntimeError(f"no ready file names {address}")


def _agent_events(logs: Path) -> list[dict[str, Any]]:
    """Every JSON event the agents printed (a line cut short by SIGKILL is skipped)."""
    events = []
    for path in sorted(logs.glob("agent-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    return events


def _sink_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spool_db(node_dir: Path) -> Path:
    return node_dir / "state" / "spool.db"


def _spool_acked(node_dir: Path) -> bool:
    path = _spool_db(node_dir)
    if not path.exists():
        return True
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM spool").fetchone()[0]
        acked = db.execute("SELECT acked_seq FROM spool_state").fetchone()
    return acked is not None and int(acked[0]) >= int(last)


def _spool_envelopes(node_dir: Path) -> list[tuple[int, bytes]]:
    path = _spool_db(node_dir)
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        rows = db.execute("SELECT seq, envelope FROM spool ORDER BY seq").fetchall()
    return [(int(seq), bytes(env)) for seq, env in rows]


async def run_chaos(cfg: ChaosConfig, progress: Callable[[str], None] = print) -> Outcome:
    """One chaos run: start, inject the schedule while tasks arrive, heal, check."""
    started = time.monotonic()
    cluster = Cluster(cfg)
    plan = schedule(cfg)
    cluster.outcome.faults_planned = len(plan)
    (cfg.root).mkdir(parents=True, exist_ok=True)
    (cfg.root / "schedule.txt").write_text("\n".join(f.describe() for f in plan) + "\n")
    progress(f"chaos seed {cfg.seed}: {len(plan)} faults, {cfg.tasks} tasks over "
             f"{cfg.duration_s:.0f}s; state in {cfg.root}")  # fmt: skip
    try:
        await cluster.start()
        progress(
            f"  started: {cfg.control_planes} control plane(s) ({cfg.store}), {cfg.sidecars} "
            f"sidecars, {len(cluster.agents)} agents, sink {cluster.sink_url}"
        )
        watcher = asyncio.create_task(cluster.watch())
        window = time.monotonic()

        async def fire(fault: Fault) -> None:
            await asyncio.sleep(max(0.0, window + fault.at_s - time.monotonic()))
            try:
                await cluster.inject(fault)
            except Exception as err:  # a harness failure is reported, not raised
                cluster.outcome.incidents.append(f"{fault.describe()}: {err!r}"[:300])

        async def update_policy() -> None:
            await asyncio.sleep(max(0.0, window + cfg.policy_update_at_s - time.monotonic()))
            try:
                await cluster.update_policy()
            except Exception as err:
                cluster.outcome.incidents.append(f"policy update: {err!r}"[:300])

        submitter = asyncio.create_task(cluster.submit_all())
        firing = [asyncio.create_task(fire(f)) for f in plan]
        if cfg.policy_update_at_s:
            firing.append(asyncio.create_task(update_policy()))
        await submitter
        await asyncio.gather(*firing)
        progress(f"  faults done ({sum(cluster.outcome.faults_by_kind.values())}); settling")
        for i in range(cfg.sidecars):
            for link in cluster.links(i):
                link.heal()
        tasks = await cluster.settle()
        cluster._stopping = True
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        for agent in cluster.agents:
            agent.expected_exit = True
            agent.signal(signal.SIGTERM)
        await cluster.drain_spools()
        await cluster.stop(cluster.agents + cluster.sidecars)  # spools closed before reading
        bundle = await cluster.export_and_verify()
        await cluster.stop_all()
        cluster.check(tasks, bundle)
    finally:
        if any(p.alive() for p in [*cluster.agents, *cluster.sidecars, *cluster.controls]):
            await cluster.stop_all()
    cluster.outcome.seconds = time.monotonic() - started
    (cfg.root / "summary.json").write_text(
        json.dumps(cluster.outcome.to_dict(), indent=2, default=str)
    )
    return cluster.outcome

"""Exports at scale against a real control plane process whose ledger holds 100,000 receipts.

The ledger is one node's chain of 100,000 real receipts (signed by the node key,
chained by prev, about leases the control key signed), written into the store
straight through SQL as the contract suite's ingest would leave them (ingest
itself is covered by tests/integration/test_ledger_pipeline.py and costs more
than this whole module may). One task's 40 receipts are spread through the
chain between other tasks' receipts. The control plane then starts over that
database, and the real CLI exports and verifies.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from control_fixtures import operator_args

from tether.core.leases import Lease
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.leases import sign_lease
from tether.crypto.merkle import leaf_hash
from tether.crypto.pki import Role
from tether.crypto.receipts import ReceiptChain, envelope_digest, sign_receipt, subject_for
from tether.crypto.signing import INTOTO_PAYLOAD_TYPE, SigningKey
from tether.testing import ControlEndpoint, endpoint, spawn_control_cli
from tether.verify.builder import seeded_key

pytestmark = pytest.mark.slow

RECEIPTS = 100_000
TASKS = 1_000
TARGET = "target-task"
NODE = "node-a"
AGENT = "agent-1"
# The target task's receipts: every 2,500th position, plus one right after the first
# (so two of them are consecutive in the chain and their prev link is checked).
TARGET_AT = frozenset({*range(1234, RECEIPTS, 2500), 1235})


@dataclass
class Ledger:
    """The prepared control plane: its process, endpoint and what the ledger holds."""

    proc: subprocess.Popen[bytes]
    ep: ControlEndpoint
    tmp: Path
    trust: Path
    target_seqs: list[int]


def _lease(key: SigningKey, task: str, token: int, issued: int) -> tuple[Lease, bytes]:
    lease = Lease(
        lease_id=f"lease-{task}",
        task_id=task,
        attempt=1,
        node_id=NODE,
        agent_id=AGENT,
        fencing_token=token,
        issued_unix_ms=issued,
        expires_unix_ms=issued + 3_600_000,
        policy_digest="ab" * 32,
        queue="work",
        tools=("http.get",),
    )
    return lease, sign_lease(lease, key).to_json_bytes()


def _receipt(lease: Lease, kind: ReceiptKind, t: int, **extra: object) -> Receipt:
    return Receipt(
        kind=kind,
        node_id=NODE,
        task_id=lease.task_id,
        attempt=1,
        fencing_token=lease.fencing_token,
        agent_id=AGENT,
        lease_id=lease.lease_id,
        lease_issued_unix_ms=lease.issued_unix_ms,
        lease_expires_unix_ms=lease.expires_unix_ms,
        time_unix_ms=t,
        policy_digest=lease.policy_digest,
        **extra,  # type: ignore[arg-type]
    )


class _FastChain:
    """Signs tool-call receipts of the chain without protobuf's JSON encoder (~3x faster).

    The statement is the reference encoder's output for a template receipt with
    its changing members replaced in place (json keeps member order), so the
    bytes are exactly what `sign_receipt` writes; `__init__` checks that.
    """

    def __init__(self, key: SigningKey, chain: ReceiptChain, lease: Lease) -> None:
        self.key, self.chain = key, chain
        from tether.crypto.receipts import statement_bytes

        sample = _receipt(lease, ReceiptKind.TOOL_CALL, 1, tool="http.get", status="ok")
        sample = dataclasses.replace(sample, seq=2, prev="00" * 32)
        self.doc = json.loads(statement_bytes(sample))
        assert self._statement(sample) == statement_bytes(sample)

    def _statement(self, r: Receipt) -> bytes:
        p = self.doc["predicate"]
        p["seq"], p["prev"], p["taskId"] = str(r.seq), r.prev, r.task_id
        p["fencingToken"], p["leaseId"] = str(r.fencing_token), r.lease_id
        p["leaseIssuedUnixMs"] = str(r.lease_issued_unix_ms)
        p["leaseExpiresUnixMs"] = str(r.lease_expires_unix_ms)
        p["timeUnixMs"] = str(r.time_unix_ms)
        self.doc["subject"] = [subject_for(r)]
        return json.dumps(self.doc, separators=(",", ":"), ensure_ascii=False).encode()

    def sign(self, lease: Lease, t: int) -> bytes:
        c = self.chain
        r = _receipt(lease, ReceiptKind.TOOL_CALL, t, tool="http.get", status="ok")
        r = dataclasses.replace(r, seq=c.last_seq + 1, prev=c.last_digest)
        data = self.key.sign_envelope(INTOTO_PAYLOAD_TYPE, self._statement(r)).to_json_bytes()
        if c.last_seq < 3:  # the fast path must write what the reference encoder writes
            assert data == sign_receipt(r, self.key)
        c.last_seq, c.last_digest = r.seq, envelope_digest(data)
        return data


def _fill(db: Path, control: SigningKey, node_key: SigningKey, start: int) -> list[int]:
    """Writes the chain and the leases into the store; returns the target task's seqs."""
    leases = [_lease(control, f"task-{i:04d}", 1, start) for i in range(TASKS)]
    target, target_env = _lease(control, TARGET, 1, start)
    chain = ReceiptChain(NODE, node_key)
    fast = _FastChain(node_key, chain, leases[0][0])
    rows: list[tuple[object, ...]] = []
    seqs: list[int] = []
    last = max(TARGET_AT)
    for i in range(RECEIPTS):
        t = start + 1_000 + i // 100
        if i in TARGET_AT:
            kind = ReceiptKind.TOOL_CALL
            extra: dict[str, object] = {"tool": "http.get", "status": "ok"}
            if i == min(TARGET_AT):
                kind, extra = ReceiptKind.LEASE_GRANTED, {}
            elif i == last:
                kind, extra = ReceiptKind.TASK_FINISHED, {"final_state": 4}
            data = chain.sign(_receipt(target, kind, t, **extra))
            seqs.append(chain.last_seq)
            task = TARGET
        elif i == 0:
            data = chain.sign(_receipt(leases[0][0], ReceiptKind.LEASE_GRANTED, t))
            task = leases[0][0].task_id
        else:
            lease = leases[i % TASKS][0]
            data = fast.sign(lease, t)
            task = lease.task_id
        rows.append((i, NODE, chain.last_seq, task, data, leaf_hash(data), envelope_digest(data)))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO ledger_leaves VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(*r, start + 500) for r in rows],
    )
    conn.executemany(
        "INSERT INTO lease_history (task_id, lease_id, fencing_token, kind, envelope,"
        " outcome, created_unix_ms) VALUES (?, ?, ?, 'grant', ?, 'finished', ?)",
        [
            (lease.task_id, lease.lease_id, 1, env, start)
            for lease, env in [*leases, (target, target_env)]
        ],
    )
    conn.execute("COMMIT")
    conn.close()
    return seqs


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """A control plane process over a ledger of 100,000 receipts of node-a."""
    import asyncio

    tmp = tmp_path_factory.mktemp("export-scale")
    control = seeded_key("export-scale/control")
    node_key = seeded_key("export-scale/node")
    (tmp / "keys").mkdir()
    control.save(tmp / "keys" / "control.key", tmp / "keys" / "control.pub")
    proc, address = spawn_control_cli(tmp, vault=False)
    try:

        async def enrol() -> None:
            client = await endpoint(address).node_client(NODE, node_key)
            await client.close()

        asyncio.run(enrol())  # the node's certificate, issued now by the control plane
        start = int(time.time() * 1000)
    finally:
        _stop(proc)
    seqs = _fill(tmp / "control.db", control, node_key, start)
    proc, address = spawn_control_cli(tmp, vault=False, timeout_s=60)
    try:
        yield Ledger(proc, endpoint(address), tmp, tmp / "keys" / "control.pub", seqs)
    finally:
        _stop(proc)


# The process's own peak RSS (VmHWM starts afresh at exec; getrusage's ru_maxrss would
# also count the forking pytest's).
_MAXRSS = (
    "import sys\n"
    "from tether.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0].split()[1]\n"
    "print('MAXRSS_KB', hwm, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _cli(*args: str, timeout: float = 300) -> tuple[int, str, str, int]:
    """Runs the tether CLI in a subprocess; (exit code, stdout, stderr, peak RSS in KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _MAXRSS, *args], capture_output=True, text=True, timeout=timeout
    )
    peak = 0
    for line in done.stderr.splitlines():
        if line.startswith("MAXRSS_KB "):
            peak = int(line.split()[1])
    return done.returncode, done.stdout, done.stderr, peak


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_per_task_export_from_a_node_with_100k_receipts_holds_only_that_task(
    ledger: Ledger,
) -> None:
    """One task exported from a node whose chain holds 100,000 receipts: the bundle holds
    exactly that task's receipts and leases (none of the 999 other tasks'), and verifies."""
    out = ledger.tmp / "task.json"
    rc, _, err, _ = _cli(
        "receipts", "export", *operator_args(ledger.ep, Role.AUDITOR), "--task", TARGET,
        "--out", str(out),
    )  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out.read_bytes())
    tasks = set()
    seqs = []
    for e in doc["entries"]:
        env = json.loads(base64.b64decode(e["envelope"]))
        pred = json.loads(base64.b64decode(env["payload"]))["predicate"]
        tasks.add(pred["taskId"])
        seqs.append(int(pred["seq"]))
    assert tasks == {TARGET}
    assert len(seqs) == len(TARGET_AT)
    assert seqs == ledger.target_seqs
    assert len(doc["leases"]) == 1
    assert int(doc["checkpoint"]["treeSize"]) == RECEIPTS
    rc, stdout, err, _ = _cli("verify", str(out), "--trust", str(ledger.trust), "--quiet")
    assert rc == 0, stdout + err
    assert stdout.startswith(f"VALID: {len(TARGET_AT)} receipts, 1 nodes, 1 tasks, ")
    assert f"per-task export of {TARGET}" in stdout
    assert out.stat().st_size < 200_000  # 40 receipts and their proofs, not the chain


def test_full_export_of_100k_receipts_streams_in_bounded_memory(ledger: Ledger) -> None:
    """A full export of 100,000 receipts (a bundle of hundreds of MB) streams to disk:
    neither the exporting CLI's peak RSS nor the control plane's grows with the bundle."""
    args = operator_args(ledger.ep, Role.AUDITOR)
    small = ledger.tmp / "small.json"
    rc, _, err, small_peak = _cli(
        "receipts", "export", *args, "--task", TARGET, "--out", str(small)
    )
    assert rc == 0, err
    pid = ledger.proc.pid
    server_before = _proc_kb(pid, "VmRSS")
    out = ledger.tmp / "all.json"
    rc, _, err, peak = _cli("receipts", "export", *args, "--all", "--out", str(out))
    assert rc == 0, err
    server_peak = _proc_kb(pid, "VmHWM")
    size = out.stat().st_size
    print(
        f"bundle {size / 2**20:.0f} MiB; CLI peak RSS {peak / 1024:.0f} MiB (per-task export "
        f"{small_peak / 1024:.0f} MiB); control plane RSS {server_before / 1024:.0f} MiB "
        f"before, peak {server_peak / 1024:.0f} MiB"
    )
    assert size > 200 * 2**20
    assert f"wrote {out}: {RECEIPTS} receipts (whole chains)" in err
    # Generous bounds (allocator noise, gRPC buffers), far below the bundle's size.
    assert peak - small_peak < 64 * 1024, "the exporting CLI's memory grew with the bundle"
    assert server_peak - server_before < 96 * 1024, "the control plane's memory grew"
    with open(out, "rb") as f:
        head = f.read(64)
        f.seek(-(1 << 16), 2)
        tail = f.read()
    assert head.startswith(b'{"version":1,"entries":[{"envelope":"')
    assert b'"manifest":{"payload":"' in tail
    assert tail.endswith(b"}}\n")
    assert not (ledger.tmp / "all.json.partial").exists()


def test_export_cut_by_a_dying_control_plane_leaves_no_bundle(ledger: Ledger) -> None:
    """A control plane killed in the middle of a full export: the CLI fails with one line
    (no traceback), and neither the bundle nor its .partial file is left behind."""
    # A second control plane process over the same database, so the module's stays up.
    proc, address = spawn_control_cli(ledger.tmp, vault=False, timeout_s=60)
    out = ledger.tmp / "cut.json"
    partial = ledger.tmp / "cut.json.partial"
    try:
        cli = subprocess.Popen(
            [
                sys.executable, "-m", "tether.cli", "receipts", "export",
                *operator_args(endpoint(address), Role.AUDITOR), "--all", "--out", str(out),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and cli.poll() is None:
            if partial.exists() and partial.stat().st_size > 20 * 2**20:
                break
            time.sleep(0.05)
        assert cli.poll() is None, "the export ended before it could be cut"
        proc.kill()
        _, err = cli.communicate(timeout=60)
    finally:
        _stop(proc)
    assert cli.returncode != 0
    assert "Traceback" not in err
    assert not out.exists()
    assert not partial.exists()

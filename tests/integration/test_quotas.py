"""Quotas per task and agent, against a real control plane and a real sidecar.

Memory keys and bytes per owner, artifact bytes per task, workspace bytes per
task and refusal receipts per minute per (task, agent): each refusal is
RESOURCE_EXHAUSTED naming its quota, and nothing is written past the quota
(checked outside the sidecar: memory, files on disk, receipts in the spool).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from tether import metrics
from tether.core import errors as E
from tether.core.clock import FakeClock
from tether.core.receipts import ReceiptKind
from tether.crypto.receipts import parse_receipt
from tether.sidecar.config import ENV_VARS, load
from tether.sidecar.memory import Scope
from tether.sidecar.quotas import MIN_ENTRY_BYTES, DenialLimiter, tree_bytes
from tether.testing import SidecarHandle, start_control, start_sidecar

DEPLOY_DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
FILL_CODE = "import sys; open(sys.argv[2], 'wb').write(b'x' * int(sys.argv[1]))"


def policy(notes: Path) -> str:
    """alice and bob work on "work": an exec tool that fills a workspace file, a python
    tool that appends outside any workspace; agent-scoped memory is granted."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = ["work"]
[tools.fill]
adapter = "exec"
[tools.fill.exec]
argv = ["python3", "-c", "{FILL_CODE}", "{{n}}", "{{file}}"]
params = ["n", "file"]
path_params = ["file"]
[tools.note]
adapter = "python"
[tools.note.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{notes}" }}
[queues.work]
tools = ["fill", "note"]
memory_scope = "agent"
filesystem_scope = "workspace"
lease_ttl_ms = 30000
"""


def kinds(side: SidecarHandle, task_id: str) -> list[ReceiptKind]:
    """The kinds of the task's receipts in the sidecar's spool, in order."""
    return [parse_receipt(env)[1].kind for env in side.sidecar._sink.envelopes(task_id)]


async def test_memory_key_quota_refuses_a_new_key_and_writes_nothing(tmp_path: Path) -> None:
    """Past memory_max_keys a Remember of a new key is RESOURCE_EXHAUSTED naming the quota and
    stores nothing, also when many writes race; overwriting a key and another owner still work."""
    async with start_control(tmp_path, policy=policy(tmp_path / "notes")) as cp:
        await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, memory_max_keys=3) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            tid = task.task_id
            results = await asyncio.gather(
                *(alice.remember(tid, f"k{i}", b"v") for i in range(10)), return_exceptions=True
            )
            refused = [r for r in results if isinstance(r, E.ResourceExhausted)]
            assert len(refused) == 7
            assert sum(isinstance(r, str) for r in results) == 3  # sha256 of the stored ones
            assert "memory_max_keys = 3" in refused[0].message
            assert refused[0].metadata["quota"] == "memory_max_keys"
            stored = [i for i in range(10) if await alice.recall(tid, f"k{i}") is not None]
            assert len(stored) == 3
            memory = side.sidecar.deps.memory
            assert await memory.usage(Scope.TASK, tid) == (3, 3 * 3)
            await alice.remember(tid, f"k{stored[0]}", b"new value")  # an existing key: fine
            assert await alice.recall(tid, f"k{stored[0]}") == b"new value"
            for i in range(3):  # the agent's own memory is another owner with its own quota
                await alice.remember(tid, f"a{i}", b"v", scope="agent")
            with pytest.raises(E.ResourceExhausted, match="memory_max_keys = 3"):
                await alice.remember(tid, "a3", b"v", scope="agent")
            assert await alice.recall(tid, "a3", scope="agent") is None
            writes = kinds(side, tid).count(ReceiptKind.MEMORY_WRITE)
            assert writes == 3 + 1 + 3  # refused writes leave no receipt


async def test_memory_byte_quota_counts_keys_and_values(tmp_path: Path) -> None:
    """Past memory_max_bytes (key plus value bytes, summed per owner) a Remember is refused with
    nothing written; an overwrite counts the new size in place of the old."""
    async with start_control(tmp_path, policy=policy(tmp_path / "notes")) as cp:
        await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, memory_max_bytes=100) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            tid = task.task_id
            await alice.remember(tid, "a", b"x" * 59)  # 60 bytes
            with pytest.raises(E.ResourceExhausted, match="memory_max_bytes = 100") as info:
                await alice.remember(tid, "b", b"x" * 40)  # 60 + 41 > 100
            assert info.value.metadata["quota"] == "memory_max_bytes"
            assert await alice.recall(tid, "b") is None
            await alice.remember(tid, "a", b"y" * 99)  # replaces 60 by 100: exactly the quota
            with pytest.raises(E.ResourceExhausted, match="memory_max_bytes"):
                await alice.remember(tid, "a", b"z" * 100)
            assert await alice.recall(tid, "a") == b"y" * 99
            assert await side.sidecar.deps.memory.usage(Scope.TASK, tid) == (1, 100)


async def test_artifact_task_quota_refuses_while_streaming_and_stores_nothing(
    tmp_path: Path,
) -> None:
    """An upload that would take a task past artifact_max_task_bytes is refused while it
    streams and leaves no file; replacing an artifact counts its new size, racing uploads
    cannot both squeeze in, and each task has its own quota."""
    async with start_control(tmp_path, policy=policy(tmp_path / "notes")) as cp:
        for _ in range(2):
            await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(
                tmp_path, cp.address, agents=("alice", "bob"), artifact_max_task_bytes=2500
            ) as side,
            side.agent("alice") as alice,
            side.agent("bob") as bob,
        ):
            task = await alice.claim("work")
            assert task is not None
            tid = task.task_id
            folder = side.state_dir / "artifacts" / tid
            await alice.put_artifact(tid, "a.bin", b"a" * 1000)
            await alice.put_artifact(tid, "b.bin", b"b" * 1000)
            with pytest.raises(E.ResourceExhausted, match="artifact_max_task_bytes = 2500"):
                await alice.put_artifact(tid, "c.bin", b"c" * 1000)
            assert sorted(os.listdir(folder)) == ["a.bin", "b.bin"]  # no part left behind
            await alice.put_artifact(tid, "a.bin", b"A" * 1400)  # 2000 - 1000 + 1400
            results = await asyncio.gather(
                alice.put_artifact(tid, "d.bin", b"d" * 80),
                alice.put_artifact(tid, "e.bin", b"e" * 80),
                return_exceptions=True,
            )
            assert sum(isinstance(r, E.ResourceExhausted) for r in results) == 1
            assert sum(f.stat().st_size for f in folder.iterdir()) == 2480
            assert kinds(side, tid).count(ReceiptKind.ARTIFACT) == 4
            other = await bob.claim("work")
            assert other is not None
            await bob.put_artifact(other.task_id, "a.bin", b"o" * 2000)


async def test_workspace_quota_refuses_the_next_workspace_call_before_it_runs(
    tmp_path: Path,
) -> None:
    """Once a measurement after an exec call finds the task's workspace over
    workspace_max_bytes, its next exec call is refused (RESOURCE_EXHAUSTED, a tool_denied
    receipt) before it runs, while tools outside the workspace still work."""
    notes = tmp_path / "notes.txt"
    async with start_control(tmp_path, policy=policy(notes)) as cp:
        await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, workspace_max_bytes=64 * 1024) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            tid = task.task_id
            workspace = side.state_dir / "workspaces" / tid
            await alice.call_tool(tid, "fill", {"n": 40_000, "file": "a.bin"})
            # Under the quota before it starts; the measurement after it finds it over.
            await alice.call_tool(tid, "fill", {"n": 40_000, "file": "b.bin"})
            assert (workspace / "b.bin").stat().st_size == 40_000
            with pytest.raises(E.ResourceExhausted, match="workspace_max_bytes = 65536") as info:
                await alice.call_tool(tid, "fill", {"n": 10, "file": "c.bin"})
            assert info.value.metadata["quota"] == "workspace_max_bytes"
            assert not (workspace / "c.bin").exists()
            assert sorted(os.listdir(workspace)) == ["a.bin", "b.bin"]
            await alice.call_tool(tid, "note", {"line": "outside the workspace"})
            assert notes.read_text().splitlines() == ["outside the workspace"]
            envelopes = [parse_receipt(e)[1] for e in side.sidecar._sink.envelopes(tid)]
            denied = [r for r in envelopes if r.kind is ReceiptKind.TOOL_DENIED]
            assert [(r.tool, r.status) for r in denied] == [("fill", "RESOURCE_EXHAUSTED")]
            calls = [r.tool for r in envelopes if r.kind is ReceiptKind.TOOL_CALL]
            assert calls == ["fill", "fill", "note"]


async def test_refusals_past_the_rate_are_refused_without_receipts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past denied_receipts_per_minute refused calls of one (task, agent) are still refused,
    with RESOURCE_EXHAUSTED "too many refused calls" and no receipt, counted once each in
    tether_denials_unrecorded and logged once; another task keeps its own allowance."""
    caplog.set_level(logging.WARNING, logger="tether.sidecar.quotas")
    notes = tmp_path / "notes.txt"
    before = metrics.COUNTERS.get_sample_value("tether_denials_unrecorded_total") or 0.0
    async with start_control(tmp_path, policy=policy(notes)) as cp:
        for _ in range(2):
            await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(
                tmp_path, cp.address, agents=("alice", "bob"), denied_receipts_per_minute=5
            ) as side,
            side.agent("alice") as alice,
            side.agent("bob") as bob,
        ):
            task = await alice.claim("work")
            assert task is not None
            tid = task.task_id
            errors = []
            for _ in range(12):
                with pytest.raises(E.TetherError) as info:
                    await alice.call_tool(tid, "rm-rf", {})
                errors.append(info.value)
            assert all(isinstance(e, E.PolicyDenied) for e in errors[:5])
            assert all(isinstance(e, E.ResourceExhausted) for e in errors[5:])
            assert "too many refused calls" in errors[5].message
            assert errors[5].metadata["quota"] == "denied_receipts_per_minute"
            assert kinds(side, tid).count(ReceiptKind.TOOL_DENIED) == 5
            after = metrics.COUNTERS.get_sample_value("tether_denials_unrecorded_total")
            assert after == before + 7
            logged = [r for r in caplog.records if "too many refused" in r.getMessage()]
            assert len(logged) == 1
            await alice.call_tool(tid, "note", {"line": "granted calls still run"})
            assert kinds(side, tid).count(ReceiptKind.TOOL_CALL) == 1
            other = await bob.claim("work")
            assert other is not None
            with pytest.raises(E.PolicyDenied):
                await bob.call_tool(other.task_id, "rm-rf", {})
            assert kinds(side, other.task_id).count(ReceiptKind.TOOL_DENIED) == 1


def test_denial_bucket_refills_evenly_over_a_minute() -> None:
    """The refusal-receipt bucket holds `per_minute` at once and regains one every
    60 s / per_minute, per (task, agent)."""
    clock = FakeClock()
    limiter = DenialLimiter(6, clock)
    assert [limiter.allow("t", "a") for _ in range(7)] == [True] * 6 + [False]
    assert limiter.allow("t", "b")  # another agent of the task: its own bucket
    clock.advance(9_999)
    assert not limiter.allow("t", "a")
    clock.advance(1)
    assert limiter.allow("t", "a")
    assert not limiter.allow("t", "a")
    clock.advance(600_000)
    assert sum(limiter.allow("t", "a") for _ in range(10)) == 6


def test_workspace_measure_stops_past_the_quota(tmp_path: Path) -> None:
    """The workspace walk counts each entry at least MIN_ENTRY_BYTES, does not follow links,
    and stops as soon as the count passes the quota."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 10_000)
    (tmp_path / "link").symlink_to("/usr")
    for i in range(100):
        (tmp_path / f"e{i}").touch()
    full = tree_bytes(tmp_path, 1 << 40)
    assert full >= 10_000 + 102 * MIN_ENTRY_BYTES
    assert full < 1_000_000  # /usr was not walked
    assert 2048 < tree_bytes(tmp_path, 2048) < 2048 + 20_000
    assert tree_bytes(tmp_path / "missing", 100) == 0


def test_quota_settings_load_from_toml_and_env_within_their_ranges(tmp_path: Path) -> None:
    """Each quota is a sidecar setting with a production default, read from the TOML file and
    overridden by its TETHER_* variable (documented for deployments); a value out of range is
    refused naming the key."""
    base = {"control": "127.0.0.1:1", "node_id": "n", "key": "k", "agent_tokens": {"a": "t"}}
    defaults = load(base, {})
    assert (defaults.memory_max_keys, defaults.memory_max_bytes) == (1000, 16 << 20)
    assert (defaults.artifact_max_task_bytes, defaults.workspace_max_bytes) == (1 << 30, 1 << 30)
    assert defaults.denied_receipts_per_minute == 60
    toml = tmp_path / "sidecar.toml"
    toml.write_text("memory_max_keys = 10\nworkspace_max_bytes = 4096\n")
    cfg = load(
        base, {"TETHER_MEMORY_MAX_KEYS": "20", "TETHER_DENIED_RECEIPTS_PER_MINUTE": "5"}, toml
    )
    assert (cfg.memory_max_keys, cfg.workspace_max_bytes, cfg.denied_receipts_per_minute) == (
        20,
        4096,
        5,
    )
    for var in (
        "TETHER_MEMORY_MAX_KEYS",
        "TETHER_MEMORY_MAX_BYTES",
        "TETHER_ARTIFACT_MAX_TASK_BYTES",
        "TETHER_WORKSPACE_MAX_BYTES",
        "TETHER_DENIED_RECEIPTS_PER_MINUTE",
    ):
        assert var in ENV_VARS
        assert var in DEPLOY_DOC.read_text(), f"{var} is not documented in docs/deploy.md"
        with pytest.raises(E.ConfigError, match="outside"):
            load(base, {var: "0"})

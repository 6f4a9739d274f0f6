"""The chaos suite's CI mode: real processes, seeded faults, every invariant checked.

A few minutes of SIGKILL/SIGSTOP/SIGTERM of agents, sidecars and the control plane,
network partitions and delays between sidecars and the control plane, and skewed
node clocks, while tasks flow; then every task ended exactly once, no stale write
reached the fencing sink, no keyed side effect ran twice, every spooled receipt is
in the ledger once, and `tether verify` accepts the full export. TETHER_CHAOS_SEED
replays a seed; `make chaos` runs the long mode (tests/chaos/run_chaos.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from chaos_harness import (
    ALL_FAULTS,
    REPLICA_FAULTS,
    ChaosConfig,
    Cluster,
    Fault,
    check_faketime,
    faketime_lib,
    run_chaos,
    schedule,
)

from tether.core.receipts import ReceiptKind
from tether.core.states import State
from tether.verify.builder import T0, BundleBuilder
from tether.verify.bundle import encode_bundle


def _seed() -> int:
    return int(os.environ.get("TETHER_CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))


def _state_dir(seed: int) -> Path:
    """A fresh .chaos/ci-seed-N (or under TETHER_CHAOS_DIR), kept for a post-mortem outside
    pytest's temporary directories, which later runs prune."""
    root = Path(os.environ.get("TETHER_CHAOS_DIR", ".chaos")).resolve() / f"ci-seed-{seed}"
    shutil.rmtree(root, ignore_errors=True)
    return root


def test_schedule_is_a_function_of_the_seed(tmp_path: Path) -> None:
    """The same seed gives the same faults; another seed gives others; every kind can occur."""
    a = schedule(ChaosConfig(seed=7, root=tmp_path, faults=300))
    assert a == schedule(ChaosConfig(seed=7, root=tmp_path, faults=300))
    assert a != schedule(ChaosConfig(seed=8, root=tmp_path, faults=300))
    assert {f.kind for f in a} == set(ALL_FAULTS)
    assert all(isinstance(f, Fault) and 2.0 <= f.at_s <= 100.0 for f in a)
    stops = [f for f in a if f.kind.startswith("sigstop")]
    assert all(f.hold_s > 3.0 for f in stops)  # past the 3 s lease TTL
    assert all(abs(f.skew_s) <= 2.0 for f in a)


def _checked(
    tmp_path: Path,
    sink: list[dict[str, Any]],
    spool_extra: bytes = b"",
    told: tuple[str, ...] = ("succeeded",),
) -> list[str]:
    """Runs the invariant checker on a built ledger (two leases of t1), a sink log and a spool."""
    b = BundleBuilder()
    first = b.lease("t1", "chaos-node-0", "agent-1", token=1, issued=T0)
    spooled = [b.receipt(ReceiptKind.LEASE_GRANTED, first, T0 + 1)]
    b.task("t1", "chaos-node-0", token=2, attempt=2, start=T0 + 5_000, tool_calls=1)
    cluster = Cluster(ChaosConfig(seed=1, root=tmp_path, sidecars=1))
    cluster.task_ids = ["t1"]
    cluster.outcome.verify_exit = 0
    (tmp_path / "sink.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sink))
    state = tmp_path / "chaos-node-0" / "state"
    state.mkdir(parents=True)
    with sqlite3.connect(state / "spool.db") as db:
        db.execute("CREATE TABLE spool (seq INTEGER PRIMARY KEY, envelope BLOB, task_id TEXT)")
        for seq, env in enumerate([*spooled, *([spool_extra] if spool_extra else [])], 1):
            db.execute("INSERT INTO spool VALUES (?, ?, 't1')", (seq, env))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "agent-0-0.log").write_text(
        "".join(
            json.dumps({"event": "completed", "task_id": "t1", "state": t}) + "\n" for t in told
        )
        + '{"event": "compl'  # a line cut short by SIGKILL
    )
    tasks = {"t1": SimpleNamespace(state=int(State.SUCCEEDED), attempt=2)}
    cluster.check(tasks, encode_bundle(b.build()))
    return cluster.outcome.violations


def _write(
    token: int, at: int, key: str, accepted: bool = True, highest: int = 0
) -> dict[str, Any]:
    return {"resource": "/records/t1", "token": token, "key": key, "highest": highest,
            "accepted": accepted, "unix_ms": at}  # fmt: skip


def test_checker_passes_a_clean_run(tmp_path: Path) -> None:
    """Writes under the live lease, one per key, every spooled receipt in the ledger: none."""
    sink = [_write(1, T0 + 100, "t1:step-0"), _write(2, T0 + 5_100, "t1:step-1")]
    assert _checked(tmp_path, sink) == []


def test_checker_names_each_violation(tmp_path: Path) -> None:
    """A write with token 1 after token 2 was granted, a write the sink refused, a key run twice,
    a spooled receipt missing from the ledger and a task completed twice are each reported."""
    sink = [
        _write(1, T0 + 100, "t1:step-0"),
        _write(1, T0 + 6_000, "t1:step-1"),  # token 2 was granted at T0 + 5000
        _write(2, T0 + 6_100, "t1:step-0"),  # step-0 ran again
        _write(1, T0 + 6_200, "t1:step-2", accepted=False, highest=2),
    ]
    violations = _checked(
        tmp_path, sink, spool_extra=b'{"not":"in the ledger"}', told=("succeeded", "failed")
    )
    text = "\n".join(violations)
    assert "token 1 at " in text
    assert "after lease token 2" in text
    assert "token 1 < 2" in text
    assert "ran 2 times: task t1 key t1:step-0" in text
    assert "1 spooled receipts not in the ledger" in text
    assert "agents were told ['succeeded', 'failed'], the control plane says succeeded" in text
    assert len(violations) == 5, text


def test_faketime_skews_python_wall_clock() -> None:
    """Preloaded libfaketime moves time.time() by FAKETIME (what the skew faults rely on)."""
    if faketime_lib() is None:
        pytest.fail("clock-skew faults need libfaketime: apt-get install faketime (.ci/run does)")
    assert abs(check_faketime(-2.0) + 2.0) < 0.5


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_chaos_ci_mode() -> None:
    """Under about 40 seeded faults of every kind, every invariant holds and the export verifies."""
    if faketime_lib() is None:
        pytest.fail("clock-skew faults need libfaketime: apt-get install faketime (.ci/run does)")
    seed = _seed()
    root = _state_dir(seed)
    cfg = ChaosConfig(seed=seed, root=root, tasks=60, faults=40,
                      duration_s=90)  # fmt: skip
    outcome = await run_chaos(cfg, progress=print)
    print(outcome.summary())
    replay = f"chaos seed {seed} failed; replay with TETHER_CHAOS_SEED={seed} (state in {cfg.root})"
    assert outcome.violations == [], f"{replay}\n{outcome.summary()}"
    assert outcome.verify_exit == 0, f"{replay}\n{outcome.summary()}"
    assert sum(outcome.faults_by_kind.values()) == len(schedule(cfg)), outcome.summary()


def test_replica_faults_target_replicas_and_need_postgres(tmp_path: Path) -> None:
    """Replica fault kinds pick a replica as target, and are refused without PostgreSQL."""
    kinds = (*ALL_FAULTS, *REPLICA_FAULTS)
    cfg = ChaosConfig(seed=3, root=tmp_path, faults=300, control_planes=3, store="postgres",
                      fault_kinds=kinds)  # fmt: skip
    plan = schedule(cfg)
    assert {f.kind for f in plan} == set(kinds)
    assert all(0 <= f.target < 3 for f in plan if "control" in f.kind)
    assert all(f.hold_s > 3.0 for f in plan if f.kind == "sigstop-control-tx")
    with pytest.raises(ValueError, match="need store='postgres'"):
        ChaosConfig(seed=3, root=tmp_path, fault_kinds=REPLICA_FAULTS)


@pytest.mark.chaos
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_replicas_ci_mode(tmp_path: Path) -> None:
    """Three replicas on PostgreSQL and four sidecars failing over between them, under
    seeded faults of every kind (replicas paused inside transactions, their sessions
    terminated): every invariant holds, leases signed after the policy bound carry the
    new digest, one checkpoint signer per term, and the export verifies."""
    if faketime_lib() is None:
        pytest.fail("clock-skew faults need libfaketime: apt-get install faketime (.ci/run does)")
    seed = _seed()
    cfg = ChaosConfig(seed=seed, root=tmp_path / f"chaos-replicas-{seed}", tasks=60, faults=40,
                      duration_s=90, sidecars=4, control_planes=3, store="postgres",
                      failover=True, fault_kinds=(*ALL_FAULTS, *REPLICA_FAULTS),
                      policy_update_at_s=45)  # fmt: skip
    outcome = await run_chaos(cfg, progress=print)
    print(outcome.summary())
    replay = (
        f"chaos seed {seed} failed; replay with TETHER_CHAOS_SEED={seed} "
        f"tests/chaos/run_chaos.py --replicas --seed {seed} (state in {cfg.root})"
    )
    assert outcome.violations == [], f"{replay}\n{outcome.summary()}"
    assert outcome.verify_exit == 0, f"{replay}\n{outcome.summary()}"
    assert sum(outcome.faults_by_kind.values()) == len(schedule(cfg)), outcome.summary()
    assert outcome.replicas["policy_updated"], outcome.summary()
    assert outcome.replicas["policy_leases_after_bound"] > 0, outcome.summary()
    assert outcome.replicas["checkpoints_signed"] > 0, outcome.summary()

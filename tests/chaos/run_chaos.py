"""`make chaos`: the chaos suite's long mode, over several seeds, with a summary per seed.

    python tests/chaos/run_chaos.py                      # seeds 1 2 3, the long mode
    python tests/chaos/run_chaos.py --seed 17 --tasks 60 --faults 40 --duration 90

Each seed is at least 200 faults over at least 400 tasks by default. Exits 0 only
when every seed held every invariant and its full export verified; prints the
seeds to replay otherwise. State (logs, spools, sink log, bundle, summary.json)
is kept under --root/seed-N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from chaos_harness import ALL_FAULTS, REPLICA_FAULTS, ChaosConfig, Outcome, run_chaos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, action="append", help="a seed (repeat; default 1 2 3)")
    p.add_argument("--tasks", type=int, default=400, help="tasks per seed (default 400)")
    p.add_argument("--faults", type=int, default=200, help="faults per seed (default 200)")
    p.add_argument("--duration", type=float, default=300.0,
                   help="fault window per seed, seconds (default 300)")  # fmt: skip
    p.add_argument("--sidecars", type=int, default=3)
    p.add_argument("--agents-per-sidecar", type=int, default=2)
    p.add_argument("--control-planes", type=int, default=1)
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--faults-of",
        default=",".join(ALL_FAULTS),
        help=f"comma-separated fault kinds (default all: {','.join(ALL_FAULTS)}; with "
        f"--store postgres also {','.join(REPLICA_FAULTS)})",
    )
    p.add_argument(
        "--failover",
        action="store_true",
        help="give each sidecar every replica (it fails over by itself)",
    )
    p.add_argument(
        "--policy-update-at",
        type=float,
        default=0.0,
        help="seconds into the window to apply a new policy version through one replica",
    )
    p.add_argument(
        "--replicas",
        action="store_true",
        help="the multi-replica scenario: 3 replicas on PostgreSQL, 4 sidecars, failover, "
        "every fault kind including the replica ones, a policy update mid-run",
    )
    p.add_argument("--root", type=Path, default=Path(".chaos"), help="state directory")
    args = p.parse_args(argv)
    if args.replicas:
        args.control_planes, args.sidecars, args.store, args.failover = 3, 4, "postgres", True
        args.faults_of = ",".join((*ALL_FAULTS, *REPLICA_FAULTS))
        args.policy_update_at = args.policy_update_at or args.duration / 2
    seeds = args.seed or [1, 2, 3]
    outcomes: list[Outcome] = []
    started = time.monotonic()
    for seed in seeds:
        root = (args.root / f"seed-{seed}").resolve()
        shutil.rmtree(root, ignore_errors=True)
        cfg = ChaosConfig(
            seed=seed, root=root, tasks=args.tasks, faults=args.faults,
            duration_s=args.duration, sidecars=args.sidecars,
            agents_per_sidecar=args.agents_per_sidecar, control_planes=args.control_planes,
            store=args.store, fault_kinds=tuple(k for k in args.faults_of.split(",") if k),
            settle_timeout_s=max(240.0, args.duration),
            failover=args.failover, policy_update_at_s=args.policy_update_at,
        )  # fmt: skip
        outcome = asyncio.run(run_chaos(cfg))
        print(outcome.summary(), flush=True)
        outcomes.append(outcome)
    failed = [o.seed for o in outcomes if o.violations or o.verify_exit != 0]
    kinds: Counter[str] = Counter()
    for o in outcomes:
        kinds.update(o.faults_by_kind)
    print("═" * 72)
    tasks = sum(o.tasks_submitted for o in outcomes)
    took = time.monotonic() - started
    faults = sum(kinds.values())
    print(f" chaos long mode: {len(seeds)} seeds in {took:.0f}s; {faults} faults, {tasks} tasks")
    print(" faults by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    for o in outcomes:
        print(f"  seed {o.seed}: {sum(o.faults_by_kind.values())} faults, {o.tasks_submitted} "
              f"tasks ({', '.join(f'{k} {v}' for k, v in sorted(o.tasks_by_state.items()))}), "
              f"{len(o.violations)} violations, verify exit {o.verify_exit}")  # fmt: skip
    print(f" {'ALL SEEDS HELD' if not failed else f'FAILED seeds {failed}: replay with --seed N'}")
    print("═" * 72)
    (args.root / "summary.json").write_text(
        json.dumps([o.to_dict() for o in outcomes], indent=2, default=str)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Paired rounds on a noisy machine: the TLS echo, pgqueuer and Tether's batch workers back
to back, so each round's ratios compare figures taken within a minute of each other.

`bench/run.py` runs the peer last, minutes after the lease groups; on a shared machine
whose load moves minute to minute that alone can move `lease_grants_batch_vs_pgqueuer`
several-fold. Each round here measures, in order: the mutual-TLS echo (32 clients),
pgqueuer 1.x draining N no-op jobs (bench/peers.py), and Tether draining N tasks with
8 batch workers at batch sizes 10 and 64 on StreamLeases streams, then at 10 with one
CompleteTasks call per batch (`_unary` keys; bench/control_bench.py `lease_run(batch=)`).
CPU per task (control plane + client) and per job (pgqueuer's process + its PostgreSQL
backend) are printed too: they move less with the load than the rates.

    .venv/bin/python bench/lease_pairs.py --tasks 20000 --rounds 3 --out /tmp/pairs.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines
import control_bench
import peers


def one_round(tasks: int, workers: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """One round's figures (rates per second, CPU in microseconds)."""
    tls = asyncio.run(baselines.grpc_echo(32, tasks, subprocess_server=True, tls=True))
    pg = asyncio.run(peers.pgqueuer_run(tasks))
    if "per_s" not in pg:
        raise SystemExit(f"pgqueuer skipped: {pg['skipped']}")
    out: dict[str, Any] = {
        "raw_grpc_tls_unary_per_s": round(tls["per_s"], 1),
        "pgqueuer_jobs_per_s": round(pg["per_s"], 1),
        "pgqueuer_cpu_us_per_job": round(pg["cpu_us_per_job"]),
    }
    # Each batch size on a StreamLeases stream, then the first by CompleteTasks calls.
    for batch, stream in [*((b, True) for b in batches), (batches[0], False)]:
        with tempfile.TemporaryDirectory(prefix="tether-pairs-") as tmp:
            run = asyncio.run(
                control_bench.lease_run(Path(tmp), tasks, workers, batch=batch, stream=stream)
            )
        cpu = run["server_cpu_us_per_task"] + run["client_cpu_us_per_task"]
        key = f"{batch}" if stream else f"{batch}_unary"
        out[f"lease_grants_per_s_batch_{key}"] = round(run["per_s"], 1)
        out[f"lease_batch_{key}_vs_pgqueuer"] = round(run["per_s"] / pg["per_s"], 3)
        out[f"lease_batch_{key}_vs_raw_grpc_tls"] = round(run["per_s"] / tls["per_s"], 3)
        out[f"lease_batch_{key}_cpu_us_per_task"] = round(cpu)
        out[f"lease_batch_{key}_server_cpu_us_per_task"] = round(run["server_cpu_us_per_task"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks (and jobs) per run")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds")
    parser.add_argument("--workers", type=int, default=8, help="Tether batch workers")
    parser.add_argument("--out", type=Path, help="JSON output (a list of rounds)")
    args = parser.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.tasks, args.workers, (10, 64))
        rounds.append(r)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rounds, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tether benchmarks: prints a table and writes bench/results.json.

Each figure is measured in the same run as the raw baseline it is compared to.
`--quick` uses small sizes (under a minute) so CI keeps the benchmark alive
without asserting any time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines
import control_bench
import ledger_bench
import mcp_bench
import peers
import replicas_bench
import sidecar_bench
import timeouts_bench
import verify_bench

HERE = Path(__file__).resolve().parent


def sizes(quick: bool) -> dict[str, int]:
    """Workload sizes for a full or a quick run."""
    if quick:
        return {
            "echo": 2_000, "sign": 2_000, "sqlite": 2_000, "concurrency": 32,
            "lease_tasks": 2_000, "lease_batch": 10, "lease_batch_workers": 8,
            "claim_small": 1_000, "claim_large": 50_000, "claims": 200,
            "ingest": 5_000, "verify": 5_000, "serial_calls": 200, "agents": 64,
            "calls_per_agent": 5, "pg_jobs": 2_000, "replica_tasks": 300,
            "ledger_small": 1_000, "ledger_large": 10_000, "timeout_rounds": 5,
        }  # fmt: skip
    return {
        "echo": 20_000, "sign": 20_000, "sqlite": 20_000, "concurrency": 32,
        "lease_tasks": 20_000, "lease_batch": 10, "lease_batch_workers": 8,
        "claim_small": 1_000, "claim_large": 1_000_000, "claims": 1_000,
        "ingest": 50_000, "verify": 100_000, "serial_calls": 2_000, "agents": 64,
        "calls_per_agent": 40, "pg_jobs": 20_000, "replica_tasks": 6_000,
        "ledger_small": 10_000, "ledger_large": 500_000, "timeout_rounds": 20,
    }  # fmt: skip


def baseline_figures(n: dict[str, int]) -> dict[str, Any]:
    """The raw limits of this machine, measured first."""
    r: dict[str, Any] = {}
    echo = asyncio.run(baselines.grpc_echo(n["concurrency"], n["echo"], subprocess_server=True))
    r["raw_grpc_unary_per_s"] = round(echo["per_s"], 1)
    r["raw_grpc_p50_ms"] = round(echo["p50_ms"], 3)
    inproc = asyncio.run(baselines.grpc_echo(n["concurrency"], n["echo"], subprocess_server=False))
    r["raw_grpc_inproc_unary_per_s"] = round(inproc["per_s"], 1)
    serial = asyncio.run(baselines.grpc_echo(1, n["echo"] // 4, subprocess_server=True))
    r["raw_grpc_serial_p50_ms"] = round(serial["p50_ms"], 3)
    r["raw_grpc_serial_p99_ms"] = round(serial["p99_ms"], 3)
    # The same echo over TCP with mutual TLS: the transport of every node call to the
    # control plane, so lease figures are judged against it (the cost of security shows).
    tls = asyncio.run(
        baselines.grpc_echo(n["concurrency"], n["echo"], subprocess_server=True, tls=True)
    )
    r["raw_grpc_tls_unary_per_s"] = round(tls["per_s"], 1)
    r["raw_grpc_tls_p50_ms"] = round(tls["p50_ms"], 3)
    tls_serial = asyncio.run(
        baselines.grpc_echo(1, n["echo"] // 4, subprocess_server=True, tls=True)
    )
    r["raw_grpc_tls_serial_p50_ms"] = round(tls_serial["p50_ms"], 3)
    r["raw_grpc_tls_serial_p99_ms"] = round(tls_serial["p99_ms"], 3)
    r["raw_grpc_tls_vs_plaintext"] = round(tls["per_s"] / echo["per_s"], 3)
    sig = baselines.ed25519(n["sign"])
    r["raw_ed25519_sign_per_s"] = round(sig["sign_per_s"], 1)
    r["raw_ed25519_verify_per_s"] = round(sig["verify_per_s"], 1)
    r["raw_ed25519_verify_per_s_libsodium"] = round(sig["libsodium_verify_per_s"], 1)
    r["raw_sqlite_wal_commits_per_s"] = round(baselines.sqlite_wal_commits(n["sqlite"]), 1)
    return r


def run(quick: bool, only: set[str] | None = None) -> dict[str, Any]:
    """Runs every benchmark (or the groups in `only`) and returns the results object."""
    n = sizes(quick)
    want = (lambda g: True) if not only else (lambda g: g in only)
    results: dict[str, Any] = {}
    notes: dict[str, str] = {}
    results.update(baseline_figures(n))
    raw_unary = results["raw_grpc_unary_per_s"]
    raw_tls = results["raw_grpc_tls_unary_per_s"]
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp_s:
        tmp = Path(tmp_s)
        if want("leases"):
            lease = asyncio.run(
                control_bench.lease_run(tmp / "leases", n["lease_tasks"], n["concurrency"])
            )
            results["lease_grants_per_s"] = round(lease["per_s"], 1)
            results["lease_grants_vs_raw_grpc"] = round(lease["per_s"] / raw_unary, 3)
            results["lease_grants_vs_raw_grpc_tls"] = round(lease["per_s"] / raw_tls, 3)
            results["lease_grant_p50_ms"] = round(lease["p50_ms"], 3)
            results["control_rss_mb"] = round(lease["rss_mb"], 1)
            # The same workers asking for up to 8 tasks per AcquireLease (max_tasks).
            batched = asyncio.run(
                control_bench.lease_run(
                    tmp / "leases-batched", n["lease_tasks"], n["concurrency"], max_tasks=8
                )
            )
            results["lease_grants_per_s_max_tasks_8"] = round(batched["per_s"], 1)
            results["lease_grants_max_tasks_8_vs_raw_grpc_tls"] = round(
                batched["per_s"] / raw_tls, 3
            )
            results["lease_grants_max_tasks_8_vs_1"] = round(batched["per_s"] / lease["per_s"], 3)
            # The same one-task workers with the node check reading the store on every call
            # (--node-check-cache-ms 0, the behaviour before the reuse bound).
            uncached = asyncio.run(
                control_bench.lease_run(
                    tmp / "leases-uncached",
                    n["lease_tasks"],
                    n["concurrency"],
                    control_args=("--node-check-cache-ms", "0"),
                )
            )
            results["lease_grants_per_s_node_check_every_call"] = round(uncached["per_s"], 1)
            results["lease_grants_node_check_reuse_vs_every_call"] = round(
                lease["per_s"] / uncached["per_s"], 3
            )
            # The same one-task workers with the operator console on and one auditor's live
            # tasks table open the whole run (docs/console.md: no per-RPC work).
            console = asyncio.run(
                control_bench.lease_run(
                    tmp / "leases-console", n["lease_tasks"], n["concurrency"], console_viewers=1
                )
            )
            results["lease_grants_per_s_console_on"] = round(console["per_s"], 1)
            results["lease_grants_console_on_vs_off"] = round(console["per_s"] / lease["per_s"], 3)
            results["console_live_updates_during_run"] = console["console_updates"]
            # Each SUCCEED also leases the next task (TransitionTask.acquire_next): one RPC a task.
            chained = asyncio.run(
                control_bench.lease_run(
                    tmp / "leases-chained", n["lease_tasks"], n["concurrency"], chain=True
                )
            )
            results["lease_grants_per_s_chained"] = round(chained["per_s"], 1)
            results["lease_grants_chained_vs_raw_grpc_tls"] = round(chained["per_s"] / raw_tls, 3)
            results["lease_grants_chained_vs_1"] = round(chained["per_s"] / lease["per_s"], 3)
            results["lease_grant_chained_p50_ms"] = round(chained["p50_ms"], 3)
            # Measured like pgqueuer: workers take a batch (max_tasks), run it, and end it
            # in the step that takes the next batch (one request on a StreamLeases
            # stream, one store transaction); first grant to last completion.
            # pgqueuer's default batch size is 10, so Tether's is too.
            batch, workers = n["lease_batch"], n["lease_batch_workers"]
            batched_done = asyncio.run(
                control_bench.lease_run(
                    tmp / "leases-batch", n["lease_tasks"], workers, batch=batch
                )
            )
            results["lease_grants_per_s_batch"] = round(batched_done["per_s"], 1)
            results["lease_batch_size"] = batch
            results["lease_batch_workers"] = workers
            results["lease_batch_tasks"] = n["lease_tasks"]
            results["lease_grants_batch_vs_raw_grpc_tls"] = round(
                batched_done["per_s"] / raw_tls, 3
            )
            results["lease_grants_batch_vs_1"] = round(batched_done["per_s"] / lease["per_s"], 3)
            results["lease_batch_p50_ms"] = round(batched_done["p50_ms"], 3)
            # CPU per task, control plane + client (load-independent where the rate is not).
            results["lease_batch_cpu_us_per_task"] = round(
                batched_done["server_cpu_us_per_task"] + batched_done["client_cpu_us_per_task"]
            )
            results["lease_batch_server_cpu_us_per_task"] = round(
                batched_done["server_cpu_us_per_task"]
            )
            # The same workers with one CompleteTasks(acquire_next) call per batch.
            unary = asyncio.run(
                control_bench.lease_run(
                    tmp / "leases-batch-unary", n["lease_tasks"], workers, batch=batch,
                    stream=False,
                )
            )  # fmt: skip
            results["lease_grants_per_s_batch_unary"] = round(unary["per_s"], 1)
            results["lease_batch_unary_server_cpu_us_per_task"] = round(
                unary["server_cpu_us_per_task"]
            )
        if want("claims"):
            for label, depth in (("1k", n["claim_small"]), ("1m", n["claim_large"])):
                c = asyncio.run(
                    control_bench.claim_latency(tmp / f"claim-{label}", depth, n["claims"])
                )
                control_bench.clean(tmp / f"claim-{label}" / "control.db")
                results[f"claim_p50_ms_{label}"] = round(c["p50_ms"], 3)
                results[f"claim_p99_ms_{label}"] = round(c["p99_ms"], 3)
            results["claim_large_depth"] = n["claim_large"]
            results["claim_ratio_1m_vs_1k"] = round(
                results["claim_p50_ms_1m"] / results["claim_p50_ms_1k"], 3
            )
        if want("ingest"):
            envs, node_id, key, leases = control_bench.receipts_for_ingest(n["ingest"])
            ing = asyncio.run(control_bench.ingest_run(tmp / "ingest", envs, node_id, key, leases))
            results["receipts_ingested_per_s"] = round(ing["per_s"], 1)
            results["receipts_ingested"] = len(envs)
            results["receipts_ingested_vs_raw_ed25519_one_core"] = round(
                ing["per_s"] / results["raw_ed25519_verify_per_s"], 3
            )
        if want("mediation"):
            med = asyncio.run(
                sidecar_bench.mediation_run(
                    tmp / "mediation", n["serial_calls"], n["agents"], n["calls_per_agent"]
                )
            )
            serial_p50 = results["raw_grpc_serial_p50_ms"]
            serial_p99 = results["raw_grpc_serial_p99_ms"]
            results["mediation_overhead_p50_ms"] = round(med["full_p50_ms"] - serial_p50, 3)
            results["mediation_overhead_p99_ms"] = round(med["full_p99_ms"] - serial_p99, 3)
            results["mediation_plain_overhead_p50_ms"] = round(med["plain_p50_ms"] - serial_p50, 3)
            results["mediation_plain_overhead_p99_ms"] = round(med["plain_p99_ms"] - serial_p99, 3)
            results["mediated_calls_per_s"] = round(med["full_per_s"], 1)
            results["mediated_plain_calls_per_s"] = round(med["plain_per_s"], 1)
            # Agents reach their sidecar over a Unix socket: the plaintext echo is the
            # same transport for the agent's hop.
            results["mediated_calls_vs_raw_grpc"] = round(med["full_per_s"] / raw_unary, 3)
            results["mediation_agents"] = n["agents"]
            results["sidecar_rss_mb"] = round(med["sidecar_rss_mb"], 1)
            results["control_rss_mb_after_mediation"] = round(med["control_rss_mb"], 1)
        if want("mcp"):
            m = asyncio.run(mcp_bench.mcp_run(tmp / "mcp", n["serial_calls"]))
            for key, value in m.items():
                results[key] = round(value, 3)
            results["mcp_current_overhead_vs_calltool_p50_ms"] = round(
                m["mcp_current_p50_ms"] - m["grpc_calltool_p50_ms"], 3
            )
        if want("timeouts"):
            t = asyncio.run(timeouts_bench.timeouts_run(tmp / "timeouts", n["timeout_rounds"]))
            for key, value in t.items():
                results[key] = round(value, 1) if isinstance(value, float) else value
        if want("verify"):
            v = verify_bench.verify_run(tmp / "verify", n["verify"])
            results["verify_receipts_per_s"] = round(v["per_s"], 1)
            results["verify_receipts"] = v["receipts"]
            results["verify_seconds"] = round(v["seconds"], 2)
            results["verify_bundle_mb"] = round(v["bytes"] / 2**20, 1)
            # The bar for verify on both cores: >= 1.5 x one core's raw Ed25519 verify.
            results["verify_vs_raw_ed25519_one_core"] = round(
                v["per_s"] / results["raw_ed25519_verify_per_s"], 3
            )
            # The same against one core of libsodium, which the verifier uses (about 1.8x
            # OpenSSL's rate): what the verifier's parsing and checks leave of two cores.
            results["verify_vs_raw_ed25519_libsodium_one_core"] = round(
                v["per_s"] / results["raw_ed25519_verify_per_s_libsodium"], 3
            )
        if want("ledger"):
            results.update(ledger_bench.ledger_figures(tmp, n["ledger_small"], n["ledger_large"]))
        if want("replicas"):
            rep = replicas_bench.replicas_figures(
                tmp,
                n["replica_tasks"],
                n["concurrency"],
                batch=n["lease_batch"],
                batch_workers=n["lease_batch_workers"],
            )
            if "skipped" in rep:
                for prefix in ("", "batch_"):
                    for k in ("1_replica", "2_replicas", "3_replicas"):
                        results[f"lease_grants_per_s_pg_{prefix}{k}"] = None
                notes["lease_grants_per_s_pg_replicas"] = rep["skipped"]
            else:
                results.update(rep)
                results["lease_grants_pg_2_vs_1_replica"] = round(
                    rep["lease_grants_per_s_pg_2_replicas"]
                    / rep["lease_grants_per_s_pg_1_replica"],
                    3,
                )
                if rep.get("lease_grants_per_s_pg_batch_2_replicas"):
                    results["lease_grants_pg_batch_2_vs_1_replica"] = round(
                        rep["lease_grants_per_s_pg_batch_2_replicas"]
                        / rep["lease_grants_per_s_pg_batch_1_replica"],
                        3,
                    )
            results["replica_tasks"] = n["replica_tasks"]
        if want("peers"):
            pg = asyncio.run(peers.pgqueuer_run(n["pg_jobs"]))
            if "per_s" in pg:
                results["pgqueuer_jobs_per_s"] = round(pg["per_s"], 1)
                results["pgqueuer_version"] = pg["version"]
                results["pgqueuer_cpu_us_per_job"] = round(pg["cpu_us_per_job"])
                if "lease_grants_per_s" in results:
                    results["lease_grants_vs_pgqueuer"] = round(
                        results["lease_grants_per_s"] / pg["per_s"], 3
                    )
                    results["lease_grants_max_tasks_8_vs_pgqueuer"] = round(
                        results["lease_grants_per_s_max_tasks_8"] / pg["per_s"], 3
                    )
                    results["lease_grants_chained_vs_pgqueuer"] = round(
                        results["lease_grants_per_s_chained"] / pg["per_s"], 3
                    )
                    results["lease_grants_batch_vs_pgqueuer"] = round(
                        results["lease_grants_per_s_batch"] / pg["per_s"], 3
                    )
                if results.get("lease_grants_per_s_pg_1_replica"):
                    # Same PostgreSQL, same run: Tether's store against the peer's.
                    results["lease_grants_pg_vs_pgqueuer"] = round(
                        results["lease_grants_per_s_pg_1_replica"] / pg["per_s"], 3
                    )
                if results.get("lease_grants_per_s_pg_batch_1_replica"):
                    results["lease_grants_pg_batch_vs_pgqueuer"] = round(
                        results["lease_grants_per_s_pg_batch_1_replica"] / pg["per_s"], 3
                    )
            else:
                results["pgqueuer_jobs_per_s"] = None
                notes["pgqueuer_jobs_per_s"] = pg["skipped"]
    if notes:
        results["_notes"] = notes
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results.json)")
    parser.add_argument(
        "--only",
        action="append",
        choices=[
            "leases",
            "claims",
            "ingest",
            "mediation",
            "mcp",
            "verify",
            "ledger",
            "replicas",
            "peers",
            "timeouts",
        ],
        help="run only these groups (repeat; baselines always run)",
    )
    args = parser.parse_args(argv)
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    started = time.time()
    load_before = os.getloadavg()
    results = run(args.quick, set(args.only or ()))
    results["_meta"] = {
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(time.time() - started, 1),
        # Figures are same-run ratios; the load says how much the absolute ones can be trusted.
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    width = max(len(k) for k in results)
    for key, value in results.items():
        if not key.startswith("_"):
            print(f"{key:<{width}}  {value!s:>12}")
    for key, note in results.get("_notes", {}).items():
        print(f"note: {key}: {note}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tether benchmarks: prints a table and writes bench/results.json.

Each figure is measured in the same run as the raw baseline it is compared to.
`--quick` uses small sizes (under a minute) so CI keeps the benchmark alive
without asserting any time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines

HERE = Path(__file__).resolve().parent


def sizes(quick: bool) -> dict[str, int]:
    """Workload sizes for a full or a quick run."""
    if quick:
        return {"echo": 2_000, "sign": 2_000, "sqlite": 2_000, "concurrency": 32}
    return {"echo": 20_000, "sign": 20_000, "sqlite": 20_000, "concurrency": 32}


def run(quick: bool) -> dict[str, Any]:
    """Runs every benchmark and returns the results object."""
    n = sizes(quick)
    results: dict[str, Any] = {}
    echo = asyncio.run(baselines.grpc_echo(n["concurrency"], n["echo"]))
    results["raw_grpc_unary_per_s"] = round(echo["per_s"], 1)
    results["raw_grpc_p50_ms"] = round(echo["p50_ms"], 3)
    serial = asyncio.run(baselines.grpc_echo(1, n["echo"] // 4))
    results["raw_grpc_serial_p50_ms"] = round(serial["p50_ms"], 3)
    results["raw_grpc_serial_p99_ms"] = round(serial["p99_ms"], 3)
    sig = baselines.ed25519(n["sign"])
    results["raw_ed25519_sign_per_s"] = round(sig["sign_per_s"], 1)
    results["raw_ed25519_verify_per_s"] = round(sig["verify_per_s"], 1)
    results["raw_sqlite_wal_commits_per_s"] = round(baselines.sqlite_wal_commits(n["sqlite"]), 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results.json)")
    args = parser.parse_args(argv)
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    started = time.time()
    results = run(args.quick)
    results["_meta"] = {
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    width = max(len(k) for k in results)
    for key, value in results.items():
        if not key.startswith("_"):
            print(f"{key:<{width}}  {value:>12}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tether demo`: the main job in one command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo",
        description="Start a control plane, two sidecars, a stand-in API and racing agents; "
        "stage a takeover, a budget denial and an idempotent retry; export and verify the "
        "receipts offline. TETHER_DEMO_SECRET sets the API secret (random by default).",
    )
    p.add_argument("--dir", type=Path, default=Path(".tether-demo"), help="state directory")
    p.add_argument("--agents", type=int, default=3, help="agent processes (>= 2)")
    p.add_argument("--tasks", type=int, default=8, help="tasks in the queue (>= 4)")
    p.add_argument("--keep", action="store_true", help="leave everything running")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tether.demo.run import run_demo

    if args.agents < 2 or args.tasks < 4:
        print("tether demo: needs --agents >= 2 and --tasks >= 4")
        return 2
    return run_demo(args.dir, agents=args.agents, tasks=args.tasks, keep=args.keep)

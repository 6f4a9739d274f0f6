"""A command's whole process tree, found and ended (Linux, from /proc).

`tether run` makes itself a child subreaper, so whatever the command forks,
even through `setsid()` and double forks, stays under `tether run` and is
found here; ending a task ends every process it left, so nothing outlives the
lease it ran under.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

from tether.sidecar.sandbox import descendants

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans of our descendants re-parent to this process instead of init; False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def signal_tree(sig: int, leader: int | None = None) -> int:
    """Sends `sig` to the command's process group and every process under us; returns the count.

    `leader` is the command's pid (its own session and group): a group signal
    also reaches members that were re-parented away before we became their
    subreaper.
    """
    if leader is not None:
        with contextlib.suppress(OSError):
            os.killpg(leader, sig)
    pids = descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
    return len(pids)


def reap_orphans(keep: int | None) -> None:
    """Collects exited orphans re-parented to us (never `keep`, the command asyncio waits for)."""
    for pid in descendants(os.getpid()) + list(_zombies()):
        if pid == keep:
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _zombies() -> list[int]:
    """Our direct children that have exited (a zombie is no longer a live descendant)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z" and int(fields[1]) == me:
                out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def kill_all(leader: int | None) -> None:
    """SIGKILLs everything under us (and the command's group) until nothing is left."""
    for _ in range(500):
        if signal_tree(signal.SIGKILL, leader) == 0:
            reap_orphans(leader)
            return
        reap_orphans(leader)
        time.sleep(0.005)

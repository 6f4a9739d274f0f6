"""Event-loop selection for the long-running servers.

uvloop cuts the per-RPC cost of the asyncio machinery when it is installed;
`TETHER_EVENT_LOOP=asyncio` forces the standard loop (e.g. to rule it out when
debugging).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from tether.logs import stop_background_writer, write_in_background

T = TypeVar("T")


def event_loop_name() -> str:
    """The loop `run` will use: "uvloop" when installed and not disabled, else "asyncio"."""
    if os.environ.get("TETHER_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs `main` (a server) to completion on the selected event loop.

    Its logs are written by a writer thread from here on (`write_in_background`:
    the loop never waits on a disk write), and what was made before (the imported
    modules, most of the process's objects) is moved out of the cyclic collector's
    reach (`gc.freeze`): full collections would otherwise walk all of it again and
    again, for nothing. When `main` ends, however it ends, the writer is drained and
    stopped, so the caller's own output (the CLI's error line) follows the last log line.
    """
    write_in_background()
    gc.freeze()
    try:
        if event_loop_name() == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
        return asyncio.run(main)
    finally:
        stop_background_writer()  # every line logged is out before anything else is

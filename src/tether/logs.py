"""Logs: readable lines on a terminal, JSON lines for machines.

`--log-format auto` (the default; env TETHER_LOG_FORMAT) writes human-readable
lines when stderr is a terminal and one JSON object per line otherwise (a
supervisor, a container runtime, a file); `text` and `json` force either. Both
carry the same context fields. Secrets never reach a log: log ids and digests,
not values.

The long-running servers (`tether control`, `tether sidecar`) hand their lines
to one writer thread (`write_in_background`), which formats and writes them: a
write to stderr can wait on the disk (a file beside an fsyncing database), and
the event loop must not. Exit (normal or by an exception) writes every line
already logged first, and so does the end of the server's run (before the CLI
prints its one-line error); a SIGKILLed server may lose its last few milliseconds
of lines. Other commands write as they log (and keep one thread, so `tether verify`
may fork its workers).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import Any, TextIO

LOG_FORMATS = ("auto", "text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_LOG_FORMAT = "TETHER_LOG_FORMAT"

# Extra fields a log call may carry (logger.info("...", extra={"task_id": ...})).
CONTEXT_FIELDS = (
    "task_id",
    "lease_id",
    "node_id",
    "agent_id",
    "fencing_token",
    "grants",  # several lease grants in one call: ["task_id:fencing_token", ...]
    "tool",
    "queue",
    # Authentication and authorization refusals (tether.control.authz).
    "refusal",
    "reason",
    "rpc",
    "peer",
    "spiffe_id",
    "keyid",
    "rekey",
    "expires_unix_ms",
    # Replicas: leader elections and the checkpoints a leader signs.
    "replica",
    "epoch",
    "tree_size",
    "signed_unix_ms",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the context fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                doc[field] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS.mmm LEVEL logger: message key=value ...`, for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = (
            f"{when}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
            f"{record.getMessage()}"
        )
        context = [
            f"{field}={getattr(record, field)}"
            for field in CONTEXT_FIELDS
            if getattr(record, field, None) is not None
        ]
        if context:
            line += "  " + " ".join(context)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def resolve_format(fmt: str, stream: TextIO) -> str:
    """ "text" or "json": `auto` is text on a terminal, JSON otherwise.

    Raises:
        ValueError: not one of LOG_FORMATS.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "json"


class _HandOff(logging.handlers.QueueHandler):
    """Hands records to the writer thread: only the message's arguments are merged here
    (so later changes to them cannot show); the record stays whole otherwise (an
    in-process queue pickles nothing), so the writer formats it as stderr's handler
    would have."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record


_writer: logging.handlers.QueueListener | None = None


def stop_background_writer() -> None:
    """Writes what is queued, stops the writer thread and puts its handlers back on the
    root logger (a server's run has ended, or the process exits): whatever is written to
    stderr afterwards, such as the CLI's one-line error, comes after every line logged
    before it."""
    global _writer
    if _writer is not None:
        writer, _writer = _writer, None
        writer.stop()
        logging.getLogger().handlers[:] = list(writer.handlers)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Sends logs to stderr at `level`, as text or JSON (see the module docstring).

    Raises:
        ValueError: an unknown level or format.
    """
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    chosen = resolve_format(fmt or os.environ.get(ENV_LOG_FORMAT) or "auto", sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if chosen == "text" else JsonFormatter())
    stop_background_writer()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def write_in_background() -> None:
    """Moves the root logger's handlers behind one writer thread (see the module
    docstring); a server calls it before it serves. Idempotent."""
    global _writer
    root = logging.getLogger()
    if _writer is not None or not root.handlers:
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _writer = logging.handlers.QueueListener(records, *root.handlers)
    _writer.start()
    atexit.unregister(stop_background_writer)
    atexit.register(stop_background_writer)
    root.handlers[:] = [_HandOff(records)]

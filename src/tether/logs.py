"""Logs: readable lines on a terminal, JSON lines for machines.

`--log-format auto` (the default; env TETHER_LOG_FORMAT) writes human-readable
lines when stderr is a terminal and one JSON object per line otherwise (a
supervisor, a container runtime, a file); `text` and `json` force either. Both
carry the same context fields. Secrets never reach a log: log ids and digests,
not values.

The long-running servers (`tether control`, `tether sidecar`) hand their lines
to one writer thread (`write_in_background`), which formats and writes them: a
write to stderr can wait on the disk (a file beside an fsyncing database), and
the event loop must not. The thread writes every line queued since its last write
in one `write`, then rests `WRITE_INTERVAL_S` (so a busy server costs one wake-up
and one write per interval, not per line; a line may show that much later).
Exit (normal or by an exception) writes every line already logged first, and so
does the end of the server's run (before the CLI prints its one-line error); a
SIGKILLed server may lose its last tens of milliseconds of lines. Other commands
write as they log (and keep one thread, so `tether verify` may fork its workers).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
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


# json.dumps(doc, default=str) makes an encoder per call; one made once writes the same.
_JSON = json.JSONEncoder(default=str)


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
        given = record.__dict__  # extra= fields are set there (a dict lookup, no raise)
        for field in CONTEXT_FIELDS:
            value = given.get(field)
            if value is not None:
                doc[field] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _JSON.encode(doc)


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


# How long the writer thread waits after a write before it takes what was queued
# meanwhile: records logged in that time go out in one write, and the loggers' puts find
# no thread waiting on the queue (no wake-up per record). A line reaches stderr at most
# this much later; stopping the writer still writes everything queued before it.
WRITE_INTERVAL_S = 0.05

_STOP = object()


class _BatchWriter:
    """The writer thread: takes every record queued since its last write, formats them
    in order and writes each stream handler's lines in one `write` (and one flush);
    other handlers get the records one by one, as a QueueListener would hand them."""

    def __init__(self, records: queue.SimpleQueue[Any], *handlers: logging.Handler) -> None:
        self.queue = records
        self.handlers = handlers
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tether-log-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Writes everything queued before this call, then ends the thread."""
        if self._thread is not None:
            self.queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        get, take = self.queue.get, self.queue.get_nowait
        while True:
            batch = [get()]  # blocks while nothing is logged
            try:
                while True:
                    batch.append(take())
            except queue.Empty:
                pass
            stop = batch[-1] is _STOP
            if stop:
                batch.pop()
            if batch:
                self._write(batch)
            if stop:
                return
            time.sleep(WRITE_INTERVAL_S)

    def _write(self, records: list[logging.LogRecord]) -> None:
        for handler in self.handlers:
            if type(handler) is not logging.StreamHandler:
                for record in records:
                    handler.handle(record)
                continue
            lines = []
            for record in records:
                if not handler.filter(record):
                    continue
                try:
                    lines.append(handler.format(record))
                except Exception:  # as StreamHandler.emit: report it, keep writing
                    handler.handleError(record)
            if not lines:
                continue
            lines.append("")
            with handler.lock:  # type: ignore[union-attr]  # made by Handler.__init__
                try:
                    handler.stream.write(handler.terminator.join(lines))
                    handler.flush()
                except Exception:
                    handler.handleError(records[-1])


_writer: _BatchWriter | None = None
_SRCFILE = logging._srcfile


def _collect_record_extras(on: bool) -> None:
    """Whether a record notes its caller's file and line, thread and process: neither
    format writes them, and a server skips collecting them on each call (the logging
    HOWTO's "Optimization" settings; a few µs of each record on the event loop)."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = on
    logging._srcfile = _SRCFILE if on else None


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
        _collect_record_extras(True)


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
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    _writer = _BatchWriter(records, *root.handlers)
    _writer.start()
    _collect_record_extras(False)
    atexit.unregister(stop_background_writer)
    atexit.register(stop_background_writer)
    root.handlers[:] = [_HandOff(records)]

"""The servers' background log writer: nothing logged is lost or reordered past its end."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import threading
import time

from tether.logs import (
    WRITE_INTERVAL_S,
    JsonFormatter,
    stop_background_writer,
    write_in_background,
)


class SlowStream(io.StringIO):
    """A stderr that takes its time (a disk beside an fsyncing database)."""

    def write(self, s: str) -> int:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)
        return super().write(s)


def test_stopping_the_writer_drains_it_and_puts_its_handlers_back() -> None:
    """Lines queued for the writer thread are all written once the writer is stopped, and
    what is logged afterwards is written at once, in order, by the same handler (the
    CLI's error line must follow a server's last log line)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = SlowStream()
    handler = logging.StreamHandler(stream)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        write_in_background()
        assert root.handlers != [handler]  # records now go to the writer thread
        for i in range(3):
            logging.getLogger("t").info("queued %d", i)
        assert logging._srcfile is None  # callers not looked up meanwhile
        assert not logging.logThreads
        stop_background_writer()
        assert root.handlers == [handler]
        assert logging._srcfile is not None  # looked up again
        assert logging.logThreads
        logging.getLogger("t").info("after")
        stream.write("tether: the error line\n")
        assert stream.getvalue().splitlines() == [
            "queued 0",
            "queued 1",
            "queued 2",
            "after",
            "tether: the error line",
        ]
    finally:
        stop_background_writer()
        root.handlers[:] = saved
        root.setLevel(level)


class GatedStream(io.StringIO):
    """A stderr whose first write waits for a gate, and that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        if not self.writes:
            self.entered.set()
            self.gate.wait(5)
        self.writes.append(s)
        return super().write(s)


def test_lines_queued_while_the_writer_is_busy_go_out_in_one_write_in_order() -> None:
    """Records logged while the writer thread is writing are written together, in one
    write and in the order they were logged, not one write per record."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = GatedStream()
    root.handlers[:] = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)
    try:
        write_in_background()
        logging.getLogger("t").info("first")
        assert stream.entered.wait(5)  # the writer is inside its first write
        for i in range(20):
            logging.getLogger("t").info("line %d", i)
        stream.gate.set()
        stop_background_writer()
        assert stream.writes == ["first\n", "".join(f"line {i}\n" for i in range(20))]
    finally:
        stop_background_writer()
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_json_line_carries_the_message_and_the_context_fields_given() -> None:
    """A JSON line holds the level, logger, formatted message and each context field given
    (values JSON cannot hold as their text), and no context field that was not given."""
    logger = logging.getLogger("tether.control")
    record = logger.makeRecord(
        "tether.control", logging.INFO, "", 0, "leases granted to %s", ("n1",), None,
        extra={"grants": ["t1:3", "t2:4"], "node_id": "n1", "fencing_token": 3,
               "queue": pathlib.PurePosixPath("q/x"), "unrelated": "x"},
    )  # fmt: skip
    doc = json.loads(JsonFormatter().format(record))
    assert doc.pop("ts").endswith("Z")
    assert doc == {
        "level": "info",
        "logger": "tether.control",
        "msg": "leases granted to n1",
        "grants": ["t1:3", "t2:4"],
        "node_id": "n1",
        "fencing_token": 3,
        "queue": "q/x",
    }


def test_a_line_reaches_the_stream_within_the_write_interval_without_a_stop() -> None:
    """docs/operations.md: a line reaches stderr at most about WRITE_INTERVAL_S after it
    was logged, while the server runs (so a SIGKILL loses at most that much): each of a
    steady run of lines is in the stream shortly after it was logged, no stop needed."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    root.handlers[:] = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)
    try:
        write_in_background()
        late = []
        for i in range(10):
            logging.getLogger("t").info("line %d", i)
            logged = time.monotonic()
            while f"line {i}\n" not in stream.getvalue():
                assert time.monotonic() - logged < 2.0, f"line {i} never written"
                time.sleep(0.002)
            late.append(time.monotonic() - logged)
            time.sleep(0.02)  # inside the writer's rest: the next line waits for it
        # Generous for a loaded CI machine; an unbatched-forever writer fails above.
        assert max(late) < WRITE_INTERVAL_S + 0.5, late
    finally:
        stop_background_writer()
        root.handlers[:] = saved
        root.setLevel(level)

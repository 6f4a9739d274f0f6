"""The servers' background log writer: nothing logged is lost or reordered past its end."""

from __future__ import annotations

import io
import logging
import threading
import time

from tether.logs import stop_background_writer, write_in_background


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
        stop_background_writer()
        assert root.handlers == [handler]
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

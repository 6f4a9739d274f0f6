"""Structured JSON logs. Secrets never reach a log: log ids and digests, not values."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Extra fields a log call may carry (logger.info("...", extra={"task_id": ...})).
CONTEXT_FIELDS = (
    "task_id",
    "lease_id",
    "node_id",
    "agent_id",
    "fencing_token",
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


def setup_logging(level: str = "INFO") -> None:
    """Sends JSON logs to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

"""Which agent is calling: by the socket it connected to, or by its token.

An agent bound to its own socket is identified by that socket alone (file
permissions decide who can connect). On the shared socket (and TCP) an agent
sends its token as "x-tether-agent-token"; the sidecar read every token file
at start and compares in constant time against each of them, so the time a
refusal takes says nothing about which token was close.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tether.core.errors import ConfigError, Unauthenticated
from tether.sidecar.config import AgentSpec

AGENT_TOKEN_HEADER = "x-tether-agent-token"
MIN_TOKEN_BYTES = 16
log = logging.getLogger("tether.sidecar.identity")


@dataclass(frozen=True)
class _Known:
    name: str
    token: bytes


def read_token_file(path: Path, what: str, *, private: bool = False) -> bytes:
    """Reads a token file (whitespace stripped), refusing short or unreadable ones.

    With `private` (a join token: a credential of the node itself) a file that
    users outside its owner and group may read is refused (a Kubernetes secret
    projected 0440 with fsGroup is fine); for an agent token file only a
    warning says so.

    Raises:
        ConfigError: unreadable, empty, shorter than 16 bytes, or (private) too open.
    """
    try:
        mode = path.stat().st_mode
        token = path.read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path}: {err.strerror}") from err
    if private and mode & 0o007:
        raise ConfigError(
            f"{what}: {path} has mode {mode & 0o777:04o}, open to other users; chmod 600 {path}"
        )
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(
            f"{what}: the token in {path} is {len(token)} bytes, shorter than "
            f"{MIN_TOKEN_BYTES}; write the whole token (`tether nodes token create --out`)"
            if private
            else f"{what}: the token in {path} is shorter than {MIN_TOKEN_BYTES} bytes"
        )
    if mode & 0o007:
        log.warning("token file %s is readable by others; chmod 600 or 640 it", path)
    return token


class AgentRegistry:
    """Maps a presented token to an agent name; holds tokens in memory only."""

    def __init__(self, agents: Sequence[AgentSpec]) -> None:
        self._known: list[_Known] = []
        self.names = frozenset(a.name for a in agents)
        for spec in agents:
            if spec.token_file is not None:
                token = read_token_file(spec.token_file, f"agents.{spec.name}.token_file")
                self._known.append(_Known(spec.name, token))
        tokens = [k.token for k in self._known]
        if len(set(tokens)) != len(tokens):
            raise ConfigError("agents: two agents share one token; give each its own")

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """Returns the agent whose token is in `metadata`.

        Raises:
            Unauthenticated: no token, or a token no agent has.
        """
        presented: bytes | None = None
        for key, value in metadata or ():
            if key.lower() == AGENT_TOKEN_HEADER:
                presented = value.encode() if isinstance(value, str) else bytes(value)
        if presented is None:
            raise Unauthenticated(
                f"no agent token: send metadata {AGENT_TOKEN_HEADER!r} or use your agent's socket"
            )
        match = ""
        for known in self._known:  # every comparison runs, whatever matches
            if hmac.compare_digest(presented.strip(), known.token):
                match = known.name
        if not match:
            raise Unauthenticated("unknown agent token")
        return match

"""The agent Broker's TCP listener (token auth, no TLS) is refused off loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.core.errors import ConfigError
from tether.sidecar import config


def _load(listen: str, tmp_path: Path) -> config.SidecarConfig:
    return config.load(
        {
            "control": "127.0.0.1:7400",
            "node_id": "n1",
            "key": str(tmp_path / "n.key"),
            "listen_tcp": listen,
            "agent_tokens": {"alice": str(tmp_path / "alice.token")},
        },
        {},
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:7300", "[::1]:7300", "localhost:0", "127.0.0.2:1"])
def test_loopback_tcp_listener_is_accepted(listen: str, tmp_path: Path) -> None:
    """A loopback address (what agents in the same pod use) is accepted."""
    assert _load(listen, tmp_path).listen_tcp == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:7300", "10.1.2.3:7300", "[::]:7300", "example.com:1"])
def test_non_loopback_tcp_listener_is_refused(listen: str, tmp_path: Path) -> None:
    """Agent tokens would cross a network in clear: refused with a message naming the key."""
    with pytest.raises(ConfigError, match=r"listen_tcp: .* not a loopback address"):
        _load(listen, tmp_path)

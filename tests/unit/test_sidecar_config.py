"""Sidecar config: precedence, validation and agent identity parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.core.errors import ConfigError, Unauthenticated
from tether.sidecar.config import AgentSpec, load
from tether.sidecar.identity import AgentRegistry

BASE = {"control": "127.0.0.1:1", "node_id": "n1", "key": "/k", "agent_tokens": {"a": "/t"}}


def test_argument_beats_env_beats_file(tmp_path: Path) -> None:
    """An argument overrides TETHER_* env, which overrides the TOML file, which beats defaults."""
    file = tmp_path / "sidecar.toml"
    file.write_text(
        'control = "file:1"\nnode_id = "from-file"\nkey = "node.key"\n'
        'grace_period_ms = 5\n[agents.a]\ntoken_file = "a.token"\n'
    )
    cfg = load({"control": "arg:1"}, {"TETHER_CONTROL": "env:1", "TETHER_NODE_ID": "env"}, file)
    assert cfg.control_address == "arg:1"
    assert cfg.node_id == "env"
    assert cfg.grace_period_ms == 5
    assert cfg.node_key_path == tmp_path / "node.key"  # relative to the file
    assert cfg.agents == (AgentSpec("a", token_file=tmp_path / "a.token"),)
    assert cfg.renew_divisor == 3


def test_missing_required_key_is_named() -> None:
    """A missing required value is a ConfigError naming the key and where to set it."""
    with pytest.raises(ConfigError, match="node_id: required"):
        load({**BASE, "node_id": None}, {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"grace_period_ms": "soon"}, "grace_period_ms: expected an integer"),
        ({"grace_period_ms": -1}, "grace_period_ms: -1 is outside"),
        ({"node_id": "bad id"}, "node_id:"),
        ({"agent_tokens": {}}, "agents: at least one"),
        ({"agent_tokens": ["nope"]}, "agent_tokens: expected NAME=PATH"),
    ],
)
def test_bad_values_are_refused(override: dict[str, object], message: str) -> None:
    """Malformed or out-of-range values are refused on load, naming the key."""
    with pytest.raises(ConfigError, match=message):
        load({**BASE, **override}, {})


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    """A typo in the TOML file is an error, not silently ignored."""
    file = tmp_path / "s.toml"
    file.write_text('contrl = "x"\n')
    with pytest.raises(ConfigError, match="contrl: unknown key"):
        load(BASE, {}, file)


def test_agents_merge_token_and_socket_from_env_and_args() -> None:
    """An agent can get its token from env and its socket from an argument."""
    cfg = load({**BASE, "agent_sockets": {"b": "/b.sock"}}, {"TETHER_AGENTS": "b=/b.token"})
    assert cfg.agent("b") == AgentSpec(
        "b", token_file=Path("/b.token"), socket_path=Path("/b.sock")
    )


def test_registry_matches_tokens_and_refuses_others(tmp_path: Path) -> None:
    """Token auth maps each token to its agent; unknown, missing and short tokens are refused."""
    (tmp_path / "a").write_text("a" * 32 + "\n")
    (tmp_path / "b").write_text("b" * 32)
    reg = AgentRegistry([AgentSpec("alice", tmp_path / "a"), AgentSpec("bob", tmp_path / "b")])
    assert reg.authenticate([("x-tether-agent-token", "a" * 32)]) == "alice"
    assert reg.authenticate([("x-tether-agent-token", "b" * 32)]) == "bob"
    with pytest.raises(Unauthenticated, match="unknown"):
        reg.authenticate([("x-tether-agent-token", "c" * 32)])
    with pytest.raises(Unauthenticated, match="no agent token"):
        reg.authenticate([])
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="shorter"):
        AgentRegistry([AgentSpec("c", tmp_path / "short")])
    with pytest.raises(ConfigError, match="share one token"):
        AgentRegistry([AgentSpec("x", tmp_path / "a"), AgentSpec("y", tmp_path / "a")])


def test_several_control_replicas_are_listed_in_order() -> None:
    """`control` may list replicas (comma-separated, as --control repeated is joined);
    enrolment addresses must match them one for one, and a repeat is refused."""
    cfg = load({**BASE, "control": "a:1, b:1,c:1"}, {})
    assert cfg.control_addresses == ("a:1", "b:1", "c:1")
    cfg = load({**BASE, "control": "a:1,b:1", "enroll": "a:2,b:2"}, {})
    assert cfg.control_addresses == ("a:1", "b:1")
    with pytest.raises(ConfigError, match="enroll: 1 enrolment addresses for 2"):
        load({**BASE, "control": "a:1,b:1", "enroll": "a:2"}, {})
    with pytest.raises(ConfigError, match="listed twice"):
        load({**BASE, "control": "a:1,a:1"}, {})

"""Policy parsing: reject by default, errors name the key path and the line."""

from __future__ import annotations

import hashlib

import pytest

from tether.core.errors import ConfigError, PolicyDenied
from tether.core.policy import parse_policy

GOOD = """\
version = 1

[agents.alice]
queues = ["default"]

[agents.bob]
queues = []

[credentials.api_token]
tools = ["fetch"]
description = "token for the test API"

[credentials.db_password]
tools = ["run"]

[tools.fetch]
adapter = "http"
credential = "api_token"
cost_micros = 100
idempotent = true
[tools.fetch.http]
base_url = "http://127.0.0.1:8080/api"
allowed_methods = ["GET", "POST"]
auth_header = "X-Api-Key"
auth_template = "{secret}"

[tools.run]
adapter = "exec"
timeout_ms = 5000
[tools.run.exec]
argv = ["python3", "/opt/report.py", "{code}"]
params = ["code"]
env = { LANG = "C.UTF-8" }
secret_env = { DB_PASSWORD = "db_password" }
cpu_seconds = 2
memory_mb = 256

[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"

[queues.default]
tools = ["fetch", "run", "echo"]
network_allowlist = ["127.0.0.1", "example.com:443"]
memory_scope = "agent"
budget_micros = 1000
lease_ttl_ms = 10000
max_attempts = 2
"""


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    return info.value


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_good_policy_parses_with_defaults_and_digest() -> None:
    """A valid document yields typed specs, defaults and the sha256 of its bytes."""
    policy = parse_policy(GOOD)
    assert policy.digest == hashlib.sha256(GOOD.encode()).hexdigest()
    assert policy.tools_for_queue("default") == ("fetch", "run", "echo")
    fetch = policy.tool("fetch")
    assert fetch.http is not None
    assert fetch.http.host == "127.0.0.1"
    assert fetch.http.port == 8080
    assert fetch.http.max_response_bytes == 1024 * 1024
    assert fetch.http.follow_redirects is False
    run = policy.tool("run")
    assert run.exec is not None
    assert run.exec.file_size_mb == 16
    assert run.credentials == ("db_password",)
    queue = policy.queue("default")
    assert queue.memory_scope == "agent"
    assert queue.filesystem_scope == "workspace"
    assert policy.credentials_for_queue("default") == ("api_token", "db_password")


def test_helpers_reject_by_default() -> None:
    """Claims, grants and credential use are allowed only where the policy says so."""
    policy = parse_policy(GOOD)
    assert policy.may_claim("alice", "default")
    assert not policy.may_claim("bob", "default")
    assert not policy.may_claim("mallory", "default")
    assert policy.credential_allowed("api_token", "fetch")
    assert not policy.credential_allowed("api_token", "run")
    assert not policy.credential_allowed("nope", "fetch")
    assert policy.tools_for_queue("unknown") == ()
    with pytest.raises(PolicyDenied, match="'nope'"):
        policy.tool("nope")
    with pytest.raises(PolicyDenied, match="'ghost'"):
        policy.queue("ghost")


def test_granted_tool_denial_names_the_tool() -> None:
    """A tool the queue does not grant is refused with PolicyDenied naming the tool."""
    text = GOOD.replace('tools = ["fetch", "run", "echo"]', 'tools = ["echo"]')
    policy = parse_policy(text)
    assert policy.granted_tool("default", "echo").adapter == "python"
    with pytest.raises(PolicyDenied, match="'fetch'") as info:
        policy.granted_tool("default", "fetch")
    assert info.value.metadata["tool"] == "fetch"


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ("cpu_seconds = 2", "cpu_seconds = 2\nbogus = 1", "tools.run.exec.bogus", "bogus"),
        (
            'auth_template = "{secret}"',
            'auth_template = "{secret}"\nextra = true',
            "tools.fetch.http.extra",
            "extra =",
        ),
        ("max_attempts = 2", "max_attempts = 2\nretries = 3", "queues.default.retries", "retries"),
        (
            'tools = ["fetch", "run", "echo"]',
            'tools = ["fetch", "missing"]',
            "queues.default.tools",
            'tools = ["fetch", "missing"]',
        ),
        ('queues = ["default"]', 'queues = ["nowhere"]', "agents.alice.queues", "nowhere"),
        ('tools = ["fetch"]', 'tools = ["run"]', "tools.fetch.credential", 'credential = "api'),
        (
            'credential = "api_token"',
            'credential = "vanished"',
            "tools.fetch.credential",
            "vanished",
        ),
        ('tools = ["run"]', 'tools = ["ghost"]', "credentials.db_password.tools", "ghost"),
        ("cost_micros = 100", 'cost_micros = "100"', "tools.fetch.cost_micros", "cost_micros"),
        ("cost_micros = 100", "cost_micros = -1", "tools.fetch.cost_micros", "cost_micros"),
        ("idempotent = true", "idempotent = 1", "tools.fetch.idempotent", "idempotent"),
        ('adapter = "python"', 'adapter = "smtp"', "tools.echo.adapter", 'adapter = "smtp"'),
        (
            'base_url = "http://127.0.0.1:8080/api"',
            'base_url = "ftp://x/"',
            "tools.fetch.http.base_url",
            "ftp://",
        ),
        (
            'base_url = "http://127.0.0.1:8080/api"',
            'base_url = "http://u:p@h/"',
            "tools.fetch.http.base_url",
            "u:p@h",
        ),
        (
            'auth_template = "{secret}"',
            'auth_template = "Bearer"',
            "tools.fetch.http.auth_template",
            'auth_template = "Bearer"',
        ),
        (
            'argv = ["python3", "/opt/report.py", "{code}"]',
            'argv = ["python3", "/opt/report.py", "{script}"]',
            "tools.run.exec.argv",
            "{script}",
        ),
        (
            'argv = ["python3", "/opt/report.py", "{code}"]',
            'argv = ["python3", "/opt/report.py", "x={code}"]',
            "tools.run.exec.argv",
            "x={code}",
        ),
        (
            'secret_env = { DB_PASSWORD = "db_password" }',
            'secret_env = { DB_PASSWORD = "other" }',
            "tools.run.exec.secret_env.DB_PASSWORD",
            "secret_env",
        ),
        (
            'memory_scope = "agent"',
            'memory_scope = "global"',
            "queues.default.memory_scope",
            "global",
        ),
        (
            'network_allowlist = ["127.0.0.1", "example.com:443"]',
            'network_allowlist = ["http://example.com"]',
            "queues.default.network_allowlist",
            "http://example.com",
        ),
        ("lease_ttl_ms = 10000", "lease_ttl_ms = 5", "queues.default.lease_ttl_ms", "lease_ttl_ms"),
        ("version = 1", "version = 2", "version", "version = 2"),
        (
            '[tools.echo.python]\nentrypoint = "tether.sidecar.tools.builtin:echo"',
            '[tools.echo.http]\nbase_url = "http://x/"',
            "tools.echo.http",
            "[tools.echo.http]",
        ),
    ],
)
def test_errors_name_key_and_line(old: str, new: str, key: str, needle: str) -> None:
    """Each schema violation is a ConfigError naming the exact key path and its line."""
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    err = _error(text)
    assert err.metadata["key"] == key, err.message
    assert err.metadata["line"] == str(_line_of(text, needle)), err.message
    assert key in err.message
    assert f"line {_line_of(text, needle)}" in err.message


def test_empty_and_queueless_policies_are_rejected() -> None:
    """An empty document, or one that defines no queue, is an error (reject by default)."""
    assert "empty" in _error("").message
    assert "empty" in _error("# nothing\n").message
    err = _error("version = 1\n")
    assert err.metadata["key"] == "queues"
    assert _error("[queues.q]\n").metadata["key"] == "version"


def test_missing_adapter_section_and_syntax_errors() -> None:
    """A tool without its adapter table, or invalid TOML, is refused with a clear message."""
    err = _error(
        GOOD.replace('[tools.echo.python]\nentrypoint = "tether.sidecar.tools.builtin:echo"', "")
    )
    assert err.metadata["key"] == "tools.echo.python"
    assert err.metadata["line"] == str(_line_of(GOOD, "[tools.echo]"))
    syntax = _error("version = \n")
    assert "line 1" in syntax.message


def test_exec_tool_cannot_take_a_plain_credential() -> None:
    """Exec tools get secrets only through secret_env, so `credential` on one is an error."""
    text = GOOD.replace('adapter = "exec"', 'adapter = "exec"\ncredential = "db_password"')
    assert _error(text).metadata["key"] == "tools.run.credential"


def test_quoted_keys_and_inline_tables_are_located() -> None:
    """Quoted names and dotted keys still map to the line that introduced them."""
    text = 'version = 1\n\n[queues."my-q"]\ntools = []\n\n[agents]\nbob.queues = ["other"]\n'
    err = _error(text)
    assert err.metadata["key"] == "agents.bob.queues"
    assert err.metadata["line"] == "7"


SCHEMA_POLICY = """\
version = 1
[tools.echo]
adapter = "python"
description = "Echo the text back"
{schema}
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.q]
tools = ["echo"]
"""


def test_input_schema_as_a_table_or_a_json_string() -> None:
    """A tool's input_schema parses from a TOML table and from a string of JSON alike."""
    table = SCHEMA_POLICY.format(
        schema='[tools.echo.input_schema]\ntype = "object"\nrequired = ["text"]\n'
        '[tools.echo.input_schema.properties.text]\ntype = "string"'
    )
    text = SCHEMA_POLICY.format(
        schema='input_schema = \'\'\'{"type": "object", "required": ["text"], '
        '"properties": {"text": {"type": "string"}}}\'\'\''
    )
    expected = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
    for doc in (table, text):
        spec = parse_policy(doc).tools["echo"]
        assert spec.input_schema == expected
        assert spec.description == "Echo the text back"
    assert parse_policy(SCHEMA_POLICY.format(schema="")).tools["echo"].input_schema is None


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ('input_schema = "not json"', "not valid JSON"),
        ("input_schema = 3", "must be a table"),
        ('input_schema = \'{"type": "string"}\'', '"type" = "object"'),
        ('input_schema = \'{"type": "object", "properties": 3}\'', "not a valid JSON Schema"),
        (
            'input_schema = \'{"type": "object", "$ref": "https://example.com/s.json"}\'',
            "is not local",
        ),
        (
            'input_schema = \'{"type": "object", "description": "' + "x" * 70_000 + "\"}'",
            "larger than",
        ),
    ],
)
def test_bad_input_schema_is_refused_naming_the_key(schema: str, needle: str) -> None:
    """A malformed, non-object, remote-referencing or huge input_schema refuses the policy."""
    with pytest.raises(ConfigError) as err:
        parse_policy(SCHEMA_POLICY.format(schema=schema))
    assert "tools.echo.input_schema" in err.value.message
    assert needle in err.value.message


def test_argument_problem_names_where() -> None:
    """Arguments are checked against the schema; the first problem names its path."""
    from tether.core.toolschema import argument_problem

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert argument_problem(schema, {"n": 3}) is None
    assert "at /n" in (argument_problem(schema, {"n": "x"}) or "")
    assert "'n' is a required property" in (argument_problem(schema, {}) or "")

"""The policy document: who may claim what, which tools exist and what they may touch.

A policy is TOML (see docs/policy.md). It is parsed once into frozen
dataclasses and rejected by default: unknown keys, wrong types, references to
undefined tools/credentials/queues, a credential used by a tool it does not
grant, or an empty document are `ConfigError`s naming the key path and the line.
`Policy.digest` is the hex SHA-256 of the document's exact UTF-8 bytes, so a
lease or receipt can name the policy it ran under.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from tether.core.errors import ConfigError, PolicyDenied
from tether.core.timeouts import (
    MAX_COEFFICIENT,
    MAX_INTERVAL_MS,
    MAX_LIMIT_MS,
    MAX_NON_RETRYABLE,
    MIN_LIMIT_MS,
    RetryPolicy,
)
from tether.core.toolschema import parse_input_schema

POLICY_VERSION = 1
ADAPTERS = ("http", "exec", "python", "mcp")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_HTTP_ALLOWED_HEADERS = ("Content-Type",)
# Request headers no agent may set, whatever `allowed_headers` says (lower case): the
# credential and cookies, message framing and hop-by-hop headers, method overrides
# (they would bypass allowed_methods), and headers that change how the response is
# represented (an encoded, partial or re-charset body slips past redaction).
HTTP_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "accept-encoding",
        "accept-charset",
        "range",
        "if-range",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)
HTTP_RESERVED_HEADER_PREFIX = "x-tether-"  # the fencing token and whatever Tether adds later
MEMORY_SCOPES = ("task", "agent")
FILESYSTEM_SCOPES = ("workspace", "none")

DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 3_600_000
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_MCP_STARTUP_TIMEOUT_MS = 10_000
DEFAULT_MAX_PROCESSES = 256
RESERVED_ENV_PREFIX = "TETHER_"  # TETHER_TASK_ID, TETHER_FENCING_TOKEN: set by the sidecar

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_RE = PLACEHOLDER_RE
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+$")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(:([0-9]{1,5}))?$")
_FAILURE_TYPE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FAILURE_TYPE_RE = _FAILURE_TYPE_RE
_ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class AgentSpec:
    """An agent identity and the queues it may claim tasks from."""

    name: str
    queues: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class CredentialSpec:
    """A vault entry's grant: the tools allowed to use it. Its value is never in policy."""

    name: str
    tools: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class HttpSpec:
    """An HTTP tool: the base URL is fixed here, the agent supplies only the rest."""

    base_url: str
    allowed_methods: tuple[str, ...] = ("GET",)
    auth_header: str = "Authorization"
    auth_template: str = "Bearer {secret}"
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    follow_redirects: bool = False
    allowed_headers: tuple[str, ...] = DEFAULT_HTTP_ALLOWED_HEADERS
    """Request headers an agent may set (case-insensitive); any other one is refused."""

    @property
    def host(self) -> str:
        """Lower-case host name of the base URL."""
        return (urlsplit(self.base_url).hostname or "").lower()

    @property
    def port(self) -> int:
        """Port of the base URL (scheme default when absent)."""
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class ExecSpec:
    """An exec tool: an argv template whose `{param}` elements the agent fills."""

    argv: tuple[str, ...]
    params: tuple[str, ...] = ()
    path_params: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    secret_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    read_paths: tuple[str, ...] = ()
    cpu_seconds: int = 10
    memory_mb: int = 512
    file_size_mb: int = 16
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_processes: int = DEFAULT_MAX_PROCESSES
    """RLIMIT_NPROC: processes and threads of the tool's whole tree (its own user namespace)."""


@dataclass(frozen=True)
class McpSpec:
    """An MCP tool: a stdio MCP server the sidecar starts per lease; `tool` is proxied.

    The server is long-lived (one per lease), so `cpu_seconds` bounds its whole
    life, not one call; `max_output_bytes` bounds one JSON-RPC message.
    """

    argv: tuple[str, ...]
    tool: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    secret_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    read_paths: tuple[str, ...] = ()
    startup_timeout_ms: int = DEFAULT_MCP_STARTUP_TIMEOUT_MS
    cpu_seconds: int = 60
    memory_mb: int = 512
    file_size_mb: int = 16
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_processes: int = DEFAULT_MAX_PROCESSES
    """RLIMIT_NPROC: processes and threads of the server's whole tree."""


@dataclass(frozen=True)
class PythonSpec:
    """An in-process tool: a `module:function` callable taking (ctx, args)."""

    entrypoint: str
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ToolSpec:
    """A tool declared by policy, with exactly one adapter section."""

    name: str
    adapter: Literal["http", "exec", "python", "mcp"]
    cost_micros: int = 0
    idempotent: bool = False
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    credential: str | None = None
    description: str = ""
    """Shown to MCP clients in `tools/list` (what the tool does, for a model to read)."""
    input_schema: Mapping[str, Any] | None = None
    """JSON Schema (2020-12, an object) of the arguments: shown in `tools/list`, and
    every call's arguments must satisfy it (refused before anything runs otherwise)."""
    http: HttpSpec | None = None
    exec: ExecSpec | None = None
    python: PythonSpec | None = None
    mcp: McpSpec | None = None

    @property
    def credentials(self) -> tuple[str, ...]:
        """Every credential the tool may see (`credential` plus exec/mcp `secret_env`), sorted."""
        names: set[str] = set()
        if self.credential is not None:
            names.add(self.credential)
        if self.exec is not None:
            names.update(self.exec.secret_env.values())
        if self.mcp is not None:
            names.update(self.mcp.secret_env.values())
        return tuple(sorted(names))


@dataclass(frozen=True)
class QueueSpec:
    """A task type: the tools, hosts, scopes and limits its tasks run under."""

    name: str
    tools: tuple[str, ...] = ()
    network_allowlist: tuple[str, ...] = ()
    filesystem_scope: Literal["workspace", "none"] = "workspace"
    memory_scope: Literal["task", "agent"] = "task"
    budget_micros: int = 0
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    """The heartbeat timeout: a lease not renewed within it lapses."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    description: str = ""
    attempt_timeout_ms: int = 0
    """Start-to-close default for the queue's tasks; 0: none."""
    deadline_ms: int = 0
    """Schedule-to-close default (from submission); 0: none."""
    schedule_to_start_timeout_ms: int = 0
    """How long a task may wait ready for a lease; 0: none."""
    retry: RetryPolicy | None = None
    """The [queues.NAME.retry] table; None: the control plane's backoff, failures final."""


@dataclass(frozen=True, eq=False)
class Policy:
    """A parsed, validated policy document."""

    version: int
    agents: Mapping[str, AgentSpec]
    credentials: Mapping[str, CredentialSpec]
    tools: Mapping[str, ToolSpec]
    queues: Mapping[str, QueueSpec]
    text: str
    digest: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def queue(self, name: str) -> QueueSpec:
        """Returns the queue; raises PolicyDenied when the policy does not define it."""
        spec = self.queues.get(name)
        if spec is None:
            raise PolicyDenied(
                f"queue {name!r} is not defined by the policy", metadata={"queue": name}
            )
        return spec

    def tool(self, name: str) -> ToolSpec:
        """Returns the tool; raises PolicyDenied naming it when the policy does not define it."""
        spec = self.tools.get(name)
        if spec is None:
            raise PolicyDenied(
                f"tool {name!r} is not defined by the policy", metadata={"tool": name}
            )
        return spec

    def tools_for_queue(self, queue: str) -> tuple[str, ...]:
        """Names of the tools granted to tasks of `queue` (empty when the queue is unknown)."""
        spec = self.queues.get(queue)
        return spec.tools if spec is not None else ()

    def granted_tool(self, queue: str, tool: str) -> ToolSpec:
        """Returns the tool if `queue` grants it; raises PolicyDenied naming the tool otherwise."""
        if tool not in self.tools_for_queue(queue):
            raise PolicyDenied(
                f"tool {tool!r} is not granted to queue {queue!r}",
                metadata={"tool": tool, "queue": queue},
            )
        return self.tool(tool)

    def may_claim(self, agent: str, queue: str) -> bool:
        """True when the policy lets `agent` claim tasks from `queue`."""
        spec = self.agents.get(agent)
        return spec is not None and queue in spec.queues and queue in self.queues

    def credential_allowed(self, credential: str, tool: str) -> bool:
        """True when `credential` is defined and lists `tool`, and `tool` declares it."""
        cred = self.credentials.get(credential)
        spec = self.tools.get(tool)
        return (
            cred is not None
            and spec is not None
            and tool in cred.tools
            and credential in spec.credentials
        )

    def credentials_for_queue(self, queue: str) -> tuple[str, ...]:
        """Credentials any tool of `queue` may see, sorted (what a lease may be issued)."""
        names: set[str] = set()
        for tool in self.tools_for_queue(queue):
            names.update(self.tools[tool].credentials)
        return tuple(sorted(names))


# --------------------------------------------------------------------------- lines


def _split_key(raw: str) -> list[str]:
    """Splits a TOML dotted key (bare or quoted parts) into its parts."""
    parts: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        while i < n and raw[i] in " \t":
            i += 1
        if i < n and raw[i] in "\"'":
            quote = raw[i]
            j = raw.find(quote, i + 1)
            if j < 0:
                return parts
            parts.append(raw[i + 1 : j])
            i = j + 1
        else:
            j = i
            while j < n and raw[j] not in ". \t":
                j += 1
            parts.append(raw[i:j])
            i = j
        while i < n and raw[i] in " \t":
            i += 1
        if i < n and raw[i] == ".":
            i += 1
    return parts


_KEY_LINE_RE = re.compile(
    r"""^\s*((?:[A-Za-z0-9_\-]+|"[^"\n]*"|'[^'\n]*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"\n]*"|'[^'\n]*'))*)\s*="""
)
_HEADER_LINE_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


class _Lines:
    """Maps key paths to the first line that mentions them (TOML parsers give no lines).

    Best effort but deterministic: table headers and `key =` lines are scanned,
    skipping multi-line strings; a path is located by its longest known prefix.
    """

    def __init__(self, text: str) -> None:
        self._first: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_ml: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_ml is not None:
                if line.count(in_ml) % 2 == 1:
                    in_ml = None
                continue
            header = _HEADER_LINE_RE.match(line)
            if header and not line.lstrip().startswith("[="):
                table = tuple(_split_key(header.group(1)))
                self._note(table, lineno)
                continue
            key = _KEY_LINE_RE.match(line)
            if key:
                self._note(table + tuple(_split_key(key.group(1))), lineno)
                rest = line[key.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_ml = quote
                        break

    def _note(self, path: tuple[str, ...], lineno: int) -> None:
        for i in range(1, len(path) + 1):
            self._first.setdefault(path[:i], lineno)

    def line_of(self, path: tuple[str, ...]) -> int:
        """The line of the longest prefix of `path` seen in the document, or 1."""
        for i in range(len(path), 0, -1):
            found = self._first.get(path[:i])
            if found is not None:
                return found
        return 1


def _fmt(path: tuple[str, ...]) -> str:
    return ".".join(p if _NAME_RE.match(p) or p == "" else repr(p) for p in path) or "<root>"


class _Checker:
    """Typed accessors that raise ConfigError naming the key path and its line."""

    def __init__(self, lines: _Lines) -> None:
        self.lines = lines

    def fail(self, path: tuple[str, ...], problem: str) -> ConfigError:
        key = _fmt(path)
        line = self.lines.line_of(path)
        return ConfigError(
            f"policy: {key} (line {line}): {problem}", metadata={"key": key, "line": str(line)}
        )

    def table(self, value: Any, path: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, got {_kind(value)}")
        return value

    def keys(self, tbl: Mapping[str, Any], path: tuple[str, ...], allowed: tuple[str, ...]) -> None:
        for key in tbl:
            if key not in allowed:
                raise self.fail(
                    (*path, key), f"unknown key (allowed here: {', '.join(sorted(allowed))})"
                )

    def name(self, name: str, path: tuple[str, ...]) -> str:
        if not _NAME_RE.match(name):
            raise self.fail(path, "names use letters, digits, '_', '-', '.' (at most 128)")
        return name

    def string(self, value: Any, path: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_kind(value)}")
        return value

    def boolean(self, value: Any, path: tuple[str, ...]) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be a boolean, got {_kind(value)}")
        return value

    def integer(
        self, value: Any, path: tuple[str, ...], *, lo: int = 0, hi: int = 2**63 - 1
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(path, f"must be between {lo} and {hi}, got {value}")
        return value

    def strings(self, value: Any, path: tuple[str, ...], *, unique: bool = True) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(path, f"must be an array of strings, got {_kind(value)}")
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(path, f"item {i} must be a string, got {_kind(item)}")
            if unique and item in out:
                raise self.fail(path, f"item {i} ({item!r}) is repeated")
            out.append(item)
        return tuple(out)

    def string_map(self, value: Any, path: tuple[str, ...]) -> dict[str, str]:
        tbl = self.table(value, path)
        for key, item in tbl.items():
            self.string(item, (*path, key))
        return dict(tbl)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


T = TypeVar("T")


def _opt(tbl: Mapping[str, Any], key: str, default: T, conv: Any, path: tuple[str, ...]) -> T:
    if key not in tbl:
        return default
    result: T = conv(tbl[key], (*path, key))
    return result


# --------------------------------------------------------------------------- parsing


def load_policy(path: str | Path) -> Policy:
    """Reads and parses a policy file.

    Raises:
        ConfigError: the file cannot be read or the document is invalid.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"policy: cannot read {path}: {err}") from err
    return parse_policy(text)


def parse_policy(text: str) -> Policy:
    """Parses and validates a policy document.

    Raises:
        ConfigError: the document is not TOML or breaks the schema; the message
            names the key path and its line.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"policy: not valid TOML: {err}", metadata={"key": "<root>"}) from err
    c = _Checker(_Lines(text))
    if not doc:
        raise c.fail((), "the policy is empty (reject by default: declare version and queues)")
    c.keys(doc, (), ("version", "agents", "credentials", "tools", "queues"))
    if "version" not in doc:
        raise c.fail(("version",), f"missing (use version = {POLICY_VERSION})")
    version = c.integer(doc["version"], ("version",))
    if version != POLICY_VERSION:
        raise c.fail(("version",), f"unsupported version {version} (this build reads 1)")

    tools = {
        name: _parse_tool(c, name, raw)
        for name, raw in c.table(doc.get("tools", {}), ("tools",)).items()
    }
    credentials = {
        name: _parse_credential(c, name, raw)
        for name, raw in c.table(doc.get("credentials", {}), ("credentials",)).items()
    }
    queues = {
        name: _parse_queue(c, name, raw)
        for name, raw in c.table(doc.get("queues", {}), ("queues",)).items()
    }
    agents = {
        name: _parse_agent(c, name, raw)
        for name, raw in c.table(doc.get("agents", {}), ("agents",)).items()
    }
    if not queues:
        raise c.fail(("queues",), "no queues defined: a policy must grant at least one queue")

    # Cross references: reject anything that names what is not defined.
    for cred in credentials.values():
        for i, tool in enumerate(cred.tools):
            if tool not in tools:
                raise c.fail(
                    ("credentials", cred.name, "tools"), f"item {i}: undefined tool {tool!r}"
                )
    for tool_spec in tools.values():
        if tool_spec.credential is not None:
            _check_grant(c, credentials, tool_spec.name, tool_spec.credential, ("credential",))
        if tool_spec.exec is not None:
            for env_name, cred_name in tool_spec.exec.secret_env.items():
                _check_grant(
                    c, credentials, tool_spec.name, cred_name, ("exec", "secret_env", env_name)
                )
        if tool_spec.mcp is not None:
            for env_name, cred_name in tool_spec.mcp.secret_env.items():
                _check_grant(
                    c, credentials, tool_spec.name, cred_name, ("mcp", "secret_env", env_name)
                )
    for queue in queues.values():
        for i, tool in enumerate(queue.tools):
            if tool not in tools:
                raise c.fail(("queues", queue.name, "tools"), f"item {i}: undefined tool {tool!r}")
    for agent in agents.values():
        for i, queue_name in enumerate(agent.queues):
            if queue_name not in queues:
                raise c.fail(
                    ("agents", agent.name, "queues"), f"item {i}: undefined queue {queue_name!r}"
                )

    return Policy(
        version=version,
        agents=MappingProxyType(agents),
        credentials=MappingProxyType(credentials),
        tools=MappingProxyType(tools),
        queues=MappingProxyType(queues),
        text=text,
        digest=policy_digest(text),
    )


def policy_digest(text: str) -> str:
    """Hex SHA-256 of the document's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_grant(
    c: _Checker,
    credentials: Mapping[str, CredentialSpec],
    tool: str,
    cred: str,
    rel: tuple[str, ...],
) -> None:
    path = ("tools", tool, *rel)
    spec = credentials.get(cred)
    if spec is None:
        raise c.fail(path, f"undefined credential {cred!r}")
    if tool not in spec.tools:
        raise c.fail(
            path,
            f"credential {cred!r} does not list tool {tool!r} in credentials.{cred}.tools",
        )


def _parse_agent(c: _Checker, name: str, raw: Any) -> AgentSpec:
    path = ("agents", c.name(name, ("agents", name)))
    tbl = c.table(raw, path)
    c.keys(tbl, path, ("queues", "description"))
    if "queues" not in tbl:
        raise c.fail((*path, "queues"), "missing (the queues this agent may claim from)")
    return AgentSpec(
        name=name,
        queues=c.strings(tbl["queues"], (*path, "queues")),
        description=_opt(tbl, "description", "", c.string, path),
    )


def _parse_credential(c: _Checker, name: str, raw: Any) -> CredentialSpec:
    path = ("credentials", c.name(name, ("credentials", name)))
    tbl = c.table(raw, path)
    c.keys(tbl, path, ("tools", "description"))
    if "tools" not in tbl:
        raise c.fail((*path, "tools"), "missing (the tools allowed to use this credential)")
    return CredentialSpec(
        name=name,
        tools=c.strings(tbl["tools"], (*path, "tools")),
        description=_opt(tbl, "description", "", c.string, path),
    )


def _parse_queue(c: _Checker, name: str, raw: Any) -> QueueSpec:
    path = ("queues", c.name(name, ("queues", name)))
    tbl = c.table(raw, path)
    c.keys(
        tbl,
        path,
        (
            "tools",
            "network_allowlist",
            "filesystem_scope",
            "memory_scope",
            "budget_micros",
            "lease_ttl_ms",
            "max_attempts",
            "max_artifact_bytes",
            "description",
            "attempt_timeout_ms",
            "deadline_ms",
            "schedule_to_start_timeout_ms",
            "retry",
        ),
    )
    hosts: tuple[str, ...] = _opt(tbl, "network_allowlist", (), c.strings, path)
    for i, host in enumerate(hosts):
        match = _HOST_RE.match(host)
        if not match or (match.group(3) and not 0 < int(match.group(3)) < 65536):
            raise c.fail(
                (*path, "network_allowlist"), f"item {i} ({host!r}) is not 'host' or 'host:port'"
            )
    fs = _opt(tbl, "filesystem_scope", "workspace", c.string, path)
    if fs not in FILESYSTEM_SCOPES:
        raise c.fail((*path, "filesystem_scope"), f"must be one of {', '.join(FILESYSTEM_SCOPES)}")
    mem = _opt(tbl, "memory_scope", "task", c.string, path)
    if mem not in MEMORY_SCOPES:
        raise c.fail((*path, "memory_scope"), f"must be one of {', '.join(MEMORY_SCOPES)}")
    _limit = _limit_checker(c)
    return QueueSpec(
        name=name,
        tools=_opt(tbl, "tools", (), c.strings, path),
        network_allowlist=tuple(h.lower() for h in hosts),
        filesystem_scope=fs,  # type: ignore[arg-type]  # checked against FILESYSTEM_SCOPES
        memory_scope=mem,  # type: ignore[arg-type]  # checked against MEMORY_SCOPES
        budget_micros=_opt(tbl, "budget_micros", 0, c.integer, path),
        lease_ttl_ms=_opt(
            tbl,
            "lease_ttl_ms",
            DEFAULT_LEASE_TTL_MS,
            lambda v, p: c.integer(v, p, lo=MIN_LEASE_TTL_MS, hi=MAX_LEASE_TTL_MS),
            path,
        ),
        max_attempts=_opt(
            tbl, "max_attempts", DEFAULT_MAX_ATTEMPTS, lambda v, p: c.integer(v, p, lo=1), path
        ),
        max_artifact_bytes=_opt(
            tbl, "max_artifact_bytes", DEFAULT_MAX_ARTIFACT_BYTES, c.integer, path
        ),
        description=_opt(tbl, "description", "", c.string, path),
        attempt_timeout_ms=_opt(tbl, "attempt_timeout_ms", 0, _limit, path),
        deadline_ms=_opt(tbl, "deadline_ms", 0, _limit, path),
        schedule_to_start_timeout_ms=_opt(tbl, "schedule_to_start_timeout_ms", 0, _limit, path),
        retry=_parse_retry(c, tbl, path),
    )


def _limit_checker(c: _Checker) -> Any:
    def check(value: Any, path: tuple[str, ...]) -> int:
        return c.integer(value, path, lo=MIN_LIMIT_MS, hi=MAX_LIMIT_MS)

    return check


def _parse_retry(
    c: _Checker, queue: Mapping[str, Any], path: tuple[str, ...]
) -> RetryPolicy | None:
    """The queue's [retry] table (None when absent); maximum_attempts is max_attempts."""
    if "retry" not in queue:
        return None
    sub = (*path, "retry")
    tbl = c.table(queue["retry"], sub)
    c.keys(
        tbl,
        sub,
        (
            "initial_interval_ms",
            "backoff_coefficient",
            "maximum_interval_ms",
            "maximum_attempts",
            "non_retryable_reasons",
            "retry_failures",
        ),
    )
    attempts = queue.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    if "maximum_attempts" in tbl:
        attempts = c.integer(tbl["maximum_attempts"], (*sub, "maximum_attempts"), lo=1)
        if "max_attempts" in queue and queue["max_attempts"] != attempts:
            raise c.fail(
                (*sub, "maximum_attempts"), "differs from the queue's max_attempts; set one of them"
            )
    initial = _opt(
        tbl,
        "initial_interval_ms",
        1_000,
        lambda v, p: c.integer(v, p, lo=1, hi=MAX_INTERVAL_MS),
        sub,
    )
    coefficient = 2.0
    if "backoff_coefficient" in tbl:
        raw = tbl["backoff_coefficient"]
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise c.fail((*sub, "backoff_coefficient"), f"must be a number, got {_kind(raw)}")
        if not 1.0 <= float(raw) <= MAX_COEFFICIENT:
            raise c.fail(
                (*sub, "backoff_coefficient"), f"must be between 1 and {MAX_COEFFICIENT:g}"
            )
        coefficient = float(raw)
    maximum = _opt(
        tbl,
        "maximum_interval_ms",
        max(60_000, initial),
        lambda v, p: c.integer(v, p, lo=initial, hi=MAX_INTERVAL_MS),
        sub,
    )
    reasons: tuple[str, ...] = _opt(tbl, "non_retryable_reasons", (), c.strings, sub)
    if len(reasons) > MAX_NON_RETRYABLE:
        raise c.fail((*sub, "non_retryable_reasons"), f"at most {MAX_NON_RETRYABLE} types")
    for i, reason in enumerate(reasons):
        if not _FAILURE_TYPE_RE.match(reason):
            raise c.fail(
                (*sub, "non_retryable_reasons"),
                f"item {i} ({reason!r}) is not a failure type ([A-Za-z0-9._-]{{1,64}})",
            )
    return RetryPolicy(
        initial_interval_ms=initial,
        backoff_coefficient=coefficient,
        maximum_interval_ms=maximum,
        maximum_attempts=attempts,
        non_retryable_reasons=reasons,
        retry_failures=_opt(tbl, "retry_failures", False, c.boolean, sub),
    )


def _parse_tool(c: _Checker, name: str, raw: Any) -> ToolSpec:
    path = ("tools", c.name(name, ("tools", name)))
    tbl = c.table(raw, path)
    c.keys(
        tbl,
        path,
        (
            "adapter",
            "cost_micros",
            "idempotent",
            "timeout_ms",
            "credential",
            "description",
            "input_schema",
            *ADAPTERS,
        ),
    )
    if "adapter" not in tbl:
        raise c.fail((*path, "adapter"), f"missing (one of {', '.join(ADAPTERS)})")
    adapter = c.string(tbl["adapter"], (*path, "adapter"))
    if adapter not in ADAPTERS:
        raise c.fail(
            (*path, "adapter"), f"unknown adapter {adapter!r} (one of {', '.join(ADAPTERS)})"
        )
    for other in ADAPTERS:
        if other != adapter and other in tbl:
            raise c.fail((*path, other), f"section does not apply to adapter {adapter!r}")
    if adapter not in tbl:
        raise c.fail((*path, adapter), f"missing [{_fmt(path)}.{adapter}] section")
    credential = _opt(tbl, "credential", None, c.string, path)
    if credential is not None and adapter in ("exec", "mcp"):
        raise c.fail(
            (*path, "credential"),
            f"{adapter} tools receive credentials through "
            f'{adapter}.secret_env = {{ENV = "credential"}}',
        )
    http = exec_ = python = mcp = None
    sub = (*path, adapter)
    if adapter == "http":
        http = _parse_http(c, c.table(tbl["http"], sub), sub)
    elif adapter == "exec":
        exec_ = _parse_exec(c, c.table(tbl["exec"], sub), sub)
    elif adapter == "mcp":
        mcp = _parse_mcp(c, c.table(tbl["mcp"], sub), sub, name)
    else:
        python = _parse_python(c, c.table(tbl["python"], sub), sub)
    return ToolSpec(
        name=name,
        adapter=adapter,  # type: ignore[arg-type]  # checked against ADAPTERS
        cost_micros=_opt(tbl, "cost_micros", 0, c.integer, path),
        idempotent=_opt(tbl, "idempotent", False, c.boolean, path),
        timeout_ms=_opt(
            tbl,
            "timeout_ms",
            DEFAULT_TIMEOUT_MS,
            lambda v, p: c.integer(v, p, lo=1, hi=MAX_LEASE_TTL_MS),
            path,
        ),
        credential=credential,
        description=_opt(tbl, "description", "", c.string, path),
        input_schema=(
            parse_input_schema(
                tbl["input_schema"], lambda problem: c.fail((*path, "input_schema"), problem)
            )
            if "input_schema" in tbl
            else None
        ),
        http=http,
        exec=exec_,
        python=python,
        mcp=mcp,
    )


def _parse_http(c: _Checker, tbl: dict[str, Any], path: tuple[str, ...]) -> HttpSpec:
    c.keys(
        tbl,
        path,
        (
            "base_url",
            "allowed_methods",
            "auth_header",
            "auth_template",
            "max_response_bytes",
            "follow_redirects",
            "allowed_headers",
        ),
    )
    if "base_url" not in tbl:
        raise c.fail((*path, "base_url"), "missing (the fixed http(s) URL the tool calls)")
    base_url = c.string(tbl["base_url"], (*path, "base_url"))
    parts = urlsplit(base_url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise c.fail((*path, "base_url"), "must be an absolute http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise c.fail((*path, "base_url"), "must not carry credentials (use a [credentials] entry)")
    if parts.query or parts.fragment:
        raise c.fail((*path, "base_url"), "must not have a query or fragment")
    methods = _opt(tbl, "allowed_methods", ("GET",), c.strings, path)
    for i, method in enumerate(methods):
        if method not in HTTP_METHODS:
            raise c.fail(
                (*path, "allowed_methods"),
                f"item {i} ({method!r}) is not one of {', '.join(HTTP_METHODS)}",
            )
    if not methods:
        raise c.fail((*path, "allowed_methods"), "must name at least one method")
    auth_header = _opt(tbl, "auth_header", "Authorization", c.string, path)
    if not _HEADER_RE.match(auth_header):
        raise c.fail((*path, "auth_header"), "is not a valid HTTP header name")
    template = _opt(tbl, "auth_template", "Bearer {secret}", c.string, path)
    if _PLACEHOLDER_RE.findall(template) != ["secret"] or "\n" in template or "\r" in template:
        raise c.fail(
            (*path, "auth_template"), "must contain {secret} exactly once and no other placeholder"
        )
    headers = _opt(tbl, "allowed_headers", DEFAULT_HTTP_ALLOWED_HEADERS, c.strings, path)
    for i, header in enumerate(headers):
        lower = header.lower()
        if not _HEADER_RE.match(header):
            why = "is not a valid HTTP header name"
        elif lower in HTTP_RESERVED_HEADERS or lower.startswith(HTTP_RESERVED_HEADER_PREFIX):
            why = "is set by the sidecar (or never sent); no agent may set it"
        elif lower == auth_header.lower():
            why = "is the auth_header, which carries the credential"
        elif lower in (h.lower() for h in headers[:i]):
            why = "is repeated"
        else:
            continue
        raise c.fail((*path, "allowed_headers"), f"item {i} ({header!r}) {why}")
    return HttpSpec(
        base_url=base_url,
        allowed_methods=methods,
        auth_header=auth_header,
        auth_template=template,
        max_response_bytes=_opt(
            tbl,
            "max_response_bytes",
            DEFAULT_MAX_RESPONSE_BYTES,
            lambda v, p: c.integer(v, p, lo=1),
            path,
        ),
        follow_redirects=_opt(tbl, "follow_redirects", False, c.boolean, path),
        allowed_headers=headers,
    )


def _parse_exec(c: _Checker, tbl: dict[str, Any], path: tuple[str, ...]) -> ExecSpec:
    c.keys(
        tbl,
        path,
        (
            "argv",
            "params",
            "path_params",
            "env",
            "secret_env",
            "read_paths",
            "cpu_seconds",
            "memory_mb",
            "file_size_mb",
            "max_output_bytes",
            "max_processes",
        ),
    )
    if "argv" not in tbl:
        raise c.fail((*path, "argv"), 'missing (e.g. argv = ["python3", "-c", "{code}"])')
    argv = c.strings(tbl["argv"], (*path, "argv"), unique=False)
    if not argv:
        raise c.fail((*path, "argv"), "must not be empty")
    params: tuple[str, ...] = _opt(tbl, "params", (), c.strings, path)
    for i, param in enumerate(params):
        if not _ENV_RE.match(param):
            raise c.fail((*path, "params"), f"item {i} ({param!r}) is not an identifier")
    for i, element in enumerate(argv):
        found = _PLACEHOLDER_RE.findall(element)
        if not found:
            continue
        if i == 0:
            raise c.fail((*path, "argv"), "item 0 (the program) cannot be a placeholder")
        if _PLACEHOLDER_RE.fullmatch(element) is None:
            raise c.fail(
                (*path, "argv"), f"item {i} ({element!r}): a placeholder must be a whole element"
            )
        if found[0] not in params:
            raise c.fail((*path, "argv"), f"item {i}: {{{found[0]}}} is not declared in params")
    path_params: tuple[str, ...] = _opt(tbl, "path_params", (), c.strings, path)
    for i, param in enumerate(path_params):
        if param not in params:
            raise c.fail((*path, "path_params"), f"item {i} ({param!r}) is not declared in params")
    env, secret_env = _parse_env(c, tbl, path)
    code = agent_code_element(argv)
    if secret_env and code is not None:
        index, runner = code
        raise c.fail(
            (*path, "secret_env"),
            f"argv item {index} ({argv[index]!r}) is code the agent supplies to {runner}, so "
            "a secret in this tool's environment is one print away from the agent; redaction "
            "is a safety net, not a boundary (a reversed or split string passes it). Give "
            "secrets only to tools that run fixed code, with agent input as data after the "
            'script (e.g. argv = ["python3", "/opt/tool.py", "{query}"])',
        )
    read_paths = _parse_read_paths(c, tbl, path)
    return ExecSpec(
        argv=argv,
        read_paths=read_paths,
        params=params,
        path_params=path_params,
        env=MappingProxyType(env),
        secret_env=MappingProxyType(secret_env),
        cpu_seconds=_opt(
            tbl, "cpu_seconds", 10, lambda v, p: c.integer(v, p, lo=1, hi=86_400), path
        ),
        memory_mb=_opt(
            tbl, "memory_mb", 512, lambda v, p: c.integer(v, p, lo=16, hi=1 << 20), path
        ),
        file_size_mb=_opt(
            tbl, "file_size_mb", 16, lambda v, p: c.integer(v, p, lo=0, hi=1 << 20), path
        ),
        max_output_bytes=_opt(
            tbl,
            "max_output_bytes",
            DEFAULT_MAX_OUTPUT_BYTES,
            lambda v, p: c.integer(v, p, lo=1),
            path,
        ),
        max_processes=_max_processes(c, tbl, path),
    )


def _max_processes(c: _Checker, tbl: Mapping[str, Any], path: tuple[str, ...]) -> int:
    return _opt(
        tbl,
        "max_processes",
        DEFAULT_MAX_PROCESSES,
        lambda v, p: c.integer(v, p, lo=1, hi=1 << 16),
        path,
    )


# Programs that run code named in their arguments, and the options whose next element is
# that code. Their first positional argument (the script, awk's program, jq's filter) is
# code too. Shells, language runtimes and text tools with an exec or env feature.
_CODE_RUNNERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("python", "pypy"), ("-c", "-m")),
    **dict.fromkeys(("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "csh", "tcsh"), ("-c",)),
    "fish": ("-c", "--command"),
    **dict.fromkeys(("node", "nodejs", "bun"), ("-e", "--eval", "-p", "--print", "-r")),
    "deno": ("eval", "run"),
    "perl": ("-e", "-E"),
    **dict.fromkeys(("ruby", "lua", "luajit", "Rscript", "R", "osascript", "elixir"), ("-e",)),
    "php": ("-r",),
    "julia": ("-e", "-E", "--eval", "--print"),
    **dict.fromkeys(("pwsh", "powershell"), ("-c", "-command", "-encodedcommand", "-ec")),
    **dict.fromkeys(("awk", "gawk", "mawk", "nawk", "jq", "tclsh", "wish"), ()),
    "sed": ("-e", "--expression"),
}
_RUNNER_RE = re.compile(r"^([A-Za-z]+?)(?:[0-9][0-9.]*)?(?:\.exe)?$")


def agent_code_element(argv: tuple[str, ...]) -> tuple[int, str] | None:
    """(index, program) of an argv placeholder that a known interpreter runs as code.

    Catches the common shapes: a placeholder after an interpreter's code option
    (`python3 -c {code}`, `sh -c {cmd}`, `node -e {js}`), in its script position
    (`python3 {file}`, `awk {prog}`), as the program of `env`, or before the
    script among options (`python3 -u {x} tool.py`). A literal right after an
    option may be that option's value, so the script counts only when it
    follows the program, `--` or another positional. It cannot see a fixed
    program that runs files the agent wrote (`make`, `npm test`): that is the
    policy author's call.
    """
    start = 0
    if argv and argv[0].rsplit("/", 1)[-1] == "env":
        start = 1
        while start < len(argv) and _PLACEHOLDER_RE.fullmatch(argv[start]) is None:
            if not (argv[start].startswith("-") or "=" in argv[start]):
                break
            start += 1
        if start >= len(argv):
            return None
        if _PLACEHOLDER_RE.fullmatch(argv[start]):
            return start, "env"
    match = _RUNNER_RE.match(argv[start].rsplit("/", 1)[-1])
    runner = match.group(1) if match else ""
    flags = _CODE_RUNNERS.get(runner)
    if flags is None:
        return None
    fold = runner in ("pwsh", "powershell")
    code_next = script_seen = after_option = False
    for i in range(start + 1, len(argv)):
        element = argv[i]
        key = element.lower() if fold else element
        if _PLACEHOLDER_RE.fullmatch(element):
            if code_next or not script_seen:
                return i, runner
            continue
        if script_seen:
            continue
        if code_next:  # fixed code: what follows is its data
            code_next, script_seen = False, True
        elif element == "--":
            after_option = False
            continue
        elif key in flags or (
            element.startswith("-")
            and not element.startswith("--")
            and any(len(f) == 2 and f[0] == "-" and element.endswith(f[1]) for f in flags)
        ):
            code_next = True
            continue
        elif element.startswith("-") and element != "-":
            after_option = "=" not in element
            continue
        elif not after_option:
            script_seen = True
        after_option = False
    return None


def _parse_env(
    c: _Checker, tbl: Mapping[str, Any], path: tuple[str, ...]
) -> tuple[dict[str, str], dict[str, str]]:
    """`env` and `secret_env` of an exec or mcp section, checked."""
    env: dict[str, str] = _opt(tbl, "env", {}, c.string_map, path)
    secret_env: dict[str, str] = _opt(tbl, "secret_env", {}, c.string_map, path)
    for key in (*env, *secret_env):
        sub = "env" if key in env else "secret_env"
        if not _ENV_RE.match(key):
            raise c.fail((*path, sub, key), "is not a valid environment variable name")
        if key.upper().startswith(RESERVED_ENV_PREFIX):
            raise c.fail(
                (*path, sub, key),
                f"{RESERVED_ENV_PREFIX}* variables are set by the sidecar "
                "(TETHER_TASK_ID, TETHER_FENCING_TOKEN)",
            )
    for key in secret_env:
        if key in env:
            raise c.fail((*path, "secret_env", key), "is also set in env")
    return env, secret_env


def _parse_read_paths(
    c: _Checker, tbl: Mapping[str, Any], path: tuple[str, ...]
) -> tuple[str, ...]:
    read_paths: tuple[str, ...] = _opt(tbl, "read_paths", (), c.strings, path)
    for i, item in enumerate(read_paths):
        if not item.startswith("/"):
            raise c.fail((*path, "read_paths"), f"item {i} ({item!r}) must be an absolute path")
    return read_paths


def _parse_mcp(c: _Checker, tbl: dict[str, Any], path: tuple[str, ...], name: str) -> McpSpec:
    c.keys(
        tbl,
        path,
        (
            "argv",
            "tool",
            "env",
            "secret_env",
            "read_paths",
            "startup_timeout_ms",
            "cpu_seconds",
            "memory_mb",
            "file_size_mb",
            "max_output_bytes",
            "max_processes",
        ),
    )
    if "argv" not in tbl:
        raise c.fail((*path, "argv"), 'missing (e.g. argv = ["python3", "/opt/mcp/server.py"])')
    argv = c.strings(tbl["argv"], (*path, "argv"), unique=False)
    if not argv:
        raise c.fail((*path, "argv"), "must not be empty")
    for i, element in enumerate(argv):
        if "\0" in element:
            raise c.fail((*path, "argv"), f"item {i} must not contain NUL")
    tool = _opt(tbl, "tool", name, c.string, path)
    if not tool or any(ch.isspace() or ord(ch) < 0x20 for ch in tool):
        raise c.fail((*path, "tool"), "must be a non-empty MCP tool name without whitespace")
    env, secret_env = _parse_env(c, tbl, path)
    return McpSpec(
        argv=argv,
        tool=tool,
        env=MappingProxyType(env),
        secret_env=MappingProxyType(secret_env),
        read_paths=_parse_read_paths(c, tbl, path),
        startup_timeout_ms=_opt(
            tbl,
            "startup_timeout_ms",
            DEFAULT_MCP_STARTUP_TIMEOUT_MS,
            lambda v, p: c.integer(v, p, lo=1, hi=MAX_LEASE_TTL_MS),
            path,
        ),
        cpu_seconds=_opt(
            tbl, "cpu_seconds", 60, lambda v, p: c.integer(v, p, lo=1, hi=86_400), path
        ),
        memory_mb=_opt(
            tbl, "memory_mb", 512, lambda v, p: c.integer(v, p, lo=16, hi=1 << 20), path
        ),
        file_size_mb=_opt(
            tbl, "file_size_mb", 16, lambda v, p: c.integer(v, p, lo=0, hi=1 << 20), path
        ),
        max_output_bytes=_opt(
            tbl,
            "max_output_bytes",
            DEFAULT_MAX_OUTPUT_BYTES,
            lambda v, p: c.integer(v, p, lo=1024, hi=1 << 30),
            path,
        ),
        max_processes=_max_processes(c, tbl, path),
    )


def _parse_python(c: _Checker, tbl: dict[str, Any], path: tuple[str, ...]) -> PythonSpec:
    c.keys(tbl, path, ("entrypoint", "config"))
    if "entrypoint" not in tbl:
        raise c.fail((*path, "entrypoint"), 'missing (e.g. entrypoint = "package.module:function")')
    entrypoint = c.string(tbl["entrypoint"], (*path, "entrypoint"))
    if not _ENTRYPOINT_RE.match(entrypoint):
        raise c.fail((*path, "entrypoint"), "must be 'module:function'")
    config = c.table(tbl.get("config", {}), (*path, "config"))
    return PythonSpec(entrypoint=entrypoint, config=MappingProxyType(dict(config)))

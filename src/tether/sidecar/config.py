"""Sidecar configuration: one frozen dataclass, one `load()`.

Precedence is argument > `TETHER_*` environment > TOML file > defaults, and
every value is validated on load (a `ConfigError` names the offending key).
The config holds *paths* to secrets (node key, enrolment token, agent tokens),
never the secrets themselves.

TOML file form (every key optional; arguments and env override it)::

    control = "127.0.0.1:7233"           # several replicas: "a:7233,b:7233" (fails over)
    enroll = "127.0.0.1:7234"            # enrolment address (default: control port + 1)
    trust_bundle = "trust.pem"           # CA certificate(s) + control public key(s), pinned
    node_id = "node-1"
    key = "node.key"                     # Ed25519 PEM, mode 0600
    enrollment_token_file = "join.token"  # single-use join token (first enrolment only)
    state_dir = "state"
    socket = "tether.sock"
    listen_tcp = "127.0.0.1:7300"
    metrics_listen = "127.0.0.1:9464"     # Prometheus /metrics; absent: off
    mcp = true                           # serve MCP (docs/mcp.md) on mcp_socket
    mcp_socket = "tether-mcp.sock"       # default: "<socket stem>-mcp.sock" beside socket
    mcp_listen = "127.0.0.1:7801"        # also on loopback TCP (loopback only); implies mcp
    grace_period_ms = 10000
    agent_liveness_ms = 0                # 0: the lease TTL
    renew_divisor = 3
    memory_max_keys = 1000               # quotas (see docs/operations.md, "Quotas")
    memory_max_bytes = 16777216
    artifact_max_task_bytes = 1073741824
    workspace_max_bytes = 1073741824
    denied_receipts_per_minute = 60
    max_concurrent_rpcs = 1024           # load shedding (docs/operations.md, "Load shedding")
    max_rpcs_per_caller = 128            # per agent
    caller_rate_per_s = 2000             # per agent; 0: off
    [agents.alice]
    token_file = "alice.token"
    socket = "alice.sock"
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError
from tether.grpcutil.limits import LIMIT_RANGES, SIDECAR_LIMITS, ServerLimits

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DEFAULT_MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class AgentSpec:
    """How one agent is known to the sidecar."""

    name: str
    """Agent name; becomes the lease's agent id."""
    token_file: Path | None = None
    """File holding the agent's token (sent as "x-tether-agent-token" on the shared socket)."""
    socket_path: Path | None = None
    """The agent's own socket; whoever can connect to it *is* this agent."""


@dataclass(frozen=True)
class SidecarConfig:
    """Everything `tether sidecar` needs to run."""

    control_address: str
    """Control plane address: "host:port" or "unix:/path"; several replicas separated by
    commas, which the sidecar fails over between (see `control_addresses`)."""
    node_id: str
    """This node's id, [A-Za-z0-9._-]{1,128}."""
    node_key_path: Path
    """Ed25519 private key of the node (PEM, mode 0600); signs receipts."""
    trust_bundle_path: Path | None = None
    """Pinned trust bundle (PEM): the CA certificate(s) the control plane's TLS
    certificate must chain to and the control key(s) leases must be signed by.
    Required: no trust on first use. Several of each allow rotation."""
    enroll_address: str | None = None
    """Enrolment address (TLS without a client certificate); default: control port + 1.
    With several control addresses: as many, comma-separated, in the same order."""
    enrollment_token_file: Path | None = None
    """File with the node's single-use join token (`tether nodes token create`);
    needed for the first enrolment only, absent when the key is allow-listed."""
    state_dir: Path = Path("tether-state")
    """Local state: memory db, artifacts, workspaces, receipt spool."""
    socket_path: Path = Path("tether.sock")
    """Shared Broker socket; agents on it authenticate with their token."""
    listen_tcp: str | None = None
    """Optional TCP address for the Broker (token auth), for containers that need it."""
    agents: tuple[AgentSpec, ...] = ()
    """Known agents."""
    grace_period_ms: int = 10_000
    """On SIGTERM, how long running calls may take to finish."""
    agent_liveness_ms: int = 0
    """An agent counts as alive this long after its last Broker call; 0 means the lease TTL."""
    renew_divisor: int = 3
    """The sidecar renews a lease every TTL / renew_divisor while its agent is alive."""
    uplink_retry_budget_ms: int = 3_000
    """How long one control-plane call may retry (backoff + jitter) before UNAVAILABLE."""
    uplink_timeout_ms: int = 5_000
    """Deadline of one control-plane attempt (plus any claim wait)."""
    receipt_ack_timeout_ms: int = 2_000
    """How long CompleteTask waits for the ledger's ack before answering receipts_pending."""
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    """Artifact size limit (the queue's max_artifact_bytes lowers it)."""
    spool_max_unacked: int = 100_000
    """Receipts the spool holds unacknowledged before it refuses new actions (each tool
    call reserves its receipt's room before it runs, so a full spool refuses it first)."""
    default_queue: str = ""
    """Queue used when ClaimTask names none; empty: a queue is required."""
    ready_file: Path | None = None
    """Written (with the sidecar's pid) once every socket is serving."""
    policy_file: Path | None = None
    """Local copy of the policy (TOML); used when its digest matches a lease's."""
    metrics_listen: str | None = None
    """Serve Prometheus metrics on http://host:port/metrics; absent: off."""
    memory_max_keys: int = 1_000
    """Memory keys one owner may hold (a task's task-scoped memory, or an agent's
    agent-scoped memory); a Remember adding one more is RESOURCE_EXHAUSTED."""
    memory_max_bytes: int = 16 * MIB
    """Bytes (keys plus values) one memory owner may hold; a Remember that would
    exceed it is RESOURCE_EXHAUSTED and writes nothing."""
    artifact_max_task_bytes: int = GIB
    """Artifact bytes one task may store on this node in total (max_artifact_bytes
    limits each artifact); an upload crossing it is refused while streaming."""
    workspace_max_bytes: int = GIB
    """Size one task's workspace may reach; once a measurement (after each exec or
    mcp call) finds it over, the task's next exec or mcp call is refused before it runs."""
    denied_receipts_per_minute: int = 60
    """Refused tool calls one (task, agent) may have on record per minute (a token
    bucket with this burst); past it a refusal is RESOURCE_EXHAUSTED with no receipt."""
    mcp: bool = False
    """Serve the MCP front door (Streamable HTTP, docs/mcp.md) for agents that speak MCP."""
    mcp_socket: Path | None = None
    """The MCP Unix socket (HTTP over it, path /mcp); set whenever `mcp` is on (default:
    "<socket stem>-mcp.sock" beside the Broker socket)."""
    mcp_listen: str | None = None
    """Also serve MCP on this loopback TCP address ("127.0.0.1:PORT"; port 0 picks one)."""
    limits: ServerLimits = SIDECAR_LIMITS
    """Load shedding of the Broker servers (every socket together; the caller is the
    agent): calls in flight, per agent, per-agent rate, streams, connections, keepalive.
    TOML keys and `TETHER_*` variables are the field names (`max_concurrent_rpcs`,
    `TETHER_MAX_CONCURRENT_RPCS`, ...)."""

    @property
    def control_addresses(self) -> tuple[str, ...]:
        """Every control-plane replica to use, in order of preference."""
        return split_addresses(self.control_address)

    def agent(self, name: str) -> AgentSpec | None:
        """Returns the agent called `name`, if known."""
        return next((a for a in self.agents if a.name == name), None)


# key -> (env var, kind)
_SCALARS: dict[str, tuple[str, str]] = {
    "control": ("TETHER_CONTROL", "str"),
    "trust_bundle": ("TETHER_TRUST_BUNDLE", "path"),
    "enroll": ("TETHER_ENROLL", "str"),
    "node_id": ("TETHER_NODE_ID", "str"),
    "key": ("TETHER_NODE_KEY", "path"),
    "enrollment_token_file": ("TETHER_ENROLLMENT_TOKEN_FILE", "path"),
    "state_dir": ("TETHER_STATE_DIR", "path"),
    "socket": ("TETHER_SOCKET", "path"),
    "listen_tcp": ("TETHER_LISTEN_TCP", "str"),
    "grace_period_ms": ("TETHER_GRACE_PERIOD_MS", "int"),
    "agent_liveness_ms": ("TETHER_AGENT_LIVENESS_MS", "int"),
    "renew_divisor": ("TETHER_RENEW_DIVISOR", "int"),
    "uplink_retry_budget_ms": ("TETHER_UPLINK_RETRY_BUDGET_MS", "int"),
    "uplink_timeout_ms": ("TETHER_UPLINK_TIMEOUT_MS", "int"),
    "receipt_ack_timeout_ms": ("TETHER_RECEIPT_ACK_TIMEOUT_MS", "int"),
    "max_artifact_bytes": ("TETHER_MAX_ARTIFACT_BYTES", "int"),
    "spool_max_unacked": ("TETHER_SPOOL_MAX_UNACKED", "int"),
    "default_queue": ("TETHER_DEFAULT_QUEUE", "str"),
    "ready_file": ("TETHER_READY_FILE", "path"),
    "policy_file": ("TETHER_POLICY_FILE", "path"),
    "metrics_listen": ("TETHER_METRICS_LISTEN", "str"),
    "memory_max_keys": ("TETHER_MEMORY_MAX_KEYS", "int"),
    "memory_max_bytes": ("TETHER_MEMORY_MAX_BYTES", "int"),
    "artifact_max_task_bytes": ("TETHER_ARTIFACT_MAX_TASK_BYTES", "int"),
    "workspace_max_bytes": ("TETHER_WORKSPACE_MAX_BYTES", "int"),
    "denied_receipts_per_minute": ("TETHER_DENIED_RECEIPTS_PER_MINUTE", "int"),
    "mcp": ("TETHER_MCP", "bool"),
    "mcp_socket": ("TETHER_MCP_SOCKET", "path"),
    "mcp_listen": ("TETHER_MCP_LISTEN", "str"),
    **{name: (f"TETHER_{name.upper()}", "limit") for name in LIMIT_RANGES},
}
ENV_VARS: frozenset[str] = frozenset(
    {var for var, _ in _SCALARS.values()} | {"TETHER_AGENTS", "TETHER_AGENT_SOCKETS"}
)
"""Every environment variable `load()` reads (deployment manifests are checked against it)."""
PATH_ENV_VARS: frozenset[str] = frozenset(var for var, kind in _SCALARS.values() if kind == "path")
"""The variables holding one path (TETHER_AGENTS / TETHER_AGENT_SOCKETS hold NAME=PATH lists)."""
_FIELD_OF = {
    "control": "control_address",
    "trust_bundle": "trust_bundle_path",
    "enroll": "enroll_address",
    "key": "node_key_path",
    "socket": "socket_path",
}
_RANGES = {
    "grace_period_ms": (0, 600_000),
    "agent_liveness_ms": (0, 3_600_000),
    "renew_divisor": (2, 100),
    "uplink_retry_budget_ms": (0, 600_000),
    "uplink_timeout_ms": (100, 600_000),
    "receipt_ack_timeout_ms": (0, 600_000),
    "max_artifact_bytes": (1, 1 << 40),
    "spool_max_unacked": (10, 10_000_000),
    "memory_max_keys": (1, 10_000_000),
    "memory_max_bytes": (1, 1 << 40),
    "artifact_max_task_bytes": (1, 1 << 50),
    "workspace_max_bytes": (1, 1 << 50),
    "denied_receipts_per_minute": (1, 1_000_000),
}


def _coerce(key: str, kind: str, value: Any, base: Path) -> Any:
    if value is None:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind in ("int", "limit"):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from err
        low, high = _RANGES.get(key) or LIMIT_RANGES[key]
        if not low <= number <= high:
            raise ConfigError(f"{key}: {number} is outside {low}..{high}")
        return number
    if not isinstance(value, str | Path):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    text = str(value)
    if kind == "path":
        if not text:
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else base / path
    return text


def split_addresses(text: str) -> tuple[str, ...]:
    """ "a:1, b:2" -> ("a:1", "b:2"): a list of control-plane replicas."""
    return tuple(a.strip() for a in text.split(",") if a.strip())


def parse_agent_pairs(key: str, items: Any) -> dict[str, str]:
    """Parses "NAME=VALUE" items (a list, or a comma-separated string from env)."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{key}: expected NAME=PATH, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def load(
    args: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> SidecarConfig:
    """Builds a validated config from arguments, environment and a TOML file.

    Args:
        args: values from the command line, by TOML key (`control`, `socket`,
            ...); `agent_tokens` and `agent_sockets` map agent names to paths.
            None values count as absent.
        env: the environment (only `TETHER_*` keys are read).
        file: optional TOML file; relative paths in it are relative to it.

    Raises:
        ConfigError: a value is missing, malformed or out of range (names the key).
    """
    args = {k: v for k, v in (args or {}).items() if v is not None}
    env = env or {}
    doc: dict[str, Any] = {}
    file_base = Path.cwd()
    if file is not None:
        try:
            doc = tomllib.loads(file.read_text())
        except OSError as err:
            raise ConfigError(f"config: cannot read {file}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config: {file} is not valid TOML: {err}") from err
        file_base = file.resolve().parent
    unknown = set(doc) - set(_SCALARS) - {"agents"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key in {file}")

    values: dict[str, Any] = {}
    for key, (var, kind) in _SCALARS.items():
        if key in args:
            values[key] = _coerce(key, kind, args[key], Path.cwd())
        elif var in env:
            values[key] = _coerce(key, kind, env[var], Path.cwd())
        elif key in doc:
            values[key] = _coerce(key, kind, doc[key], file_base)

    agents = _load_agents(args, env, doc, file_base)
    for key in ("control", "node_id", "key"):
        if not values.get(key):
            var = _SCALARS[key][0]
            raise ConfigError(f"{key}: required (argument, {var} or the config file)")
    if not NAME_RE.match(values["node_id"]):
        raise ConfigError(f"node_id: {values['node_id']!r} must match [A-Za-z0-9._-]{{1,128}}")
    if values.get("default_queue") and not NAME_RE.match(values["default_queue"]):
        raise ConfigError("default_queue: must match [A-Za-z0-9._-]{1,128}")
    if not agents:
        raise ConfigError("agents: at least one agent is required (--agent NAME=TOKEN_FILE)")
    for address in split_addresses(values["control"]):
        check_dial_address("control", address)
    for address in split_addresses(values.get("enroll") or ""):
        check_dial_address("enroll", address)
    if values.get("listen_tcp"):
        check_loopback_listen(values["listen_tcp"])
    if values.get("mcp_listen"):
        check_loopback_listen(values["mcp_listen"], "mcp_listen")
    if values.get("mcp_listen") or values.get("mcp_socket"):
        values["mcp"] = True
    if values.get("mcp") and not values.get("mcp_socket"):
        socket = values.get("socket") or SidecarConfig.socket_path
        values["mcp_socket"] = socket.with_name(f"{socket.stem}-mcp.sock")
    controls = split_addresses(values["control"])
    if not controls:
        raise ConfigError("control: no address given")
    if len(set(controls)) != len(controls):
        raise ConfigError("control: an address is listed twice")
    if values.get("enroll") and len(split_addresses(values["enroll"])) != len(controls):
        raise ConfigError(
            f"enroll: {len(split_addresses(values['enroll']))} enrolment addresses for "
            f"{len(controls)} control addresses; give one per control address, in order"
        )
    limits = SIDECAR_LIMITS.replace({k: values.pop(k) for k in LIMIT_RANGES if k in values})
    kwargs = {_FIELD_OF.get(k, k): v for k, v in values.items() if v is not None}
    cfg = SidecarConfig(agents=agents, limits=limits, **kwargs)
    check_socket_path("socket", cfg.socket_path)
    if cfg.mcp_socket is not None:
        check_socket_path("mcp_socket", cfg.mcp_socket)
    for agent in agents:
        if agent.socket_path is not None:
            check_socket_path(f"agents.{agent.name}.socket", agent.socket_path)
    return cfg


MAX_SOCKET_PATH_BYTES = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with the final NUL)."""


def check_socket_path(key: str, path: Path) -> None:
    """A socket path the kernel can bind: at most 107 bytes once made absolute.

    Raises:
        ConfigError: too long (says by how much, and how to shorten it).
    """
    size = len(os.fsencode(os.path.abspath(path)))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{key}: {path} is {size} bytes long as an absolute path; Unix sockets allow "
            f"{MAX_SOCKET_PATH_BYTES}: choose a shorter path (e.g. under /run or /tmp)"
        )


def check_dial_address(key: str, address: str) -> None:
    """A control-plane address is host:port or unix:/path, without a URL scheme.

    Raises:
        ConfigError: anything else (names the key, shows the expected form).
    """
    form = "host:port (e.g. 127.0.0.1:7400) or unix:/path"
    if "://" in address:
        raise ConfigError(f"{key}: {address!r} has a URL scheme; give {form}")
    if address.startswith("unix:"):
        if len(address) == len("unix:"):
            raise ConfigError(f"{key}: {address!r} needs a path; give {form}")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{key}: {address!r} is not {form} with a port 1..65535")


def check_loopback_listen(address: str, key: str = "listen_tcp") -> None:
    """The agent Broker's TCP listener carries agent tokens in clear: loopback only.

    In a pod, agent and sidecar share the network namespace, so 127.0.0.1 is
    what a container deployment needs; anything wider would put tokens on a
    network.

    Raises:
        ConfigError: not host:port, or a host that is not a loopback address.
    """
    import ipaddress

    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key}: {address!r} is not host:port")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"{key}: {address!r} is not a loopback address; the agent API carries agent "
            "tokens without TLS, so it listens on 127.0.0.1 or ::1 only (agents in the same "
            "pod reach it there)"
        )


def _load_agents(
    args: Mapping[str, Any], env: Mapping[str, str], doc: Mapping[str, Any], file_base: Path
) -> tuple[AgentSpec, ...]:
    """Merges agent specs field by field with the same precedence as scalars."""
    merged: dict[str, dict[str, Path | None]] = {}

    def put(name: str, attr: str, raw: str, base: Path, key: str) -> None:
        if not NAME_RE.match(name):
            raise ConfigError(f"{key}: agent name {name!r} must match [A-Za-z0-9._-]{{1,128}}")
        merged.setdefault(name, {})[attr] = _coerce(key, "path", raw, base)

    table = doc.get("agents", {})
    if not isinstance(table, dict):
        raise ConfigError("agents: expected a table of [agents.NAME]")
    for name, spec in table.items():
        if not isinstance(spec, dict) or set(spec) - {"token_file", "socket"}:
            raise ConfigError(f"agents.{name}: expected token_file and/or socket")
        for attr, tkey in (("token_file", "token_file"), ("socket_path", "socket")):
            if tkey in spec:
                put(name, attr, spec[tkey], file_base, f"agents.{name}.{tkey}")
    for attr, env_key, arg_key in (
        ("token_file", "TETHER_AGENTS", "agent_tokens"),
        ("socket_path", "TETHER_AGENT_SOCKETS", "agent_sockets"),
    ):
        for name, raw in parse_agent_pairs(env_key, env.get(env_key, "")).items():
            put(name, attr, raw, Path.cwd(), env_key)
        pairs = args.get(arg_key) or {}
        if not isinstance(pairs, Mapping):
            pairs = parse_agent_pairs(arg_key, pairs)
        for name, raw in pairs.items():
            put(name, attr, str(raw), Path.cwd(), arg_key)
    out = []
    for name, spec in sorted(merged.items()):
        agent = AgentSpec(
            name=name, token_file=spec.get("token_file"), socket_path=spec.get("socket_path")
        )
        if agent.token_file is None and agent.socket_path is None:
            raise ConfigError(f"agents.{name}: needs a token_file or a socket")
        out.append(agent)
    return tuple(out)

"""The `exec` adapter: a policy argv template run confined in the task's workspace.

Only declared parameters are substituted, each as exactly one argv element (no
shell). The child runs with cwd = the task workspace, an environment holding
only the policy's `env`, the injected `secret_env` credentials and
`TETHER_TASK_ID`/`TETHER_FENCING_TOKEN` (so what the tool acts on can fence),
and rlimits for CPU, address space, file size and processes. The
`tether.sidecar.sandbox` launcher supervises it: own user/mount/network
namespaces (only the workspace is writable, no other path exists, no network
but the allowlist's proxy), Landlock, and its whole process tree killed at the
end of the call, at the timeout and when the lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tether.core.errors import (
    ConfigError,
    InvalidArgument,
    PolicyDenied,
    ResourceExhausted,
)
from tether.core.policy import PLACEHOLDER_RE, ExecSpec, ToolSpec
from tether.sidecar import sandbox
from tether.sidecar.tools.base import ToolContext, ToolResult

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_SCRIPT = str(Path(sandbox.__file__).resolve())
_SYSTEM_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/")
STOP_GRACE_S = 5.0  # the launcher's sweep after SIGTERM; then its group is SIGKILLed
MAX_ENDED = 4096  # leases remembered as ended, so a late call cannot start under one
TASK_ID_ENV = "TETHER_TASK_ID"
FENCING_TOKEN_ENV = "TETHER_FENCING_TOKEN"

LeaseKey = tuple[str, int]  # (task_id, fencing_token)


def fencing_env(ctx: ToolContext) -> dict[bytes, bytes]:
    """The variables that tell a tool which task and lease it acts for."""
    return {
        TASK_ID_ENV.encode(): ctx.task_id.encode(),
        FENCING_TOKEN_ENV.encode(): str(ctx.fencing_token).encode(),
    }


def launcher_command(config: Mapping[str, Any], program: str, args: list[str]) -> list[str]:
    """The argv that runs `program` under the sandbox launcher."""
    return [sys.executable, "-I", "-S", SANDBOX_SCRIPT, json.dumps(config), program, *args]


def signal_launcher(pid: int) -> None:
    """Asks a launcher to stop its tool: it kills and reaps the whole tree, then exits."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)


def kill_launcher_group(pid: int) -> None:
    """The last resort: SIGKILL the launcher's process group (no sweep)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def stop_launcher(proc: asyncio.subprocess.Process, grace_s: float = STOP_GRACE_S) -> None:
    """Stops a launcher and waits until it is reaped.

    SIGTERM first, so the launcher sweeps every descendant (including ones that
    left the process group); SIGKILL to the group if it has not exited in time.
    """
    if proc.returncode is None:
        signal_launcher(proc.pid)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace_s)
        except TimeoutError:
            pass  # the launcher is stuck: the group kill below
        except BaseException:  # cancelled again while waiting: do not leave it running
            kill_launcher_group(proc.pid)
            raise
    kill_launcher_group(proc.pid)
    await proc.wait()


def _inside(workspace: str, value: str) -> bool:
    """True when `value`, taken as a path relative to the workspace, stays inside it."""
    target = os.path.expanduser(value)
    if not os.path.isabs(target):
        target = os.path.join(workspace, target)
    real = os.path.realpath(target)
    return real == workspace or real.startswith(workspace + os.sep)


def _looks_like_path(value: str) -> bool:
    if not value or any(c.isspace() for c in value):
        return False
    parts = value.split("/")
    return value.startswith(("/", "~")) or ".." in parts


def resolve_program(tool: str, program: str, env: Mapping[str, str]) -> str:
    """The absolute path of argv[0], searched on the tool's own PATH (not the sidecar's).

    Raises:
        ConfigError: the program is not found.
    """
    if os.sep in program:
        return program
    found = shutil.which(program, path=env.get("PATH", DEFAULT_PATH))
    if found is None:
        raise ConfigError(f"tool {tool!r}: program {program!r} not found")
    return found


def sandbox_config(
    ctx: ToolContext,
    program: str,
    env_names: list[str],
    *,
    read_paths: tuple[str, ...],
    cpu_seconds: int,
    memory_mb: int,
    file_size_mb: int,
    max_processes: int,
    require_confinement: bool,
) -> dict[str, Any]:
    """The confinement handed to `sandbox.py` for a child of the exec or mcp adapter.

    The workspace is the only writable path; a program outside the system
    prefixes is added to the read-only paths so it can be executed. The queue's
    network allowlist becomes the launcher's proxy grants (`proxy_allow`);
    `tcp_ports` is used only where confinement was opted out and no network
    namespace exists.
    """
    readable = list(read_paths)
    if not os.path.realpath(program).startswith(_SYSTEM_PREFIXES):
        readable.append(program)
    workspace = os.path.realpath(ctx.workspace)
    return {
        "workspace": workspace,
        "write_paths": [workspace],
        "read_paths": readable,
        "cpu_seconds": cpu_seconds,
        "memory_bytes": memory_mb * 1024 * 1024,
        "file_size_bytes": file_size_mb * 1024 * 1024,
        "max_processes": max_processes,
        "proxy_allow": allowlist_grants(ctx.network_allowlist),
        "tcp_ports": tcp_ports(ctx.network_allowlist),
        "env_names": env_names,
        "require_confinement": require_confinement,
        "parent_pid": os.getpid(),
    }


def allowlist_grants(allowlist: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """(host, port or None for any port) per allowlist entry, as the launcher's proxy reads them.

    Same reading as the http adapter: "host" means any port, "host:port" that
    port, "[v6]" and "[v6]:port" for IPv6 literals.
    """
    grants: list[tuple[str, int | None]] = []
    for entry in allowlist:
        entry = entry.lower()
        if entry.startswith("["):
            name, _, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:
            name, port = entry.split(":")
        else:
            name, port = entry, ""
        grants.append((name, int(port) if port else None))
    return grants


def tcp_ports(allowlist: tuple[str, ...]) -> list[int]:
    """TCP ports a child outside a network namespace may connect to (Landlock: ports only)."""
    ports: set[int] = set()
    for _, port in allowlist_grants(allowlist):
        if port is None:
            ports.update((80, 443))
        else:
            ports.add(port)
    return sorted(ports)


class ExecTool:
    """Runs the policy's argv template in a confined child process."""

    def __init__(self, spec: ToolSpec, *, require_confinement: bool = True) -> None:
        if spec.exec is None:
            raise ConfigError(f"tool {spec.name!r} has no exec section")
        self.spec = spec
        self.exec: ExecSpec = spec.exec
        self.name = spec.name
        self.timeout_ms = spec.timeout_ms
        self.require_confinement = require_confinement
        self._running: dict[LeaseKey, set[asyncio.subprocess.Process]] = {}
        self._ended: OrderedDict[LeaseKey, None] = OrderedDict()
        self._stopped: set[asyncio.subprocess.Process] = set()  # by release_lease

    def release_lease(self, task_id: str, fencing_token: int) -> None:
        """Stops every running call of the lease and refuses new ones under it.

        Synchronous so it can run wherever the lease's grants are dropped: each
        launcher gets SIGTERM and kills its tool's whole tree; the call that
        awaited it ends with PolicyDenied.
        """
        key = (task_id, fencing_token)
        self._ended[key] = None
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        for proc in self._running.get(key, ()):
            if proc.returncode is None:
                self._stopped.add(proc)
                signal_launcher(proc.pid)

    def running(self, task_id: str, fencing_token: int) -> list[int]:
        """Launcher pids of the lease's calls still running (diagnostics and tests)."""
        return [p.pid for p in self._running.get((task_id, fencing_token), ())]

    def _lease_ended(self, ctx: ToolContext) -> PolicyDenied:
        return PolicyDenied(
            f"tool {self.name!r}: the lease on task {ctx.task_id!r} has ended",
            metadata={"tool": self.name, "task_id": ctx.task_id},
        )

    def build_argv(self, workspace: Path, args: Mapping[str, Any]) -> list[str]:
        """The argv with declared parameters substituted.

        Raises:
            PolicyDenied: an undeclared parameter, or a path outside the workspace.
            InvalidArgument: a parameter is missing or not a string/number.
        """
        values: dict[str, str] = {}
        for key, value in args.items():
            if key not in self.exec.params:
                raise PolicyDenied(
                    f"tool {self.name!r} does not declare parameter {key!r}",
                    metadata={"tool": self.name, "parameter": key},
                )
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise InvalidArgument(f"args.{key}", "must be a string or a number")
            text = str(value)
            if "\0" in text:
                raise InvalidArgument(f"args.{key}", "must not contain NUL")
            values[key] = text
        ws = os.path.realpath(workspace)
        for key, text in values.items():
            strict = key in self.exec.path_params
            if (strict or _looks_like_path(text)) and not _inside(ws, text):
                raise PolicyDenied(
                    f"tool {self.name!r}: parameter {key!r} resolves outside the workspace",
                    metadata={"tool": self.name, "parameter": key},
                )
        argv: list[str] = []
        for element in self.exec.argv:
            match = PLACEHOLDER_RE.fullmatch(element)
            if match is None:
                argv.append(element)
                continue
            param = match.group(1)
            if param not in values:
                raise InvalidArgument(f"args.{param}", "is required")
            argv.append(values[param])
        return argv

    def _program(self) -> str:
        return resolve_program(self.name, self.exec.argv[0], self.exec.env)

    def _sandbox_config(
        self, ctx: ToolContext, program: str, env_names: list[str]
    ) -> dict[str, Any]:
        return sandbox_config(
            ctx,
            program,
            env_names,
            read_paths=self.exec.read_paths,
            cpu_seconds=self.exec.cpu_seconds,
            memory_mb=self.exec.memory_mb,
            file_size_mb=self.exec.file_size_mb,
            max_processes=self.exec.max_processes,
            require_confinement=self.require_confinement,
        )

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Runs the child to completion and returns its exit status and output.

        Raises:
            PolicyDenied: the lease ended (before or during the call), or the
                sandbox refused to start the tool (the message says why).
        """
        key = (ctx.task_id, ctx.fencing_token)
        if key in self._ended:
            raise self._lease_ended(ctx)
        ctx.workspace.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = self.build_argv(ctx.workspace, args)
        program = self._program()
        env: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in self.exec.env.items()}
        for env_name, cred in self.exec.secret_env.items():
            env[env_name.encode()] = ctx.credential(cred)
        env.update(fencing_env(ctx))
        config = self._sandbox_config(ctx, program, sorted(k.decode() for k in env))
        proc = await asyncio.create_subprocess_exec(
            *launcher_command(config, program, argv[1:]),
            cwd=ctx.workspace,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        running = self._running.setdefault(key, set())
        running.add(proc)
        if key in self._ended:  # the lease ended while the launcher was starting
            self._stopped.add(proc)
            signal_launcher(proc.pid)
        cap = self.exec.max_output_bytes
        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [
            asyncio.ensure_future(_read_capped(proc.stdout, cap, self.name)),
            asyncio.ensure_future(_read_capped(proc.stderr, cap, self.name)),
        ]
        try:
            waiter = asyncio.ensure_future(proc.wait())
            done, _ = await asyncio.wait([waiter, *readers], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raise ResourceExhausted from a reader
            rc = await waiter  # the launcher exits only after its whole tree is gone
            stdout, stderr = await asyncio.gather(*readers)
        except BaseException:
            self._stopped.discard(proc)
            raise
        finally:
            running.discard(proc)
            if not running:
                self._running.pop(key, None)
            for task in readers:
                task.cancel()
            await stop_launcher(proc)
        stopped = proc in self._stopped
        self._stopped.discard(proc)
        if stopped and rc == -signal.SIGKILL:  # one that finished on its own keeps its outcome
            raise PolicyDenied(
                f"tool {self.name!r}: the lease on task {ctx.task_id!r} ended while the "
                "tool ran; its processes were stopped",
                metadata={"tool": self.name, "task_id": ctx.task_id},
            )
        err_text = stderr.decode("utf-8", "replace")
        if rc == sandbox.SETUP_FAILED and err_text.startswith("tether-sandbox:"):
            raise PolicyDenied(
                f"tool {self.name!r}: sandbox refused to start: {err_text.strip()}",
                metadata={"tool": self.name},
            )
        value: dict[str, Any] = {
            "exit_code": rc if rc >= 0 else None,
            "signal": signal.Signals(-rc).name if rc < 0 else None,
            "stdout": stdout.decode("utf-8", "replace"),
            "stderr": err_text,
        }
        return ToolResult(value=value, status="ok" if rc == 0 else "error")


async def _read_capped(stream: asyncio.StreamReader, cap: int, tool: str) -> bytes:
    buf = bytearray()
    while chunk := await stream.read(65536):
        buf += chunk
        if len(buf) > cap:
            raise ResourceExhausted(
                f"tool {tool!r}: output exceeds {cap} bytes", metadata={"tool": tool}
            )
    return bytes(buf)

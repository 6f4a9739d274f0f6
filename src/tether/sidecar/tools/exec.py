"""The `exec` adapter: a policy argv template run confined in the task's workspace.

Only declared parameters are substituted, each as exactly one argv element (no
shell). The child runs with cwd = the task workspace, an environment holding
only the policy's `env` plus the injected `secret_env` credentials, rlimits for
CPU, address space and file size, and in its own process group (killed as a
whole at the end and at the timeout). Filesystem confinement is Linux Landlock,
applied by the `tether.sidecar.sandbox` launcher: system directories are
read-only, the workspace is the only writable place, the rest is invisible.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
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
    require_landlock: bool,
) -> dict[str, Any]:
    """The confinement handed to `sandbox.py` for a child of the exec or mcp adapter.

    The workspace is the only writable path; a program outside the system
    prefixes is added to the read-only paths so it can be executed.
    """
    readable = list(read_paths)
    if not os.path.realpath(program).startswith(_SYSTEM_PREFIXES):
        readable.append(program)
    return {
        "write_paths": [os.path.realpath(ctx.workspace)],
        "read_paths": readable,
        "cpu_seconds": cpu_seconds,
        "memory_bytes": memory_mb * 1024 * 1024,
        "file_size_bytes": file_size_mb * 1024 * 1024,
        "tcp_ports": tcp_ports(ctx.network_allowlist),
        "env_names": env_names,
        "require_landlock": require_landlock,
    }


def tcp_ports(allowlist: tuple[str, ...]) -> list[int]:
    """TCP ports an exec child may connect to (Landlock filters ports, not hosts)."""
    ports: set[int] = set()
    for entry in allowlist:
        host, sep, port = entry.rpartition(":")
        if sep and port.isdigit() and not host.endswith(":"):
            ports.add(int(port))
        else:
            ports.update((80, 443))
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
            require_landlock=self.require_confinement,
        )

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Runs the child to completion and returns its exit status and output."""
        ctx.workspace.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = self.build_argv(ctx.workspace, args)
        program = self._program()
        env: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in self.exec.env.items()}
        for env_name, cred in self.exec.secret_env.items():
            env[env_name.encode()] = ctx.credential(cred)
        config = self._sandbox_config(ctx, program, sorted(k.decode() for k in env))
        cmd = [sys.executable, "-I", "-S", SANDBOX_SCRIPT, json.dumps(config), program, *argv[1:]]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=ctx.workspace,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
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
            rc = await waiter
            _kill_group(proc.pid)
            stdout, stderr = await asyncio.gather(*readers)
        finally:
            _kill_group(proc.pid)
            for task in readers:
                task.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
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


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)

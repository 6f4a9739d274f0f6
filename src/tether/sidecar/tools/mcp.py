"""The `mcp` adapter: a stdio MCP server per lease, with `tools/call` proxied to it.

The sidecar starts the server on a lease's first call (cwd = the task
workspace; env = only the policy's `env` plus the `secret_env` credentials;
confined and supervised by the same `tether.sidecar.sandbox` launcher as exec
tools), performs the `initialize` handshake and then forwards each call as
`tools/call` with the agent's arguments and `_meta = {"tether/task_id": ...,
"tether/fencing_token": ...}`, so what the server acts on can fence. Messages
are newline-delimited JSON-RPC 2.0 on stdin/stdout (MCP stdio transport);
stderr is drained and its tail kept for error messages.

A server that exits, or a reply that is not JSON-RPC, is the tool's error
outcome (never a hang): pending calls end at once and the next call starts a
fresh server. A call cancelled by the timeout stops the server's whole process
tree (the launcher kills every descendant, including ones that left the process
group), since the server's state is unknown. When the lease ends the mediation
layer calls `release_lease`, which stops the server holding the lease's secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from tether import __version__
from tether.core.errors import ConfigError, InvalidArgument, PolicyDenied, ResourceExhausted
from tether.core.policy import McpSpec, ToolSpec
from tether.sidecar import sandbox
from tether.sidecar.tools.base import ToolContext, ToolResult
from tether.sidecar.tools.exec import (
    STOP_GRACE_S,
    kill_launcher_group,
    launcher_command,
    resolve_program,
    sandbox_config,
    signal_launcher,
)

log = logging.getLogger("tether.sidecar.tools.mcp")

PROTOCOL_VERSION = "2025-06-18"
META_TASK_ID = "tether/task_id"
META_FENCING_TOKEN = "tether/fencing_token"
STDERR_TAIL_BYTES = 2048
CLOSE_GRACE_S = 1.0
MAX_ENDED = 4096  # leases remembered as ended, so a late call cannot restart their server

LeaseKey = tuple[str, int]  # (task_id, fencing_token): a takeover gets a fresh server


class ServerFailed(Exception):
    """The server exited, broke the protocol or did not start (the call's error outcome)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _RpcError(Exception):
    """A JSON-RPC error response (the server answered, with an error)."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        super().__init__(str(error.get("message", "")))
        self.error = dict(error)


class _Session:
    """One running server: a reader task dispatching replies to pending requests."""

    def __init__(self, tool: str, proc: asyncio.subprocess.Process) -> None:
        self.tool = tool
        self.proc = proc
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.stderr_tail = b""
        self.failure: BaseException | None = None
        self.stopping = ""
        self.protocol_version = ""
        self.server_info: dict[str, Any] = {}
        self._last_resort: asyncio.TimerHandle | None = None
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())
        self._reader = asyncio.ensure_future(self._read())

    @property
    def done(self) -> asyncio.Future[None]:
        """Completes once the server has exited and its output is consumed."""
        return self._reader

    @property
    def alive(self) -> bool:
        return self.failure is None and self.proc.returncode is None

    async def request(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Sends a request and awaits its result.

        Raises:
            ServerFailed: the server is gone or replied with something malformed.
            ResourceExhausted: a reply exceeded max_output_bytes.
            _RpcError: the server answered with a JSON-RPC error.
        """
        if self.failure is not None:
            raise self.failure
        self.next_id += 1
        rid = self.next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        try:
            await self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            return await future
        finally:
            self.pending.pop(rid, None)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self._send(msg)

    async def _send(self, msg: Mapping[str, Any]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        data = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        try:
            stdin.write(data)
            await stdin.drain()
        except (ConnectionError, BrokenPipeError, RuntimeError) as err:
            # The reader will see EOF and say why; give it that chance first.
            await asyncio.wait({self._reader}, timeout=CLOSE_GRACE_S)
            raise self.failure or ServerFailed(
                "mcp_server_exited", f"tool {self.tool!r}: MCP server closed its input"
            ) from err

    async def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while True:
                try:
                    line = await stdout.readline()
                except ValueError as err:  # the line exceeds the stream limit
                    raise ResourceExhausted(
                        f"tool {self.tool!r}: an MCP message exceeds max_output_bytes",
                        metadata={"tool": self.tool},
                    ) from err
                if not line:
                    break
                if line.strip():
                    await self._dispatch(line)
            rc = await self.proc.wait()
            await asyncio.wait({self._stderr_task}, timeout=CLOSE_GRACE_S)
            raise ServerFailed("mcp_server_exited", self._exit_message(rc))
        except asyncio.CancelledError:
            self._fail(
                ServerFailed("mcp_server_stopped", f"tool {self.tool!r}: MCP server stopped")
            )
            self._close_input()
            self.kill()
            raise
        except (ServerFailed, ResourceExhausted) as err:
            self._fail(err)
        except Exception as err:  # never let the reader die silently with calls pending
            self._fail(ServerFailed("mcp_protocol_error", f"tool {self.tool!r}: {err}"))
        # Whatever ended the session: kill the group (grandchildren may outlive the
        # server), then drain and reap, so the reader ends only once all is closed.
        self._close_input()
        self.kill()
        with contextlib.suppress(Exception):
            while await stdout.read(65536):
                pass
        await self.proc.wait()
        await asyncio.wait({self._stderr_task}, timeout=CLOSE_GRACE_S)

    def _close_input(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def _exit_message(self, rc: int) -> str:
        if self.stopping:
            return f"tool {self.tool!r}: MCP server stopped ({self.stopping})"
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
        message = f"tool {self.tool!r}: MCP server exited with {how}"
        tail = self.stderr_tail.decode("utf-8", "replace").strip()
        return f"{message}; stderr: {tail}" if tail else message

    async def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise ServerFailed(
                "mcp_protocol_error",
                f"tool {self.tool!r}: MCP server wrote a line that is not JSON "
                "(a stdio server must write only JSON-RPC messages to stdout)",
            ) from err
        for item in msg if isinstance(msg, list) else [msg]:
            if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
                raise ServerFailed(
                    "mcp_protocol_error", f"tool {self.tool!r}: not a JSON-RPC 2.0 message"
                )
            if "method" in item:
                if "id" in item:  # a server -> client request; we offer no capabilities
                    await self._answer(item)
                continue  # notifications (logging, progress, list_changed) are ignored
            rid = item.get("id")
            future = self.pending.get(rid) if isinstance(rid, int) else None
            if future is None or future.done():
                continue  # a late reply to a request that was given up
            if isinstance(item.get("error"), dict):
                future.set_exception(_RpcError(item["error"]))
            elif isinstance(item.get("result"), dict):
                future.set_result(item["result"])
            else:
                future.set_exception(
                    ServerFailed(
                        "mcp_protocol_error",
                        f"tool {self.tool!r}: reply {rid} has neither a result object "
                        "nor an error object",
                    )
                )

    async def _answer(self, request: Mapping[str, Any]) -> None:
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        if request.get("method") == "ping":
            reply["result"] = {}
        else:
            reply["error"] = {"code": -32601, "message": "Method not found"}
        stdin = self.proc.stdin
        assert stdin is not None
        with contextlib.suppress(Exception):  # the reader notices a dead server on its own
            stdin.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    async def _drain_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        with contextlib.suppress(Exception):
            while chunk := await stderr.read(65536):
                self.stderr_tail = (self.stderr_tail + chunk)[-STDERR_TAIL_BYTES:]

    def _fail(self, err: BaseException) -> None:
        if self.failure is None:
            self.failure = err
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.failure)

    def kill(self, reason: str = "") -> None:
        """Stops the server's whole process tree now (synchronous: safe in any callback).

        The launcher gets SIGTERM and kills every descendant itself; should it
        not have exited after STOP_GRACE_S its process group is SIGKILLed.
        """
        if reason and not self.stopping:
            self.stopping = reason
        if self.proc.returncode is not None:
            return
        signal_launcher(self.proc.pid)
        if self._last_resort is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to wait on (interpreter shutdown): no grace
                self._kill_group()
                return
            self._last_resort = loop.call_later(STOP_GRACE_S, self._kill_group)

    def _kill_group(self) -> None:
        if self.proc.returncode is None:
            kill_launcher_group(self.proc.pid)

    async def aclose(self, reason: str, grace_s: float = CLOSE_GRACE_S) -> None:
        """Closes stdin (the MCP stdio shutdown), waits briefly, then kills the group."""
        self.stopping = self.stopping or reason
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace_s)
        self.kill()
        await self.proc.wait()
        if self._last_resort is not None:
            self._last_resort.cancel()
        # Both pipes reach EOF once the group is dead; wait (not cancel) so they close.
        await asyncio.wait({self._reader, self._stderr_task}, timeout=CLOSE_GRACE_S)


class McpTool:
    """Proxies one MCP tool of a stdio server started per lease."""

    def __init__(self, spec: ToolSpec, *, require_confinement: bool = True) -> None:
        if spec.mcp is None:
            raise ConfigError(f"tool {spec.name!r} has no mcp section")
        self.spec = spec
        self.mcp: McpSpec = spec.mcp
        self.name = spec.name
        self.timeout_ms = spec.timeout_ms
        self.require_confinement = require_confinement
        self._sessions: dict[LeaseKey, _Session] = {}
        self._live: set[_Session] = set()  # including killed ones not yet reaped
        self._starting: dict[LeaseKey, asyncio.Lock] = {}
        self._ended: OrderedDict[LeaseKey, None] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    def release_lease(self, task_id: str, fencing_token: int) -> None:
        """Stops the lease's server now and refuses to start another for that lease.

        Synchronous so it can run wherever the lease's grants are dropped; the
        killed process is reaped by asyncio's child watcher.
        """
        key = (task_id, fencing_token)
        self._ended[key] = None
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        self._starting.pop(key, None)
        session = self._sessions.pop(key, None)
        if session is not None:
            session.kill("the lease ended")

    async def aclose(self) -> None:
        """Shuts every server down and waits until each is reaped (sidecar shutdown, tests)."""
        sessions = list(self._live)
        self._sessions.clear()
        await asyncio.gather(*(s.aclose("the sidecar closed the tool") for s in sessions))

    def running(self, task_id: str, fencing_token: int) -> int | None:
        """The pid of the lease's live server, if any (for diagnostics and tests)."""
        session = self._sessions.get((task_id, fencing_token))
        return session.proc.pid if session is not None and session.alive else None

    # ------------------------------------------------------------------ call

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Forwards one `tools/call` and returns the server's content and isError."""
        key = (ctx.task_id, ctx.fencing_token)
        if key in self._ended:
            raise PolicyDenied(
                f"tool {self.name!r}: the lease on task {ctx.task_id!r} has ended",
                metadata={"tool": self.name, "task_id": ctx.task_id},
            )
        try:
            arguments = json.loads(json.dumps(dict(args)))  # a plain JSON object
        except (TypeError, ValueError) as err:
            raise InvalidArgument("args", f"must be a JSON object: {err}") from err
        session: _Session | None = None
        try:
            session = await self._session(ctx, key)
            meta = {META_TASK_ID: ctx.task_id, META_FENCING_TOKEN: ctx.fencing_token}
            result = await session.request(
                "tools/call", {"name": self.mcp.tool, "arguments": arguments, "_meta": meta}
            )
        except ServerFailed as err:
            self._forget(key, session)
            return ToolResult(value={"error": err.kind, "message": err.message}, status="error")
        except _RpcError as err:
            return ToolResult(value={"error": err.error}, status="error")
        except BaseException:
            # Cancelled (the timeout) or over a limit: the server's state is unknown.
            self._forget(key, session, kill="the call was stopped")
            raise
        return self._result(result)

    def _result(self, result: Mapping[str, Any]) -> ToolResult:
        content = result.get("content")
        is_error = result.get("isError", False)
        if not isinstance(content, list) or not isinstance(is_error, bool):
            return ToolResult(
                value={
                    "error": "mcp_protocol_error",
                    "message": f"tool {self.name!r}: tools/call result needs a content "
                    "array and a boolean isError",
                },
                status="error",
            )
        value: dict[str, Any] = {"content": content, "isError": is_error}
        if isinstance(result.get("structuredContent"), dict):
            value["structuredContent"] = result["structuredContent"]
        return ToolResult(value=value, status="error" if is_error else "ok")

    def _forget(self, key: LeaseKey, session: _Session | None, kill: str = "") -> None:
        if session is None:
            session = self._sessions.get(key)
            if session is None or session.alive:
                return
        if self._sessions.get(key) is session:
            del self._sessions[key]
        if kill or not session.alive:
            session.kill(kill)

    async def _session(self, ctx: ToolContext, key: LeaseKey) -> _Session:
        session = self._sessions.get(key)
        if session is not None and session.alive:
            return session
        lock = self._starting.setdefault(key, asyncio.Lock())
        async with lock:
            session = self._sessions.get(key)
            if session is not None and session.alive:
                return session
            if session is not None:
                self._forget(key, session)
            session = await self._start(ctx)
            if key in self._ended:  # the lease ended while the server was starting
                session.kill("the lease ended")
                raise PolicyDenied(
                    f"tool {self.name!r}: the lease on task {ctx.task_id!r} has ended",
                    metadata={"tool": self.name, "task_id": ctx.task_id},
                )
            self._sessions[key] = session
        return session

    def _program(self) -> str:
        return resolve_program(self.name, self.mcp.argv[0], self.mcp.env)

    def _sandbox_config(
        self, ctx: ToolContext, program: str, env_names: list[str]
    ) -> dict[str, Any]:
        return sandbox_config(
            ctx,
            program,
            env_names,
            read_paths=self.mcp.read_paths,
            cpu_seconds=self.mcp.cpu_seconds,
            memory_mb=self.mcp.memory_mb,
            file_size_mb=self.mcp.file_size_mb,
            max_processes=self.mcp.max_processes,
            require_confinement=self.require_confinement,
        )

    async def _start(self, ctx: ToolContext) -> _Session:
        """Spawns the confined server and completes the initialize handshake.

        Raises:
            ServerFailed: the server exited or did not answer the handshake in time.
            PolicyDenied: the sandbox refused to start (e.g. no Landlock).
        """
        ctx.workspace.mkdir(parents=True, exist_ok=True, mode=0o700)
        program = self._program()
        env: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in self.mcp.env.items()}
        for env_name, cred in self.mcp.secret_env.items():
            env[env_name.encode()] = ctx.credential(cred)
        config = self._sandbox_config(ctx, program, sorted(k.decode() for k in env))
        proc = await asyncio.create_subprocess_exec(
            *launcher_command(config, program, list(self.mcp.argv[1:])),
            cwd=ctx.workspace,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=self.mcp.max_output_bytes,
        )
        session = _Session(self.name, proc)
        self._live.add(session)
        session.done.add_done_callback(lambda _: self._live.discard(session))
        limit_s = self.mcp.startup_timeout_ms / 1000
        try:
            async with asyncio.timeout(limit_s):
                init = await session.request(
                    "initialize",
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": "tether-sidecar", "version": __version__},
                    },
                )
                version = init.get("protocolVersion")
                if not isinstance(version, str) or not version:
                    raise ServerFailed(
                        "mcp_protocol_error",
                        f"tool {self.name!r}: initialize result has no protocolVersion",
                    )
                session.protocol_version = version
                info = init.get("serverInfo")
                session.server_info = dict(info) if isinstance(info, dict) else {}
                await session.notify("notifications/initialized")
        except TimeoutError:
            session.kill()
            await session.aclose("startup timed out", grace_s=0)
            raise ServerFailed(
                "mcp_startup_timeout",
                f"tool {self.name!r}: MCP server did not complete initialize within "
                f"{self.mcp.startup_timeout_ms} ms",
            ) from None
        except _RpcError as err:
            await session.aclose("initialize refused", grace_s=0)
            raise ServerFailed(
                "mcp_protocol_error",
                f"tool {self.name!r}: MCP server refused initialize: {err.error}",
            ) from None
        except ServerFailed:
            await session.aclose("startup failed", grace_s=0)
            tail = session.stderr_tail.decode("utf-8", "replace")
            if proc.returncode == sandbox.SETUP_FAILED and tail.startswith("tether-sandbox:"):
                raise PolicyDenied(
                    f"tool {self.name!r}: sandbox refused to start: {tail.strip()}",
                    metadata={"tool": self.name},
                ) from None
            raise
        except BaseException:
            session.kill()
            raise
        log.info(
            "mcp server started",
            extra={
                "tool": self.name,
                "task_id": ctx.task_id,
                "pid": proc.pid,
                "protocol_version": session.protocol_version,
            },
        )
        return session

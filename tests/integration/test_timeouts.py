"""Time limits, cancellation and the retry policy, end to end with real servers and processes.

Each limit is enforced by the control plane's sweeper (real clock, real store);
the sidecar learns it at its next renewal, stops the tool calls in flight
(killing exec trees, cutting HTTP requests) and refuses further calls with
DEADLINE_EXCEEDED or CANCELLED; the agent's Heartbeat says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import export_and_verify, operator_args

from tether.agent import AgentClient, Task
from tether.core import errors as E
from tether.core.states import Event, State
from tether.core.timeouts import EndReason
from tether.crypto.envelopes import from_proto
from tether.crypto.leases import decode_lease
from tether.testing import ControlHandle, SidecarHandle, start_control, start_sidecar
from tether.v1 import control_pb2 as pb

# A tool that starts a grandchild appending a line to ticks.txt every 50 ms, then waits:
# while any of its tree lives, the file grows.
TICKER = (
    "import subprocess, sys, time\n"
    'code = \'import time\\nwhile True:\\n    open("ticks.txt", "a").write("t\\\\n")\\n'
    "    time.sleep(0.05)'\n"
    "subprocess.Popen([sys.executable, '-c', code])\n"
    "time.sleep(60)\n"
)


def policy(queue: str = "", tools: str = "", tool_names: tuple[str, ...] = ()) -> str:
    """alice may claim from "work", which grants `tool_names` and has `queue`'s keys."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
{tools}
[queues.work]
tools = {json.dumps(list(tool_names))}
{queue}
"""


EXEC_TICKER = f"""
[tools.ticker]
adapter = "exec"
timeout_ms = 60000
[tools.ticker.exec]
argv = ["python3", "-c", {json.dumps(TICKER)}]
env = {{ LANG = "C.UTF-8" }}
"""


@dataclass
class Env:
    control: ControlHandle
    side: SidecarHandle
    agent: AgentClient

    def workspace(self, task_id: str) -> Path:
        return self.side.state_dir / "workspaces" / task_id

    async def task(self, task_id: str) -> pb.Task:
        return (await self.control.client.get_task(task_id)).task

    async def claim(self) -> Task:
        task = await self.agent.claim("work", wait_ms=5000)
        assert task is not None
        return task


@contextlib.asynccontextmanager
async def env(tmp_path: Path, doc: str, db: str | None = None) -> AsyncIterator[Env]:
    """Both servers under `doc` (sweeper every 100 ms) and alice's client."""
    async with (
        start_control(tmp_path, policy=doc, sweep_interval_ms=100, db=db) as control,
        start_sidecar(tmp_path, control.address, agent_liveness_ms=120_000) as side,
        side.agent("alice") as agent,
    ):
        yield Env(control, side, agent)


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Polls `predicate` until true; fails after `timeout_s` (a hang guard, not a timing claim)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def size(path: Path) -> int:
    """The file's size; -1 when it does not exist."""
    return path.stat().st_size if path.exists() else -1


async def tree_gone(ticks: Path) -> None:
    """Asserts that nothing of the tool's process tree still writes ticks.txt.

    The kill may land a tick or two after the refusal reached the agent: the file
    must stop growing within 3 s, then stay still for twenty ticks' worth.
    """
    assert size(ticks) > 0, "the tool never started its grandchild"
    settle = time.monotonic() + 3.0
    before = size(ticks)
    while True:
        await asyncio.sleep(0.3)
        now = size(ticks)
        if now == before:
            break
        assert time.monotonic() < settle, "the tool's tree kept writing"
        before = now
    await asyncio.sleep(1.0)  # twenty ticks' worth: a survivor would have written
    assert size(ticks) == before, "a process of the tool's tree survived"


async def attempts(control: ControlHandle, task_id: str) -> list[tuple[int, int, str]]:
    """(fencing token, grant time, outcome) of each attempt's grant, from the lease history."""
    got = await control.client.get_task(task_id)
    out = []
    for rec in got.leases:
        lease = decode_lease(from_proto(rec.lease).payload)
        out.append((lease.fencing_token, lease.issued_unix_ms, rec.outcome))
    return out


def grants(history: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The first record of each fencing token: the grant (renewals follow it)."""
    seen: dict[int, tuple[int, int, str]] = {}
    for token, issued, outcome in history:
        seen.setdefault(token, (token, issued, outcome))
    return [seen[t] for t in sorted(seen)]


# --------------------------------------------------------------------------- deadline


async def test_deadline_ends_the_task_kills_the_exec_tree_and_refuses_calls(
    tmp_path: Path,
) -> None:
    """Past its deadline a running task ends expired/deadline; the exec tree in flight is
    killed, the call fails DEADLINE_EXCEEDED, Heartbeat says DEADLINE, later calls are refused."""
    doc = policy("", EXEC_TICKER, ("ticker",))
    async with env(tmp_path, doc) as e:
        submitted = await e.control.client.submit(
            "work", b"{}", lease_ttl_ms=6000, deadline_ms=2500
        )
        task = await e.claim()
        assert task.task_id == submitted.task.task_id
        with pytest.raises(E.TaskTimedOut) as err:
            await e.agent.call_tool(task.task_id, "ticker", {})
        assert err.value.metadata["end_reason"] == "deadline"
        await tree_gone(e.workspace(task.task_id) / "ticks.txt")

        async def expired() -> bool:
            return (await e.task(task.task_id)).state == State.EXPIRED

        await until(expired)
        got = await e.task(task.task_id)
        assert (got.state, got.end_reason) == (State.EXPIRED, EndReason.DEADLINE)
        assert got.deadline_unix_ms == got.created_unix_ms + 2500
        assert got.updated_unix_ms >= got.deadline_unix_ms
        with pytest.raises(E.TaskTimedOut) as hb:
            await e.agent.heartbeat(task.task_id)
        assert hb.value.metadata["end_reason"] == "deadline"
        with pytest.raises(E.TaskTimedOut):
            await e.agent.call_tool(task.task_id, "ticker", {})
        assert [o for _, _, o in grants(await attempts(e.control, task.task_id))] == ["deadline"]


# --------------------------------------------------------------------------- cancel


async def test_cancel_reaches_the_running_agent_within_one_renewal(tmp_path: Path) -> None:
    """CancelTask on a running task stops its exec tree; the call fails CANCELLED, Heartbeat
    says CANCELED, and the task ends canceled/canceled."""
    async with env(tmp_path, policy("", EXEC_TICKER, ("ticker",))) as e:
        await e.control.client.submit("work", b"{}", lease_ttl_ms=3000)
        task = await e.claim()
        call = asyncio.ensure_future(e.agent.call_tool(task.task_id, "ticker", {}))
        ticks = e.workspace(task.task_id) / "ticks.txt"

        async def ticking() -> bool:
            return size(ticks) > 0

        await until(ticking)
        await e.control.client.cancel(task.task_id, "operator changed their mind")
        canceled_at = time.monotonic()
        with pytest.raises(E.TaskCanceled) as err:
            await call
        # One renewal interval (TTL/3 = 1 s) plus scheduling: well under the 3 s TTL.
        assert time.monotonic() - canceled_at < 3.0
        assert err.value.metadata["end_reason"] == "canceled"
        await tree_gone(ticks)
        with pytest.raises(E.TaskCanceled):
            await e.agent.heartbeat(task.task_id)
        with pytest.raises(E.TaskCanceled):
            await e.agent.call_tool(task.task_id, "ticker", {})
        got = await e.task(task.task_id)
        assert (got.state, got.end_reason) == (State.CANCELED, EndReason.CANCELED)
        assert got.error == "operator changed their mind"


# --------------------------------------------------------------------------- attempt timeout


async def test_attempt_timeout_retries_on_the_queue_schedule_then_expires(tmp_path: Path) -> None:
    """The queue's attempt timeout ends each attempt however often it is renewed; attempts are
    re-granted no sooner than the retry policy's delays (capped), then the task expires."""
    queue = """
lease_ttl_ms = 3000
attempt_timeout_ms = 1500
max_attempts = 3
[queues.work.retry]
initial_interval_ms = 500
backoff_coefficient = 3.0
maximum_interval_ms = 800
"""
    async with env(tmp_path, policy(queue)) as e:
        submitted = (await e.control.client.submit("work", b"{}")).task
        assert submitted.attempt_timeout_ms == 1500
        assert list(
            (submitted.retry_policy.initial_interval_ms, submitted.retry_policy.maximum_interval_ms)
        ) == [500, 800]
        for _ in range(3):
            task = await e.claim()
            with contextlib.suppress(E.LeaseLost):
                while True:  # a live agent: heartbeats never extend an attempt past its limit
                    await e.agent.heartbeat(task.task_id)
                    await asyncio.sleep(0.2)

        async def expired() -> bool:
            return (await e.task(submitted.task_id)).state == State.EXPIRED

        await until(expired)
        got = await e.task(submitted.task_id)
        assert (got.attempt, got.end_reason) == (3, EndReason.ATTEMPT_TIMEOUT)
        history = grants(await attempts(e.control, submitted.task_id))
        assert [o for _, _, o in history] == ["attempt_timeout"] * 3
        issued = [t for _, t, _ in history]
        # attempt n ends at its grant + 1500 (or later, at the sweep); then the delay
        gaps = [b - a for a, b in itertools.pairwise(issued)]
        for gap, delay in zip(gaps, [500, 800], strict=True):
            assert gap >= 1500 + delay


# --------------------------------------------------------------------------- failures


async def test_failures_retry_by_policy_and_a_non_retryable_one_is_not(tmp_path: Path) -> None:
    """With retry_failures a failure is retried after the initial interval; a failure marked
    non-retryable, or of a listed type, ends the task failed at once."""
    queue = """
[queues.work.retry]
initial_interval_ms = 400
retry_failures = true
non_retryable_reasons = ["bad-input"]
"""
    async with env(tmp_path, policy(queue)) as e:
        flaky = (await e.control.client.submit("work", b"1")).task
        task = await e.claim()
        assert task.task_id == flaky.task_id
        state, _ = await e.agent.complete(
            task.task_id, succeeded=False, error="timeout talking to db", failure_type="io"
        )
        assert state == "queued"
        again = await e.claim()
        assert (again.task_id, again.attempt) == (flaky.task_id, 2)
        state, _ = await e.agent.complete(
            again.task_id, succeeded=False, error="gave up", non_retryable=True
        )
        assert state == "failed"
        got = await e.task(flaky.task_id)
        assert (got.state, got.end_reason, got.attempt) == (
            State.FAILED,
            EndReason.NON_RETRYABLE,
            2,
        )
        (_, first, o1), (_, second, o2) = grants(await attempts(e.control, flaky.task_id))
        assert (o1, o2) == ("failed", "finished")
        assert second - first >= 400

        listed = (await e.control.client.submit("work", b"2")).task
        task = await e.claim()
        assert task.task_id == listed.task_id
        state, _ = await e.agent.complete(
            task.task_id, succeeded=False, error="bad", failure_type="bad-input"
        )
        assert state == "failed"
        assert await e.agent.claim("work", wait_ms=800) is None  # never offered again
        got = await e.task(listed.task_id)
        assert (got.attempt, got.end_reason) == (1, EndReason.NON_RETRYABLE)
        # Attempt 1's task_finished says queued (retried), attempt 2's failed: one final each.
        code, out = await export_and_verify(
            e.control, tmp_path, [flaky.task_id, listed.task_id], "--json"
        )
        assert code == 0, out
        finals = {t["task_id"]: t["final_state"] for t in json.loads(out)["tasks"]}
        assert finals == {flaky.task_id: "failed", listed.task_id: "failed"}


# --------------------------------------------------------------------------- schedule-to-start


async def test_schedule_to_start_expires_a_task_nobody_claims(tmp_path: Path) -> None:
    """A task left ready past the queue's schedule-to-start timeout expires and is never leased."""
    async with env(tmp_path, policy("schedule_to_start_timeout_ms = 1000")) as e:
        submitted = (await e.control.client.submit("work", b"{}")).task

        async def expired() -> bool:
            return (await e.task(submitted.task_id)).state == State.EXPIRED

        await until(expired)
        got = await e.task(submitted.task_id)
        assert (got.end_reason, got.attempt) == (EndReason.SCHEDULE_TO_START_TIMEOUT, 0)
        assert got.updated_unix_ms >= got.created_unix_ms + 1000
        assert await e.agent.claim("work", wait_ms=300) is None


# --------------------------------------------------------------------------- the agent's deadline


async def test_the_agents_grpc_deadline_stops_the_tool(tmp_path: Path) -> None:
    """A CallTool with a 1.5 s gRPC deadline stops the exec tool (and its tree) by then,
    although the policy would let it run 60 s."""
    async with env(tmp_path, policy("", EXEC_TICKER, ("ticker",))) as e:
        await e.control.client.submit("work", b"{}", lease_ttl_ms=30_000)
        task = await e.claim()
        started = time.monotonic()
        with pytest.raises(E.TetherError):
            await e.agent.call_tool(task.task_id, "ticker", {}, timeout_s=1.5)
        assert time.monotonic() - started < 10
        await tree_gone(e.workspace(task.task_id) / "ticks.txt")


# --------------------------------------------------------------------------- slow HTTP


@dataclass
class SlowApi:
    """A real HTTP API whose writes take `delay_s` and are abandoned if the client leaves
    first (as a server that ties work to its request's context does)."""

    delay_s: float
    requests: list[float] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)
    abandoned: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _slow_handler(api: SlowApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with api.lock:
                api.requests.append(time.time())
            end = time.monotonic() + api.delay_s
            while time.monotonic() < end:
                ready, _, _ = select.select([self.connection], [], [], 0.05)
                if ready and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    with api.lock:
                        api.abandoned.append(time.time())
                    return  # the client is gone: nothing is written
            with api.lock:
                api.writes.append(time.time())
            body = b'{"written": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def slow_api(delay_s: float) -> Iterator[tuple[SlowApi, int]]:
    api = SlowApi(delay_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _slow_handler(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


async def test_a_slow_http_write_is_cut_off_at_the_queue_deadline(tmp_path: Path) -> None:
    """At the queue's deadline the HTTP request in flight is cut: the API never writes, and
    calls after the deadline are refused before any request reaches it."""
    with slow_api(delay_s=8.0) as (api, port):
        tools = f"""
[tools.slow]
adapter = "http"
timeout_ms = 60000
[tools.slow.http]
base_url = "http://127.0.0.1:{port}"
allowed_methods = ["POST"]
"""
        queue = f"""
lease_ttl_ms = 6000
deadline_ms = 2500
network_allowlist = ["127.0.0.1:{port}"]
"""
        async with env(tmp_path, policy(queue, tools, ("slow",))) as e:
            submitted = (await e.control.client.submit("work", b"{}")).task
            assert submitted.deadline_unix_ms == submitted.created_unix_ms + 2500
            task = await e.claim()
            with pytest.raises(E.TaskTimedOut):
                await e.agent.call_tool(
                    task.task_id, "slow", {"method": "POST", "path": "/write", "body": "x"}
                )
            with pytest.raises(E.TaskTimedOut):
                await e.agent.call_tool(
                    task.task_id, "slow", {"method": "POST", "path": "/write", "body": "y"}
                )

            async def abandoned() -> bool:
                with api.lock:
                    return bool(api.abandoned)

            await until(abandoned)
            await asyncio.sleep(api.delay_s)  # past when the write would have landed
            with api.lock:
                assert (len(api.requests), api.writes) == (1, [])

            async def expired() -> bool:
                return (await e.task(task.task_id)).state == State.EXPIRED

            await until(expired)
            got = await e.task(task.task_id)
            assert (got.state, got.end_reason) == (State.EXPIRED, EndReason.DEADLINE)


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_submits_limits_shows_the_schedule_and_cancels_a_running_task(
    tmp_path: Path,
) -> None:
    """`tether submit` sets limits and retry policy, `tether task cancel --reason` stops the
    running agent's tool, and `tether task show` prints limits, retry delays and the end reason."""
    async with env(tmp_path, policy("", EXEC_TICKER, ("ticker",))) as e:
        ops = operator_args(e.control)
        out = await asyncio.to_thread(
            _cli, "submit", *ops, "--queue", "work", "--payload", "{}",
            "--max-attempts", "4", "--heartbeat-timeout-ms", "20000",
            "--attempt-timeout-ms", "60000", "--deadline-ms", "120000",
            "--retry-initial-ms", "200", "--retry-coefficient", "3",
            "--retry-max-interval-ms", "1000", "--non-retryable", "bad-input",
            "--retry-failures",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        task_id = out.stdout.strip()
        task = await e.claim()
        assert task.task_id == task_id
        call = asyncio.ensure_future(e.agent.call_tool(task_id, "ticker", {}))
        ticks = e.workspace(task_id) / "ticks.txt"

        async def ticking() -> bool:
            return size(ticks) > 0

        await until(ticking)
        cancel = await asyncio.to_thread(
            _cli, "task", "cancel", task_id, "--reason", "wrong input", *ops
        )
        assert cancel.returncode == 0, cancel.stderr
        with pytest.raises(E.TaskCanceled):
            await call
        await tree_gone(ticks)
        shown = await asyncio.to_thread(_cli, "task", "show", task_id, *ops)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert "limits: heartbeat 20000 ms, attempt 60000 ms, deadline " in shown.stdout
        assert (
            "retry: delays 200 ms, 600 ms, 1000 ms; failures retried; never retried: bad-input"
            in lines
        )
        assert "ended: canceled" in lines
        assert "error: wrong input" in lines


# --------------------------------------------------------------------------- the edge


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"deadline_ms": 5}, "deadline_ms"),
        ({"attempt_timeout_ms": 4_000_000_000}, "attempt_timeout_ms"),
        ({"schedule_to_start_timeout_ms": 999}, "schedule_to_start_timeout_ms"),
        ({"retry_policy": pb.RetryPolicy(backoff_coefficient=0.5)}, "backoff_coefficient"),
        ({"retry_policy": pb.RetryPolicy(backoff_coefficient=float("nan"))}, "coefficient"),
        (
            {"retry_policy": pb.RetryPolicy(initial_interval_ms=500, maximum_interval_ms=100)},
            "maximum_interval_ms",
        ),
        ({"max_attempts": 2, "retry_policy": pb.RetryPolicy(maximum_attempts=3)}, "maximum"),
        ({"retry_policy": pb.RetryPolicy(non_retryable_reasons=["no spaces"])}, "non_retryable"),
    ],
)
async def test_bad_limits_are_invalid_argument_naming_the_field(
    tmp_path: Path, fields: dict[str, Any], field_name: str
) -> None:
    """SubmitTask refuses out-of-range limits and inconsistent retry policies at the edge."""
    async with start_control(tmp_path) as control:
        with pytest.raises(E.InvalidArgument) as err:
            await control.client.submit("work", b"{}", **fields)
        assert field_name in err.value.field


async def test_non_retryable_is_refused_on_events_other_than_fail(tmp_path: Path) -> None:
    """TransitionTask with non_retryable or failure_type on SUCCEED is INVALID_ARGUMENT."""
    async with start_control(tmp_path) as control:
        await control.client.submit("work", b"{}")
        async with await control.node_client("node-1") as node:
            got = await node.acquire_lease("work", "node-1", "alice")
            with pytest.raises(E.InvalidArgument) as err:
                await node.transition(
                    got.task.task_id,
                    got.task.fencing_token,
                    Event.START,
                    "node-1",
                    non_retryable=True,
                )
            assert err.value.field == "non_retryable"


async def test_the_sidecar_stops_at_the_signed_deadline_without_the_sweeper(
    tmp_path: Path,
) -> None:
    """The lease carries the deadline, so the sidecar stops the tool and refuses calls by its
    own monotonic clock even when the control plane has not (yet) ended the task."""
    doc = policy("", EXEC_TICKER, ("ticker",))
    async with (
        start_control(tmp_path, policy=doc) as control,  # no sweeper: nothing ends it centrally
        start_sidecar(tmp_path, control.address, agent_liveness_ms=120_000) as side,
        side.agent("alice") as agent,
    ):
        await control.client.submit("work", b"{}", lease_ttl_ms=30_000, deadline_ms=2500)
        task = await agent.claim("work", wait_ms=5000)
        assert task is not None
        with pytest.raises(E.TaskTimedOut) as err:
            await agent.call_tool(task.task_id, "ticker", {})
        assert err.value.metadata["end_reason"] == "deadline"
        await tree_gone(side.state_dir / "workspaces" / task.task_id / "ticks.txt")
        with pytest.raises(E.TaskTimedOut):
            await agent.call_tool(task.task_id, "ticker", {})
        got = (await control.client.get_task(task.task_id)).task
        assert got.state == State.LEASED  # the control plane has not swept: the sidecar stopped
        assert time.time() * 1000 >= got.deadline_unix_ms - 1000


async def test_renew_lease_answers_with_the_reason_the_control_plane_ended_it(
    tmp_path: Path,
) -> None:
    """RenewLease on a lease ended by an attempt timeout or a cancel returns the end reason
    and the task's state (no lease); another node's renewal of it stays an error."""
    from tether.core.clock import FakeClock

    clock = FakeClock()
    async with start_control(tmp_path, clock=clock) as control:
        timed = (await control.client.submit("work", b"1", attempt_timeout_ms=5000)).task
        canceled = (await control.client.submit("work", b"2")).task
        async with (
            await control.node_client("node-1") as node,
            await control.node_client("node-2") as other,
        ):
            first = (await node.acquire_lease("work", "node-1", "alice")).task
            second = (await node.acquire_lease("work", "node-1", "alice")).task
            assert (first.task_id, second.task_id) == (timed.task_id, canceled.task_id)
            clock.advance(5000)
            await control.service.sweep()
            await control.client.cancel(canceled.task_id, "no longer needed")
            got = await node.renew_lease(first.task_id, first.fencing_token, "node-1")
            assert not got.HasField("lease")
            assert (got.end_reason, got.task_state) == (EndReason.ATTEMPT_TIMEOUT, State.QUEUED)
            got = await node.renew_lease(second.task_id, second.fencing_token, "node-1")
            assert (got.end_reason, got.task_state) == (EndReason.CANCELED, State.CANCELED)
            with pytest.raises(E.TetherError):  # not its lease: no reason is told
                await other.renew_lease(second.task_id, second.fencing_token, "node-2")


# --------------------------------------------------------------------------- on the record


async def test_exported_bundle_verifies_and_shows_the_timeout_and_cancel_receipts(
    tmp_path: Path,
) -> None:
    """A task stopped at its deadline mid-call and a task canceled mid-call export to a bundle
    that `tether verify` accepts strictly, showing each end: which limit, which clock, when."""
    async with env(tmp_path, policy("", EXEC_TICKER, ("ticker",))) as e:
        timed = (
            await e.control.client.submit("work", b"1", lease_ttl_ms=6000, deadline_ms=2500)
        ).task
        task = await e.claim()
        with pytest.raises(E.TaskTimedOut):
            await e.agent.call_tool(task.task_id, "ticker", {})
        canceled = (await e.control.client.submit("work", b"2", lease_ttl_ms=3000)).task
        task = await e.claim()
        assert task.task_id == canceled.task_id
        call = asyncio.ensure_future(e.agent.call_tool(task.task_id, "ticker", {}))
        await asyncio.sleep(0.5)
        await e.control.client.cancel(task.task_id, "operator stop")
        with pytest.raises(E.TaskCanceled):
            await call

        async def ended() -> bool:
            return (await e.task(timed.task_id)).state == State.EXPIRED

        await until(ended)
        ids = [timed.task_id, canceled.task_id]
        code, out = await export_and_verify(e.control, tmp_path, ids, "--json")
        assert code == 0, out
        report = json.loads(out[out.index("{") :])
        tasks = {t["task_id"]: t for t in report["tasks"]}
        ends = {
            tid: [ev for ev in t["events"] if ev["ref"].startswith("control[")]
            for tid, t in tasks.items()
        }
        (deadline,) = ends[timed.task_id]
        (cancel,) = ends[canceled.task_id]
        assert deadline["kind"] == "deadline"
        assert "clock=control-plane" in deadline["detail"]
        assert "state=expired" in deadline["detail"]
        assert cancel["kind"] == "canceled"
        assert 'reason="canceled: operator stop"' in cancel["detail"]
        assert (tasks[timed.task_id]["final_state"], tasks[canceled.task_id]["final_state"]) == (
            "expired",
            "canceled",
        )
        stopped = [
            ev
            for ev in tasks[canceled.task_id]["events"]
            if ev["kind"] == "tool_call" and "status=TASK_CANCELED" in ev["detail"]
        ]
        assert len(stopped) == 1  # the call in flight, on the record as stopped by the cancel
        (limit,) = tasks[timed.task_id]["limits"][:1]
        assert limit.startswith("deadline=")  # from the signed lease, shown by the verifier
        assert tasks[timed.task_id]["limits"][1].startswith("attempt 1 granted=")
        assert tasks[canceled.task_id]["limits"] == []  # no limit was set
        code, human = await export_and_verify(e.control, tmp_path, ids, "--timeline")
        assert code == 0, human
        assert "limit (signed lease)  deadline=" in human


async def test_heartbeat_timeout_retries_then_expires_with_its_reason(tmp_path: Path) -> None:
    """An agent that goes silent loses each lease at the heartbeat timeout (the TTL); with
    attempts spent the task ends expired with reason heartbeat_timeout, the delay between
    attempts following the retry policy."""
    queue = """
lease_ttl_ms = 1000
max_attempts = 2
[queues.work.retry]
initial_interval_ms = 700
"""
    async with (
        start_control(tmp_path, policy=policy(queue), sweep_interval_ms=100) as control,
        start_sidecar(tmp_path, control.address, agent_liveness_ms=200) as side,
        side.agent("alice") as agent,
    ):
        submitted = (await control.client.submit("work", b"{}")).task
        for attempt in (1, 2):
            task = await agent.claim("work", wait_ms=10_000)
            assert task is not None
            assert task.attempt == attempt  # then silence: no heartbeat, no call

        async def expired() -> bool:
            got = (await control.client.get_task(submitted.task_id)).task
            return got.state == State.EXPIRED

        await until(expired)
        got = (await control.client.get_task(submitted.task_id)).task
        assert got.end_reason == EndReason.HEARTBEAT_TIMEOUT
        (_, first, o1), (_, second, o2) = grants(await attempts(control, submitted.task_id))
        assert (o1, o2) == ("lapsed", "lapsed")
        assert second - first >= 1000 + 700  # the TTL ran out, then the retry delay


@pytest.mark.postgres
async def test_on_postgresql_the_databases_clock_decides_and_is_on_the_record(
    tmp_path: Path,
) -> None:
    """With a PostgreSQL store the deadline is judged by the database's clock: the task ends
    expired/deadline and its control receipt says clock=database."""
    from test_trust_boundaries import fresh_postgres

    with fresh_postgres() as url:
        async with env(tmp_path, policy("", EXEC_TICKER, ("ticker",)), db=url) as e:
            timed = (
                await e.control.client.submit("work", b"1", lease_ttl_ms=6000, deadline_ms=2500)
            ).task
            task = await e.claim()
            with pytest.raises(E.TaskTimedOut):
                await e.agent.call_tool(task.task_id, "ticker", {})
            await tree_gone(e.workspace(task.task_id) / "ticks.txt")

            async def ended() -> bool:
                return (await e.task(timed.task_id)).state == State.EXPIRED

            await until(ended)
            assert (await e.task(timed.task_id)).end_reason == EndReason.DEADLINE
            code, out = await export_and_verify(e.control, tmp_path, [timed.task_id], "--json")
            assert code == 0, out
            report = json.loads(out[out.index("{") :])
            (end,) = [
                ev
                for t in report["tasks"]
                for ev in t["events"]
                if ev["ref"].startswith("control[")
            ]
            assert end["kind"] == "deadline"
            assert "clock=database" in end["detail"]

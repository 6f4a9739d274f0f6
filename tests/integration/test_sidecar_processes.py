"""Control plane, sidecars and agents as the real CLIs a user runs, in subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.agent import AgentClient
from tether.core import errors as E
from tether.core.states import State
from tether.testing import endpoint, spawn_control_cli, spawn_sidecar_cli, sync_join_token

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python_agent.py"


class Procs:
    """Tracks subprocesses so every one is killed at the end of a test."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.all.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.all:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop_all()


def spawn_agent(
    procs: Procs, socket: Path, token_file: Path, out: Path, *args: str
) -> subprocess.Popen[bytes]:
    """Starts examples/python_agent.py with its JSON events going to `out`."""
    argv = [sys.executable, str(EXAMPLE), "--socket", str(socket), "--queue", "work",
            "--token-file", str(token_file), *args]  # fmt: skip
    with out.open("ab") as f:
        return procs.add(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT))


def events(out: Path) -> list[dict[str, object]]:
    """The JSON events an agent printed (non-JSON lines ignored)."""
    found = []
    for line in out.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


async def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    """Polls `predicate()` until true; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_cli_agent_completes_task(tmp_path: Path, procs: Procs) -> None:
    """CLI control plane + CLI sidecar + example agent: the task ends succeeded."""
    control, address = spawn_control_cli(tmp_path)
    procs.add(control)
    sidecar, sock, tokens = spawn_sidecar_cli(tmp_path, address)
    procs.add(sidecar)
    async with endpoint(address).admin() as client:
        task = (await client.submit("work", b'{"job": 1}')).task
        out = tmp_path / "agent.out"
        agent = spawn_agent(procs, sock, tokens["alice"], out, "--count", "1")
        assert await asyncio.to_thread(agent.wait, 30) == 0
        kinds = [e["event"] for e in events(out)]
        assert kinds == ["claimed", "started", "completed", "exit"]
        got = await client.get_task(task.task_id)
        assert got.task.state == State.SUCCEEDED
    sidecar.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(sidecar.wait, 15) == 0
    assert not sock.exists()


async def test_two_sidecars_race_on_200_tasks(tmp_path: Path, procs: Procs) -> None:
    """Two agents on two sidecars drain 200 tasks: every task is completed exactly once."""
    control, address = spawn_control_cli(tmp_path)
    procs.add(control)
    s1, sock1, tok1 = spawn_sidecar_cli(tmp_path, address, node_id="n1", agents=("alice",))
    s2, sock2, tok2 = spawn_sidecar_cli(tmp_path, address, node_id="n2", agents=("bob",))
    procs.add(s1), procs.add(s2)
    async with endpoint(address).admin() as client:
        ids = set()
        for i in range(200):
            ids.add((await client.submit("work", json.dumps({"i": i}).encode())).task.task_id)
        out1, out2 = tmp_path / "a1.out", tmp_path / "a2.out"
        a1 = spawn_agent(procs, sock1, tok1["alice"], out1, "--exit-when-idle", "--wait-ms", "300")
        a2 = spawn_agent(procs, sock2, tok2["bob"], out2, "--exit-when-idle", "--wait-ms", "300")
        assert await asyncio.to_thread(a1.wait, 60) == 0
        assert await asyncio.to_thread(a2.wait, 60) == 0
        done = [e["task_id"] for out in (out1, out2) for e in events(out)
                if e["event"] == "completed"]  # fmt: skip
        assert Counter(done).most_common(1)[0][1] == 1
        assert set(done) == ids
        tasks = await client.list_all_tasks(queue="work")
        assert Counter(t.state for t in tasks) == {State.SUCCEEDED: 200}


async def test_killed_agent_task_taken_over_with_higher_token(tmp_path: Path, procs: Procs) -> None:
    """A SIGKILLed agent's task moves to another sidecar (higher token); the late finish fails."""
    control, address = spawn_control_cli(tmp_path, extra_args=["--sweep-interval-ms", "200"])
    procs.add(control)
    s1, sock1, tok1 = spawn_sidecar_cli(tmp_path, address, node_id="n1", agents=("alice",))
    s2, sock2, tok2 = spawn_sidecar_cli(tmp_path, address, node_id="n2", agents=("bob",))
    procs.add(s1), procs.add(s2)
    async with endpoint(address).admin() as client:
        task_id = (await client.submit("work", b"{}", lease_ttl_ms=2000)).task.task_id
        out = tmp_path / "victim.out"
        victim = spawn_agent(procs, sock1, tok1["alice"], out, "--work-seconds", "120")
        await wait_for(lambda: any(e["event"] == "started" for e in events(out)))
        first_token = next(e for e in events(out) if e["event"] == "started")["fencing_token"]
        victim.kill()
        victim.wait()
        bob_token = tok2["bob"].read_text().strip()
        async with AgentClient(sock2, token=bob_token) as bob:
            task = None
            while task is None:
                task = await bob.claim("work", wait_ms=1000)
            assert task.task_id == task_id
            assert task.fencing_token > int(str(first_token))
            alice_token = tok1["alice"].read_text().strip()
            async with AgentClient(sock1, token=alice_token) as late:
                with pytest.raises(E.LeaseLost, match="lease lost"):
                    await late.complete(task_id, result=b"late")
            assert (await bob.complete(task_id, result=b"bob"))[0] == "succeeded"
        got = await client.get_task(task_id)
        assert got.task.state == State.SUCCEEDED
        assert got.task.result == b"bob"
        assert got.task.fencing_token == task.fencing_token


async def test_control_plane_killed_and_restarted_loses_nothing(
    tmp_path: Path, procs: Procs
) -> None:
    """SIGKILL and restart of the control plane while agents work: no task lost or doubled."""
    control, address = spawn_control_cli(tmp_path, extra_args=["--sweep-interval-ms", "200"])
    procs.add(control)
    s1, sock1, tok1 = spawn_sidecar_cli(tmp_path, address, node_id="n1", agents=("alice",))
    s2, sock2, tok2 = spawn_sidecar_cli(tmp_path, address, node_id="n2", agents=("bob",))
    procs.add(s1), procs.add(s2)
    n = 60
    async with endpoint(address).admin() as client:
        ids = {
            (await client.submit("work", b"{}", lease_ttl_ms=5000)).task.task_id for _ in range(n)
        }
    out1, out2 = tmp_path / "a1.out", tmp_path / "a2.out"
    args = ("--count", "0", "--work-seconds", "0.05", "--wait-ms", "300")
    a1 = spawn_agent(procs, sock1, tok1["alice"], out1, *args)
    a2 = spawn_agent(procs, sock2, tok2["bob"], out2, *args)

    def completed() -> list[str]:
        return [str(e["task_id"]) for o in (out1, out2) for e in events(o)
                if e["event"] == "completed"]  # fmt: skip

    await wait_for(lambda: len(completed()) >= 10)
    control.kill()
    control.wait()
    await asyncio.sleep(0.5)
    enroll = endpoint(address).enroll_address  # the sidecars were told both addresses
    restarted, address2 = spawn_control_cli(
        tmp_path,
        extra_args=["--sweep-interval-ms", "200", "--listen", address, "--enroll-listen", enroll],
    )
    procs.add(restarted)
    assert address2 == address
    await wait_for(lambda: len(set(completed())) >= n, timeout_s=45)
    a1.send_signal(signal.SIGTERM), a2.send_signal(signal.SIGTERM)
    done = completed()
    assert Counter(done).most_common(1)[0][1] == 1
    assert set(done) == ids
    async with endpoint(address).admin() as client:
        tasks = await client.list_all_tasks(queue="work")
        assert Counter(t.state for t in tasks) == {State.SUCCEEDED: n}


async def test_sidecar_started_during_an_outage_waits_and_reports_not_serving(
    tmp_path: Path, procs: Procs
) -> None:
    """A sidecar started while the control plane is down keeps retrying instead of exiting,
    serves once it is back, and its health says NOT_SERVING while it cannot reach it."""
    control, address = spawn_control_cli(tmp_path)
    procs.add(control)
    enroll = endpoint(address).enroll_address
    token = sync_join_token(endpoint(address), "n1")
    control.terminate()
    control.wait()
    started = asyncio.get_running_loop().run_in_executor(
        None,
        lambda: spawn_sidecar_cli(
            tmp_path, address, node_id="n1", agents=("alice",), join_token=token, timeout_s=60
        ),
    )
    log_path = tmp_path / "n1" / "sidecar.log"

    def reported_unreachable() -> bool:
        return log_path.exists() and "unreachable at start-up" in log_path.read_text()

    # Wait for the sidecar's own report of a failed attempt (a loaded machine may take seconds
    # just to start the process), then a while longer: it must still be alive, retrying.
    await wait_for(reported_unreachable, timeout_s=60)
    await asyncio.sleep(2)
    assert not started.done()
    restarted, _ = spawn_control_cli(
        tmp_path, extra_args=["--listen", address, "--enroll-listen", enroll]
    )
    procs.add(restarted)
    side, sock, _ = await started
    procs.add(side)
    assert reported_unreachable()

    def health() -> int:
        return subprocess.run(
            [sys.executable, "-m", "tether.cli", "health", "--socket", str(sock)],
            capture_output=True, check=False, timeout=30,
        ).returncode  # fmt: skip

    assert await asyncio.to_thread(health) == 0
    restarted.kill()
    restarted.wait()
    async with AgentClient(sock, token=(tmp_path / "n1" / "alice.token").read_text().strip()) as a:
        with contextlib.suppress(Exception):
            await a.claim("work")  # finds the control plane gone
    await wait_for(lambda: health() == 1, timeout_s=15)

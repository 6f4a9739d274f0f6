# ruff: noqa: E501  (the table keeps one mistake per line, so each reads as one row)
"""What a user who gets something wrong sees: each bad input run as a real `tether` process.

Every row of the table is one mistake (most from issue 15's survey, some that
were already handled well). Each must end in the documented exit code (2 for a
usage or configuration error, including a request the control plane refused as
INVALID_ARGUMENT; 1 for a failure the command found), a message on stderr that
names the field or file at fault, and no traceback or raw gRPC log line. A
process that cannot serve must exit on its own: every row runs under a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from control_fixtures import operator_args

from tether.crypto.pki import write_private
from tether.crypto.signing import SigningKey
from tether.testing import endpoint, spawn_control_cli, spawn_sidecar_cli, write_agent_token

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 60  # generous for a loaded machine; a hang fails the row


@dataclass
class World:
    """One control plane and sidecar shared by the rows, and the files they name."""

    dir: Path
    address: str
    op: list[str]
    trust: Path
    busy_port: int
    sidecar_socket: Path
    alice_token: Path
    values: dict[str, str] = field(default_factory=dict)


def _free_busy_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A running control plane (mTLS) and sidecar, a busy port, and the files the rows use."""
    d = tmp_path_factory.mktemp("cli-errors")
    control, address = spawn_control_cli(d / "cp")
    side = None
    busy = _free_busy_socket()
    try:
        side, sock, tokens = spawn_sidecar_cli(d / "cp", address, node_id="n1")
        ep = endpoint(address)
        (d / "afile").write_text("not a directory\n")
        (d / "corrupt.db").write_bytes(b"this is not an SQLite database" * 100)
        (d / "somedir").mkdir()
        SigningKey.generate().save(d / "node.key", d / "node.pub")
        write_agent_token(d / "alice.token")
        write_private(d / "short.join", b"abc\n")
        (d / "open.join").write_text("a-join-token-that-is-long-enough-to-pass\n")
        (d / "open.join").chmod(0o644)
        (d / "wrong.token").write_text("this-is-not-alices-token-at-all\n")
        (d / "bad-policy.toml").write_text('version = 1\n[queues.q]\ntools = ["nope"]\n')
        (d / "garbage.json").write_bytes(b"\x00\x01 not a bundle")
        yield World(
            dir=d,
            address=address,
            op=operator_args(ep),
            trust=ep.pki.trust_bundle,
            busy_port=busy.getsockname()[1],
            sidecar_socket=sock,
            alice_token=tokens["alice"],
        )
    finally:
        busy.close()
        for proc in (side, control):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _env() -> dict[str, str]:
    """The environment without any TETHER_* setting, so only the row's arguments count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.pop("GRPC_VERBOSITY", None)  # the CLI must silence gRPC's C core by itself
    return env


def run_tether(
    w: World, argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m tether.cli ARGV` in the world's directory, under the deadline."""
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *argv],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        cwd=w.dir,
        env=env or _env(),
        check=False,
    )


# (id, argv, exit code, what stderr must name). "@OP" stands for the operator's
# --control/--tls-* arguments; {dir}, {busy}, {trust}, {sock} are filled in.
SIDECAR = [
    "sidecar", "--node-id", "n9", "--key", "{dir}/node.key", "--trust-bundle", "{trust}",
    "--agent", "alice={dir}/alice.token",
]  # fmt: skip
ROWS: list[tuple[str, list[str], int, tuple[str, ...], bytes | None]] = [
    # -- global flags ----------------------------------------------------------------------
    ("log-level", ["--log-level", "bogus", "keys", "init", "--dir", "k1"], 2, ("--log-level", "bogus"), None),
    ("log-format", ["--log-format", "xml", "keys", "init", "--dir", "k1"], 2, ("--log-format",), None),
    ("no-command", [], 2, ("COMMAND",), None),
    # -- keys ------------------------------------------------------------------------------
    ("keys-dir-is-file", ["keys", "init", "--dir", "afile"], 2, ("--dir", "afile"), None),
    ("keys-name-escape", ["keys", "init", "--dir", "k2", "--name", "../../escape"], 2, ("--name", "../../escape"), None),
    ("keys-name-dotdot", ["keys", "init", "--dir", "k2", "--name", ".."], 2, ("--name",), None),
    ("operators-no-ca", ["operators", "add", "bob", "--role", "auditor", "--dir", "somedir"], 2, ("somedir",), None),
    # -- control plane that cannot serve: exits at once, naming the cause ------------------
    ("control-corrupt-db", ["control", "--db", "corrupt.db", "--key", "{dir}/cp/keys/control.key", "--insecure-plaintext", "--listen", "127.0.0.1:0"], 1, ("corrupt.db", "not a database"), None),
    ("control-db-is-dir", ["control", "--db", "somedir", "--key", "{dir}/cp/keys/control.key", "--insecure-plaintext", "--listen", "127.0.0.1:0"], 1, ("somedir",), None),
    ("control-port-range", ["control", "--db", "x.db", "--key", "{dir}/cp/keys/control.key", "--insecure-plaintext", "--listen", "127.0.0.1:99999"], 2, ("127.0.0.1:99999", "0..65535"), None),
    ("control-port-busy", ["control", "--db", "x.db", "--key", "{dir}/cp/keys/control.key", "--insecure-plaintext", "--listen", "127.0.0.1:{busy}"], 2, ("--listen", "{busy}", "in use"), None),
    ("control-listen-scheme", ["control", "--db", "x.db", "--key", "{dir}/cp/keys/control.key", "--insecure-plaintext", "--listen", "http://127.0.0.1:7"], 2, ("http://", "host:port"), None),
    ("control-key-missing", ["control", "--db", "x.db", "--key", "missing.key"], 2, ("missing.key",), None),
    ("control-sweep", ["control", "--db", "x.db", "--key", "{dir}/cp/keys/control.key", "--sweep-interval-ms", "0"], 2, ("--sweep-interval-ms",), None),
    # -- sidecar: found before it waits for the control plane ------------------------------
    ("sidecar-long-socket", [*SIDECAR, "--control", "127.0.0.1:1", "--socket", "/tmp/" + "s" * 120, "--state-dir", "st"], 2, ("socket", "107"), None),
    ("sidecar-state-dir-file", [*SIDECAR, "--control", "127.0.0.1:1", "--socket", "s1.sock", "--state-dir", "afile"], 2, ("state_dir", "afile"), None),
    ("sidecar-tcp-busy", [*SIDECAR, "--control", "127.0.0.1:1", "--socket", "s2.sock", "--state-dir", "st", "--listen-tcp", "127.0.0.1:{busy}"], 2, ("listen_tcp", "{busy}", "in use"), None),
    ("sidecar-control-scheme", [*SIDECAR, "--control", "http://127.0.0.1:7400", "--socket", "s3.sock", "--state-dir", "st"], 2, ("control", "http://"), None),
    ("sidecar-short-join-token", [*SIDECAR, "--control", "127.0.0.1:1", "--socket", "s4.sock", "--state-dir", "st", "--join-token-file", "short.join"], 2, ("enrollment_token_file", "short.join", "shorter"), None),
    ("sidecar-open-join-token", [*SIDECAR, "--control", "127.0.0.1:1", "--socket", "s5.sock", "--state-dir", "st", "--join-token-file", "open.join"], 2, ("enrollment_token_file", "open.join", "chmod 600"), None),
    ("sidecar-no-agent", ["sidecar", "--node-id", "n9", "--key", "{dir}/node.key", "--control", "127.0.0.1:1"], 2, ("agent",), None),
    # -- operator commands: checked locally ------------------------------------------------
    ("no-address", ["tasks"], 2, ("--control", "TETHER_CONTROL"), None),
    ("submit-attempts-negative", ["submit", "@OP", "--queue", "work", "--payload", "{{}}", "--max-attempts", "-1"], 2, ("--max-attempts", "-1"), None),
    ("submit-not-json", ["submit", "@OP", "--queue", "work", "--payload", "{{nope"], 2, ("--payload", "not JSON"), None),
    ("submit-payload-file-missing", ["submit", "@OP", "--queue", "work", "--payload-file", "missing.json"], 2, ("--payload-file", "missing.json"), None),
    ("submit-payload-stdin-not-json", ["submit", "@OP", "--queue", "work", "--payload-file", "-"], 2, ("--payload-file", "not JSON"), b"{nope"),
    ("submit-two-payloads", ["submit", "@OP", "--queue", "work", "--payload", "{{}}", "--payload-file", "-"], 2, ("--payload",), None),
    ("tasks-bad-state", ["tasks", "@OP", "--state", "bogus"], 2, ("--state", "bogus"), None),
    ("output-bad", ["tasks", "@OP", "-o", "yaml"], 2, ("--output", "yaml"), None),
    ("token-ttl", ["nodes", "token", "create", "@OP", "--node", "n2", "--ttl", "5 weeks"], 2, ("duration", "5 weeks"), None),
    ("secret-empty", ["secrets", "put", "api_token", "@OP"], 2, ("empty",), b""),
    ("policy-apply-invalid", ["policy", "apply", "bad-policy.toml", "@OP"], 2, ("nope",), None),
    ("policy-validate-invalid", ["policy", "validate", "bad-policy.toml"], 1, ("bad-policy.toml", "INVALID", "nope"), None),
    ("policy-validate-missing", ["policy", "validate", "missing.toml"], 2, ("missing.toml",), None),
    ("export-missing-dir", ["receipts", "export", "@OP", "--all", "--out", "/missing/dir/b.json"], 2, ("--out", "/missing/dir"), None),
    ("tls-ca-missing", ["tasks", "--control", "{address}", "--tls-ca", "missing.pem"], 2, ("missing.pem",), None),
    # -- operator commands: refused by the control plane -----------------------------------
    ("server-invalid-queue", ["submit", "@OP", "--queue", "bad queue", "--payload", "{{}}"], 2, ("queue",), None),
    ("server-unknown-task", ["task", "show", "t_nope", "@OP"], 1, ("t_nope",), None),
    ("server-cancel-unknown", ["task", "cancel", "t_nope", "@OP", "--reason", "x"], 1, ("t_nope",), None),
    ("unreachable", ["tasks", "@OP", "--control", "127.0.0.1:1"], 1, ("cannot reach", "127.0.0.1:1", "--control"), None),
    # -- verify and health -----------------------------------------------------------------
    ("verify-missing", ["verify", "missing.json", "--trust", "{trust}"], 2, ("missing.json",), None),
    ("verify-garbage-stdin", ["verify", "-", "--trust", "{trust}"], 1, ("bundle",), b"\x00garbage"),
    ("verify-no-trust", ["verify", "garbage.json"], 2, ("--trust",), None),
    ("health-unreachable", ["health", "--address", "127.0.0.1:1", "--timeout", "2"], 1, ("127.0.0.1:1",), None),
]  # fmt: skip


def _expand(w: World, argv: list[str]) -> list[str]:
    values = {
        "dir": str(w.dir),
        "busy": str(w.busy_port),
        "trust": str(w.trust),
        "address": w.address,
        "sock": str(w.sidecar_socket),
    }
    out: list[str] = []
    for arg in argv:
        if arg == "@OP":
            out += w.op
        else:
            out.append(arg.format(**values))
    return out


@pytest.mark.parametrize(
    ("argv", "code", "needles", "stdin"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_ends_in_one_line_and_the_documented_exit_code(
    world: World, argv: list[str], code: int, needles: tuple[str, ...], stdin: bytes | None
) -> None:
    """The mistake gets its documented exit code and a message naming what is wrong, no traceback."""
    proc = run_tether(world, _expand(world, argv), stdin=stdin if stdin is not None else b"")
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out
    assert "add_port.cc" not in out
    assert "E1201" not in out
    for needle in needles:
        assert needle.format(busy=world.busy_port) in out, out
    if proc.stderr.strip():
        # The message is the last line on stderr (logs, if any, come before it).
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(("tether", "127.0.0.1:1: ")), proc.stderr
    else:  # tether verify: the verdict is the first line on stdout
        assert proc.stdout.startswith("INVALID"), proc.stdout


def test_debug_adds_the_traceback(world: World) -> None:
    """--debug shows the traceback of the same error (and the one-line message still ends it)."""
    plain = run_tether(world, ["keys", "init", "--dir", "afile"])
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    argv = ["--debug", "control", "--db", "corrupt.db", "--key", f"{world.dir}/cp/keys/control.key"]
    debug = run_tether(world, [*argv, "--insecure-plaintext", "--listen", "127.0.0.1:0"])
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("tether: cannot open database")


def test_a_closed_pipe_ends_quietly(world: World) -> None:
    """`tether tasks | head -1`: when the reader is gone the command ends without a traceback."""
    argv = [sys.executable, "-m", "tether.cli", "tasks", *world.op]
    submitted = run_tether(world, ["submit", *world.op, "--queue", "work", "--payload", "{}"])
    assert submitted.returncode == 0, submitted.stderr  # so `tasks` has a line to write
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=world.dir, env=_env()
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader goes away before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(DEADLINE_S) == 141, err
    assert "Traceback" not in err
    assert "BrokenPipe" not in err


def test_wrong_agent_token_in_the_example_agent(world: World) -> None:
    """examples/python_agent.py with a token the sidecar does not know: one line, exit 2."""
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "examples" / "python_agent.py"),
            "--socket", str(world.sidecar_socket), "--token-file", str(world.dir / "wrong.token"),
            "--queue", "work", "--count", "1",
        ],
        capture_output=True, text=True, timeout=DEADLINE_S, cwd=world.dir, env=_env(),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--token-file" in proc.stderr


def test_sigterm_ends_a_sidecar_waiting_for_the_control_plane(world: World) -> None:
    """A sidecar started while nothing answers keeps retrying, and SIGTERM still ends it."""
    argv = _expand(
        world, [*SIDECAR, "--control", "127.0.0.1:1", "--socket", "w.sock", "--state-dir", "stw"]
    )
    log = world.dir / "waiting-sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", *argv],
            stdout=out, stderr=out, cwd=world.dir, env=_env(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "unreachable at start-up" not in log.read_text():  # it retries, not exits
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


def test_raw_garbage_requests_are_invalid_argument_and_servers_stay_healthy(world: World) -> None:
    """Bytes that are no protobuf message, sent to the control plane (mTLS) and the sidecar
    (its socket), are INVALID_ARGUMENT, and both still answer health checks afterwards."""
    import grpc

    from tether.crypto.pki import Role
    from tether.grpcutil.tls import ClientTLS

    ep = endpoint(world.address)
    tls: ClientTLS = ep.pki.operator_tls(Role.ADMIN)
    garbage = b"\xff\xff\xff\xff\x0f not protobuf \x00" * 8
    targets = [
        (
            grpc.secure_channel(world.address, tls.credentials()),
            "/tether.v1.ControlService/SubmitTask",
        ),
        (
            grpc.insecure_channel(f"unix:{world.sidecar_socket}"),
            "/tether.v1.BrokerService/ClaimTask",
        ),
    ]
    for channel, method in targets:
        with channel:
            call = channel.unary_unary(method)  # no serializer: the bytes go as they are
            with pytest.raises(grpc.RpcError) as info:
                call(garbage, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    health = run_tether(world, ["health", "--socket", str(world.sidecar_socket)])
    assert health.returncode == 0, health.stderr
    op = dict(zip(world.op[::2], world.op[1::2], strict=True))
    served = run_tether(
        world,
        ["health", "--address", world.address, "--tls-ca", op["--tls-ca"],
         "--tls-cert", op["--tls-cert"], "--tls-key", op["--tls-key"]],
    )  # fmt: skip
    assert served.returncode == 0, served.stderr


def test_read_only_database_exits_at_once(tmp_path: Path) -> None:
    """A database file this user cannot write: the control plane exits 1 naming the file,
    instead of serving reads and failing every write. (As root, the control plane runs as
    nobody through setpriv, for whom the root-owned file is read-only.)"""
    import shutil
    import sqlite3
    import tempfile

    argv = [sys.executable, "-m", "tether.cli"]
    nobody = 65534
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file read-only")
        argv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", *argv]
        # pytest's tmp_path is root's 0700 tree: use a directory nobody can reach.
        d = Path(tempfile.mkdtemp(prefix="tether-ro-", dir="/tmp"))
        d.chmod(0o755)
    else:
        d = tmp_path
    try:
        sqlite3.connect(d / "ro.db").close()
        SigningKey.generate().save(d / "control.key", d / "control.pub")
        if os.geteuid() == 0:
            for path in (d, d / "control.key", d / "control.pub"):
                os.chown(path, nobody, nobody)
            (d / "ro.db").chmod(0o644)  # root's file: readable, not writable, by nobody
        else:
            (d / "ro.db").chmod(0o444)
        proc = subprocess.run(
            [*argv, "control", "--db", str(d / "ro.db"), "--key", str(d / "control.key"),
             "--insecure-plaintext", "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=DEADLINE_S, env=_env(), cwd=d, check=False,
        )  # fmt: skip
    finally:
        if d != tmp_path:
            shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tether: cannot open database {d / 'ro.db'}"), proc.stderr
    assert "not writable" in last

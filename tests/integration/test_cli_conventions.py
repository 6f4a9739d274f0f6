"""The conventions users bring from other CLIs, run as real `tether` processes.

--version; the control plane's address and the operator's credential from
TETHER_* variables alone; `-o json` on the listing and showing commands;
`task cancel --reason`; `submit --payload-file -`; `secrets list` (never a
value); `policy validate` offline and `policy diff`; a per-KEK report from
`rotate-kek`; `receipts export --out -` piped into `tether verify -`; readable
logs on a terminal and JSON otherwise; help text on every flag.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether import __version__
from tether.cli import build_parser
from tether.crypto.pki import Role
from tether.testing import endpoint, spawn_control_cli, spawn_sidecar_cli, write_agent_token

DEADLINE_S = 60
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Env:
    """A running control plane and the TETHER_* environment of an admin operator."""

    dir: Path
    address: str
    vars: dict[str, str]
    db: Path
    kek: Path

    def with_role(self, role: Role) -> dict[str, str]:
        cert, key = endpoint(self.address).pki.write_operator(role)
        return {**self.vars, "TETHER_TLS_CERT": str(cert), "TETHER_TLS_KEY": str(key)}


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One control plane (mTLS, vault on) for the module."""
    d = tmp_path_factory.mktemp("cli-conventions")
    proc, address = spawn_control_cli(d)
    try:
        ep = endpoint(address)
        cert, key = ep.pki.write_operator(Role.ADMIN)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env.update(
            TETHER_CONTROL=address,
            TETHER_TLS_CA=str(ep.pki.trust_bundle),
            TETHER_TLS_CERT=str(cert),
            TETHER_TLS_KEY=str(key),
        )
        yield Env(d, address, env, d / "control.db", d / "control.kek")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tether(
    env: dict[str, str], *argv: str, stdin: bytes = b"", cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Runs `python -m tether.cli ARGV` with exactly `env` (no flags for the address)."""
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *argv],
        input=stdin,
        capture_output=True,
        timeout=DEADLINE_S,
        env=env,
        cwd=cwd,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    return proc.stdout.decode()


def test_version_prints_the_package_version() -> None:
    """`tether --version` prints the installed version and exits 0."""
    out = ok(tether(dict(os.environ), "--version"))
    assert out.strip() == f"tether {__version__}"


def test_every_flag_and_command_has_help() -> None:
    """Every option, positional and subcommand of every command says what it is for."""
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name} (command)")
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "tether")
    assert not missing, missing


def test_operator_commands_take_address_and_credential_from_the_environment(cp: Env) -> None:
    """With only TETHER_* set, submit, tasks, nodes, policy, export and health all work."""
    task_id = ok(tether(cp.vars, "submit", "--queue", "work", "--payload", '{"n": 1}')).split()[0]
    assert task_id in ok(tether(cp.vars, "tasks"))
    ok(tether(cp.vars, "nodes", "list"))
    assert "[queues.work]" in ok(tether(cp.vars, "policy", "show"))
    ok(tether(cp.vars, "receipts", "export", "--all", "--out", str(cp.dir / "env.json")))
    # health reads the same TLS variables when given the control plane's address
    assert "SERVING" in ok(tether(cp.vars, "health", "--address", cp.address))
    # without them, the message says which variable is missing
    bare = {k: v for k, v in cp.vars.items() if k != "TETHER_CONTROL"}
    proc = tether(bare, "tasks")
    assert proc.returncode == 2
    assert b"TETHER_CONTROL" in proc.stderr


def test_json_output_of_tasks_task_show_nodes_policy_and_cancel(cp: Env) -> None:
    """-o json prints one JSON document (proto3 JSON field names) a script can load."""
    task_id = ok(tether(cp.vars, "submit", "--queue", "work", "--payload", '{"j": 1}')).split()[0]
    tasks = json.loads(ok(tether(cp.vars, "tasks", "--queue", "work", "-o", "json")))
    assert task_id in {t["task_id"] for t in tasks}
    shown = json.loads(ok(tether(cp.vars, "task", "show", task_id, "-o", "json")))
    assert shown["task"]["task_id"] == task_id
    assert shown["task"]["state"] == "TASK_STATE_QUEUED"
    assert shown["leases"] == []
    assert isinstance(json.loads(ok(tether(cp.vars, "nodes", "list", "-o", "json"))), list)
    policy = json.loads(ok(tether(cp.vars, "policy", "show", "-o", "json")))
    assert int(policy["version"]) >= 1  # uint64: a string in proto3 JSON
    assert "[queues.work]" in policy["document"]
    canceled = json.loads(
        ok(tether(cp.vars, "task", "cancel", task_id, "--reason", "not needed", "-o", "json"))
    )
    assert canceled["task_id"] == task_id
    assert canceled["state"] == "TASK_STATE_CANCELED"
    again = tether(cp.vars, "task", "cancel", task_id, "--reason", "again")
    assert again.returncode == 1  # a canceled task cannot be canceled again: one line says so
    assert b"Traceback" not in again.stderr
    assert b"canceled" in again.stderr


async def test_task_show_folds_renewals_into_one_lease(cp: Env) -> None:
    """A lease renewed twice is one lease in `task show` (2 renewals), not three lapsed ones."""
    ep = endpoint(cp.address)
    node = await ep.node_client("node-show")
    try:
        resp = ok(tether(cp.vars, "submit", "--queue", "q2", "--payload", "{}"))
        task_id = resp.split()[0]
        got = await node.acquire_lease("q2", "node-show", "a")
        assert got.task.task_id == task_id
        for _ in range(2):
            await node.renew_lease(task_id, got.task.fencing_token, "node-show")
    finally:
        await node.close()
    shown = json.loads(ok(tether(cp.vars, "task", "show", task_id, "-o", "json")))
    assert len(shown["leases"]) == 1
    lease = shown["leases"][0]
    assert lease["renewals"] == 2
    assert lease["outcome"] == "active"
    assert lease["fencing_token"] == got.task.fencing_token
    table = ok(tether(cp.vars, "task", "show", task_id))
    assert table.count(f"token {got.task.fencing_token} attempt") == 1
    assert "(2 renewals)  active" in table


def test_submit_reads_a_large_payload_from_stdin(cp: Env) -> None:
    """--payload-file - takes a payload too long for a command line (600 KB) from stdin."""
    payload = json.dumps({"blob": "x" * 600_000}).encode()
    task_id = ok(tether(cp.vars, "submit", "--queue", "work", "--payload-file", "-", stdin=payload))
    assert task_id.startswith("t_")
    (cp.dir / "p.json").write_bytes(b'{"from": "file"}')
    ok(tether(cp.vars, "submit", "--queue", "work", "--payload-file", str(cp.dir / "p.json")))


def test_secrets_list_shows_names_and_versions_never_values(cp: Env) -> None:
    """secrets list: name, latest version, count and KEK, for admin and auditor; never the value."""
    for value in (b"first-value-0001", b"second-value-0002"):
        ok(tether(cp.vars, "secrets", "put", "listed_token", stdin=value))
    listed = json.loads(ok(tether(cp.vars, "secrets", "list", "-o", "json")))
    entry = next(s for s in listed if s["name"] == "listed_token")
    assert entry["latest_version"] == "2"  # uint64 is a string in proto3 JSON
    assert entry["versions"] == "2"
    assert entry["kek_id"]
    assert sum(int(n) for n in entry["versions_by_kek"].values()) == 2
    auditor = tether(cp.with_role(Role.AUDITOR), "secrets", "list")
    text = ok(auditor) + auditor.stderr.decode()
    assert "listed_token" in text
    assert "version 2" in text
    for role in (Role.ADMIN, Role.AUDITOR):
        out = tether(cp.with_role(role), "secrets", "list", "-o", "json")
        assert b"first-value" not in out.stdout + out.stderr
        assert b"second-value" not in out.stdout + out.stderr
    refused = tether(cp.with_role(Role.SUBMITTER), "secrets", "list")
    assert refused.returncode == 1
    assert b"role" in refused.stderr


def test_policy_validate_offline_and_diff_against_the_policy_in_force(cp: Env) -> None:
    """validate needs no control plane; diff is 0 for the same policy and 1 with a diff."""
    shown = json.loads(ok(tether(cp.vars, "policy", "show", "-o", "json")))
    same = cp.dir / "same.toml"
    same.write_text(shown["document"])
    offline = {k: v for k, v in cp.vars.items() if not k.startswith("TETHER_")}
    assert "valid" in ok(tether(offline, "policy", "validate", str(same)))
    proc = tether(cp.vars, "policy", "diff", str(same))
    assert proc.returncode == 0, proc.stderr
    assert b"no difference" in proc.stderr
    changed = cp.dir / "changed.toml"
    changed.write_text(shown["document"].replace("[queues.work]", "[queues.work]\n# changed"))
    proc = tether(cp.vars, "policy", "diff", str(changed))
    assert proc.returncode == 1, proc.stderr
    assert b"+# changed" in proc.stdout
    assert f"--- policy version {shown['version']}".encode() in proc.stdout


def test_rotate_kek_reports_each_kek(cp: Env) -> None:
    """rotate-kek names every KEK with its versions before and after, and which may go."""
    ok(tether(cp.vars, "secrets", "put", "rotated_token", stdin=b"rotated-value-001"))
    out = ok(
        tether(cp.vars, "secrets", "rotate-kek", "--kek-file", str(cp.kek), "--db", str(cp.db))
    )
    lines = out.splitlines()
    assert re.match(r"active KEK is now \S+; re-wrapped \d+ secret version\(s\)", lines[0])
    old = [ln for ln in lines if "(old)" in ln]
    active = [ln for ln in lines if "(active)" in ln]
    assert len(active) == 1
    assert " 0 version(s) before" in active[0]
    assert old
    assert all(ln.endswith("it may be removed from the KEK file") for ln in old), out
    assert all(", 0 now" in ln for ln in old), out


def test_export_to_stdout_pipes_into_verify(cp: Env) -> None:
    """`receipts export --out -` writes the bundle to stdout; `tether verify -` reads it."""
    side, sock, tokens = spawn_sidecar_cli(cp.dir, cp.address, node_id="n-export")
    try:
        ok(tether(cp.vars, "submit", "--queue", "work", "--payload", '{"e": 1}'))
        agent = [
            sys.executable, str(REPO / "examples" / "python_agent.py"), "--socket", str(sock),
            "--token-file", str(tokens["alice"]), "--queue", "work", "--count", "1",
        ]  # fmt: skip
        done = subprocess.run(agent, capture_output=True, timeout=DEADLINE_S, check=False)
        assert b'"event": "completed"' in done.stdout, done.stdout + done.stderr
    finally:
        side.send_signal(signal.SIGTERM)
        side.wait(30)
    exported = tether(cp.vars, "receipts", "export", "--all", "--out", "-")
    bundle = exported.stdout
    assert exported.returncode == 0, exported.stderr
    assert b"wrote stdout" in exported.stderr
    trust = cp.vars["TETHER_TLS_CA"]
    verified = tether(cp.vars, "verify", "-", "--trust", trust, stdin=bundle)
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.startswith(b"VALID: ")
    assert b"1 nodes" in verified.stdout


def test_logs_are_text_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    """auto: JSON lines into a pipe, readable lines on a terminal; --log-format forces either."""
    ok(tether(dict(os.environ), "keys", "init", "--dir", str(tmp_path / "k")))
    k = tmp_path / "k"
    write_agent_token(tmp_path / "a.token")
    (tmp_path / "afile").write_text("x")
    argv = [
        "sidecar", "--control", "127.0.0.1:1", "--node-id", "n", "--key", str(k / "control.key"),
        "--trust-bundle", str(k / "trust.pem"), "--agent", f"a={tmp_path / 'a.token'}",
        "--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "afile"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    piped = tether(env, *argv).stderr.decode().splitlines()
    assert json.loads(piped[0])["msg"] == "sidecar stopped", piped  # then the one-line error
    assert piped[-1].startswith("tether: state_dir: ")
    text = tether(env, "--log-format", "text", *argv).stderr.decode().splitlines()
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO +tether\.sidecar: sidecar stopped", text[0]), text
    main, sub = os.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tether.cli", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sub,
            env=env, timeout=DEADLINE_S, check=False,
        )  # fmt: skip
        os.close(sub)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main)
    assert proc.returncode == 2
    first = seen.decode(errors="replace").splitlines()[0]
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO ", first), seen

"""The main job, `tether demo`, run as a user would: every fact holds and the secret never leaks."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_holds_every_fact_and_leaks_no_secret(tmp_path: Path) -> None:
    """`tether demo` exits 0 with its summary, and the chosen secret is in no output or file."""
    secret = "demo-secret-" + base64.b32encode(os.urandom(15)).decode().lower()
    env = dict(os.environ, TETHER_DEMO_SECRET=secret)
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=280,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-4000:] + proc.stderr.decode(errors="replace")[-4000:]
    assert "ALL FACTS HELD" in out
    assert "tether verify" in out
    assert "VALID:" in out
    assert "lease on the slow task to lapse" in out  # it says what the pause is for
    assert "slow task: succeeded, attempt 2" in out
    forms = [
        secret.encode(),
        base64.b64encode(secret.encode()).rstrip(b"="),
        urllib.parse.quote(secret, safe="").encode(),
    ]
    outputs = [proc.stdout, proc.stderr]
    outputs += [p.read_bytes() for p in (tmp_path / "demo").rglob("*") if p.is_file()]
    for form in forms:
        assert not any(form in data for data in outputs), form


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_says_the_demo_was_interrupted_and_stops_its_processes(tmp_path: Path) -> None:
    """SIGINT to the demo's process group (Ctrl-C) ends it with 130, a one-line notice and no
    traceback, and leaves none of the processes it started running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "demo", "--dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        start_new_session=True,  # a terminal's Ctrl-C reaches the whole foreground group
    )
    assert proc.stdout is not None
    seen = b""
    while b"submitted" not in seen:  # the control plane, sidecars and agents are running
        line = proc.stdout.readline()
        assert line, seen.decode(errors="replace")
        seen += line
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode(errors="replace")
    assert proc.returncode == 130, seen.decode() + out.decode() + text
    assert "interrupted (Ctrl-C)" in text
    assert "Traceback" not in text
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True, check=False
    ).stdout.split()
    assert not leftovers, leftovers

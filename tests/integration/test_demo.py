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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keep_prints_the_console_url_and_keeps_it_serving(tmp_path: Path) -> None:
    """`tether demo --keep` prints the operator console's URL after its summary; the console
    answers the demo's auditor certificate with the demo's tasks until Ctrl-C ends it."""
    import re
    import ssl
    import time
    import urllib.request

    out_file = tmp_path / "out.txt"
    with out_file.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", "demo", "--keep", "--dir", str(tmp_path / "d")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        url = ""
        deadline = time.monotonic() + 240
        while not url and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"operator console: (https://\S+)", out_file.read_text(errors="replace"))
            url = m.group(1) if m else ""
            time.sleep(0.5)
        text = out_file.read_text(errors="replace")
        assert url, text[-4000:]
        assert "ALL FACTS HELD" in text
        keys = tmp_path / "d" / "keys"
        assert (keys / "demo-auditor.p12").stat().st_mode & 0o077 == 0
        ctx = ssl.create_default_context(cafile=str(keys / "ca.crt"))
        ctx.load_cert_chain(keys / "demo-auditor.crt", keys / "demo-auditor.key")
        with urllib.request.urlopen(url + "tasks", context=ctx, timeout=20) as resp:
            page = resp.read().decode()
        assert resp.status == 200
        assert "auditor demo-auditor" in page
        assert page.count('<tr id="row-') >= 8
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

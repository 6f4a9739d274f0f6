"""The README's "Using it by hand" block, run as written in a fresh folder shaped like the repo.

The folder holds only what the block expects from the repository root (`.venv`
and `examples/`, linked); everything else the block creates itself. The one
change made to the text is the port: 7400/7401 become two free ports, so the
test never collides with a control plane someone else runs on this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def readme_block() -> str:
    """The first ```sh block under the "Using it by hand" heading of README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it by hand") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, "no sh block under 'Using it by hand'"
    return match.group(1)


def _two_free_ports() -> int:
    """A port p with p+1 free too (the block uses :7400 and, for enrolment, :7401)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_using_it_by_hand_runs_as_written(tmp_path: Path) -> None:
    """Every command of the block succeeds in order and the bundle it exports verifies."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "activate").exists():
        pytest.skip(f"the block sources .venv/bin/activate; {venv} is not a virtualenv")
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    port = _two_free_ports()
    block = readme_block()
    assert "127.0.0.1:7400" in block  # the substitution below changes something
    script = block.replace(":7401", f":{port + 1}").replace(":7400", f":{port}")
    (tmp_path / "block.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "VIRTUAL_ENV"))}
    proc = subprocess.Popen(
        ["bash", "-e", "block.sh"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its background jobs share the group we clean up
    )
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "Traceback" not in text
    assert re.search(r"^VALID: \d+ receipts, 1 nodes, 1 tasks", text, re.M), text[-4000:]
    assert '"event": "completed"' in text
    assert "succeeded" in text
    assert "api_token" in text  # `tether secrets list`
    assert "s3cr3t" not in text  # ...and never its value
    assert (tmp_path / "bundle.json").exists()

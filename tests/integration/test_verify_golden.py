"""Golden bundles in tests/assets/bundles, checked with the real `tether verify` CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ASSETS = Path(__file__).parents[1] / "assets"
BUNDLES = ASSETS / "bundles"
EXPECTED: dict[str, list[object]] = json.loads((BUNDLES / "expected.json").read_text())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_golden_files_are_reproducible() -> None:
    """make_golden.py regenerates every golden file byte for byte (formats are pinned)."""
    spec = importlib.util.spec_from_file_location("make_golden", ASSETS / "make_golden.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, data in mod.build_all().items():
        assert (BUNDLES / name).read_bytes() == data, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_bundle_cli(name: str) -> None:
    """`tether verify --json` exits 0 on valid bundles and 1 naming the check, never a traceback."""
    code, check = EXPECTED[name]
    proc = _cli("verify", str(BUNDLES / name), "--trust", str(BUNDLES / "control.pub"), "--json")
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["valid"] is (code == 0)
    if check:
        assert check in {f["check"] for f in report["failures"]}


def test_human_output_and_usage_errors(tmp_path: Path) -> None:
    """Human output shows the timeline and the first failure; bad keys and files exit 2."""
    pub = str(BUNDLES / "control.pub")
    short = _cli("verify", str(BUNDLES / "valid.json"), "--trust", pub)
    assert short.returncode == 0
    assert "task task-1" not in short.stdout  # the verdict alone by default
    ok = _cli("verify", str(BUNDLES / "valid.json"), "--trust", pub, "--timeline")
    assert ok.returncode == 0
    assert "task task-1  [succeeded]" in ok.stdout
    assert "VALID: 11 receipts" in ok.stdout
    bad = _cli("verify", str(BUNDLES / "tampered-deleted.json"), "--trust", pub)
    assert bad.returncode == 1
    assert "INVALID: 1 failure(s); first: node-a#3: chain.gap" in bad.stdout
    (tmp_path / "junk.pub").write_text("not a key")
    assert (
        _cli(
            "verify", str(BUNDLES / "valid.json"), "--trust", str(tmp_path / "junk.pub")
        ).returncode
        == 2
    )
    assert _cli("verify", str(tmp_path / "missing.json"), "--trust", pub).returncode == 2
    assert _cli("verify", str(BUNDLES / "valid.json")).returncode == 2

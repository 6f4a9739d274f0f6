"""The policy examples the docs show load as written (a reader copies them whole)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tether.core.policy import parse_policy

REPO = Path(__file__).resolve().parents[2]


def toml_blocks(path: Path) -> list[str]:
    """Every ```toml block of a Markdown file that is a whole policy (it sets `version`)."""
    blocks = re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)
    return [b for b in blocks if re.search(r"^version\s*=", b, re.M)]


def test_policy_reference_example_loads_as_written() -> None:
    """docs/policy.md's full example parses: every tool, credential and queue it names exists."""
    blocks = toml_blocks(REPO / "docs" / "policy.md")
    assert blocks, "docs/policy.md shows no whole policy"
    for block in blocks:
        policy = parse_policy(block)
        assert policy.queues
    full = blocks[0]
    policy = parse_policy(full)
    assert {"fetch", "report", "run", "echo", "search"} <= set(policy.tools)
    assert {"api_token", "db", "search_key"} <= set(policy.credentials)


def test_examples_policy_passes_tether_policy_validate(tmp_path: Path) -> None:
    """`tether policy validate` (offline) accepts examples/policy.toml and the docs example."""
    doc = tmp_path / "from-docs.toml"
    doc.write_text(toml_blocks(REPO / "docs" / "policy.md")[0])
    for path in (REPO / "examples" / "policy.toml", doc):
        proc = subprocess.run(
            [sys.executable, "-m", "tether.cli", "policy", "validate", str(path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "valid:" in proc.stdout

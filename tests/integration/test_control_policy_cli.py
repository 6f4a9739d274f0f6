"""`tether policy apply|show` as real subprocesses against a real control plane."""

from __future__ import annotations

from pathlib import Path

from control_fixtures import POLICY, operator_args, run_cli

from tether.testing import start_control


async def test_policy_apply_and_show(tmp_path: Path) -> None:
    """apply stores a new version in force; show prints that document back."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY)
    async with start_control(tmp_path) as cp:
        before = (await cp.client.get_policy()).version  # the test control plane's own policy
        rc, out, err = await run_cli("policy", "apply", str(policy_file), *operator_args(cp))
        assert rc == 0, err
        assert f"policy version {before + 1} in force" in out
        rc, out, err = await run_cli("policy", "show", *operator_args(cp))
        assert rc == 0, err
        assert out == POLICY
        assert f"policy version {before + 1}" in err
        got = await cp.client.get_policy()
        assert got.document == POLICY


async def test_policy_apply_names_the_bad_key_and_line_and_exits_2(tmp_path: Path) -> None:
    """An unknown key is refused locally: exit 2 naming the key and its line; nothing stored."""
    bad = POLICY.replace("budget_micros = 1000", "budget_micros = 1000\nbudgte = 5")
    line = bad.splitlines().index("budgte = 5") + 1
    policy_file = tmp_path / "bad.toml"
    policy_file.write_text(bad)
    async with start_control(tmp_path) as cp:
        before = await cp.client.get_policy()
        rc, _, err = await run_cli("policy", "apply", str(policy_file), *operator_args(cp))
        assert rc == 2
        assert "budgte" in err
        assert f"line {line}" in err
        after = await cp.client.get_policy()
        assert (after.version, after.digest) == (before.version, before.digest)

"""The sidecar process keeps off its memory budget what it never runs (docs/performance.md)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tether.cli import _command_word

# Modules a sidecar never needs: the control plane's server and service, the store, the
# offline verifier, multiprocessing (the verifier's pool), jsonschema (imported when a
# policy declares a tool input schema) and prometheus_client (imported when metrics are
# served).
NOT_IN_SIDECAR = (
    "tether.control.server",
    "tether.control.service",
    "tether.control.cmd",
    "tether.store",
    "tether.verify.verifier",
    "tether.verify.cmd",
    "multiprocessing",
    "jsonschema",
    "prometheus_client",
)


def _loaded(code: str) -> set[str]:
    """The modules of NOT_IN_SIDECAR that `code`, run in a fresh interpreter, imported."""
    names = repr(NOT_IN_SIDECAR)
    check = f"{code}\nimport sys\nprint('loaded:', *(m for m in {names} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", check], check=True, capture_output=True, text=True
    ).stdout
    return set(out.splitlines()[-1].split()[1:])


def test_sidecar_modules_import_nothing_off_its_path() -> None:
    """Importing the sidecar's server and CLI module loads none of NOT_IN_SIDECAR."""
    assert _loaded("import tether.sidecar.server, tether.sidecar.cmd") == set()


def test_sidecar_command_builds_only_its_own_parser() -> None:
    """`tether [global options] sidecar ...` imports no other command's module."""
    code = (
        "import tether.cli\n"
        "try:\n"
        "    tether.cli.main(['--log-level', 'INFO', '--debug', 'sidecar', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    assert _loaded(code) == set()


def test_policy_with_a_schema_still_checks_it() -> None:
    """A policy that declares an input schema imports jsonschema and enforces the schema."""
    code = (
        "from tether.core.toolschema import argument_problem, parse_input_schema\n"
        "s = parse_input_schema({'type': 'object', 'properties': {'n': {'type': 'integer'}}},"
        " ValueError)\n"
        "assert argument_problem(s, {'n': 'x'}) is not None\n"
        "assert argument_problem(s, {'n': 1}) is None\n"
    )
    assert _loaded(code) == {"jsonschema"}


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["sidecar", "--node-id", "n"], "sidecar"),
        (["--log-level", "DEBUG", "sidecar"], "sidecar"),
        (["--log-format=json", "--debug", "verify", "b"], "verify"),
        (["--help", "sidecar"], None),
        (["--version"], None),
        ([], None),
    ],
)
def test_command_word(argv: list[str], word: str | None) -> None:
    """The command word is found past the global options, and is None when unsure."""
    assert _command_word(argv) == word


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
@pytest.mark.parametrize("env", [None, "16"])
def test_malloc_arenas_are_capped_unless_the_environment_says(env: str | None) -> None:
    """The sidecar caps glibc's arenas at MALLOC_ARENA_MAX (2) before its threads start;
    MALLOC_ARENA_MAX in the environment wins. Eight threads that malloc at once are counted
    by their arenas (64 MiB-aligned heaps in /proc/self/maps)."""
    code = (
        "import re, threading\n"
        "from tether.sidecar.cmd import limit_malloc_arenas\n"
        "print('capped:', limit_malloc_arenas())\n"
        "go = threading.Barrier(9)\n"
        "def work():\n"
        "    keep = [bytearray(4096) for _ in range(64)]\n"
        "    go.wait()\n"
        "    go.wait()\n"
        "threads = [threading.Thread(target=work) for _ in range(8)]\n"
        "[t.start() for t in threads]\n"
        "go.wait()\n"
        "heaps = 1 + sum(1 for line in open('/proc/self/maps') if line.split()[1] == 'rw-p'"
        " and len(line.split()) == 5 and int(line.split('-')[0], 16) % (64 << 20) == 0)\n"
        "go.wait()\n"
        "[t.join() for t in threads]\n"
        "print('arenas:', heaps)\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env is not None:
        environ["MALLOC_ARENA_MAX"] = env
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=environ
    ).stdout.split()
    assert out[1] == str(env is None)
    arenas = int(out[3])
    assert arenas <= 2 if env is None else arenas >= 4, out  # 8 threads, 8 arenas by default

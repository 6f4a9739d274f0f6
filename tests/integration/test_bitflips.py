"""Invariant 5 at scale: random single-bit flips of the demo's real bundle, every one detected.

The bundle comes from running `tether demo` once (real control plane, sidecars,
agents, a killed agent's task taken over, renewals); each flipped copy goes
through the full verifier, in worker processes, one per core.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tether.crypto.pki import TrustBundle
from tether.crypto.signing import VerifyKey
from tether.verify import CHECKS, verify_bundle

FLIPS = int(os.environ.get("TETHER_BITFLIPS", "10000"))
SEED = int(os.environ.get("TETHER_BITFLIP_SEED", "6962"))

_STATE: list[tuple[bytes, list[VerifyKey]]] = []  # the worker's bundle and keys


def _load(bundle: str, trust: str) -> None:
    keys = list(TrustBundle.load(Path(trust), need_ca=False).control_keys)
    _STATE[:] = [(Path(bundle).read_bytes(), keys)]


def _check(flips: Sequence[int]) -> list[tuple[int, str]]:
    """Verifies one flipped copy per bit index; returns the flips that were not caught."""
    data, keys = _STATE[0]
    missed: list[tuple[int, str]] = []
    for flip in flips:
        mutated = bytearray(data)
        mutated[flip >> 3] ^= 1 << (flip & 7)
        try:
            report = verify_bundle(bytes(mutated), keys, threads=1)
        except Exception as err:  # a crash is a miss too: the verifier must name a failure
            missed.append((flip, f"raised {err!r}"))
            continue
        if report.ok:
            missed.append((flip, "verified"))
        elif not {f.check for f in report.failures} <= set(CHECKS):
            missed.append((flip, f"unnamed failure {report.failures[0]}"))
    return missed


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The bundle and trust bundle of one real `tether demo` run."""
    root = tmp_path_factory.mktemp("bitflips") / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "demo", "--dir", str(root)],
        capture_output=True,
        cwd=root.parent,
        timeout=280,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:] + proc.stderr.decode(errors="replace")[-3000:]
    return root / "bundle.json", root / "keys" / "trust.pem"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_single_bit_flip_of_the_demo_bundle_is_detected(
    demo_bundle: tuple[Path, Path],
) -> None:
    """10,000 random single-bit flips of a real demo bundle each make `tether verify` fail."""
    bundle, trust = demo_bundle
    data = bundle.read_bytes()
    keys = list(TrustBundle.load(trust, need_ca=False).control_keys)
    assert verify_bundle(data, keys).ok
    flips = random.Random(SEED).sample(range(len(data) * 8), min(FLIPS, len(data) * 8))
    workers = os.cpu_count() or 1
    jobs = [flips[i :: workers * 8] for i in range(workers * 8)]
    started = time.perf_counter()
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_load,
        initargs=(str(bundle), str(trust)),
    ) as pool:
        missed = [m for part in pool.map(_check, jobs) for m in part]
    seconds = time.perf_counter() - started
    print(
        f"\n{len(flips)} single-bit flips of a {len(data)}-byte demo bundle "
        f"(seed {SEED}) checked in {seconds:.1f}s on {workers} processes"
    )
    shown = [(f >> 3, f & 7, why, data[max(0, (f >> 3) - 30) : (f >> 3) + 10]) for f, why in missed]
    assert not missed, shown[:20]

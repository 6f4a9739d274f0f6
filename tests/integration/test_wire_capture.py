"""An observer on the network: loopback captured with tcpdump while `tether demo` runs.

The demo's API secret must cross the control plane's ports in no form (raw,
base64, hex, URL-encoded): it travels only inside TLS. The same capture must
show the secret on the demo API's own port (plain HTTP, the stand-in for a
third-party service the sidecar injects the credential into), which proves the
capture and the search would have found it.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path

import pytest


def _ensure_tcpdump() -> str:
    """tcpdump's path, installed from Debian's packages when missing (root only)."""
    found = shutil.which("tcpdump")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("tcpdump is missing and cannot be installed here (needs root and apt-get)")
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "tcpdump"],
        check=False,
        capture_output=True,
        timeout=300,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )
    found = shutil.which("tcpdump")
    if not found:
        pytest.skip("apt-get could not install tcpdump")
    return found


def _tcp_payloads(pcap: bytes) -> dict[tuple[int, int], bytes]:
    """TCP payloads of a pcap file (Ethernet or Linux cooked), concatenated per (sport, dport)."""
    magic = struct.unpack("<I", pcap[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", pcap[20:24])[0]
    link_len = {1: 14, 113: 16, 276: 20, 0: 4}.get(linktype)
    assert link_len is not None, f"unexpected pcap link type {linktype}"
    flows: dict[tuple[int, int], bytearray] = defaultdict(bytearray)
    off = 24
    while off + 16 <= len(pcap):
        incl = struct.unpack(endian + "I", pcap[off + 8 : off + 12])[0]
        pkt = pcap[off + 16 : off + 16 + incl]
        off += 16 + incl
        ip = pkt[link_len:]
        if len(ip) < 20:
            continue
        version = ip[0] >> 4
        if version == 4:
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6:
                continue
            tcp = ip[ihl:]
        elif version == 6:
            if ip[6] != 6:
                continue
            tcp = ip[40:]
        else:
            continue
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        data = tcp[(tcp[12] >> 4) * 4 :]
        if data:
            flows[(sport, dport)] += data
    return {k: bytes(v) for k, v in flows.items()}


def _forms(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [
        raw,
        base64.b64encode(raw).rstrip(b"="),
        base64.b64encode(b"x" + raw)[4:-4],  # another alignment
        base64.b64encode(b"xx" + raw)[4:-4],
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
        raw.hex().upper().encode(),
        urllib.parse.quote(secret, safe="").encode(),
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_secret_never_crosses_the_control_plane_port_in_clear(tmp_path: Path) -> None:
    """While the demo runs, no form of the API secret appears on the control plane's ports."""
    tcpdump = _ensure_tcpdump()
    pcap = tmp_path / "lo.pcap"
    cap = subprocess.Popen(
        [tcpdump, "-i", "lo", "-U", "-s", "0", "-w", str(pcap), "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not pcap.exists() and time.monotonic() < deadline:
        if cap.poll() is not None:
            pytest.skip(f"tcpdump cannot capture here: {cap.stderr.read().decode()[-300:]}")  # type: ignore[union-attr]
        time.sleep(0.05)
    time.sleep(0.5)
    secret = "wire-secret-" + base64.b32encode(os.urandom(15)).decode().lower()
    demo_dir = tmp_path / "demo"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tether.cli", "demo", "--dir", str(demo_dir)],
            capture_output=True,
            env=dict(os.environ, TETHER_DEMO_SECRET=secret),
            cwd=tmp_path,
            timeout=280,
            check=False,
        )
    finally:
        time.sleep(0.5)
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:] + proc.stderr.decode(errors="replace")[-3000:]
    lines = (demo_dir / "control.addr").read_text().splitlines()
    control_ports = {int(a.rpartition(":")[2]) for a in lines if a}
    assert len(control_ports) == 2, lines  # the mTLS port and the enrolment port
    flows = _tcp_payloads(pcap.read_bytes())
    on_control = b"".join(
        data for (sport, dport), data in flows.items() if {sport, dport} & control_ports
    )
    elsewhere = b"".join(
        data for (sport, dport), data in flows.items() if not {sport, dport} & control_ports
    )
    # The capture saw the control plane's traffic, and it is TLS (records start 0x16 0x03).
    assert len(on_control) > 20_000, f"only {len(on_control)} bytes captured on {control_ports}"
    assert b"\x16\x03" in on_control
    # The detector works: the plain-HTTP demo API (a third party) does carry the injected secret.
    assert secret.encode() in elsewhere, "capture missed the demo API's traffic"
    for form in _forms(secret):
        assert form not in on_control, f"secret form {form[:12]!r}… seen on the control plane port"
    # And none of the operator or node credentials' private keys cross it either.
    for name in ("admin.key", "ca.key", "server.key"):
        pem = (demo_dir / "keys" / name).read_bytes()
        body = b"".join(pem.splitlines()[1:-1])
        assert body[:40] not in on_control

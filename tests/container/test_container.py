"""The Tether image run for real with rootful Podman (`make container-test`).

A control plane runs in a container from the image; `sidecar/k8s/deployment.yaml` is
played with `podman kube play` (an agent container beside the sidecar, the socket on a
shared emptyDir, the node key and trust bundle mounted into the sidecar only) and
`sidecar/compose.yaml` with podman-compose where it is installed. The agent claims and
completes tasks through the shared socket, and the bundle exported from the control
plane verifies. On the running pod: the agent container holds no key, token or
credential (its environment, file system and mounts scanned for the known secret
values), the sidecar runs as a non-root user on a read-only root file system, its
health check turns healthy, and stopping it hands its live lease back at once.

Nothing is faked: the only edits to the manifests are the ones a cluster would supply
(image names, the control plane's address, the key and config map objects) and listed
in the log. Outside CI a machine without root or Podman skips with the reason; under
CI=true it fails.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGE = os.environ.get("TETHER_IMAGE", "localhost/tether:0.1.0")
AGENT_IMAGE = "localhost/tether-test-agent:latest"
TETHER = str(Path(sys.executable).parent / "tether")
SIDECAR = "tether-sidecar"
QUEUE = "research"
TASKS = 5
POLICY = f"""
version = 1
[agents.research]
queues = ["{QUEUE}"]
[tools.echo]
adapter = "python"
cost_micros = 10
idempotent = true
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.{QUEUE}]
tools = ["echo"]
budget_micros = 1000000
# Long, so that a lease seen back in `queued` within seconds was handed back, not expired.
lease_ttl_ms = 120000
max_attempts = 3
"""


def say(message: str) -> None:
    """One progress line in the test log."""
    print(f"container-test: {message}", flush=True)


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs podman with the Makefile's CONTAINERS_CONF; fails with its stderr."""
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def unavailable(reason: str) -> None:
    """Skips with the reason outside CI; fails under CI=true, where Podman must work."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the container test cannot run in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Control:
    """The containerised control plane and an operator's view of it."""

    name: str
    address: str
    enroll: str
    keys: Path
    node_key: Path
    secrets: dict[str, bytes] = field(repr=False)
    """Every secret of the trust domain: file name -> content."""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`tether ARGS` on the host as the admin operator."""
        env = {
            **os.environ,
            "TETHER_CONTROL": self.address,
            "TETHER_TLS_CA": str(self.keys / "trust.pem"),
            "TETHER_TLS_CERT": str(self.keys / "admin.crt"),
            "TETHER_TLS_KEY": str(self.keys / "admin.key"),
        }
        result = subprocess.run(
            [TETHER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if check and result.returncode != 0:
            pytest.fail(f"tether {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def tasks(self) -> list[dict[str, Any]]:
        out = self.cli("tasks", "--queue", QUEUE, "-o", "json").stdout
        return list(json.loads(out))

    def states(self) -> dict[str, str]:
        """task id -> state name (lower case, no prefix)."""
        return {t["task_id"]: state_of(t) for t in self.tasks()}


def state_of(task: dict[str, Any]) -> str:
    return str(task.get("state", "")).lower().removeprefix("task_state_")


@pytest.fixture(scope="module")
def engine() -> None:
    """Rootful Podman that works and holds the image (`make image`)."""
    if os.geteuid() != 0:
        unavailable("rootful Podman needs root (run `make container-test` as root)")
    if shutil.which("podman") is None:
        unavailable("podman is not installed (Debian: apt-get install podman runc)")
    info = podman("info", check=False)
    if info.returncode != 0:
        unavailable(f"podman does not work here: {info.stderr.strip()[-300:]}")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        unavailable(f"no image {IMAGE}: run `make image` first (`make container-test` does)")


@pytest.fixture(scope="module")
def agent_image(engine: None) -> str:
    """The test's agent image (tests/container/agent.Containerfile) on the Tether image's base."""
    base = podman("image", "inspect", "--format", '{{index .Labels "tether.base"}}', IMAGE)
    base_image = base.stdout.strip() or "python:3.11-slim"
    podman(
        "build", "--format", "docker", "--network", "host",
        "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"TETHER_IMAGE={IMAGE}",
        "-f", str(HERE / "agent.Containerfile"), "-t", AGENT_IMAGE, str(HERE),
        timeout=600,
    )  # fmt: skip
    say(f"built agent image {AGENT_IMAGE} on {base_image}")
    return AGENT_IMAGE


@pytest.fixture(scope="module")
def control(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    """A control plane in a container from the image (host network, uid 10001, read-only
    root), with the trust domain's keys made on the host and the test policy applied."""
    tmp = tmp_path_factory.mktemp("container")
    keys, node, data = tmp / "keys", tmp / "node", tmp / "data"
    run = [TETHER, "keys", "init"]
    subprocess.run([*run, "--dir", str(keys), "--san", "127.0.0.1"], check=True, timeout=60)
    subprocess.run([*run, "--dir", str(node), "--name", "node"], check=True, timeout=60)
    subprocess.run([TETHER, "secrets", "init-kek", "--file", str(keys / "control.kek")],
                   check=True, timeout=60)  # fmt: skip
    shutil.copy(node / "node.pub", keys / "node.pub")
    data.mkdir()
    for path in (keys, data, *keys.iterdir()):
        os.chown(path, 10001, 10001)
    secrets = {
        p.name: p.read_bytes()
        for p in (*keys.iterdir(), *node.iterdir())
        if p.suffix in (".key", ".kek", ".token")
    }
    port, enroll = free_port(), free_port()
    name = f"tether-ct-control-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "-d", "--name", name, "--network", "host", "--read-only", "--no-healthcheck",
        "-v", f"{keys}:/etc/tether:ro", "-v", f"{data}:/var/lib/tether",
        "--entrypoint", "tether", IMAGE,
        "control", "--db", "/var/lib/tether/control.db",
        "--listen", f"127.0.0.1:{port}", "--enroll-listen", f"127.0.0.1:{enroll}",
        "--key", "/etc/tether/control.key", "--ca-cert", "/etc/tether/ca.crt",
        "--ca-key", "/etc/tether/ca.key", "--tls-cert", "/etc/tether/server.crt",
        "--tls-key", "/etc/tether/server.key", "--kek-file", "/etc/tether/control.kek",
        "--allow-node-key", "research-agent-*=/etc/tether/node.pub",
    )  # fmt: skip
    cp = Control(name, f"127.0.0.1:{port}", f"127.0.0.1:{enroll}", keys, node / "node.key", secrets)
    try:
        health = subprocess.run(
            [TETHER, "health", "--address", cp.enroll, "--tls-ca", str(keys / "trust.pem"),
             "--wait", "90s"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if health.returncode != 0:
            logs = podman("logs", name, check=False)
            pytest.fail(f"control plane never served: {health.stderr}\n{logs.stderr[-2000:]}")
        say(f"control plane container {name} serving on {cp.address} (enrolment {cp.enroll})")
        (tmp / "policy.toml").write_text(POLICY)
        cp.cli("policy", "apply", str(tmp / "policy.toml"))
        yield cp
    finally:
        podman("rm", "-f", "-v", "-t", "5", name, check=False)


def secret_value(content: bytes) -> str:
    """A Secret's `data` value as this Podman's `kube play` reads it from a podman
    secret: base64, as in Kubernetes, except Podman 4.3 (Debian 12), which writes the
    `data` text into the volume as it is, so there it is the content itself."""
    version = podman("version", "--format", "{{.Client.Version}}").stdout.strip()
    if tuple(int(x) for x in version.split(".")[:2]) <= (4, 3):
        return content.decode()
    return base64.b64encode(content).decode()


def kube_manifest(cp: Control, agent_image: str, metrics_port: int) -> tuple[str, list[str]]:
    """sidecar/k8s/deployment.yaml with what a cluster supplies, plus the Secret and
    ConfigMap it names; returns (YAML, the edits made, for the log)."""
    dep = yaml.safe_load((ROOT / "sidecar" / "k8s" / "deployment.yaml").read_text())
    edits: list[str] = []
    pod = dep["spec"]["template"]["spec"]
    for c in pod["containers"]:
        old = c["image"]
        c["image"] = IMAGE if c["name"] == SIDECAR else agent_image
        edits.append(f"{c['name']}: image {old} -> {c['image']}")
        for item in c.get("env", []):
            new = {
                "TETHER_CONTROL": cp.address,
                "TETHER_ENROLL": cp.enroll,
                "TETHER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            }.get(item["name"])
            if new is not None:
                edits.append(f"{c['name']}: {item['name']} {item['value']} -> {new}")
                item["value"] = new
        if c.pop("ports", None):
            # The pod shares the host's network (no port mappings there): the metrics
            # port is the host's, moved off 9464 to a free one above.
            edits.append(f"{c['name']}: ports dropped (host network)")
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tether-trust"},
        "data": {"trust.pem": (cp.keys / "trust.pem").read_text()},
    }
    return yaml.safe_dump_all([config, dep], sort_keys=False), edits


def create_node_secret(cp: Control, tmp: Path) -> None:
    """The `tether-node` secret, as `kubectl create secret generic tether-node
    --from-file=node.key=...` would make it: a podman secret holding a Kubernetes Secret,
    which `kube play` turns into the secret volume (a Secret document in the played
    YAML itself ends up base64-encoded in the volume with Podman 4.3)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "tether-node"},
        "data": {"node.key": secret_value(cp.node_key.read_bytes())},
    }
    path = tmp / "tether-node.secret.yaml"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(doc))
    try:
        podman("secret", "create", "tether-node", str(path))
    finally:
        path.unlink()


def secret_needles(secrets: dict[str, bytes]) -> dict[bytes, str]:
    """Byte strings that betray a secret: each file whole and its base64, each PEM body
    line, and each key of a KEK file (`id:base64` lines; comments and ids are not secret)."""
    needles: dict[bytes, str] = {}
    for name, content in secrets.items():
        needles[content.strip()] = name
        needles[base64.b64encode(content)] = f"{name} (base64)"
        for line in content.splitlines():
            line = line.strip()
            if line.startswith((b"#", b"-----")):
                continue
            value = line.rpartition(b":")[2].strip()
            if len(value) >= 16:
                needles[value] = f"{name} (a key in it)"
    return needles


PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{40,}")


def scan_bytes(data: bytes, where: str, needles: dict[bytes, str], pem: bool = True) -> list[str]:
    """Findings in `data`: each known secret value, and (when `pem`) any PEM private
    key block, known or not."""
    found = [f"{what} in {where}" for needle, what in needles.items() if needle in data]
    if pem and PEM_PRIVATE_KEY.search(data):
        found.append(f"a PEM private key in {where}")
    return found


# Run inside a container: prints "path NUL hex(content)" for every file under the
# mounts given as arguments and for the environments and command line of its processes.
READER = """
import os, sys
roots = sys.argv[1:] + ["/proc/1/environ", "/proc/1/cmdline", "/proc/self/environ"]
for root in roots:
    if os.path.isfile(root):
        paths = [root]
    else:
        paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    for p in paths:
        try:
            data = open(p, "rb").read()
        except OSError:
            continue
        sys.stdout.buffer.write(p.encode() + b"\\0" + data.hex().encode() + b"\\n")
"""


def scan_container(name: str, needles: dict[bytes, str]) -> tuple[list[str], int]:
    """Every place in a running container an agent could read a secret from: its
    config (env, command, labels), its exported file system, the files on its mounted
    volumes and its processes' environments. Returns (findings, files scanned)."""
    found: list[str] = []
    inspect = podman("inspect", name).stdout
    found += scan_bytes(inspect.encode(), f"{name}: podman inspect (env, args, mounts)", needles)
    # Known values anywhere; any private key block in what the container added to its
    # image (the image's own libraries carry sample keys: libgnutls has one).
    diff = json.loads(podman("diff", "--format", "json", name).stdout or "{}")
    added = {p.lstrip("/") for kind in ("added", "changed") for p in diff.get(kind) or []}
    raw = subprocess.run(["podman", "export", name], capture_output=True, timeout=600, check=True)
    files = 0
    with tarfile.open(fileobj=io.BytesIO(raw.stdout)) as tar:
        for member in tar:
            if not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            files += 1
            path = member.name.removeprefix("./")
            found += scan_bytes(handle.read(), f"{name}:/{path}", needles, pem=path in added)
    mounts = [m["Destination"] for m in json.loads(inspect)[0]["Mounts"]]
    out = subprocess.run(
        ["podman", "exec", name, "/opt/tether/bin/python", "-c", READER, *mounts],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        path, _, hexdata = line.partition(b"\0")
        files += 1
        found += scan_bytes(bytes.fromhex(hexdata.decode()), f"{name}:{path.decode()}", needles)
    return found, files


def cleanup_kube_objects() -> None:
    """Removes what `kube play` made of the manifest's volumes (a podman secret, and
    named volumes for the Secret, the ConfigMap and each emptyDir, some of which `kube
    down` leaves), also after a crashed run, so no state carries over between runs."""
    podman("secret", "rm", "tether-node", check=False)
    for volume in ("tether-node", "tether-trust", "tether-socket", "tether-state"):
        podman("volume", "rm", "-f", volume, check=False)


@pytest.fixture(scope="module")
def pod(control: Control, agent_image: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[dict[str, str]]:  # fmt: skip
    """sidecar/k8s/deployment.yaml played with `podman kube play`; yields container names."""
    tmp = tmp_path_factory.mktemp("kube")
    manifest, edits = kube_manifest(control, agent_image, free_port())
    path = tmp / "pod.yaml"
    path.write_text(manifest)
    for edit in edits:
        say(f"manifest edit (what a cluster supplies): {edit}")
    started = time.monotonic()
    # Host networking, as containers.conf sets for plain containers (kube play would
    # otherwise put the pod on its own bridge network, away from the control plane).
    cleanup_kube_objects()
    names: dict[str, str] = {}
    try:
        create_node_secret(control, tmp)
        played = podman("kube", "play", "--network", "host", str(path), timeout=300)
        pods = json.loads(podman("pod", "ps", "--format", "json").stdout)
        (pod_name,) = [p["Name"] for p in pods if p["Name"].startswith("research-agent-pod")]
        say(f"played sidecar/k8s/deployment.yaml as pod {pod_name}: {played.stdout.split()}")
        names = {c: f"{pod_name}-{c}" for c in (SIDECAR, "agent")}
        for name in names.values():
            podman("container", "exists", name)
        sidecar = names[SIDECAR]

        def healthy() -> bool:
            return podman("healthcheck", "run", sidecar, check=False).returncode == 0

        wait_for("the sidecar's health check", healthy, timeout=120)
        say(f"sidecar healthy {time.monotonic() - started:.1f} s after `podman kube play` began")
        yield {"sidecar": sidecar, "agent": names["agent"], "manifest": str(path)}
    finally:
        for c, name in names.items():
            logs = podman("logs", name, check=False)
            say(f"--- {c} log (tail) ---\n{(logs.stdout + logs.stderr)[-3000:]}")
        podman("kube", "down", str(path), check=False)
        cleanup_kube_objects()


def test_pod_agent_completes_tasks_and_the_bundle_verifies(
    control: Control, pod: dict[str, str], tmp_path: Path
) -> None:
    """The agent container claims and completes tasks through the socket it shares with
    the sidecar on the emptyDir; the exported bundle verifies offline."""
    ids = [
        control.cli("submit", "--queue", QUEUE, "--payload", json.dumps({"n": i}))
        .stdout.strip()
        .split()[-1]
        for i in range(TASKS)
    ]
    say(f"submitted {TASKS} tasks: {ids}")

    def done() -> bool:
        states = control.states()
        return all(states.get(i) == "succeeded" for i in ids)

    wait_for(f"{TASKS} tasks to succeed", done, timeout=240, every=2)
    say(f"tasks completed by the pod's agent: {control.states()}")
    bundle = tmp_path / "bundle.json"
    control.cli("receipts", "export", "--all", "--out", str(bundle))
    verdict = subprocess.run(
        [TETHER, "verify", str(bundle), "--trust", str(control.keys / "control.pub")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    say(f"bundle verified: {verdict.stdout.strip().splitlines()[0]}")


def test_agent_container_holds_no_secret(control: Control, pod: dict[str, str]) -> None:
    """Scanning the agent container (env, config, file system, volumes, process
    environments) finds none of the trust domain's keys or tokens, while the same scan
    of the sidecar finds its node key: the scan can see what it looks for."""
    needles = secret_needles(control.secrets)
    found, files = scan_container(pod["agent"], needles)
    say(f"agent container scan: {files} files, {len(needles)} secret values: {found or 'nothing'}")
    assert found == []
    side, _ = scan_container(pod["sidecar"], needles)
    assert any("node.key" in f for f in side), side


def test_sidecar_runs_non_root_on_a_read_only_root(pod: dict[str, str]) -> None:
    """The sidecar's processes run as uid 10001 and its root file system refuses writes."""
    sidecar = pod["sidecar"]
    conf = json.loads(podman("inspect", sidecar).stdout)[0]
    assert conf["HostConfig"]["ReadonlyRootfs"] is True
    ids = podman("exec", sidecar, "id", "-u").stdout.strip()
    assert ids == "10001"
    processes = podman("top", sidecar, "user", "args").stdout.splitlines()[1:]
    assert processes
    for line in processes:
        assert line.split()[0] in ("tether", "10001"), processes
    write = podman("exec", sidecar, "touch", "/opt/tether/x", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr, write.stderr
    status = json.loads(podman("inspect", sidecar).stdout)[0]["State"]
    assert (status.get("Health") or status.get("Healthcheck", {}))["Status"] == "healthy"


def test_stopping_the_sidecar_hands_its_lease_back(control: Control, pod: dict[str, str]) -> None:
    """With a task held by the agent, `podman stop` on the sidecar (SIGTERM) hands the
    lease back: the control plane shows the task queued again long before its 120 s
    lease could have expired."""
    task = control.cli("submit", "--queue", QUEUE, "--payload", '{"hold": true}').stdout
    task_id = task.strip().split()[-1]
    wait_for("the hold task to be running", lambda: control.states().get(task_id) == "running",
             timeout=120)  # fmt: skip
    stopped = time.monotonic()
    podman("stop", "-t", "20", pod["sidecar"], timeout=60)
    wait_for("the lease handed back", lambda: control.states().get(task_id) == "queued",
             timeout=30)  # fmt: skip
    say(f"sidecar stopped; task {task_id} queued again after {time.monotonic() - stopped:.1f} s")
    bundle = Path(pod["manifest"]).with_name("bundle-after-stop.json")
    control.cli("receipts", "export", "--all", "--out", str(bundle))
    verdict = subprocess.run(
        [TETHER, "verify", str(bundle), "--trust", str(control.keys / "control.pub"),
         "--allow-open"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_image_sbom_describes_the_image(engine: None) -> None:
    """`make image` wrote a CycloneDX SBOM for this very image (its id recorded beside
    it) listing Tether, its main dependencies and the base's Debian packages."""
    sbom = Path(os.environ.get("TETHER_SBOM", ROOT / "build" / "container" / "sbom.json"))
    if not sbom.exists():
        unavailable(f"no SBOM at {sbom}: run `make image`")
    image_id = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    assert Path(f"{sbom}.image-id").read_text().strip() == image_id
    doc = json.loads(sbom.read_text())
    assert doc["bomFormat"] == "CycloneDX"
    names = {c["name"]: c for c in doc["components"]}
    assert names["tether"]["version"] == "0.1.0"
    for dependency in ("grpcio", "cryptography", "protobuf", "aiosqlite"):
        assert dependency in names, dependency
    debs = {c["name"] for c in doc["components"] if c.get("purl", "").startswith("pkg:deb/")}
    assert "libc6" in debs
    base = doc["metadata"]["component"]["description"]
    if "localhost/tether-base" in base:  # the base made from Debian's packages
        assert {"python3", "python3-venv"} <= debs


# --------------------------------------------------------------------------- compose

COMPOSE_OVERRIDE = """
# What the test changes in sidecar/compose.yaml: the images (built by `make image`, none
# pulled) and the agent: the test's Python agent instead of the Node.js example, whose
# node:20-slim image no registry here serves.
services:
  control:
    image: {image}
  sidecar:
    image: {image}
  agent:
    image: {agent}
    user: "10002:10001"
    command: ["--socket", "/run/tether/alice.sock", "--queue", "default"]
"""
COMPOSE_POLICY = POLICY.replace("research", "alice", 1).replace(QUEUE, "default")


def compose_tool() -> list[str]:
    """podman-compose (PyPI, the `container` extra), beside this Python or on PATH."""
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        unavailable("podman-compose is not installed (pip install -e '.[container]')")
    return [str(found)]


def test_compose_file_runs_with_podman_compose(
    engine: None, agent_image: str, tmp_path: Path
) -> None:
    """sidecar/compose.yaml as docs/deploy.md runs it (dev keys, the control plane first,
    a join token, then everything) with podman-compose on a bridge network: the sidecar
    enrols with its join token, the agent completes tasks through the socket volume, and
    the export verifies; the agent container holds none of the secrets."""
    tool = compose_tool()
    for port in (7400, 9464, 9465):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port}, which sidecar/compose.yaml publishes, is in use")
    side = tmp_path / "sidecar"
    dev = side / "dev"
    dev.mkdir(parents=True)
    shutil.copy(ROOT / "sidecar" / "compose.yaml", side / "compose.yaml")
    for linked in ("examples", "protos"):  # the agent service's bind mounts
        (tmp_path / linked).symlink_to(ROOT / linked)
    (side / "override.yaml").write_text(COMPOSE_OVERRIDE.format(image=IMAGE, agent=agent_image))
    run = [TETHER, "keys", "init", "--dir", str(dev)]
    sans = ["--san", "control", "--san", "localhost", "--san", "127.0.0.1"]
    subprocess.run([*run, *sans], check=True, timeout=60, capture_output=True)
    subprocess.run([*run, "--name", "node"], check=True, timeout=60, capture_output=True)
    subprocess.run([TETHER, "secrets", "init-kek", "--file", str(dev / "control.kek")],
                   check=True, timeout=60, capture_output=True)  # fmt: skip
    for name in ("control.key", "control.kek", "ca.key", "server.key", "node.key"):
        os.chown(dev / name, 10001, 10001)
    compose = [*tool, "-f", "compose.yaml", "-f", "override.yaml"]

    def up(*services: str) -> None:
        command = [*compose, "up", "-d", *services]
        result = subprocess.run(
            command, cwd=side, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr

    cp = Control("tether_control_1", "127.0.0.1:7400", "", dev, dev / "node.key", {})
    cp.secrets = {
        p.name: p.read_bytes() for p in dev.iterdir() if p.suffix in (".key", ".kek", ".token")
    }
    try:
        up("control")
        health = [TETHER, "health", "--address", cp.address, "--tls-ca", str(dev / "trust.pem"),
                  "--tls-cert", str(dev / "admin.crt"), "--tls-key", str(dev / "admin.key"),
                  "--wait", "90s"]  # fmt: skip
        subprocess.run(health, check=True, timeout=120, capture_output=True)
        token = dev / "join.token"
        cp.cli("nodes", "token", "create", "--node", "compose-node-1", "--ttl", "1h",
               "--out", str(token))  # fmt: skip
        os.chown(token, 10001, 10001)
        cp.secrets["join.token"] = token.read_bytes()
        (tmp_path / "policy.toml").write_text(COMPOSE_POLICY)
        cp.cli("policy", "apply", str(tmp_path / "policy.toml"))
        up()
        say("podman-compose: control plane, sidecar and agent up (sidecar/compose.yaml)")
        ids = [
            cp.cli("submit", "--queue", "default", "--payload", "{}").stdout.strip().split()[-1]
            for _ in range(3)
        ]

        def done() -> bool:
            out = json.loads(cp.cli("tasks", "--queue", "default", "-o", "json").stdout)
            states = {t["task_id"]: state_of(t) for t in out}
            return all(states.get(i) == "succeeded" for i in ids)

        wait_for("the compose agent's tasks to succeed", done, timeout=240, every=2)
        bundle = tmp_path / "bundle.json"
        cp.cli("receipts", "export", "--all", "--out", str(bundle))
        verdict = subprocess.run(
            [TETHER, "verify", str(bundle), "--trust", str(dev / "control.pub")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        say(f"compose: 3 tasks completed; {verdict.stdout.strip().splitlines()[0]}")
        found, files = scan_container("tether_agent_1", secret_needles(cp.secrets))
        say(f"compose agent container scan: {files} files: {found or 'nothing'}")
        assert found == []
    finally:
        anonymous = set()
        for name in ("tether_control_1", "tether_sidecar_1", "tether_agent_1"):
            logs = podman("logs", name, check=False)
            say(f"--- compose {name} log (tail) ---\n{(logs.stdout + logs.stderr)[-1500:]}")
            inspect = podman("inspect", name, check=False)
            if inspect.returncode == 0:  # the image's VOLUMEs, which `down -v` leaves
                mounts = json.loads(inspect.stdout)[0]["Mounts"]
                anonymous |= {
                    m["Name"] for m in mounts if re.fullmatch(r"[0-9a-f]{64}", m.get("Name", ""))
                }
        subprocess.run([*compose, "down", "-v", "-t", "20"], cwd=side, capture_output=True,
                       timeout=300, check=False)  # fmt: skip
        for volume in anonymous:
            podman("volume", "rm", "-f", volume, check=False)

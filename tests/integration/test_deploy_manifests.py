"""The container deployment (sidecar/) agrees with the sidecar's config loader.

No container engine runs here, so the manifests are checked statically (env
names, paths under mounts, the shared socket, ports, where secrets go) and the
entrypoint is run as a plain process with exactly the environment the
Kubernetes manifest gives the sidecar container, paths remapped into tmp_path.
"""

from __future__ import annotations

import copy
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tether.crypto.signing import SigningKey
from tether.sidecar.config import ENV_VARS, PATH_ENV_VARS, parse_agent_pairs
from tether.testing import endpoint, spawn_control_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "sidecar"
SIDECAR = "tether-sidecar"
SECRET_ENV = ("TETHER_NODE_KEY", "TETHER_ENROLLMENT_TOKEN_FILE")
PAIR_ENV = ("TETHER_AGENTS", "TETHER_AGENT_SOCKETS")
REQUIRED_ENV = ("TETHER_CONTROL", "TETHER_TRUST_BUNDLE", "TETHER_NODE_ID", "TETHER_NODE_KEY")


def deployment() -> dict[str, Any]:
    """The Deployment in sidecar/k8s/."""
    docs = [
        d
        for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
    ]
    found = [d for d in docs if d and d.get("kind") == "Deployment"]
    assert len(found) == 1, "sidecar/k8s/ must hold exactly one Deployment"
    return found[0]


def env_of(container: dict[str, Any], node_id: str = "pod-name") -> dict[str, str]:
    """A container's env as the kubelet would set it (fieldRefs become `node_id`)."""
    out = {}
    for item in container.get("env", []):
        out[item["name"]] = item.get("value", node_id)
    return out


def _under(path: str, mounts: list[dict[str, Any]]) -> tuple[str, PurePosixPath] | None:
    """(volume, path inside it) for an absolute path, by the longest mount holding it."""
    p = PurePosixPath(path)
    best = None
    for m in mounts:
        mp = PurePosixPath(m["mountPath"])
        if (p == mp or mp in p.parents) and (best is None or len(mp.parts) > len(best[1].parts)):
            best = (m, mp)
    if best is None:
        return None
    return best[0]["name"], p.relative_to(best[1])


def sidecar_paths(env: dict[str, str]) -> dict[str, str]:
    """Every path the sidecar's env names: {what: path}."""
    out = {k: v for k, v in env.items() if k in PATH_ENV_VARS}
    for var in PAIR_ENV:
        for name, path in parse_agent_pairs(var, env.get(var, "")).items():
            out[f"{var}[{name}]"] = path
    return out


def check_pod(dep: dict[str, Any]) -> list[str]:
    """Everything wrong with the pod spec, as readable findings ([] when consistent)."""
    problems: list[str] = []
    spec = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    containers = {c["name"]: c for c in spec["containers"]}
    if SIDECAR not in containers:
        return [f"no container named {SIDECAR}"]
    side = containers.pop(SIDECAR)
    if not containers:
        problems.append("no agent container")
    env = env_of(side)
    mounts = side.get("volumeMounts", [])
    for m in mounts:
        if m["name"] not in volumes:
            problems.append(f"sidecar mounts undefined volume {m['name']}")
    for name in env:
        if name.startswith("TETHER_") and name not in ENV_VARS:
            problems.append(f"sidecar env {name} is unknown to the config loader")
    for name in REQUIRED_ENV:
        if name not in env:
            problems.append(f"sidecar env lacks required {name}")
    if not any(env.get(v) for v in PAIR_ENV):
        problems.append("sidecar env names no agent (TETHER_AGENTS / TETHER_AGENT_SOCKETS)")
    located: dict[str, tuple[str, PurePosixPath]] = {}
    for what, path in sidecar_paths(env).items():
        if not PurePosixPath(path).is_absolute():
            problems.append(f"{what}={path} is not absolute")
            continue
        where = _under(path, mounts)
        if where is None:
            problems.append(f"{what}={path} is on no volume mounted into the sidecar")
        else:
            located[what] = where
    for what in SECRET_ENV:
        if what in located and "secret" not in volumes.get(located[what][0], {}):
            problems.append(f"{what} is not on a secret volume")
    for var in ("TETHER_SOCKET", "TETHER_STATE_DIR"):
        if var in located and "emptyDir" not in volumes.get(located[var][0], {}):
            problems.append(f"{var} is not on an emptyDir volume")
    agent_sockets = {k: v for k, v in located.items() if k.startswith("TETHER_AGENT_SOCKETS[")}
    for what, (vol, _) in agent_sockets.items():
        if "emptyDir" not in volumes.get(vol, {}):
            problems.append(f"{what} is not on an emptyDir volume")
    private = (*SECRET_ENV, "TETHER_STATE_DIR")
    sidecar_only = {
        vol
        for what, (vol, _) in located.items()
        if what in private or what.startswith("TETHER_AGENTS[")
    }
    for name, agent in containers.items():
        amounts = agent.get("volumeMounts", [])
        for m in amounts:
            vol = volumes.get(m["name"], {})
            if "secret" in vol:
                problems.append(f"agent container {name} mounts secret volume {m['name']}")
            if m["name"] in sidecar_only:
                problems.append(f"agent container {name} mounts sidecar-only volume {m['name']}")
        aenv = env_of(agent)
        if any(k.startswith("TETHER_") for k in aenv):
            problems.append(f"agent container {name} has TETHER_* env (sidecar config)")
        socket_path = aenv.get("AGENT_BROKER_SOCKET", "")
        where = _under(socket_path, amounts) if socket_path else None
        if where is None or where not in agent_sockets.values():
            problems.append(
                f"agent container {name}: AGENT_BROKER_SOCKET={socket_path!r} is not the "
                "socket the sidecar serves for an agent on a shared volume"
            )
    ports = {p["containerPort"] for p in side.get("ports", [])}
    metrics = env.get("TETHER_METRICS_LISTEN")
    if metrics and int(metrics.rpartition(":")[2]) not in ports:
        problems.append(f"TETHER_METRICS_LISTEN={metrics} port is not a containerPort")
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = side.get(probe, {}).get("exec", {}).get("command", [])
        if cmd[:2] != ["tether", "health"]:
            problems.append(f"{probe} does not run `tether health`")
        elif "--socket" in cmd:
            path = cmd[cmd.index("--socket") + 1]
            served = {env.get("TETHER_SOCKET"), *(sidecar_paths(env)[k] for k in agent_sockets)}
            if path not in served:
                problems.append(f"{probe} checks {path}, which the sidecar does not serve")
    return problems


def test_kubernetes_manifest_agrees_with_the_config_loader() -> None:
    """The pod's env names, paths, volumes, ports and probes all match what the sidecar
    reads, and the agent container mounts neither secrets nor the node key."""
    assert check_pod(deployment()) == []


@pytest.mark.parametrize(
    ("container", "volume", "new_path", "named"),
    [
        ("agent", "tether-socket", "/run/tether-agent", "AGENT_BROKER_SOCKET"),
        (SIDECAR, "tether-socket", "/run/sock", "TETHER_AGENT_SOCKETS[research]"),
        (SIDECAR, "tether-node", "/etc/tether/secrets", "TETHER_NODE_KEY"),
    ],
)
def test_check_fails_when_a_mount_path_changes_in_one_place(
    container: str, volume: str, new_path: str, named: str
) -> None:
    """Moving one mount in one container only (not the env that points into it) is caught,
    naming the setting that no longer lands on the volume."""
    dep = copy.deepcopy(deployment())
    assert check_pod(dep) == []
    for c in dep["spec"]["template"]["spec"]["containers"]:
        if c["name"] == container:
            for m in c["volumeMounts"]:
                if m["name"] == volume:
                    m["mountPath"] = new_path
    problems = check_pod(dep)
    assert any(named in p for p in problems), problems


def test_check_fails_when_the_agent_gets_the_node_secret() -> None:
    """Mounting the node-key secret into the agent container is reported."""
    dep = copy.deepcopy(deployment())
    (agent,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    agent["volumeMounts"].append({"name": "tether-node", "mountPath": "/etc/tether/node"})
    assert any("secret" in p for p in check_pod(dep))


def test_compose_agrees_with_the_config_loader() -> None:
    """compose.yaml: known TETHER_* names, the control and enrolment addresses match the
    control plane's --listen and --enroll-listen, the trust bundle is mounted, the socket
    volume is shared and the agent gets no secret."""
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    env = services["sidecar"]["environment"]
    assert set(env) <= ENV_VARS, set(env) - ENV_VARS
    command = services["control"]["command"]
    for var, flag in (("TETHER_CONTROL", "--listen="), ("TETHER_ENROLL", "--enroll-listen=")):
        listen = next(a for a in command if a.startswith(flag))
        host, _, port = env[var].rpartition(":")
        assert host in services
        assert port == listen.rpartition(":")[2], (var, listen)
    assert "secrets" not in services["agent"]
    assert set(services["sidecar"]["secrets"]) == {"node_key", "join_token"}
    assert env["TETHER_NODE_KEY"] == "/run/secrets/node_key"
    assert env["TETHER_ENROLLMENT_TOKEN_FILE"] == "/run/secrets/join_token"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["sidecar"]["volumes"]}
    assert mounts.get("./dev/trust.pem") == env["TETHER_TRUST_BUNDLE"]
    agent_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["agent"]["volumes"]}
    for _, path in parse_agent_pairs("TETHER_AGENT_SOCKETS", env["TETHER_AGENT_SOCKETS"]).items():
        (vol,) = [v for v, mp in mounts.items() if path.startswith(mp + "/")]
        assert vol in doc["volumes"]
        assert agent_mounts.get(vol) == mounts[vol]
        assert path in services["agent"]["command"][-1]


def test_dockerfile_is_multistage_nonroot_and_healthchecked() -> None:
    """The image builds the wheel in a builder stage and runs it as a non-root user with a
    gRPC health check and the entrypoint; its TETHER_* defaults are loader names."""
    text = (DEPLOY / "Dockerfile").read_text()
    preamble, *stages = re.split(r"^FROM ", text, flags=re.M)
    assert len(stages) >= 2
    assert " AS builder" in stages[0]
    final = stages[-1]
    # The base is a build argument (`make image` passes one made from Debian's packages
    # where no registry is reachable) whose default stays the usual public image.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", preamble, flags=re.M)
    assert all(s.startswith("${BASE_IMAGE}") for s in stages)
    assert "COPY --from=builder" in final
    assert ".whl" in final
    assert not re.search(r"\b(gcc|build-essential|g\+\+|clang)\b", final)
    user = re.search(r"^USER (\S+)", final, flags=re.M)
    assert user
    assert user.group(1).split(":")[0] not in ("root", "0")
    assert re.search(r'^\s*CMD \["tether", "health"', final, flags=re.M)
    assert "ENTRYPOINT" in final
    assert "sidecar/entrypoint.sh" in final
    assert set(re.findall(r"\b(TETHER_[A-Z_]+)=", final)) <= ENV_VARS


# --------------------------------------------------------------------------- runtime


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[str, str, Path, Path]]:
    """A real control plane (CLI subprocess) that allow-lists one node key, as the
    manifest's deployment needs; yields (address, enrolment address, trust bundle, node key)."""
    node_key = tmp_path / "node" / "node.key"
    SigningKey.generate().save(node_key, node_key.with_suffix(".pub"))
    proc, address = spawn_control_cli(
        tmp_path / "control",
        extra_args=["--allow-node-key", f"research-agent-*={node_key.with_suffix('.pub')}"],
    )
    ep = endpoint(address)
    try:
        yield address, ep.enroll_address, ep.pki.trust_bundle, node_key
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remap(path: str, mounts: list[dict[str, Any]], root: Path) -> Path:
    """Where a container path lands when each volume is a directory under `root`."""
    where = _under(path, mounts)
    assert where is not None, path
    return root / where[0] / where[1]


def test_entrypoint_runs_with_the_manifest_environment(
    tmp_path: Path, control: tuple[str, str, Path, Path]
) -> None:
    """The entrypoint, given exactly the sidecar container's env (paths under tmp_path, the
    secret files group-readable as Kubernetes projects them), enrols with a real control
    plane, passes the probe command and serves metrics."""
    address, enroll_address, trust_bundle, node_key = control
    dep = deployment()
    side = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == SIDECAR)
    mounts = side["volumeMounts"]
    root = tmp_path / "volumes"
    env = env_of(side, node_id="research-agent-7d9f")
    for m in mounts:
        (root / m["name"]).mkdir(parents=True, exist_ok=True)
    for var in PATH_ENV_VARS & set(env):
        env[var] = str(remap(env[var], mounts, root))
    for var in PAIR_ENV:
        if var in env:
            pairs = parse_agent_pairs(var, env[var]).items()
            env[var] = ",".join(f"{n}={remap(p, mounts, root)}" for n, p in pairs)
    env["TETHER_CONTROL"] = address
    env["TETHER_ENROLL"] = enroll_address
    metrics_port = _free_port()
    env["TETHER_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    # What the kubelet would project: the secret (mode 0440 with fsGroup) and config map.
    key = Path(env["TETHER_NODE_KEY"])
    key.write_bytes(node_key.read_bytes())
    key.chmod(0o440)
    Path(env["TETHER_TRUST_BUNDLE"]).write_bytes(trust_bundle.read_bytes())

    venv_bin = str(Path(sys.executable).parent)
    process_env = {**env, "PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path)}
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["/bin/sh", str(DEPLOY / "entrypoint.sh")],
            env=process_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    probe = side["readinessProbe"]["exec"]["command"]
    socket_arg = probe.index("--socket") + 1
    probe = [
        *probe[:socket_arg],
        str(remap(probe[socket_arg], mounts, root)),
        *probe[socket_arg + 1 :],
    ]
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            result = subprocess.run(probe, env=process_env, capture_output=True, text=True)
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, (shlex.join(probe), result.stderr, log.read_text())
            time.sleep(0.1)
        assert "SERVING" in result.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert b"tether_spool_depth" in r.read()
        private = Path(env["TETHER_STATE_DIR"]) / ".node.key"
        assert private.stat().st_mode & 0o077 == 0  # the owner-only copy the entrypoint made
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, log.read_text()


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore lets in exactly the files the Dockerfile copies from the context
    (everything else, such as .venv or local keys, stays out of the build)."""
    text = (DEPLOY / "Dockerfile").read_text()
    sources = {
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M)
        for src in line.split()[:-1]
    }
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert sources == allowed, (sources, allowed)
    assert not any(s.endswith((".key", ".token", ".kek")) or "dev/" in s for s in sources)

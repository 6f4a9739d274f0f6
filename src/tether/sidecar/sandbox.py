"""Confinement for exec and mcp tools: the launcher that supervises one tool's process tree.

The sidecar never forks into a sandbox with `preexec_fn` (unsafe in a threaded
process). It runs this file as a tiny stdlib-only launcher:

    python -I -S sandbox.py '<json config>' <program> [args...]

The launcher is the tool's **supervisor**. It makes itself a child subreaper
(so every orphan of the tool's tree becomes its child, whatever `setsid()` or
double forks it does), forks the tool, and when the tool exits, or the launcher
gets SIGTERM/SIGINT/SIGHUP (the sidecar's timeout and lease end), or the
sidecar dies, it SIGKILLs every descendant and reaps them until none is left,
then exits with the tool's status (a tool killed by a signal is mirrored by the
launcher dying of the same signal).

Before the exec the forked child confines itself:

- new **user, mount, network, IPC and UTS namespaces**. The mount namespace
  gets a fresh read-only root holding only the system directories, a minimal
  `/etc`, four device files, the policy's `read_paths`, the program and the
  task workspace (read-write), so no other path -- other agents' broker sockets,
  the sidecar's state, `/proc`, `/tmp` -- exists for the tool. The network
  namespace holds only a loopback device: no TCP, no UDP, no abstract Unix
  sockets reach anything outside. A tool whose queue grants hosts gets loopback
  up and one port on it where the launcher (outside the namespace) runs an HTTP
  proxy that connects only to the granted `host[:port]`s (`CONNECT` and
  absolute-form requests); `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` point there.
  When the sidecar runs as root the tool runs as `tool_uid` (default 65534),
  so it can neither signal the sidecar nor escape `RLIMIT_NPROC`; otherwise
  it keeps the sidecar's uid inside its own user namespace.
- rlimits: CPU, address space, file size, `RLIMIT_NPROC` (per tool: the count
  is kept per user namespace), no core dumps;
- `no_new_privs`, a **Landlock** ruleset (read+execute on the system paths,
  read-write on the workspace only; no TCP bind and TCP connect only to the
  proxy port on ABI>=4; no signals or abstract-socket connections out of the
  sandbox on ABI>=6), an empty capability bounding set and no capabilities.

Where the kernel lacks what this needs (Landlock; the namespaces; a way to stop
the tool signalling its supervisor, i.e. a separate uid or Landlock ABI>=6)
the launcher refuses the tool: it exits with status 125 and one line on stderr
starting `tether-sandbox:` saying why, and nothing runs unconfined -- unless
the sidecar passed `require_confinement: false`, the operator's explicit
opt-out.

This module must import nothing outside the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, NoReturn

SETUP_FAILED = 125
DEFAULT_TOOL_UID = 65534
DEFAULT_MAX_PROCESSES = 256
SIGNAL_SCOPE_ABI = 6
PROXY_CONNECT_TIMEOUT_S = 10.0
PROXY_HEAD_TIMEOUT_S = 30.0
PROXY_MAX_HEAD = 16384
PROXY_MAX_CONNECTIONS = 64

# Read-only (read + execute) directories a program typically needs.
SYSTEM_READ_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# A minimal /etc: the dynamic loader, locale/time zone, name resolution, TLS roots.
SYSTEM_READ_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/mime.types",
)
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

# linux/landlock.h
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_TRUNCATE = 1 << 14
_FS_IOCTL_DEV = 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_ACCESS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
# linux/prctl.h
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_PR_SET_CHILD_SUBREAPER, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 36, 47, 4
# linux/sched.h, linux/mount.h
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_NAMESPACES = _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 1 << 14, 1 << 18, 1 << 21
_MNT_DETACH = 2
# pivot_root has no glibc wrapper and no generic syscall number.
_SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "arm64": 41,
    "riscv64": 41,
    "loongarch64": 41,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
    "i686": 217,
    "i386": 217,
    "armv7l": 218,
    "armv6l": 218,
}
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_MAX_USERNS = "/proc/sys/user/max_user_namespaces"  # per user namespace
_SCRATCH_DIRS = ("/tmp", "/mnt", "/run", "/var/tmp", "/media", "/srv", "/opt", "/home", "/root")


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = _libc()
        libc.syscall.restype = ctypes.c_long
        abi = int(
            libc.syscall(
                _SYS_CREATE_RULESET,
                None,
                ctypes.c_size_t(0),
                ctypes.c_uint32(_CREATE_RULESET_VERSION),
            )
        )
    except (OSError, AttributeError):
        return 0
    return max(abi, 0)


def _fs_mask(abi: int) -> int:
    mask = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        mask |= 1 << 13  # REFER
    if abi >= 3:
        mask |= _FS_TRUNCATE
    if abi >= 5:
        mask |= _FS_IOCTL_DEV
    return mask


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"tether-sandbox: {message}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def _prctl(option: int, arg: int) -> int:
    return int(_libc().prctl(option, arg, 0, 0, 0))


# --------------------------------------------------------------------------- Landlock


def _landlock(config: dict[str, Any], tcp_ports: list[int] | None) -> None:
    """Restricts this process (and what it execs) to the config's paths and TCP ports.

    `tcp_ports` None leaves TCP unhandled (only when the tool is not in its own
    network namespace and the queue grants no ports, i.e. confinement opted out).
    """
    abi = landlock_abi()
    if abi <= 0:
        if config.get("require_confinement", True):
            _fail("Landlock is not available on this kernel; refusing to run unconfined")
        return
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled = _fs_mask(abi)
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    if abi >= 4 and tcp_ports is not None:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= SIGNAL_SCOPE_ABI:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset = libc.syscall(
        _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        _fail(f"landlock_create_ruleset: {_errno_text()}")

    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    device = _FS_READ_FILE | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)

    def add_rule(kind: int, rule: Any, what: str) -> None:
        if (
            libc.syscall(
                _SYS_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(kind),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
            < 0
        ):
            _fail(f"landlock_add_rule {what}: {_errno_text()}")

    def allow(path: str, access: int, required: bool = False) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as err:
            if required:
                _fail(f"cannot open {path}: {err.strerror}")
            return
        try:
            if not os.path.isdir(path):
                access &= _FILE_ACCESS
            add_rule(_RULE_PATH_BENEATH, _PathBeneathAttr(access & handled, fd), path)
        finally:
            os.close(fd)

    for path in (*SYSTEM_READ_DIRS, *SYSTEM_READ_FILES, *config.get("read_paths", ())):
        allow(path, read)
    for path in DEVICE_FILES:
        allow(path, device)
    for path in config.get("write_paths", ()):
        allow(path, handled, required=True)
    if attr.handled_access_net:
        for port in tcp_ports or ():
            add_rule(_RULE_NET_PORT, _NetPortAttr(_NET_CONNECT_TCP, port), f"port {port}")
    if libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        _fail(f"landlock_restrict_self: {_errno_text()}")
    os.close(ruleset)


def _drop_bounding_set() -> None:
    """Empties the bounding and ambient sets (needs CAP_SETPCAP; a no-op without it)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            last = int(f.read().strip())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)  # EPERM without CAP_SETPCAP: capset below still clears
    _libc().prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _clear_capabilities() -> None:
    """Empties the permitted, effective and inheritable sets."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if _libc().capset(ctypes.byref(header), data) != 0:
        _fail(f"capset: {_errno_text()}")


# --------------------------------------------------------------------------- namespaces


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    libc = _libc()
    rc = libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        _fail(f"mount {source or fstype or ''} on {target}: {_errno_text()}")


def _locked_flags(path: str) -> int:
    """The mount flags a read-only remount must keep (a user namespace cannot clear them)."""
    try:
        flag = os.statvfs(path).f_flag
    except OSError:
        return _MS_NOSUID | _MS_NODEV
    out = _MS_NOSUID  # always wanted
    for st, ms in (
        (os.ST_NODEV, _MS_NODEV),
        (os.ST_NOEXEC, _MS_NOEXEC),
        (os.ST_NOATIME, _MS_NOATIME),
        (os.ST_NODIRATIME, _MS_NODIRATIME),
        (os.ST_RELATIME, _MS_RELATIME),
    ):
        if flag & st:
            out |= ms
    return out


def _bind_plan(config: dict[str, Any], program: str) -> list[tuple[str, str]]:
    """(path, mode) pairs for the new root: "ro", "dev" or "rw"; symlinks kept as "link"."""
    ro = [*SYSTEM_READ_DIRS, *SYSTEM_READ_FILES, *config.get("read_paths", ()), program]
    plan: list[tuple[str, str]] = []
    seen: set[str] = set()

    def covered(path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in seen)

    def add(path: str, mode: str) -> None:
        path = os.path.normpath(path)
        if not os.path.isabs(path) or covered(path) or not os.path.lexists(path):
            return
        if os.path.islink(path):
            plan.append((path, "link"))
            add(os.path.realpath(path), mode)
            return
        seen.add(path)
        plan.append((path, mode))

    for path in ro:
        add(path, "ro")
    for path in DEVICE_FILES:
        add(path, "dev")
    for path in config.get("write_paths", ()):
        add(path, "rw")
    return plan


def _make_mountpoint(root: str, path: str, is_dir: bool) -> str:
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.lexists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return target


def _scratch(sources: Iterable[str]) -> str:
    """An existing directory inside none of `sources`, to mount the new root on.

    A recursive bind of a source would carry along a mount stacked inside it.
    """
    taken = [s.rstrip("/") for s in sources]
    for candidate in _SCRATCH_DIRS:
        inside = any(candidate == t or candidate.startswith(t + "/") for t in taken)
        if os.path.isdir(candidate) and not os.path.islink(candidate) and not inside:
            return candidate
    _fail("no directory to build the tool's root on (tried " + ", ".join(_SCRATCH_DIRS) + ")")


def _new_root(config: dict[str, Any], program: str, workspace: str) -> None:
    """Replaces this mount namespace's root with one holding only what the tool may use.

    The new root is a tmpfs mounted on a scratch directory; every source is
    opened first, so that tmpfs hiding one of them does not matter.
    """
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    plan = _bind_plan(config, program)
    fds: dict[str, int] = {}
    for path, mode in plan:
        if mode != "link":
            with contextlib.suppress(OSError):
                fds[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
    root = _scratch(fds)
    _mount("tether-root", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    for path, mode in plan:
        if mode == "link":
            target = root + path
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            continue
        fd = fds.get(path)
        if fd is None:
            continue
        is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        target = _make_mountpoint(root, path, is_dir)
        _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
        if mode == "ro":
            flags = _locked_flags(target) | _MS_REMOUNT | _MS_BIND | _MS_RDONLY
            _mount(None, target, None, flags)
        os.close(fd)
    syscall = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if syscall is None:
        _fail(f"pivot_root: unknown architecture {os.uname().machine!r}")
    os.chdir(root)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(syscall), b".", b".") != 0:
        _fail(f"pivot_root: {_errno_text()}")
    if libc.umount2(b".", _MNT_DETACH) != 0:  # the old root, stacked under the new one
        _fail(f"umount old root: {_errno_text()}")
    os.chdir("/")
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(workspace)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | _IFF_UP))


def _write_maps(pid: int, tool_ids: tuple[int, int] | None) -> None:
    """Maps ids into the child's new user namespace (written from outside, as the parent).

    Root maps 0 (for the set-up) and the tool's uid/gid; anyone else maps only itself.
    """
    uid, gid = os.geteuid(), os.getegid()
    if tool_ids is not None:
        uid_map = f"0 0 1\n{tool_ids[0]} {tool_ids[0]} 1\n"
        gid_map = f"0 0 1\n{tool_ids[1]} {tool_ids[1]} 1\n"
    else:
        _write_proc(pid, "setgroups", "deny")
        uid_map, gid_map = f"{uid} {uid} 1\n", f"{gid} {gid} 1\n"
    _write_proc(pid, "uid_map", uid_map)
    _write_proc(pid, "gid_map", gid_map)


def _write_proc(pid: int, name: str, text: str) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the tool


def _resolve(config: dict[str, Any], program: str) -> str:
    if os.sep in program:
        return program
    found = shutil.which(program, path=config.get("path") or os.defpath)
    if found is None:
        _fail(f"program {program!r} not found")
    return found


def _child(
    config: dict[str, Any],
    program: str,
    argv: list[str],
    supervisor: int,
    to_parent: int,
    from_parent: int,
    fd_channel: socket.socket | None,
) -> NoReturn:
    """Confines this forked process and execs the tool (never returns)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:
        os._exit(SETUP_FAILED)
    required = bool(config.get("require_confinement", True))
    workspace = str(config.get("workspace") or os.getcwd())
    tool_ids: tuple[int, int] | None = None
    isolated = _libc().unshare(ctypes.c_int(_NAMESPACES)) == 0
    if not isolated:
        if required:
            _fail(
                "cannot create the tool's own user, mount and network namespaces "
                f"({_errno_text()}); without them the tool would reach the network and "
                "other agents' sockets, so it is refused (allow unprivileged user "
                "namespaces for the sidecar, e.g. no seccomp profile that blocks unshare)"
            )
        os.write(to_parent, b"n")
    else:
        os.write(to_parent, b"u")
        reply = os.read(from_parent, 64)
        if not reply.startswith(b"ok"):
            _fail(reply.decode("utf-8", "replace") or "the supervisor went away")
        if reply == b"ok-root":
            tool_ids = (
                int(config.get("tool_uid", DEFAULT_TOOL_UID)),
                int(config.get("tool_gid", DEFAULT_TOOL_UID)),
            )
        # No nested user namespaces: a tool cannot regain capabilities in one.
        with contextlib.suppress(OSError), open(_MAX_USERNS, "w", encoding="ascii") as f:
            f.write("0")
        with contextlib.suppress(OSError):
            socket.sethostname("tether-tool")
        _new_root(config, program, workspace)
    tcp_ports: list[int] | None = [] if isolated else config.get("tcp_ports")
    proxy_port = 0
    if fd_channel is not None:
        if isolated:
            _loopback_up()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(PROXY_MAX_CONNECTIONS)
            proxy_port = int(listener.getsockname()[1])
            socket.send_fds(fd_channel, [b"L"], [listener.fileno()])
            listener.close()
            tcp_ports = [proxy_port]
        fd_channel.close()
    _drop_bounding_set()
    if tool_ids is not None:
        os.setgroups([])
        os.setresgid(tool_ids[1], tool_ids[1], tool_ids[1])
        os.setresuid(tool_ids[0], tool_ids[0], tool_ids[0])
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a uid change clears it
        if os.getppid() != supervisor:
            os._exit(SETUP_FAILED)
    limits = (
        (resource.RLIMIT_CPU, config.get("cpu_seconds")),
        (resource.RLIMIT_AS, config.get("memory_bytes")),
        (resource.RLIMIT_FSIZE, config.get("file_size_bytes")),
        (resource.RLIMIT_NPROC, config.get("max_processes", DEFAULT_MAX_PROCESSES)),
        (resource.RLIMIT_CORE, 0),
    )
    for which, value in limits:
        if value is not None:
            hard = resource.getrlimit(which)[1]
            limit = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
            resource.setrlimit(which, (limit, limit))
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0:
        _fail(f"prctl(NO_NEW_PRIVS): {_errno_text()}")
    _landlock(config, tcp_ports)
    _clear_capabilities()
    # Only declared names survive (the launcher's own start-up may add e.g. LC_CTYPE).
    keep = set(config.get("env_names", ()))
    env = {k: v for k, v in os.environb.items() if k.decode("utf-8", "surrogateescape") in keep}
    if proxy_port:
        for name in PROXY_ENV:
            env[name.encode()] = f"http://127.0.0.1:{proxy_port}".encode()
        env[b"NO_PROXY"] = env[b"no_proxy"] = b""
    for fd in (to_parent, from_parent):
        os.close(fd)
    try:
        os.execve(program, argv, env)
    except OSError as err:
        _fail(f"exec {program}: {err.strerror}")


# --------------------------------------------------------------------------- supervision


class _Stop(Exception):
    """Raised by the signal handler: the sidecar wants the tool stopped now."""


_armed = False


def _on_stop(signum: int, frame: Any) -> None:
    if _armed:
        raise _Stop


def _arm(value: bool) -> None:
    global _armed
    _armed = value


def descendants(root: int) -> list[int]:
    """Every live (not zombie) process under `root`, from /proc (orphans re-parent to a
    subreaper). The one walker: `tether run` (runner/proctree.py) imports it; this module
    must itself import nothing of Tether's, as it runs under `python -I -S`."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            ppid = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != b"Z":  # a zombie has ended; it only waits to be reaped (by _reap)
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


_descendant_set: set[int] = set()  # the current sweep round's finds


def _kill(pid: int) -> None:
    """SIGKILLs `pid` through a pidfd, so a recycled pid is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # still ours once pinned by the pidfd?
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        if ppid == os.getpid() or ppid in _descendant_set:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
    finally:
        os.close(pidfd)


def _reap() -> bool:
    """Reaps every exited child; False once this process has no children left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _sweep(deadline_s: float = 10.0) -> None:
    """Kills and reaps every descendant until none is left (a fork bomb included).

    Each round kills what /proc shows under us; what a dying process forked in
    the meantime re-parents to us (the subreaper) and is found by the next one.
    """
    me = os.getpid()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = descendants(me)
        _descendant_set.clear()
        _descendant_set.update(found)
        for pid in found:
            _kill(pid)
        if not _reap() and not found:
            return
        time.sleep(0.001 if found else 0.01)


def _exit_like(status: int) -> NoReturn:
    """Ends the launcher the way the tool ended (exit code, or death by the same signal)."""
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else signal.SIGKILL
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE and SIGXFSZ
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), sig)
        time.sleep(1)  # delivery is asynchronous to other threads' progress
    os._exit(128 + sig)


# --------------------------------------------------------------------------- the proxy


def _allowed(allow: list[tuple[str, int | None]], host: str, port: int) -> bool:
    host = host.lower().strip("[]")
    return any(name == host and (want is None or want == port) for name, want in allow)


def _split_host_port(text: str, default: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and not port.isdigit():
        raise ValueError(text)
    value = int(port) if port else default
    if not host or not 0 < value < 65536:
        raise ValueError(text)
    return host, value


def _reply(conn: socket.socket, status: str, why: str) -> None:
    body = f"tether: {why}\n".encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    with contextlib.suppress(OSError):
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve(conn: socket.socket, allow: list[tuple[str, int | None]]) -> None:
    """One proxied connection: only to an allowed host:port, then bytes both ways."""
    upstream: socket.socket | None = None
    try:
        conn.settimeout(PROXY_HEAD_TIMEOUT_S)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
            if len(head) > PROXY_MAX_HEAD:
                _reply(conn, "431 Request Header Fields Too Large", "request head too large")
                return
        head_part, _, rest = head.partition(b"\r\n\r\n")
        lines = head_part.split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3:
            _reply(conn, "400 Bad Request", "malformed request line")
            return
        method, target, version = parts
        try:
            if method == "CONNECT":
                host, port = _split_host_port(target, 443)
                path = ""
            else:
                if not target.lower().startswith("http://"):
                    raise ValueError(target)
                authority, slash, tail = target[7:].partition("/")
                host, port = _split_host_port(authority, 80)
                path = slash + tail or "/"
        except ValueError:
            _reply(conn, "400 Bad Request", "use CONNECT host:port or an http:// absolute URL")
            return
        if not _allowed(allow, host, port):
            _reply(conn, "403 Forbidden", f"{host}:{port} is not on the network allowlist")
            return
        try:
            upstream = socket.create_connection((host, port), timeout=PROXY_CONNECT_TIMEOUT_S)
        except OSError as err:
            _reply(conn, "502 Bad Gateway", f"cannot connect to {host}:{port}: {err.strerror}")
            return
        if method == "CONNECT":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = rest
        else:
            kept = [
                line
                for line in lines[1:]
                if not line.lower().startswith((b"proxy-connection:", b"proxy-authorization:"))
            ]
            request = f"{method} {path} {version}".encode("latin-1")
            first = b"\r\n".join([request, *kept]) + b"\r\n\r\n" + rest
        conn.settimeout(None)
        upstream.settimeout(None)
        if first:
            upstream.sendall(first)
        back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
        back.start()
        _pump(conn, upstream)
        back.join()
    except OSError:
        pass
    finally:
        conn.close()
        if upstream is not None:
            upstream.close()


def _proxy(listener: socket.socket, allow: list[tuple[str, int | None]]) -> None:
    slots = threading.BoundedSemaphore(PROXY_MAX_CONNECTIONS)

    def run(conn: socket.socket) -> None:
        try:
            _serve(conn, allow)
        finally:
            slots.release()

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if not slots.acquire(blocking=False):
            _reply(conn, "503 Service Unavailable", "too many connections")
            conn.close()
            continue
        threading.Thread(target=run, args=(conn,), daemon=True).start()


# --------------------------------------------------------------------------- main


def _parse_allow(entries: Iterable[Any]) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for host, port in entries:
        out.append((str(host).lower(), None if port is None else int(port)))
    return out


def _main(argv: list[str]) -> None:
    if len(argv) < 3:
        _fail("usage: sandbox.py CONFIG PROGRAM [ARGS...]")
    config = json.loads(argv[1])
    program_argv = argv[2:]
    program = _resolve(config, program_argv[0])
    required = bool(config.get("require_confinement", True))
    me = os.getpid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # The sidecar's death stops the tool too (SIGTERM: we sweep, then exit).
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = int(config.get("parent_pid", 0))
    if parent and os.getppid() != parent:
        _fail("the sidecar went away before the tool started")
    if _prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0 and required:
        _fail(f"prctl(CHILD_SUBREAPER): {_errno_text()}; the tool's processes could outlive it")
    root = os.geteuid() == 0
    tool_ids = (
        int(config.get("tool_uid", DEFAULT_TOOL_UID)),
        int(config.get("tool_gid", DEFAULT_TOOL_UID)),
    )
    if required and not root and landlock_abi() < SIGNAL_SCOPE_ABI:
        _fail(
            f"this kernel's Landlock ABI is {landlock_abi()} (signal scoping needs "
            f"{SIGNAL_SCOPE_ABI}, Linux 6.12) and the sidecar is not root, so the tool "
            "would run as the sidecar's own user and could signal its supervisor and the "
            "sidecar, escaping the kill at the end of the call; refusing to run it"
        )
    allow = _parse_allow(config.get("proxy_allow") or ())
    child = -1
    status: int | None = None
    _arm(True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_stop)
    with contextlib.suppress(_Stop):
        child, status = _supervise(config, program, program_argv, me, root, tool_ids, allow)
    while True:  # a second signal may land anywhere before this; only a flag changes here
        try:
            _arm(False)
            break
        except _Stop:
            continue
    if status is None:  # stopped by the sidecar (timeout, lease end) or it died
        status = signal.SIGKILL
        if child > 0:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
    _sweep()
    _exit_like(status)


def _supervise(
    config: dict[str, Any],
    program: str,
    program_argv: list[str],
    me: int,
    root: bool,
    tool_ids: tuple[int, int],
    allow: list[tuple[str, int | None]],
) -> tuple[int, int | None]:
    """Forks the tool, finishes its set-up from outside, and waits for it to exit.

    Returns (child pid, its wait status); raises _Stop when the sidecar stops it.
    """
    to_parent_r, to_parent_w = os.pipe()
    from_parent_r, from_parent_w = os.pipe()
    ours, theirs = socket.socketpair() if allow else (None, None)
    child = os.fork()
    if child == 0:
        os.close(to_parent_r)
        os.close(from_parent_w)
        if ours is not None:
            ours.close()
        try:
            _child(config, program, program_argv, me, to_parent_w, from_parent_r, theirs)
        except BaseException as err:  # never unwind into the supervisor's code
            _fail(f"setting up the tool failed: {type(err).__name__}: {err}")
    os.close(to_parent_w)
    os.close(from_parent_r)
    if theirs is not None:
        theirs.close()
    try:
        if os.read(to_parent_r, 1) == b"u":
            try:
                if root:
                    os.chown(str(config.get("workspace") or os.getcwd()), *tool_ids)
                _write_maps(child, tool_ids if root else None)
            except OSError as err:
                os.write(from_parent_w, f"cannot map the tool's user ids: {err}".encode())
            else:
                os.write(from_parent_w, b"ok-root" if root else b"ok")
        if ours is not None:
            with contextlib.suppress(OSError):
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
                if fds:
                    listener = socket.socket(fileno=fds[0])
                    threading.Thread(target=_proxy, args=(listener, allow), daemon=True).start()
    finally:
        os.close(to_parent_r)
        os.close(from_parent_w)
        if ours is not None:
            ours.close()
    # Nothing of ours keeps the tool's pipes open once it is gone.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return child, None
        if pid == child:
            return child, status


if __name__ == "__main__":
    _main(sys.argv)

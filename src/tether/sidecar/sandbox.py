"""Confinement for exec tools: rlimits, Landlock and dropped capabilities, then execve.

The sidecar never forks into a sandbox with `preexec_fn` (unsafe in a threaded
process). It runs this file as a tiny stdlib-only launcher:

    python -I -S sandbox.py '<json config>' <program> [args...]

The launcher sets RLIMIT_CPU/AS/FSIZE (and CORE=0), sets no_new_privs, builds a
Landlock ruleset (read+execute on system directories, read-write on the task
workspace only, nothing else; TCP connect/bind only to allowed ports on ABI>=4;
no signals or abstract-socket connections outside the sandbox on ABI>=6), drops
every capability when running as root, and only then execs the tool. Anything
that fails before the exec exits with status 125 and one line on stderr.

This module must import nothing outside the standard library.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import sys
from typing import Any, NoReturn

SETUP_FAILED = 125

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
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4


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


def _landlock(config: dict[str, Any]) -> None:
    abi = landlock_abi()
    if abi <= 0:
        if config.get("require_landlock", True):
            _fail("Landlock is not available on this kernel; refusing to run unconfined")
        return
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled = _fs_mask(abi)
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    ports: list[int] | None = config.get("tcp_ports")
    if abi >= 4 and ports is not None:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset = libc.syscall(
        _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        _fail(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")

    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    device = _FS_READ_FILE | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)

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
            rule = _PathBeneathAttr(access & handled, fd)
            if (
                libc.syscall(
                    _SYS_ADD_RULE,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(_RULE_PATH_BENEATH),
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                )
                < 0
            ):
                _fail(f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    for path in (*SYSTEM_READ_DIRS, *SYSTEM_READ_FILES, *config.get("read_paths", ())):
        allow(path, read)
    for path in DEVICE_FILES:
        allow(path, device)
    for path in config.get("write_paths", ()):
        allow(path, handled, required=True)
    if attr.handled_access_net:
        for port in ports or ():
            rule = _NetPortAttr(_NET_CONNECT_TCP, port)
            if (
                libc.syscall(
                    _SYS_ADD_RULE,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(_RULE_NET_PORT),
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                )
                < 0
            ):
                _fail(f"landlock_add_rule port {port}: {os.strerror(ctypes.get_errno())}")
    if libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        _fail(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    os.close(ruleset)


def _drop_capabilities() -> None:
    """Empties the bounding, ambient, permitted, effective and inheritable sets."""
    libc = _libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            last = int(f.read().strip())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: capset below
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        _fail(f"capset: {os.strerror(ctypes.get_errno())}")


def _main(argv: list[str]) -> None:
    if len(argv) < 3:
        _fail("usage: sandbox.py CONFIG PROGRAM [ARGS...]")
    config = json.loads(argv[1])
    program_argv = argv[2:]
    program = program_argv[0]
    if os.sep not in program:
        found = shutil.which(program, path=config.get("path") or os.defpath)
        if found is None:
            _fail(f"program {program!r} not found")
        program = found
    limits = (
        (resource.RLIMIT_CPU, config.get("cpu_seconds")),
        (resource.RLIMIT_AS, config.get("memory_bytes")),
        (resource.RLIMIT_FSIZE, config.get("file_size_bytes")),
        (resource.RLIMIT_CORE, 0),
    )
    for which, value in limits:
        if value is not None:
            resource.setrlimit(which, (int(value), int(value)))
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    _landlock(config)
    if os.geteuid() == 0 or os.getuid() == 0:
        _drop_capabilities()
    # Only declared names survive (the launcher's own start-up may add e.g. LC_CTYPE).
    keep = set(config.get("env_names", ()))
    env = {k: v for k, v in os.environb.items() if k.decode("utf-8", "surrogateescape") in keep}
    try:
        os.execve(program, program_argv, env)
    except OSError as err:
        _fail(f"exec {program}: {err.strerror}")


if __name__ == "__main__":
    _main(sys.argv)

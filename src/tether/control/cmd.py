"""CLI: `tether control`, `tether keys init`, `tether secrets`, `tether policy`, operator commands.

Operator commands read the operator token (when the control plane requires
one) from the TETHER_OPERATOR_TOKEN environment variable or --operator-token-file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tether import runtime
from tether.core.errors import ConfigError, InvalidArgument
from tether.core.states import State
from tether.crypto.signing import SigningKey, VerifyKey
from tether.v1 import control_pb2 as pb

log = logging.getLogger("tether.control.cmd")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds control, keys, submit, tasks and task subcommands."""
    p = sub.add_parser("control", help="run the control plane")
    p.add_argument(
        "--db",
        required=True,
        help="SQLite database file, or postgresql://user@host:port/dbname (several replicas)",
    )
    p.add_argument("--listen", default="127.0.0.1:7400", help="host:port (port 0 ok) or unix:/path")
    p.add_argument("--key", required=True, help="control-plane Ed25519 private key (PEM, 0600)")
    p.add_argument("--enrollment-token-file", help="node enrolment tokens, one per line")
    p.add_argument(
        "--allow-node-key",
        action="append",
        default=[],
        metavar="PUBKEY_PEM_FILE",
        help="a node public key that may register without a token (repeatable)",
    )
    p.add_argument(
        "--operator-token-file",
        help="operator tokens, one per line; when given, operator RPCs require one "
        "(metadata x-tether-operator-token); when absent, operator RPCs are open",
    )
    p.add_argument(
        "--kek-file",
        help="key-encryption keys of the credential vault (from `tether secrets init-kek`, "
        "mode 0600); re-read when it changes, so `secrets rotate-kek` needs no restart. "
        "Without it the vault is off",
    )
    p.add_argument("--sweep-interval-ms", type=int, default=1000, help="lapsed-lease sweep period")
    p.add_argument(
        "--checkpoint-interval-ms",
        type=int,
        default=10_000,
        help="sign a ledger checkpoint this often while receipts arrive (default 10000)",
    )
    p.add_argument("--ready-file", help="write the bound address here once serving")
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )
    p.set_defaults(func=_cmd_control)

    k = sub.add_parser("keys", help="manage keys")
    ksub = k.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    ki = ksub.add_parser("init", help="write a new Ed25519 key pair")
    ki.add_argument("--dir", required=True, help="directory for NAME.key and NAME.pub")
    ki.add_argument("--name", default="control", help="file name stem (default control)")
    ki.set_defaults(func=_cmd_keys_init)

    def operator(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--control", required=True, help="control plane address")
        parser.add_argument("--operator-token-file", help="file holding the operator token")

    s = sub.add_parser("submit", help="submit a task")
    operator(s)
    s.add_argument("--queue", required=True)
    s.add_argument("--payload", required=True, help="JSON payload")
    s.add_argument("--key", default="", help="idempotency key")
    s.add_argument("--max-attempts", type=int, default=0)
    s.set_defaults(func=_cmd_submit)

    sec = sub.add_parser("secrets", help="the credential vault (write-only)")
    ssub = sec.add_subparsers(dest="secrets_command", metavar="SUBCOMMAND", required=True)
    si = ssub.add_parser("init-kek", help="create a key-encryption-key file (mode 0600)")
    si.add_argument("--file", required=True, help="KEK file to create (never overwritten)")
    si.set_defaults(func=_cmd_secrets_init_kek)
    sp = ssub.add_parser(
        "put",
        help="seal and store a new version of a secret",
        description="Reads the value from stdin (a prompt without echo on a terminal) or "
        "--from-file, never from the command line; one trailing newline is dropped unless "
        "--keep-newline. The value is never printed and cannot be read back.",
    )
    sp.add_argument("name", help="credential name, as the policy names it")
    operator(sp)
    sp.add_argument("--from-file", help="read the value from this file instead of stdin")
    sp.add_argument("--keep-newline", action="store_true", help="keep a trailing newline")
    sp.set_defaults(func=_cmd_secrets_put)
    sr = ssub.add_parser(
        "rotate-kek",
        help="add a new active KEK and re-wrap every stored secret under it",
        description="Offline tool on the database; safe while the control plane runs: the "
        "KEK file gets a new last (active) key, old keys stay, and every secret's DEK is "
        "re-wrapped in one transaction. A running control plane re-reads the changed KEK "
        "file on its next vault use, so no restart is needed. Remove an old KEK from the "
        "file only after a later run re-wraps 0 secrets.",
    )
    sr.add_argument("--kek-file", required=True, help="the KEK file of the control plane")
    sr.add_argument(
        "--db", required=True, help="the control plane's SQLite file or postgresql:// URL"
    )
    sr.set_defaults(func=_cmd_secrets_rotate_kek)

    pol = sub.add_parser("policy", help="apply or show the policy")
    psub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    pa = psub.add_parser(
        "apply", help="check a policy file and store it as the new version in force"
    )
    pa.add_argument("file", help="policy TOML file")
    operator(pa)
    pa.set_defaults(func=_cmd_policy_apply)
    ps = psub.add_parser("show", help="print the policy in force (or a version)")
    operator(ps)
    ps.add_argument("--version", type=int, default=0, help="version (default: in force)")
    ps.set_defaults(func=_cmd_policy_show)

    t = sub.add_parser("tasks", help="list tasks")
    operator(t)
    t.add_argument("--queue", default="")
    t.add_argument("--state", default="", help="queued, leased, running, succeeded, ...")
    t.set_defaults(func=_cmd_tasks)

    ts = sub.add_parser("task", help="inspect one task")
    tsub = ts.add_subparsers(dest="task_command", metavar="SUBCOMMAND", required=True)
    show = tsub.add_parser("show", help="state, attempts and lease history")
    show.add_argument("task_id")
    operator(show)
    show.set_defaults(func=_cmd_task_show)


def _cmd_keys_init(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    priv, pub = d / f"{args.name}.key", d / f"{args.name}.pub"
    for path in (priv, pub):
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a key")
    key = SigningKey.generate()
    key.save(priv, pub)
    print(f"wrote {priv} (mode 0600) and {pub}; keyid {key.keyid}")
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    from tether.control.server import serve_forever, start_server
    from tether.control.service import Auth, read_token_file

    key = SigningKey.load(Path(args.key))
    auth = Auth.from_tokens(
        enrollment_tokens=read_token_file(args.enrollment_token_file)
        if args.enrollment_token_file
        else (),
        allowed_node_keys=[VerifyKey.load(Path(f)).raw for f in args.allow_node_key],
        operator_tokens=read_token_file(args.operator_token_file)
        if args.operator_token_file
        else (),
    )
    if args.sweep_interval_ms <= 0:
        raise ConfigError("--sweep-interval-ms must be positive")
    if args.checkpoint_interval_ms <= 0:
        raise ConfigError("--checkpoint-interval-ms must be positive")

    async def run() -> None:
        running = await start_server(
            db=args.db,
            listen=args.listen,
            key=key,
            auth=auth,
            sweep_interval_ms=args.sweep_interval_ms,
            kek_file=args.kek_file,
            checkpoint_interval_ms=args.checkpoint_interval_ms,
            metrics_listen=args.metrics_listen,
        )
        await serve_forever(running, Path(args.ready_file) if args.ready_file else None)

    runtime.run(run())
    return 0


def _operator_token(args: argparse.Namespace) -> str:
    if getattr(args, "operator_token_file", None):
        from tether.control.service import read_token_file

        return read_token_file(args.operator_token_file)[0]
    return os.environ.get("TETHER_OPERATOR_TOKEN", "")


def _run_client(args: argparse.Namespace, fn: Any) -> int:
    from tether.control.client import ControlClient
    from tether.control.server import grpc_target

    async def go() -> int:
        async with ControlClient(
            grpc_target(args.control), operator_token=_operator_token(args)
        ) as client:
            return int(await fn(client))

    return asyncio.run(go())


def _task_line(t: pb.Task) -> str:
    state = State(t.state).name.lower() if t.state else "?"
    return (
        f"{t.task_id}  {t.queue:<16} {state:<10} attempt {t.attempt}/{t.max_attempts}"
        f"  token {t.fencing_token}"
    )


def _cmd_submit(args: argparse.Namespace) -> int:
    try:
        json.loads(args.payload)
    except ValueError as err:
        raise InvalidArgument("--payload", f"not JSON: {err}") from err

    async def fn(client: Any) -> int:
        resp = await client.submit(
            args.queue,
            args.payload.encode(),
            idempotency_key=args.key,
            max_attempts=args.max_attempts,
        )
        print(resp.task.task_id + ("" if resp.created else "  (existing task, same key)"))
        return 0

    return _run_client(args, fn)


def _cmd_tasks(args: argparse.Namespace) -> int:
    state = 0
    if args.state:
        try:
            state = int(State[args.state.upper()])
        except KeyError:
            raise ConfigError(f"unknown state {args.state!r}") from None

    async def fn(client: Any) -> int:
        tasks = await client.list_all_tasks(queue=args.queue, state=state)
        for t in tasks:
            print(_task_line(t))
        print(f"{len(tasks)} task(s)", file=sys.stderr)
        return 0

    return _run_client(args, fn)


def _ms(unix_ms: int) -> str:
    """A UTC timestamp with milliseconds, for timelines."""
    secs, ms = divmod(unix_ms, 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def _cmd_task_show(args: argparse.Namespace) -> int:
    from tether.crypto.envelopes import from_proto
    from tether.crypto.leases import decode_lease
    from tether.crypto.receipts import parse_receipt

    async def fn(client: Any) -> int:
        resp = await client.get_task(args.task_id)
        t = resp.task
        print(_task_line(t))
        if t.error:
            print(f"error: {t.error}")
        if t.result:
            print(f"result: {t.result.decode(errors='replace')}")
        print(f"leases ({len(resp.leases)}):")
        for rec in resp.leases:
            lease = decode_lease(from_proto(rec.lease).payload)
            print(
                f"  token {lease.fencing_token} attempt {lease.attempt} node {lease.node_id}"
                f" agent {lease.agent_id} expires {_ms(lease.expires_unix_ms)}  {rec.outcome}"
            )
        bundle = await client.export_bundle([args.task_id])
        receipts = []
        for entry in bundle.entries:
            _, receipt = parse_receipt(bytes(entry.envelope))
            if receipt.task_id == args.task_id:
                receipts.append(receipt)
        print(f"receipts ({len(receipts)}; `tether receipts export --task` to verify them):")
        for r in sorted(receipts, key=lambda r: (r.time_unix_ms, r.node_id, r.seq)):
            what = " ".join(
                x for x in (r.tool, r.status, r.reason, r.artifact_name, r.memory_key) if x
            )
            print(
                f"  {_ms(r.time_unix_ms)}  {r.node_id}#{r.seq:<5} token {r.fencing_token:<4}"
                f" {r.kind.name.lower():<14} {what}"
            )
        return 0

    return _run_client(args, fn)


def _cmd_secrets_init_kek(args: argparse.Namespace) -> int:
    from tether.control.vault import init_kek_file

    kek_id = init_kek_file(args.file)
    print(f"wrote {args.file} (mode 0600); active KEK {kek_id}")
    return 0


def _read_secret_value(args: argparse.Namespace) -> bytes:
    """The value from --from-file or stdin; never from argv, never echoed."""
    if args.from_file:
        try:
            value = Path(args.from_file).read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read {args.from_file}: {err.strerror}") from None
    elif sys.stdin.isatty():
        import getpass

        value = getpass.getpass(f"value of secret {args.name} (not echoed): ").encode()
    else:
        value = sys.stdin.buffer.read()
    if not args.keep_newline:
        if value.endswith(b"\r\n"):
            value = value[:-2]
        elif value.endswith(b"\n"):
            value = value[:-1]
    if not value:
        raise ConfigError("the secret value is empty")
    return value


def _cmd_secrets_put(args: argparse.Namespace) -> int:
    value = _read_secret_value(args)

    async def fn(client: Any) -> int:
        version = await client.put_secret(args.name, value)
        print(f"secret {args.name} stored as version {version} (sealed; write-only)")
        return 0

    return _run_client(args, fn)


def _cmd_secrets_rotate_kek(args: argparse.Namespace) -> int:
    from tether.control.vault import rotate_kek
    from tether.crypto.sealing import load_keks
    from tether.store import is_postgres_url, store_from_url

    load_keks(args.kek_file)  # refuse a missing/too-open file before touching anything
    if not is_postgres_url(args.db) and not Path(args.db).exists():
        raise ConfigError(f"database {args.db} does not exist")

    async def go() -> tuple[str, int]:
        store = store_from_url(args.db)
        await store.open()
        try:
            return await rotate_kek(args.kek_file, store)
        finally:
            await store.close()

    kek_id, count = asyncio.run(go())
    print(f"active KEK is now {kek_id}; re-wrapped {count} secret version(s)")
    return 0


def _cmd_policy_apply(args: argparse.Namespace) -> int:
    from tether.core.policy import load_policy

    policy = load_policy(args.file)  # ConfigError names the key and line -> exit 2

    async def fn(client: Any) -> int:
        resp = await client.put_policy(policy.text)
        print(f"policy version {resp.version} in force (sha256 {resp.digest})")
        return 0

    return _run_client(args, fn)


def _cmd_policy_show(args: argparse.Namespace) -> int:
    if args.version < 0:
        raise ConfigError("--version must not be negative")

    async def fn(client: Any) -> int:
        resp = await client.get_policy(args.version)
        sys.stdout.write(resp.document if resp.document.endswith("\n") else resp.document + "\n")
        print(f"policy version {resp.version} (sha256 {resp.digest})", file=sys.stderr)
        return 0

    return _run_client(args, fn)

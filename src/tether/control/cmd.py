"""CLI: `tether control`, `tether keys init`, `tether operators`, `tether nodes`,
`tether secrets`, `tether policy` and the other operator commands.

Operator commands dial the control plane over mTLS with an operator
certificate: --control / --tls-ca / --tls-cert / --tls-key, or the
environment variables TETHER_CONTROL, TETHER_TLS_CA, TETHER_TLS_CERT and
TETHER_TLS_KEY (in the manner of VAULT_ADDR / VAULT_CACERT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tether import runtime
from tether.control.leader import DEFAULT_LEADER_TTL_MS
from tether.control.policy_sync import DEFAULT_POLICY_MAX_STALENESS_MS
from tether.core.errors import (
    ConfigError,
    Forbidden,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)
from tether.core.states import State
from tether.crypto.pki import (
    DEFAULT_TRUST_DOMAIN,
    CertificateAuthority,
    Role,
    TrustBundle,
    cert_pem,
    generate_tls_key,
    key_pem,
    load_certificate,
    trust_domain_of,
    write_private,
    write_public,
)
from tether.crypto.signing import SigningKey, VerifyKey
from tether.grpcutil.limits import CONTROL_LIMITS, add_limit_arguments, limit_values
from tether.grpcutil.tls import ENV_CA, ENV_CERT, ENV_CONTROL, ENV_KEY, client_tls_from_env
from tether.store.postgres_settings import PostgresSettings, warn_password_in_url
from tether.v1 import control_pb2 as pb

log = logging.getLogger("tether.control.cmd")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds control, keys, submit, tasks and task subcommands."""
    p = sub.add_parser("control", help="run the control plane")
    p.add_argument(
        "--db",
        required=True,
        help="SQLite database file, or postgresql://user@host:port/dbname (several replicas; "
        "give the password by PGPASSWORD or ~/.pgpass, never in the URL: it shows in ps)",
    )
    p.add_argument("--listen", default="127.0.0.1:7400", help="host:port (port 0 ok) or unix:/path")
    p.add_argument("--key", required=True, help="control-plane Ed25519 private key (PEM, 0600)")
    p.add_argument(
        "--enroll-listen",
        help="where nodes without a certificate enrol (TLS, no client certificate); "
        "default: the --listen host and port + 1",
    )
    p.add_argument(
        "--ca-cert",
        help="the trust domain's CA certificate, which issues node certificates "
        "(default: ca.crt beside --key)",
    )
    p.add_argument("--ca-key", help="the CA's private key (default: ca.key beside --key)")
    p.add_argument(
        "--tls-cert", help="server certificate chain (PEM; default: server.crt beside --key)"
    )
    p.add_argument("--tls-key", help="server TLS key (PEM; default: server.key beside --key)")
    p.add_argument(
        "--client-ca",
        help="CA bundle client certificates must chain to (default: the --ca-cert); "
        "several CAs allow a CA rotation",
    )
    p.add_argument(
        "--node-cert-ttl-s",
        type=int,
        default=3600,
        help="lifetime of node client certificates, seconds (default 3600; nodes renew "
        "at two thirds)",
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="DEVELOPMENT ONLY: serve without TLS or authentication (anyone reaching the "
        "port is admin and any node; sidecars cannot enrol)",
    )
    p.add_argument(
        "--allow-node-key",
        action="append",
        default=[],
        metavar="NODE_GLOB=PUBKEY_PEM_FILE",
        help="a node public key that may enrol, without a join token but still proving "
        "possession of its private key, node ids matching NODE_GLOB (e.g. "
        "'research-agent-*=node.pub'); repeatable. Revoking a node revokes its key",
    )
    p.add_argument(
        "--log-origin",
        default="",
        help="the receipt ledger's checkpoint origin, its log identity in C2SP notes "
        "(default: TRUST_DOMAIN/ledger); `tether keys vkey` prints the matching verifier key",
    )
    p.add_argument(
        "--sqlite-synchronous",
        choices=["full", "normal"],
        default="full",
        help="SQLite durability (default full: every acknowledged write survives power loss, "
        "with group commit). normal skips the fsync per commit: a process crash loses "
        "nothing, but power loss or an OS crash may roll back the last acknowledged lease "
        "grants, tool-call records, budget reservations and ledger appends",
    )
    p.add_argument(
        "--kek-file",
        help="key-encryption keys of the credential vault (from `tether secrets init-kek`, "
        "mode 0600); re-read when it changes, so `secrets rotate-kek` needs no restart. "
        "Without it the vault is off",
    )
    pg = PostgresSettings()
    p.add_argument(
        "--db-pool-min", type=int, default=pg.pool_min, help="PostgreSQL connections kept open"
    )
    p.add_argument(
        "--db-pool-max",
        type=int,
        default=pg.pool_max,
        help=f"most PostgreSQL connections of this replica (default {pg.pool_max})",
    )
    p.add_argument(
        "--db-connect-timeout-s",
        type=int,
        default=pg.connect_timeout_s,
        help="PostgreSQL: longest wait to connect or for a free pooled connection",
    )
    p.add_argument(
        "--db-statement-timeout-ms",
        type=int,
        default=pg.statement_timeout_ms,
        help="PostgreSQL statement_timeout: a longer statement is canceled (UNAVAILABLE)",
    )
    p.add_argument(
        "--db-lock-timeout-ms",
        type=int,
        default=pg.lock_timeout_ms,
        help="PostgreSQL lock_timeout: longest wait for a row or the ledger's lock",
    )
    p.add_argument(
        "--db-idle-in-transaction-timeout-ms",
        type=int,
        default=pg.idle_in_transaction_timeout_ms,
        help="PostgreSQL idle_in_transaction_session_timeout: a replica paused inside a "
        "transaction loses its session (and locks) after this long; the bound on how long "
        "it can stall the other replicas",
    )
    p.add_argument(
        "--policy-max-staleness-ms",
        type=int,
        default=DEFAULT_POLICY_MAX_STALENESS_MS,
        help="with replicas: a lease is never granted under a view of the policy older than "
        "this (a new version is normally seen at once, by LISTEN/NOTIFY)",
    )
    p.add_argument(
        "--node-check-cache-ms",
        type=int,
        default=1_000,  # ControlConfig.node_check_cache_ms
        help="how long a replica reuses an active node's record between its calls (0..1000; "
        "0 reads the database on every call): the most a revocation or re-key made through "
        "another replica can take to be refused here",
    )
    p.add_argument(
        "--leader-ttl-ms",
        type=int,
        default=DEFAULT_LEADER_TTL_MS,
        help="term of the replica leading a singleton job (sweeper, checkpoint signer); a "
        "dead or paused leader is replaced within about this long",
    )
    p.add_argument(
        "--replica-id",
        default="",
        help="this replica's name in leader elections (default host:pid:random)",
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
    p.add_argument(
        "--console-listen",
        metavar="HOST:PORT",
        help="serve the operator console on https://HOST:PORT/ (TLS; operators sign in with "
        "the client certificate from `tether operators add`; default: off; docs/console.md)",
    )
    add_limit_arguments(p, CONTROL_LIMITS, "node or operator")
    p.set_defaults(func=_cmd_control)

    k = sub.add_parser("keys", help="create the trust domain's keys and certificates")
    ksub = k.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    ki = ksub.add_parser(
        "init",
        help="create a trust domain (control key, CA, server certificate, admin "
        "credential, trust bundle), or with --name a node's Ed25519 key pair",
        description="Without --name (or with --name control): writes control.key/.pub "
        "(signs leases and checkpoints), ca.crt/ca.key (the CA that issues node and operator "
        "certificates), server.crt/server.key (for the --san names), admin.crt/admin.key "
        "(an admin operator credential) and trust.pem (CA certificate + control public key: "
        "what sidecars and auditors pin). With another --name: only NAME.key/NAME.pub.",
    )
    ki.add_argument("--dir", required=True, help="directory for the files")
    ki.add_argument("--name", default="control", help="file name stem (default control)")
    ki.add_argument(
        "--san",
        action="append",
        default=[],
        help="host name or IP address of the control plane's certificate (repeatable; "
        "default localhost and 127.0.0.1)",
    )
    ki.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain name")
    ki.set_defaults(func=_cmd_keys_init)
    kv = ksub.add_parser(
        "vkey",
        help="print the C2SP verifier key of the ledger's checkpoints (for note/witness tools)",
        description="Prints NAME+HASH+KEY, the verifier key with which any C2SP signed-note "
        "reader (Go's sumdb/note, witnesses) checks the ledger's checkpoints.",
    )
    kv.add_argument("--key", required=True, help="control public key (PEM) or trust.pem")
    kv.add_argument(
        "--origin",
        help="the log origin the control plane runs with (default: the CA's TRUST_DOMAIN/"
        "ledger when --key is a trust.pem, else required)",
    )
    kv.set_defaults(func=_cmd_keys_vkey)

    def operator(parser: argparse.ArgumentParser) -> None:
        add_client_args(parser)

    op = sub.add_parser("operators", help="issue operator credentials")
    opsub = op.add_subparsers(dest="operators_command", metavar="SUBCOMMAND", required=True)
    oa = opsub.add_parser(
        "add",
        help="issue an operator client certificate with a role (offline, with the CA key)",
        description="Roles: admin (policy, secrets, nodes, and everything below), "
        "submitter (submit, cancel, get tasks), auditor (list and get tasks without "
        "payloads, export receipts, checkpoints, nodes).",
    )
    oa.add_argument("name", help="operator name, [A-Za-z0-9._-]{1,128}")
    oa.add_argument("--role", required=True, choices=[r.value for r in Role], help="what it may do")
    oa.add_argument("--dir", required=True, help="the directory holding ca.crt and ca.key")
    oa.add_argument("--out", help="where to write NAME.crt and NAME.key (default: --dir)")
    oa.add_argument("--ttl-days", type=int, default=30, help="lifetime (default 30 days)")
    oa.set_defaults(func=_cmd_operators_add)

    nd = sub.add_parser("nodes", help="enrol, re-key, revoke and list nodes")
    nsub = nd.add_subparsers(dest="nodes_command", metavar="SUBCOMMAND", required=True)
    ntok = nsub.add_parser("token", help="join tokens")
    ntsub = ntok.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    ntc = ntsub.add_parser(
        "create", help="a single-use, expiring join token for one node id (admin)"
    )
    ntc.add_argument("--node", required=True, help="node id the token is bound to")
    ntc.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d (default 1h)")
    ntc.add_argument("--out", help="write the token to this file (mode 0600) instead of stdout")
    operator(ntc)
    ntc.set_defaults(func=_cmd_nodes_token_create)
    nrk = nsub.add_parser(
        "rekey", help="a join token with which an enrolled node id enrols a new key (admin)"
    )
    nrk.add_argument("node", help="node id")
    nrk.add_argument("--ttl", default="1h", help="lifetime of the join token (default 1h)")
    nrk.add_argument("--out", help="write the token to this file (mode 0600)")
    operator(nrk)
    nrk.set_defaults(func=_cmd_nodes_rekey)
    nrv = nsub.add_parser("revoke", help="revoke a node on every replica (admin)")
    nrv.add_argument("node", help="node id")
    nrv.add_argument("--reason", default="", help="why (recorded)")
    operator(nrv)
    nrv.set_defaults(func=_cmd_nodes_revoke)
    nls = nsub.add_parser("list", help="enrolled nodes, their keys and status")
    operator(nls)
    add_output_arg(nls)
    nls.set_defaults(func=_cmd_nodes_list)

    s = sub.add_parser(
        "submit",
        help="submit a task",
        description="Adds a task to a queue and prints its id. The payload is JSON, given "
        "inline (--payload) or read from a file or stdin (--payload-file FILE, or - for "
        "stdin: no command-line length limit; at most 1 MiB).",
    )
    operator(s)
    s.add_argument("--queue", required=True, help="queue name, as the policy declares it")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--payload", help="the JSON payload, inline")
    what.add_argument(
        "--payload-file", metavar="FILE", help="read the JSON payload from FILE (- for stdin)"
    )
    s.add_argument(
        "--key",
        default="",
        help="idempotency key: submitting again with the same key returns the same task",
    )
    s.add_argument(
        "--max-attempts",
        type=int_in(0, 100),
        default=0,
        metavar="N",
        help="attempts allowed, 1..100 (default 0: the queue's default, 3 without one)",
    )
    s.add_argument(
        "--heartbeat-timeout-ms",
        type=int_in(0, 2**32 - 1),
        default=0,
        help="the lease TTL: a lease not renewed this often lapses (0: queue's)",
    )
    s.add_argument(
        "--attempt-timeout-ms",
        type=int_in(0, 2**32 - 1),
        default=0,
        help="start-to-close per attempt (0: queue's)",
    )
    s.add_argument(
        "--deadline-ms",
        type=int_in(0, 2**32 - 1),
        default=0,
        help="schedule-to-close: the task ends expired this long after submission (0: queue's)",
    )
    s.add_argument(
        "--schedule-to-start-timeout-ms",
        type=int_in(0, 2**32 - 1),
        default=0,
        help="how long the task may wait ready for a lease (0: queue's)",
    )
    s.add_argument(
        "--retry-initial-ms", type=int_in(0, 2**32 - 1), default=0, help="first retry delay"
    )
    s.add_argument("--retry-coefficient", type=float, default=0.0, help="delay growth (>= 1)")
    s.add_argument(
        "--retry-max-interval-ms", type=int_in(0, 2**32 - 1), default=0, help="longest retry delay"
    )
    s.add_argument(
        "--non-retryable",
        action="append",
        default=[],
        metavar="TYPE",
        help="a failure type never retried (repeatable)",
    )
    s.add_argument(
        "--retry-failures",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="retry failures the agent reports (default: the queue's setting)",
    )
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
    sl = ssub.add_parser(
        "list",
        help="stored secrets: names, versions and KEKs (never a value; admin, auditor)",
        description="One line per secret: its latest version, how many versions are "
        "stored, the KEK its latest version is sealed under, and when it was stored. "
        "Values cannot be read back by anyone.",
    )
    operator(sl)
    add_output_arg(sl)
    sl.set_defaults(func=_cmd_secrets_list)

    pol = sub.add_parser("policy", help="validate, compare, apply or show the policy")
    psub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    pa = psub.add_parser(
        "apply", help="check a policy file and store it as the new version in force"
    )
    pa.add_argument("file", help="policy TOML file")
    operator(pa)
    pa.set_defaults(func=_cmd_policy_apply)
    ps = psub.add_parser("show", help="print the policy in force (or a version)")
    operator(ps)
    ps.add_argument(
        "--version", type=int_in(0, 2**63 - 1), default=0, help="version (default: in force)"
    )
    add_output_arg(ps, table="the TOML document")
    ps.set_defaults(func=_cmd_policy_show)
    pv = psub.add_parser(
        "validate",
        help="check a policy file offline (no control plane needed)",
        description="Loads FILE as the control plane would. Exit 0 valid (a summary and its "
        "sha256 on stdout), 1 invalid (the problem, naming the key and line), 2 unreadable.",
    )
    pv.add_argument("file", help="policy TOML file")
    pv.set_defaults(func=_cmd_policy_validate)
    pd = psub.add_parser(
        "diff",
        help="show how a policy file differs from the policy in force",
        description="A unified diff from the policy in force (or --version) to FILE, which "
        "is validated first. Exit 0 when they are the same, 1 when they differ (as diff(1)).",
    )
    pd.add_argument("file", help="policy TOML file")
    operator(pd)
    pd.add_argument(
        "--version",
        type=int_in(0, 2**63 - 1),
        default=0,
        help="compare with this version (default: the one in force)",
    )
    pd.set_defaults(func=_cmd_policy_diff)

    t = sub.add_parser("tasks", help="list tasks")
    operator(t)
    t.add_argument("--queue", default="", help="only this queue (default: every queue)")
    t.add_argument(
        "--state",
        default="",
        help="only tasks in this state: " + ", ".join(s.name.lower() for s in State),
    )
    add_output_arg(t)
    t.set_defaults(func=_cmd_tasks)

    ts = sub.add_parser("task", help="inspect or cancel one task")
    tsub = ts.add_subparsers(dest="task_command", metavar="SUBCOMMAND", required=True)
    show = tsub.add_parser("show", help="state, attempts, leases and receipts of one task")
    show.add_argument("task_id", help="the task id (from `tether submit` or `tether tasks`)")
    operator(show)
    add_output_arg(show)
    show.set_defaults(func=_cmd_task_show)
    cancel = tsub.add_parser(
        "cancel",
        help="cancel a task; a running agent is stopped within one renewal interval",
        description="Ends the task as canceled, recording --reason; its lease is fenced, so "
        "its holder's next call under it is refused.",
    )
    cancel.add_argument("task_id", help="the task id")
    cancel.add_argument("--reason", default="", help="why (recorded on the task)")
    operator(cancel)
    add_output_arg(cancel)
    cancel.set_defaults(func=_cmd_task_cancel)


def _cmd_keys_init(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--dir {d} exists and is not a directory")
    if not _NAME_RE.fullmatch(args.name) or args.name in (".", ".."):
        raise ConfigError(f"--name {args.name!r} must match [A-Za-z0-9._-]{{1,64}}")
    priv, pub = d / f"{args.name}.key", d / f"{args.name}.pub"
    full = args.name == "control"
    files = [priv, pub]
    if full:
        files += [
            d / n
            for n in (
                "ca.crt",
                "ca.key",
                "server.crt",
                "server.key",
                "admin.crt",
                "admin.key",
                "trust.pem",
            )
        ]
    for path in files:
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a key")
    key = SigningKey.generate()
    key.save(priv, pub)
    print(f"wrote {priv} (mode 0600) and {pub}; keyid {key.keyid}")
    if not full:
        return 0
    ca = CertificateAuthority.create(args.trust_domain)
    write_private(d / "ca.key", key_pem(ca.key))
    write_public(d / "ca.crt", cert_pem(ca.cert))
    server_key = generate_tls_key()
    server = ca.issue_server(server_key.public_key(), args.san or ["localhost", "127.0.0.1"])
    write_private(d / "server.key", key_pem(server_key))
    write_public(d / "server.crt", cert_pem(server))
    admin_key = generate_tls_key()
    admin = ca.issue_operator("admin", Role.ADMIN, admin_key.public_key())
    write_private(d / "admin.key", key_pem(admin_key))
    write_public(d / "admin.crt", cert_pem(admin))
    write_public(d / "trust.pem", TrustBundle((ca.cert,), (key.public,)).to_pem())
    print(
        f"trust domain {args.trust_domain}: wrote {d}/ca.crt, ca.key (0600), server.crt, "
        f"server.key (0600) for {', '.join(args.san or ['localhost', '127.0.0.1'])}, "
        f"admin.crt, admin.key (0600) and trust.pem (give it to sidecars and auditors)"
    )
    return 0


def _cmd_keys_vkey(args: argparse.Namespace) -> int:
    from tether.crypto.note import verifier_key

    bundle = TrustBundle.load(Path(args.key), need_ca=False)
    origin = args.origin
    if not origin:
        if not bundle.ca_certs:
            raise ConfigError("--origin is required when --key holds no CA certificate")
        origin = f"{trust_domain_of(bundle.ca_certs[0])}/ledger"
    for key in bundle.control_keys:
        print(verifier_key(origin, key))
    return 0


def _cmd_operators_add(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    out = Path(args.out) if args.out else d
    if args.ttl_days <= 0 or args.ttl_days > 3650:
        raise ConfigError("--ttl-days must be between 1 and 3650")
    ca_cert = load_certificate(d / "ca.crt")
    ca = CertificateAuthority.load(d / "ca.crt", d / "ca.key", trust_domain_of(ca_cert))
    for path in (out / f"{args.name}.crt", out / f"{args.name}.key"):
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a credential")
    tls_key = generate_tls_key()
    cert = ca.issue_operator(
        args.name, Role(args.role), tls_key.public_key(), args.ttl_days * 86_400_000
    )
    write_private(out / f"{args.name}.key", key_pem(tls_key))
    write_public(out / f"{args.name}.crt", cert_pem(cert))
    print(
        f"wrote {out}/{args.name}.crt and {args.name}.key (0600): role {args.role}, "
        f"valid {args.ttl_days} days; use them with --tls-cert/--tls-key (or "
        "TETHER_TLS_CERT/TETHER_TLS_KEY) and --tls-ca trust.pem"
    )
    return 0


_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d)")


def parse_duration_ms(text: str) -> int:
    """Milliseconds of "90s", "30m", "1h", "2d" or "500ms".

    Raises:
        ConfigError: not such a duration.
    """
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"duration {text!r} must look like 90s, 30m, 1h or 2d")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[m.group(2)]
    return int(m.group(1)) * scale


def _emit_token(token: str, out: str | None, what: str, expires_ms: int) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_ms / 1000))
    if out:
        write_private(Path(out), (token + "\n").encode())
        print(f"wrote {what} to {out} (mode 0600); single use, expires {when}", file=sys.stderr)
    else:
        print(token)
        print(f"{what}: single use, expires {when}", file=sys.stderr)


def _cmd_nodes_token_create(args: argparse.Namespace) -> int:
    ttl = parse_duration_ms(args.ttl)

    async def fn(client: Any) -> int:
        resp = await client.create_join_token(args.node, ttl)
        _emit_token(resp.token, args.out, f"join token for node {args.node}", resp.expires_unix_ms)
        return 0

    return _run_client(args, fn)


def _cmd_nodes_rekey(args: argparse.Namespace) -> int:
    ttl = parse_duration_ms(args.ttl)

    async def fn(client: Any) -> int:
        resp = await client.rekey_node(args.node, ttl)
        _emit_token(
            resp.token, args.out, f"re-key join token for node {args.node}", resp.expires_unix_ms
        )
        return 0

    return _run_client(args, fn)


def _cmd_nodes_revoke(args: argparse.Namespace) -> int:
    async def fn(client: Any) -> int:
        node = await client.revoke_node(args.node, args.reason)
        print(f"node {node.node_id} revoked ({node.status_reason})")
        return 0

    return _run_client(args, fn)


def _cmd_nodes_list(args: argparse.Namespace) -> int:
    async def fn(client: Any) -> int:
        nodes = await client.list_nodes()
        if args.output == "json":
            print_json([message_doc(n) for n in nodes])
            return 0
        for n in nodes:
            print(
                f"{n.node_id:<24} {n.status:<8} key {n.keyid[:16]}  enrolled "
                f"{_ms(n.registered_unix_ms)}"
                + (f"  ({n.status_reason})" if n.status_reason else "")
            )
        if not nodes:
            print("no nodes enrolled", file=sys.stderr)
        return 0

    return _run_client(args, fn)


def _allowed_key(item: str) -> tuple[str, bytes]:
    glob, sep, path = item.partition("=")
    if not sep or not glob or not path:
        raise ConfigError(
            f"--allow-node-key {item!r} must be NODE_GLOB=PUBKEY_PEM_FILE, e.g. "
            "'research-agent-*=node.pub' (a key is allow-listed for node ids, not for any id)"
        )
    return glob, VerifyKey.load(Path(path)).raw


def _beside(key: str, given: str | None, name: str) -> Path:
    return Path(given) if given else Path(key).parent / name


def _cmd_control(args: argparse.Namespace) -> int:
    from tether.control.server import serve_forever, start_server
    from tether.control.service import Auth, ControlConfig
    from tether.grpcutil.tls import ServerTLS
    from tether.store import is_postgres_url

    key = SigningKey.load(Path(args.key))
    postgres = PostgresSettings(
        pool_min=args.db_pool_min,
        pool_max=args.db_pool_max,
        connect_timeout_s=args.db_connect_timeout_s,
        statement_timeout_ms=args.db_statement_timeout_ms,
        lock_timeout_ms=args.db_lock_timeout_ms,
        idle_in_transaction_timeout_ms=args.db_idle_in_transaction_timeout_ms,
    )
    if is_postgres_url(args.db):
        warn_password_in_url(args.db)
    if args.policy_max_staleness_ms < 50:
        raise ConfigError("--policy-max-staleness-ms must be at least 50")
    if args.leader_ttl_ms < 300:
        raise ConfigError("--leader-ttl-ms must be at least 300")
    if args.sweep_interval_ms <= 0:
        raise ConfigError("--sweep-interval-ms must be positive")
    if args.checkpoint_interval_ms <= 0:
        raise ConfigError("--checkpoint-interval-ms must be positive")
    if not 60 <= args.node_cert_ttl_s <= 30 * 86_400:
        raise ConfigError("--node-cert-ttl-s must be between 60 and 2592000")
    allowed = tuple(_allowed_key(item) for item in args.allow_node_key)
    limits = CONTROL_LIMITS.replace(limit_values(args))
    tls = None
    if args.insecure_plaintext:
        auth = Auth(allowed_node_keys=allowed, insecure=True)
    else:
        ca_cert = _beside(args.key, args.ca_cert, "ca.crt")
        ca_key = _beside(args.key, args.ca_key, "ca.key")
        if not ca_cert.exists() or not ca_key.exists():
            raise ConfigError(
                f"no CA at {ca_cert} / {ca_key}: run `tether keys init --dir "
                f"{Path(args.key).parent}` (or give --ca-cert/--ca-key); --insecure-plaintext "
                "serves without TLS for local development only"
            )
        ca = CertificateAuthority.load(ca_cert, ca_key, trust_domain_of(load_certificate(ca_cert)))
        tls = ServerTLS.load(
            _beside(args.key, args.tls_cert, "server.crt"),
            _beside(args.key, args.tls_key, "server.key"),
            Path(args.client_ca) if args.client_ca else ca_cert,
        )
        auth = Auth(
            ca=ca,
            trust_domain=ca.trust_domain,
            allowed_node_keys=allowed,
            node_cert_ttl_ms=args.node_cert_ttl_s * 1000,
        )
    enroll_listen = args.enroll_listen
    if enroll_listen is None and tls is not None and not args.listen.startswith("unix:"):
        host, _, port = args.listen.rpartition(":")
        if port.isdigit() and int(port) != 0:
            enroll_listen = f"{host}:{int(port) + 1}"

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
            tls=tls,
            enroll_listen=enroll_listen,
            sqlite_synchronous=args.sqlite_synchronous.upper(),
            config=ControlConfig(
                log_origin=args.log_origin,
                policy_max_staleness_ms=args.policy_max_staleness_ms,
                leader_ttl_ms=args.leader_ttl_ms,
                replica_id=args.replica_id,
                node_check_cache_ms=args.node_check_cache_ms,
            ),
            postgres=postgres,
            limits=limits,
            console_listen=args.console_listen,
        )
        if running.console_url:
            print(f"console: {running.console_url}", file=sys.stderr, flush=True)
        await serve_forever(running, Path(args.ready_file) if args.ready_file else None)

    runtime.run(run())
    return 0


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """--control and the operator's TLS credential (each with its TETHER_* variable)."""
    parser.add_argument(
        "--control",
        default=os.environ.get(ENV_CONTROL),
        help=f"control plane address (env {ENV_CONTROL}); several replicas comma-separated: "
        "the first healthy one is used",
    )
    parser.add_argument("--tls-ca", help=f"trust bundle or CA certificate (env {ENV_CA})")
    parser.add_argument(
        "--tls-cert", help=f"operator certificate from `tether operators add` (env {ENV_CERT})"
    )
    parser.add_argument("--tls-key", help=f"operator key (env {ENV_KEY})")
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="dial without TLS (only a control plane started with --insecure-plaintext)",
    )


def client_from_args(args: argparse.Namespace) -> Any:
    """A ControlClient for an operator command.

    Raises:
        ConfigError: no address, or no TLS material and no explicit plaintext opt-out.
    """
    from tether.control.client import ControlClient
    from tether.control.server import grpc_target

    if not args.control:
        raise ConfigError(f"no control plane address: give --control or set {ENV_CONTROL}")
    # Several replicas: "a:7400,b:7400" (the client uses the first healthy one).
    targets = [a.strip() for a in args.control.split(",") if a.strip()]
    target = ",".join(grpc_target(a, what="--control") for a in targets)
    if args.insecure_plaintext:
        return ControlClient(target, tls=None)
    tls = client_tls_from_env(args.tls_ca, args.tls_cert, args.tls_key)
    if tls is None:
        raise ConfigError(
            f"no TLS credentials: give --tls-ca/--tls-cert/--tls-key (or {ENV_CA}, {ENV_CERT}, "
            f"{ENV_KEY}); the control plane serves mTLS only"
        )
    if tls is not None and tls.cert_pem is None:
        raise ConfigError(
            f"no operator certificate: give --tls-cert/--tls-key (or {ENV_CERT}/{ENV_KEY}) "
            "from `tether operators add`"
        )
    return ControlClient(target, tls=tls)


def _run_client(args: argparse.Namespace, fn: Any) -> int:
    """Runs `fn(client)`; a refusal or an unreachable control plane says what to check."""

    async def go() -> int:
        async with client_from_args(args) as client:
            return int(await fn(client))

    with explain_client_errors(args):
        return asyncio.run(go())


@contextlib.contextmanager
def explain_client_errors(args: argparse.Namespace) -> Iterator[None]:
    """Adds to an operator command's error what to check: address, CA, credential, role."""
    try:
        yield
    except Unavailable as err:
        raise Unavailable(
            f"cannot reach the control plane at {args.control}: {_first_line(err.message)} "
            f"(is it running, and are --control/{ENV_CONTROL} and --tls-ca/{ENV_CA} right?)"
        ) from err
    except Unauthenticated as err:
        raise Unauthenticated(
            f"the control plane did not accept your credential: {_first_line(err.message)} "
            f"(give an operator certificate from `tether operators add` with --tls-cert/"
            f"--tls-key or {ENV_CERT}/{ENV_KEY})"
        ) from err
    except Forbidden as err:
        raise Forbidden(
            f"{_first_line(err.message)} (your operator certificate's role may not do this; "
            "roles: admin, submitter, auditor, see `tether operators add --help`)"
        ) from err


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


OUTPUT_FORMATS = ("table", "json")


def add_output_arg(parser: argparse.ArgumentParser, table: str = "aligned text") -> None:
    """-o/--output table|json: text for people, or one JSON document on stdout for scripts."""
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default="table",
        help=f"table (default: {table}) or json (one JSON document on stdout; messages "
        "in the proto3 JSON form of control.proto)",
    )


def print_json(doc: Any) -> None:
    """Writes `doc` as indented JSON and a newline to stdout."""
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def message_doc(message: Any) -> dict[str, Any]:
    """A protobuf message in proto3 JSON form, field names as in the .proto file."""
    from google.protobuf import json_format

    doc: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return doc


def int_in(low: int, high: int) -> Any:
    """An argparse type: an integer in low..high, refused with the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _task_line(t: pb.Task) -> str:
    state = State(t.state).name.lower() if t.state else "?"
    return (
        f"{t.task_id}  {t.queue:<16} {state:<10} attempt {t.attempt}/{t.max_attempts}"
        f"  token {t.fencing_token}"
    )


MAX_PAYLOAD_BYTES = 1024 * 1024


def read_payload(args: argparse.Namespace) -> bytes:
    """The payload from --payload, --payload-file FILE or --payload-file - (stdin), checked.

    Raises:
        InvalidArgument: not JSON, or over 1 MiB (names the flag).
        ConfigError: the file cannot be read.
    """
    if args.payload is not None:
        flag, data = "--payload", args.payload.encode()
    else:
        flag = "--payload-file"
        source = args.payload_file
        try:
            if source == "-":
                data = sys.stdin.buffer.read(MAX_PAYLOAD_BYTES + 1)
            else:
                with open(source, "rb") as f:
                    data = f.read(MAX_PAYLOAD_BYTES + 1)
        except OSError as err:
            raise ConfigError(f"--payload-file: cannot read {source}: {err.strerror}") from err
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(flag, f"the payload is over {MAX_PAYLOAD_BYTES} bytes (1 MiB)")
    try:
        json.loads(data)
    except ValueError as err:
        raise InvalidArgument(flag, f"not JSON: {err}") from err
    return bytes(data)


def _cmd_submit(args: argparse.Namespace) -> int:
    payload = read_payload(args)

    async def fn(client: Any) -> int:
        resp = await client.submit(
            args.queue,
            payload,
            idempotency_key=args.key,
            max_attempts=args.max_attempts,
            lease_ttl_ms=args.heartbeat_timeout_ms,
            attempt_timeout_ms=args.attempt_timeout_ms,
            deadline_ms=args.deadline_ms,
            schedule_to_start_timeout_ms=args.schedule_to_start_timeout_ms,
            retry_policy=pb.RetryPolicy(
                initial_interval_ms=args.retry_initial_ms,
                backoff_coefficient=args.retry_coefficient,
                maximum_interval_ms=args.retry_max_interval_ms,
                non_retryable_reasons=args.non_retryable,
                retry_failures=args.retry_failures,
            ),
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
            raise ConfigError(
                f"--state {args.state!r} is not a state; use one of "
                + ", ".join(s.name.lower() for s in State)
            ) from None

    async def fn(client: Any) -> int:
        tasks = await client.list_all_tasks(queue=args.queue, state=state)
        if args.output == "json":
            print_json([message_doc(t) for t in tasks])
            return 0
        for t in tasks:
            print(_task_line(t))
        print(f"{len(tasks)} task(s)", file=sys.stderr)
        return 0

    return _run_client(args, fn)


def _ms(unix_ms: int) -> str:
    """A UTC timestamp with milliseconds, for timelines."""
    secs, ms = divmod(unix_ms, 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def lease_summaries(records: Any) -> list[dict[str, Any]]:
    """One entry per lease (fencing token) from GetTask's history, renewals folded in.

    The history holds a row for the grant and one for each renewal, all under
    the lease's fencing token; a person (or a script) wants the lease: who held
    it, from when to its last expiry, how often it was renewed and how it ended.
    """
    from tether.crypto.envelopes import from_proto
    from tether.crypto.leases import decode_lease

    by_token: dict[int, dict[str, Any]] = {}
    for rec in records:
        lease = decode_lease(from_proto(rec.lease).payload)
        entry = by_token.get(lease.fencing_token)
        if entry is None:
            by_token[lease.fencing_token] = {
                "fencing_token": lease.fencing_token,
                "attempt": lease.attempt,
                "lease_id": lease.lease_id,
                "node_id": lease.node_id,
                "agent_id": lease.agent_id,
                "granted_unix_ms": lease.issued_unix_ms,
                "expires_unix_ms": lease.expires_unix_ms,
                "renewals": 0,
                "outcome": rec.outcome,
            }
            continue
        entry["renewals"] += 1
        entry["expires_unix_ms"] = max(entry["expires_unix_ms"], lease.expires_unix_ms)
        entry["outcome"] = rec.outcome  # the latest row says how the lease ended
    return [by_token[token] for token in sorted(by_token)]


def _receipt_doc(r: Any) -> dict[str, Any]:
    doc = {k: v for k, v in vars(r).items() if v not in ("", 0) or k in ("seq", "attempt")}
    doc["kind"] = r.kind.name.lower()
    if r.final_state:
        doc["final_state"] = State(r.final_state).name.lower()
    return doc


def _cmd_task_show(args: argparse.Namespace) -> int:
    from tether.crypto.receipts import parse_receipt

    async def fn(client: Any) -> int:
        resp = await client.get_task(args.task_id)
        t = resp.task
        leases = lease_summaries(resp.leases)
        bundle = await client.export_bundle([args.task_id])
        receipts = []
        for entry in bundle.entries:
            _, receipt = parse_receipt(bytes(entry.envelope))
            if receipt.task_id == args.task_id:
                receipts.append(receipt)
        receipts.sort(key=lambda r: (r.time_unix_ms, r.node_id, r.seq))
        if args.output == "json":
            print_json(
                {
                    "task": message_doc(t),
                    "leases": leases,
                    "receipts": [_receipt_doc(r) for r in receipts],
                }
            )
            return 0
        print(_task_line(t))
        for line in _limits_lines(t):
            print(line)
        if t.error:
            print(f"error: {t.error}")
        if t.result:
            print(f"result: {t.result.decode(errors='replace')}")
        print(f"leases ({len(leases)}):")
        for lease in leases:
            renewed = lease["renewals"]
            print(
                f"  token {lease['fencing_token']} attempt {lease['attempt']} node "
                f"{lease['node_id']} agent {lease['agent_id']} granted "
                f"{_ms(lease['granted_unix_ms'])}, last expiry {_ms(lease['expires_unix_ms'])}"
                f" ({renewed} renewal{'' if renewed == 1 else 's'})  {lease['outcome']}"
            )
        print(f"receipts ({len(receipts)}; `tether receipts export --task` to verify them):")
        for r in receipts:
            what = " ".join(
                x for x in (r.tool, r.status, r.reason, r.artifact_name, r.memory_key) if x
            )
            print(
                f"  {_ms(r.time_unix_ms)}  {r.node_id}#{r.seq:<5} token {r.fencing_token:<4}"
                f" {r.kind.name.lower():<14} {what}"
            )
        return 0

    return _run_client(args, fn)


def _limits_lines(t: pb.Task) -> list[str]:
    """The task's limits, its retry schedule and why it (or its last attempt) ended."""
    from tether.core.timeouts import RetryPolicy, end_reason_label

    limits = [f"heartbeat {t.lease_ttl_ms} ms"]
    if t.attempt_timeout_ms:
        limits.append(f"attempt {t.attempt_timeout_ms} ms")
    if t.schedule_to_start_timeout_ms:
        limits.append(f"schedule-to-start {t.schedule_to_start_timeout_ms} ms")
    if t.deadline_unix_ms:
        limits.append(f"deadline {_ms(t.deadline_unix_ms)}")
    lines = ["limits: " + ", ".join(limits)]
    r = t.retry_policy
    if r.initial_interval_ms:
        policy = RetryPolicy(
            initial_interval_ms=r.initial_interval_ms,
            backoff_coefficient=r.backoff_coefficient or 2.0,
            maximum_interval_ms=max(r.maximum_interval_ms, r.initial_interval_ms),
            maximum_attempts=max(t.max_attempts, 1),
        )
        delays = ", ".join(f"{d} ms" for d in policy.schedule_ms()) or "none (one attempt)"
        failures = "failures retried" if r.retry_failures else "failures final"
        never = f"; never retried: {', '.join(r.non_retryable_reasons)}"
        lines.append(
            f"retry: delays {delays}; {failures}{never if r.non_retryable_reasons else ''}"
        )
    label = end_reason_label(t.end_reason)
    if label:
        terminal = State(t.state).terminal if t.state else False
        lines.append(f"{'ended' if terminal else 'last attempt ended'}: {label}")
    return lines


def _cmd_task_cancel(args: argparse.Namespace) -> int:
    async def fn(client: Any) -> int:
        task = await client.cancel(args.task_id, args.reason)
        if args.output == "json":
            print_json(message_doc(task))
        else:
            print(f"{_task_line(task)}  ({args.reason or 'canceled by operator'})")
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

    def by_kek(versions: Any) -> Counter[str]:
        return Counter(v.kek_id for v in versions)

    async def go() -> tuple[str, int, Counter[str], Counter[str]]:
        store = store_from_url(args.db)
        await store.open()
        try:
            before = by_kek(await store.list_secret_versions())
            kek_id, count = await rotate_kek(args.kek_file, store)
            after = by_kek(await store.list_secret_versions())
            return kek_id, count, before, after
        finally:
            await store.close()

    kek_id, count, before, after = asyncio.run(go())
    keks, _ = load_keks(args.kek_file)
    print(f"active KEK is now {kek_id}; re-wrapped {count} secret version(s)")
    for kek in [*keks, *sorted(set(before) - set(keks))]:
        role = "active" if kek == kek_id else "old" if kek in keks else "NOT IN THE FILE"
        now = after.get(kek, 0)
        advice = ""
        if kek != kek_id and kek in keks:
            advice = (
                "; no secret is under it: it may be removed from the KEK file"
                if now == 0
                else "; still needed: run rotate-kek again"
            )
        print(f"  KEK {kek} ({role}): {before.get(kek, 0)} version(s) before, {now} now{advice}")
    return 0


def _cmd_secrets_list(args: argparse.Namespace) -> int:
    async def fn(client: Any) -> int:
        secrets = await client.list_secrets()
        if args.output == "json":
            print_json([message_doc(x) for x in secrets])
            return 0
        for x in secrets:
            print(
                f"{x.name:<32} version {x.latest_version:<4} ({x.versions} stored)  "
                f"KEK {x.kek_id}  updated {_ms(x.updated_unix_ms)}"
            )
        print(f"{len(secrets)} secret(s); values are write-only", file=sys.stderr)
        return 0

    return _run_client(args, fn)


def _cmd_policy_apply(args: argparse.Namespace) -> int:
    from tether.core.policy import load_policy

    policy = load_policy(args.file)  # ConfigError names the key and line -> exit 2

    async def fn(client: Any) -> int:
        resp = await client.put_policy(policy.text)
        print(f"policy version {resp.version} in force (sha256 {resp.digest})")
        return 0

    return _run_client(args, fn)


def _cmd_policy_show(args: argparse.Namespace) -> int:
    async def fn(client: Any) -> int:
        resp = await client.get_policy(args.version)
        if args.output == "json":
            print_json(message_doc(resp))
            return 0
        sys.stdout.write(resp.document if resp.document.endswith("\n") else resp.document + "\n")
        print(f"policy version {resp.version} (sha256 {resp.digest})", file=sys.stderr)
        return 0

    return _run_client(args, fn)


def _load_policy_file(path: str) -> Any:
    from tether.core.policy import load_policy

    if not Path(path).is_file():
        raise ConfigError(f"cannot read policy file {path}: no such file")
    return load_policy(path)


def _cmd_policy_validate(args: argparse.Namespace) -> int:
    try:
        policy = _load_policy_file(args.file)
    except ConfigError as err:
        if not Path(args.file).is_file():
            raise
        print(f"tether: {args.file}: INVALID: {err.message}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: valid: {len(policy.queues)} queue(s), {len(policy.tools)} tool(s), "
        f"{len(policy.credentials)} credential(s), {len(policy.agents)} agent(s); "
        f"sha256 {policy.digest}"
    )
    return 0


def _cmd_policy_diff(args: argparse.Namespace) -> int:
    import difflib

    policy = _load_policy_file(args.file)

    async def fn(client: Any) -> int:
        resp = await client.get_policy(args.version)
        if resp.digest == policy.digest:
            print(f"no difference: {args.file} is policy version {resp.version}", file=sys.stderr)
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                resp.document.splitlines(keepends=True),
                policy.text.splitlines(keepends=True),
                fromfile=f"policy version {resp.version} (sha256 {resp.digest[:12]})",
                tofile=args.file,
            )
        )
        return 1

    return _run_client(args, fn)

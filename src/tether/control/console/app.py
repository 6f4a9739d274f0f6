"""The operator console's pages: server-rendered HTML over the control plane's own service.

Every request is authorized from the verified client certificate by the one
authorization table (`tether.control.authz.RULES`), as the RPC whose data the
page shows. Pages read the running control plane's service, store and ledger
(no second connection pool), and do work only when a page is asked for: the
console adds nothing to the RPC paths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tether.control.authz import (
    Principal,
    authorize,
    check_unexpired,
    principal_from_pem,
    sees_payloads,
)
from tether.control.console.server import PEER_CERT
from tether.core.errors import NotFound, TetherError, VerificationError
from tether.core.receipts import ReceiptKind
from tether.core.states import State, state_name
from tether.crypto.certs import decode_cert, verify_cert
from tether.crypto.leases import decode_lease
from tether.crypto.note import verifier_key
from tether.crypto.receipts import parse_control_statement, parse_receipt
from tether.crypto.signing import Envelope, SigningKey
from tether.store.base import TaskRecord
from tether.verify import strictjson
from tether.verify.bundle import Bundle, Limits, encode_bundle
from tether.verify.verifier import Failure, Report, verify_bundle

if TYPE_CHECKING:
    from tether.control.server import RunningControl

HERE = Path(__file__).parent
PAGE_SIZE = 50
SCAN_LIMIT = 5000  # rows a filtered listing reads at most for one page
LIVE_INTERVAL_S = 1.0
MAX_UPLOAD_BYTES = 64 << 20
MAX_REASON = 500
STATES = [s.name.lower() for s in State]


class Refused(Exception):
    """A request the console refuses: an HTTP status and the reason shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _iso(ms: int) -> str:
    if ms <= 0:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(text: str, now_ms: int) -> int:
    """Milliseconds of an ISO 8601 time (UTC if no zone) or a look-back like 15m, 2h, 1d."""
    text = text.strip()
    if not text:
        return 0
    units = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    if text[-1:] in units and text[:-1].isdigit():
        return now_ms - int(text[:-1]) * units[text[-1]]
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Refused(
            400, f"time {text!r}: give ISO 8601 (2026-12-07T15:00Z) or 15m, 2h, 1d"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


@dataclass
class TaskFilter:
    """The tasks list's filters, as they appear in its URL."""

    state: str = ""
    queue: str = ""
    agent: str = ""
    node: str = ""
    since: str = ""
    until: str = ""
    after: int = 0
    _since_ms: int = field(default=0, repr=False)
    _until_ms: int = field(default=0, repr=False)

    @classmethod
    def of(cls, request: Request) -> TaskFilter:
        q = request.query_params
        f = cls(
            state=q.get("state", ""),
            queue=q.get("queue", "").strip(),
            agent=q.get("agent", "").strip(),
            node=q.get("node", "").strip(),
            since=q.get("since", "").strip(),
            until=q.get("until", "").strip(),
        )
        after = q.get("after", "0")
        if not after.isdigit():
            raise Refused(400, "after must be a task sequence number")
        f.after = int(after)
        if f.state and f.state not in STATES:
            raise Refused(400, f"state {f.state!r} is not one of {', '.join(STATES)}")
        now = int(time.time() * 1000)
        f._since_ms = _parse_time(f.since, now)
        f._until_ms = _parse_time(f.until, now)
        return f

    @property
    def filters_in_python(self) -> bool:
        """True when a filter the store does not apply (agent, node, time) is set."""
        return bool(self.agent or self.node or self._since_ms or self._until_ms)

    def keeps(self, t: TaskRecord) -> bool:
        return (
            (not self.agent or t.agent_id == self.agent)
            and (not self.node or t.node_id == self.node)
            and (not self._since_ms or t.created_unix_ms >= self._since_ms)
            and (not self._until_ms or t.created_unix_ms <= self._until_ms)
        )

    def query(self, **change: Any) -> str:
        doc = {
            "state": self.state,
            "queue": self.queue,
            "agent": self.agent,
            "node": self.node,
            "since": self.since,
            "until": self.until,
            "after": self.after or "",
        }
        doc.update(change)
        return urlencode({k: v for k, v in doc.items() if v not in ("", 0, None)})


@dataclass(frozen=True)
class TimelineRow:
    """One line of a task's timeline, from a signed receipt or lease."""

    time_ms: int
    kind: str
    who: str
    detail: str
    css: str = ""
    digests: tuple[tuple[str, str], ...] = ()


class Console:
    """The console's ASGI app over one running control plane."""

    def __init__(self, running: RunningControl) -> None:
        self.running = running
        self.service = running.service
        self.store = running.store
        self._csrf_key = secrets.token_bytes(32)
        self.stopping = asyncio.Event()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.globals["iso"] = _iso
        self.app = Starlette(
            routes=[
                Route("/", self.home),
                Route("/tasks", self.tasks),
                Route("/tasks/events", self.task_events),
                Route("/tasks/{task_id}", self.task),
                Route("/tasks/{task_id}/payload", self.payload),
                Route("/tasks/{task_id}/cancel", self.cancel, methods=["POST"]),
                Route("/tasks/{task_id}/verify", self.verify_task),
                Route("/tasks/{task_id}/bundle.json", self.bundle),
                Route("/verify", self.verify_upload, methods=["GET", "POST"]),
                Route("/nodes", self.nodes),
                Route("/budgets", self.budgets),
                Route("/ledger", self.ledger),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ],
            exception_handlers={Refused: self._refused, TetherError: self._tether_error},
        )

    # -- identity, authorization, rendering ---------------------------------------------

    def principal(self, request: Request, rpc: str) -> Principal:
        """The operator behind the request, authorized as `rpc` by the one table.

        Raises:
            Refused: no operator certificate (401) or a role the table refuses (403).
        """
        der = request.scope.get("state", {}).get(PEER_CERT)
        if not der:
            raise Refused(401, "the console needs an operator's client certificate")
        pem = b"-----BEGIN CERTIFICATE-----\n" + _b64_lines(der) + b"-----END CERTIFICATE-----\n"
        try:
            who = principal_from_pem(pem, self.service.auth.trust_domain)
            # A keep-alive connection outlives its handshake: validity is checked per
            # request, as on gRPC, or an expired certificate keeps an open tab working.
            check_unexpired(who)
            authorize(rpc, who)
        except TetherError as err:
            raise Refused(401 if err.reason == "UNAUTHENTICATED" else 403, err.message) from err
        if who.is_node:  # the table never names nodes for console pages; say so plainly
            raise Refused(403, f"node {who.name!r} is not an operator")
        return who

    def csrf_token(self, request: Request) -> str:
        """The operator's token for POST forms: HMAC of their certificate, per process."""
        der = request.scope.get("state", {}).get(PEER_CERT) or b""
        return hmac.new(self._csrf_key, hashlib.sha256(der).digest(), "sha256").hexdigest()

    def render(
        self, request: Request, template: str, who: Principal, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(
            who=who, path=request.url.path, csrf=self.csrf_token(request), **ctx
        )
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    async def _refused(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        html = self.env.get_template("refused.html").render(
            status=exc.status, message=exc.message, who=None, path=request.url.path, csrf=""
        )
        return HTMLResponse(html, status_code=exc.status, headers=_SECURITY_HEADERS)

    async def _tether_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TetherError)
        status = 404 if isinstance(exc, NotFound) else 409 if exc.reason else 400
        return await self._refused(request, Refused(status, exc.message))

    # -- pages -------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        self.principal(request, "ListTasks")
        return RedirectResponse("/tasks", status_code=303)

    async def _task_page(self, f: TaskFilter) -> tuple[list[TaskRecord], int]:
        """One page of tasks matching `f`, and the `after` of the next page (0: last)."""
        state = State[f.state.upper()] if f.state else None
        found: list[TaskRecord] = []
        after, scanned = f.after, 0
        # The store filters state and queue; only agent, node and time are filtered here,
        # so without them one page (and one more row, to know of a next page) is read.
        batch = 200 if f.filters_in_python else PAGE_SIZE + 1
        while len(found) <= PAGE_SIZE and scanned < SCAN_LIMIT:
            rows = await self.store.list_tasks(
                queue=f.queue, state=state, after_seq=after, limit=batch
            )
            if not rows:
                break
            scanned += len(rows)
            for t in rows:
                after = t.seq
                if f.keeps(t):
                    found.append(t)
                    if len(found) > PAGE_SIZE:
                        break
        if len(found) > PAGE_SIZE:
            return found[:PAGE_SIZE], found[PAGE_SIZE - 1].seq
        return found, (after if scanned >= SCAN_LIMIT else 0)

    async def tasks(self, request: Request) -> Response:
        who = self.principal(request, "ListTasks")
        f = TaskFilter.of(request)
        rows, next_after = await self._task_page(f)
        return self.render(
            request,
            "tasks.html",
            who,
            tasks=rows,
            f=f,
            states=STATES,
            next_url=f"/tasks?{f.query(after=next_after)}" if next_after else "",
            first_url=f"/tasks?{f.query(after=0)}" if f.after else "",
            events_url=f"/tasks/events?{f.query()}",
        )

    async def task_events(self, request: Request) -> Response:
        """Server-sent events: the tasks table's rows again whenever they change."""
        who = self.principal(request, "ListTasks")
        f = TaskFilter.of(request)
        rows_tpl = self.env.get_template("task_rows.html")

        async def stream() -> AsyncIterator[bytes]:
            last = ""
            yield b"retry: 2000\n\n"
            while not self.stopping.is_set():
                try:
                    check_unexpired(who)  # the stream outlives the request's check
                except TetherError:
                    return  # the browser reconnects and is refused (401) by principal()
                rows, _ = await self._task_page(f)
                html = rows_tpl.render(tasks=rows, who=who)
                digest = hashlib.sha256(html.encode()).hexdigest()
                if digest != last:
                    last = digest
                    data = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
                    yield f"event: rows\n{data}\n".encode()
                else:
                    yield b": idle\n\n"  # a comment: finds a closed connection
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), LIVE_INTERVAL_S)
                if await request.is_disconnected():
                    return

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _export(self, task_id: str) -> Bundle:
        assert self.running.servicer is not None
        ledger = await self.running.servicer.get_ledger()
        return await ledger.export([task_id])

    async def task(self, request: Request) -> Response:
        who = self.principal(request, "GetTask")
        task_id = request.path_params["task_id"]
        task, history = await self.service.get(task_id, caller=who)
        leases: dict[str, dict[str, Any]] = {}
        for h in history:
            lease = decode_lease(Envelope.from_json_bytes(h.envelope).payload)
            seen = leases.setdefault(
                h.lease_id,
                {
                    "lease": lease,
                    "outcome": h.outcome,
                    "renewals": 0,
                    "first_renew_ms": 0,
                    "last_renew_ms": 0,
                    "expires_ms": lease.expires_unix_ms,
                },
            )
            if h.kind == "renew":
                seen["renewals"] += 1
                seen["first_renew_ms"] = seen["first_renew_ms"] or h.created_unix_ms
                seen["last_renew_ms"] = h.created_unix_ms
                seen["expires_ms"] = lease.expires_unix_ms
        rows = await self._timeline(task_id)
        return self.render(
            request,
            "task.html",
            who,
            task=task,
            leases=list(leases.values()),
            rows=rows,
            may_cancel=_may(who, "CancelTask") and not task.state.terminal,
            may_payload=sees_payloads(who),
        )

    async def _timeline(self, task_id: str) -> list[TimelineRow]:
        """The task's receipts in the ledger (node-signed and control-signed), in time order."""
        bundle = await self._export(task_id)
        rows: list[TimelineRow] = []
        for e in bundle.entries:
            try:
                _, r = parse_receipt(e.envelope)
            except VerificationError as err:
                rows.append(TimelineRow(0, "unreadable", "", err.message, "bad"))
                continue
            kind = _KIND_NAMES.get(int(r.kind), str(r.kind))
            parts = [f"token {r.fencing_token}", f"attempt {r.attempt}"]
            if r.tool:
                parts.insert(0, r.tool)
            if r.status:
                parts.append(r.status)
            if r.cost_micros:
                parts.append(f"cost {r.cost_micros} µ")
            if r.duration_ms:
                parts.append(f"{r.duration_ms} ms")
            if r.artifact_name:
                parts.append(f"artifact {r.artifact_name} ({r.artifact_size} B)")
            if r.memory_key:
                parts.append(f"memory {r.memory_key}")
            if r.reason:
                parts.append(f"reason: {r.reason}")
            if r.kind == ReceiptKind.TASK_FINISHED:
                parts.append(f"final state {state_name(r.final_state)}")
            digests = tuple(
                (name, value)
                for name, value in (
                    ("arguments sha256", r.arguments_sha256),
                    ("result sha256", r.result_sha256),
                    ("artifact sha256", r.artifact_sha256),
                )
                if value
            )
            css = "deny" if r.kind == ReceiptKind.TOOL_DENIED else ""
            who = f"{r.node_id}/{r.agent_id} #{r.seq}"
            rows.append(TimelineRow(r.time_unix_ms, kind, who, " · ".join(parts), css, digests))
        for env in bundle.control_receipts:
            try:
                c = parse_control_statement(strictjson.loads(env.payload, 64))
            except VerificationError as err:
                rows.append(TimelineRow(0, "unreadable", "", err.message, "bad"))
                continue
            detail = f"{c.end_reason.name.lower()} · state {state_name(c.state)}"
            if c.reason:
                detail += f" · {c.reason}"
            rows.append(TimelineRow(c.time_unix_ms, "control", "control plane", detail, "control"))
        rows.sort(key=lambda row: row.time_ms)
        return rows

    async def payload(self, request: Request) -> Response:
        who = self.principal(request, "GetTask")
        if not sees_payloads(who):
            raise Refused(
                403,
                f"{who.kind} {who.name!r} may not read payloads or results "
                "(an auditor sees the evidence: receipts, digests, leases)",
            )
        task, _ = await self.service.get(request.path_params["task_id"], caller=who)
        return self.render(request, "payload.html", who, task=task, text=_text)

    async def cancel(self, request: Request) -> Response:
        who = self.principal(request, "CancelTask")
        task_id = request.path_params["task_id"]
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise Refused(403, f"cross-origin POST refused (Origin {origin})")
        form = await request.form()
        token = str(form.get("csrf", ""))
        if not hmac.compare_digest(token, self.csrf_token(request)):
            raise Refused(403, "missing or wrong CSRF token: cancel from the task's page")
        reason = str(form.get("reason", "")).strip()[:MAX_REASON]
        if not reason:
            raise Refused(400, "give a reason for the cancel")
        await self.service.cancel(
            task_id, f"{reason} (by {who.kind} {who.name} in the console)", caller=who
        )
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    async def _verify(self, data: bytes, name: str) -> Report:
        keys = [self.service.key.public]
        started = time.monotonic()
        try:
            report = await asyncio.to_thread(
                verify_bundle, data, keys, threads=1, limits=Limits(max_bytes=MAX_UPLOAD_BYTES)
            )
        except VerificationError as err:
            report = Report([Failure("bundle.format", name, err.message)])
        report.seconds = report.seconds or time.monotonic() - started
        return report

    async def verify_task(self, request: Request) -> Response:
        who = self.principal(request, "StreamExportBundle")
        task_id = request.path_params["task_id"]
        await self.service.get(task_id, caller=who)  # NotFound first, not an empty export
        data = encode_bundle(await self._export(task_id))
        report = await self._verify(data, f"{task_id}.bundle.json")
        return self.render(
            request,
            "verify.html",
            who,
            report=report,
            task_id=task_id,
            source=f"per-task export of {task_id} ({len(data)} bytes)",
        )

    async def bundle(self, request: Request) -> Response:
        who = self.principal(request, "StreamExportBundle")
        task_id = request.path_params["task_id"]
        await self.service.get(task_id, caller=who)
        data = encode_bundle(await self._export(task_id))
        return Response(
            data,
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{task_id}.bundle.json"'},
        )

    async def verify_upload(self, request: Request) -> Response:
        who = self.principal(request, "GetCheckpoint")
        if request.method == "GET":
            return self.render(request, "verify.html", who, report=None, task_id="", source="")
        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES + 65536:
            raise Refused(413, f"bundles up to {MAX_UPLOAD_BYTES >> 20} MiB")
        form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        token = str(form.get("csrf", ""))
        if not hmac.compare_digest(token, self.csrf_token(request)):
            raise Refused(403, "missing or wrong CSRF token: upload from the verify page")
        upload = form.get("bundle")
        if upload is None or isinstance(upload, str):
            raise Refused(400, "choose a bundle file")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)  # a chunked body has no length to check
        if len(data) > MAX_UPLOAD_BYTES:
            raise Refused(413, f"bundles up to {MAX_UPLOAD_BYTES >> 20} MiB")
        name = upload.filename or "upload"
        report = await self._verify(data, name)
        return self.render(
            request,
            "verify.html",
            who,
            report=report,
            task_id="",
            source=f"uploaded {name} ({len(data)} bytes)",
        )

    async def nodes(self, request: Request) -> Response:
        who = self.principal(request, "ListNodes")
        rows = []
        for n in await self.service.list_nodes():
            head = await self.store.ledger_head(n.node_id)
            cert = _cert_facts(n.certificate, self.service.key)
            rows.append({"node": n, "head": head, "cert": cert})
        return self.render(request, "nodes.html", who, rows=rows)

    async def budgets(self, request: Request) -> Response:
        who = self.principal(request, "ListTasks")
        by_queue: dict[str, dict[str, int]] = {}
        limited: list[TaskRecord] = []
        after = 0
        while True:
            rows = await self.store.list_tasks(queue="", state=None, after_seq=after, limit=500)
            if not rows:
                break
            for t in rows:
                after = t.seq
                q = by_queue.setdefault(t.queue, {"tasks": 0, "limit": 0, "spent": 0})
                q["tasks"] += 1
                q["limit"] += t.budget_limit_micros
                q["spent"] += t.budget_spent_micros
                if t.budget_limit_micros and len(limited) < 200:
                    limited.append(t)
            if after and len(rows) < 500:
                break
        return self.render(
            request, "budgets.html", who, by_queue=sorted(by_queue.items()), tasks=limited
        )

    async def ledger(self, request: Request) -> Response:
        who = self.principal(request, "GetCheckpoint")
        assert self.running.servicer is not None
        ledger = await self.running.servicer.get_ledger()
        cp = await ledger.checkpoint()
        return self.render(
            request,
            "ledger.html",
            who,
            size=ledger.size,
            cp=cp,
            vkey=verifier_key(self.service.log_origin, self.service.key.public),
            keyid=self.service.key.keyid,
        )


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would send Origin: null on POSTs
    "Cache-Control": "no-store",
}

_KIND_NAMES = {int(k): k.name.lower() for k in ReceiptKind}


def _may(who: Principal, rpc: str) -> bool:
    try:
        authorize(rpc, who)
    except TetherError:
        return False
    return True


def _b64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))


def _text(data: bytes) -> str:
    """Payload bytes as text: pretty JSON when it is JSON, else UTF-8 with replacements."""
    try:
        return json.dumps(json.loads(data), indent=2, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")


def _cert_facts(stored: bytes, key: SigningKey) -> dict[str, Any]:
    """What a node's stored certificate (a control-signed envelope) says, and whether it verifies.

    A certificate signed by an earlier control key (before a rotation) is decoded
    and labelled as not checked against the current key.
    """
    try:
        envelope = Envelope.from_json_bytes(stored)
    except (ValueError, VerificationError):
        return {"ok": False, "note": "unreadable", "cert": None}
    try:
        cert = verify_cert(envelope, {key.keyid: key.public})
        return {"ok": True, "note": "signed by this control plane's key", "cert": cert}
    except VerificationError as err:
        try:
            cert = decode_cert(envelope.payload)
        except VerificationError:
            return {"ok": False, "note": err.message, "cert": None}
        return {
            "ok": False,
            "note": f"not checked against the current key: {err.message}",
            "cert": cert,
        }

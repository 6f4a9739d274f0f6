"""The operator console's trust boundary, attacked over real TLS (no browser needed).

A real control plane serves the console on 127.0.0.1:0; clients present no
certificate, a node's certificate, a certificate of another CA, or operators'
certificates of each role, and try cross-site and token-less POSTs.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tether.control.client import ControlClient, node_client_tls
from tether.core.states import State
from tether.crypto.pki import CertificateAuthority, Role, cert_pem, generate_tls_key, key_pem
from tether.crypto.signing import SigningKey
from tether.testing import ControlHandle, start_control

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlHandle]:
    async with start_control(tmp_path, console_listen="127.0.0.1:0") as handle:
        yield handle


def _ctx(cp: ControlHandle, cert: bytes | None = None, key: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=cert_pem(cp.pki.ca.cert).decode())
    if cert is not None and key is not None:
        d = cp.pki.dir
        (d / "c.pem").write_bytes(cert)
        (d / "k.pem").write_bytes(key)
        ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    return ctx


def _operator(cp: ControlHandle, role: Role) -> httpx.AsyncClient:
    tls = cp.pki.operator_tls(role, f"console-{role.value}")
    assert tls.cert_pem is not None
    assert tls.key_pem is not None
    return httpx.AsyncClient(
        verify=_ctx(cp, tls.cert_pem, tls.key_pem), base_url=cp.running.console_url, timeout=20
    )


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert m is not None
    return m.group(1)


async def test_console_is_off_by_default(tmp_path: Path) -> None:
    """Without --console-listen nothing serves it and the control plane has no console."""
    async with start_control(tmp_path) as plain:
        assert plain.running.console is None
        assert plain.running.console_url == ""


async def test_no_client_certificate_is_refused_in_the_handshake(cp: ControlHandle) -> None:
    """A browser without an operator certificate never gets an HTTP answer."""
    async with httpx.AsyncClient(verify=_ctx(cp), base_url=cp.running.console_url) as anon:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await anon.get("/tasks")


async def test_a_certificate_of_another_ca_is_refused(cp: ControlHandle) -> None:
    """An operator certificate issued by a different CA (same role name) is refused in TLS."""
    other = CertificateAuthority.create("test.tether.local")
    k = generate_tls_key()
    cert = other.issue_operator("mallory", Role.ADMIN, k.public_key())
    async with httpx.AsyncClient(
        verify=_ctx(cp, cert_pem(cert), key_pem(k)), base_url=cp.running.console_url
    ) as c:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await c.get("/tasks")


async def test_a_node_certificate_is_refused(cp: ControlHandle) -> None:
    """A node's own mTLS certificate (valid, same CA) is no operator: every page is 403."""
    k = generate_tls_key()
    token = await cp.join_token("node-1")
    async with ControlClient(cp.enroll_address, tls=cp.pki.anonymous_tls) as anon:
        reg = await anon.register_node("node-1", SigningKey.generate(), token, k)
    tls = node_client_tls(cert_pem(cp.pki.ca.cert), reg, k)
    assert tls.cert_pem is not None
    assert tls.key_pem is not None
    async with httpx.AsyncClient(
        verify=_ctx(cp, tls.cert_pem, tls.key_pem), base_url=cp.running.console_url
    ) as c:
        for path in ("/tasks", "/nodes", "/ledger", "/verify", "/tasks/events"):
            r = await c.get(path)
            assert r.status_code == 403, path
            assert "node" in r.text


async def test_auditor_sees_evidence_but_not_payloads_and_may_not_cancel(
    cp: ControlHandle,
) -> None:
    """An auditor reads the task's page, but its payload page is 403, no cancel form is shown,
    and a cancel POST (even with the auditor's own CSRF token) is refused by the table."""
    task = (await cp.client.submit("work", b'{"secret-ish": "payload"}')).task
    async with _operator(cp, Role.AUDITOR) as auditor:
        page = await auditor.get(f"/tasks/{task.task_id}")
        assert page.status_code == 200
        assert "secret-ish" not in page.text
        assert 'id="cancel-form"' not in page.text
        refused = await auditor.get(f"/tasks/{task.task_id}/payload")
        assert refused.status_code == 403
        assert "may not read payloads" in refused.text
        r = await auditor.post(
            f"/tasks/{task.task_id}/cancel",
            data={"csrf": _csrf((await auditor.get("/verify")).text), "reason": "x"},
        )
        assert r.status_code == 403
    assert (await cp.client.get_task(task.task_id)).task.state == State.QUEUED
    async with _operator(cp, Role.ADMIN) as admin:
        shown = await admin.get(f"/tasks/{task.task_id}/payload")
        assert shown.status_code == 200
        assert "secret-ish" in shown.text


async def test_cancel_needs_the_csrf_token_and_a_same_origin(cp: ControlHandle) -> None:
    """A submitter's cancel POST without the token, with another operator's token or from
    another origin is 403 and the task stays queued; the page's own form cancels it."""
    own = cp.operator(Role.SUBMITTER, "console-submitter")  # the console submitter's own task
    try:
        task = (await own.submit("work", b"{}")).task
    finally:
        await own.close()
    url = f"/tasks/{task.task_id}/cancel"
    async with _operator(cp, Role.SUBMITTER) as sub, _operator(cp, Role.ADMIN) as admin:
        page = await sub.get(f"/tasks/{task.task_id}")
        token = _csrf(page.text)
        other = _csrf((await admin.get(f"/tasks/{task.task_id}")).text)
        assert other != token
        assert (await sub.post(url, data={"reason": "x"})).status_code == 403
        assert (await sub.post(url, data={"csrf": other, "reason": "x"})).status_code == 403
        cross = await sub.post(
            url, data={"csrf": token, "reason": "x"}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403
        assert (await cp.client.get_task(task.task_id)).task.state == State.QUEUED
        done = await sub.post(url, data={"csrf": token, "reason": "wrong input"})
        assert done.status_code == 303
    got = (await cp.client.get_task(task.task_id)).task
    assert got.state == State.CANCELED
    assert "wrong input" in got.error


async def test_a_submitter_may_not_see_or_cancel_another_submitters_task(
    cp: ControlHandle,
) -> None:
    """Another submitter's task is 404 in the console (page, payload, cancel) and stays
    queued; an admin still sees and cancels it (authz.OWN_TASKS_ONLY)."""
    alice = cp.operator(Role.SUBMITTER, "alice-ci")
    try:
        task = (await alice.submit("work", b"alice-secret")).task
    finally:
        await alice.close()
    base = f"/tasks/{task.task_id}"
    async with _operator(cp, Role.SUBMITTER) as mallory, _operator(cp, Role.ADMIN) as admin:
        assert (await mallory.get(base)).status_code == 404
        payload = await mallory.get(f"{base}/payload")
        assert payload.status_code == 404
        assert "alice-secret" not in payload.text
        # A well-formed cancel (the admin's page token is per-operator, so take mallory's
        # from a task mallory does own) is still refused as unknown.
        own = cp.operator(Role.SUBMITTER, "console-submitter")
        try:
            mine = (await own.submit("work", b"{}")).task
        finally:
            await own.close()
        token = _csrf((await mallory.get(f"/tasks/{mine.task_id}")).text)
        refused = await mallory.post(f"{base}/cancel", data={"csrf": token, "reason": "x"})
        assert refused.status_code == 404
        assert (await cp.client.get_task(task.task_id)).task.state == State.QUEUED
        admin_page = await admin.get(base)
        assert admin_page.status_code == 200
        done = await admin.post(
            f"{base}/cancel", data={"csrf": _csrf(admin_page.text), "reason": "by admin"}
        )
        assert done.status_code == 303
    assert (await cp.client.get_task(task.task_id)).task.state == State.CANCELED


async def test_submitter_may_not_list_tasks(cp: ControlHandle) -> None:
    """The table says ListTasks is admin and auditor only, and the console follows it."""
    async with _operator(cp, Role.SUBMITTER) as sub:
        r = await sub.get("/tasks")
        assert r.status_code == 403
        assert "may not call ListTasks" in r.text


async def test_bad_filters_are_400_and_unknown_tasks_404(cp: ControlHandle) -> None:
    """A state that is not one, a malformed time and an unknown task id get clear answers."""
    async with _operator(cp, Role.AUDITOR) as auditor:
        assert (await auditor.get("/tasks?state=bogus")).status_code == 400
        assert (await auditor.get("/tasks?since=yesterday")).status_code == 400
        assert (await auditor.get("/tasks?after=-1")).status_code == 400
        assert (await auditor.get("/tasks/t_nope")).status_code == 404


async def test_nodes_ledger_and_budgets_pages_show_the_stores_facts(cp: ControlHandle) -> None:
    """Nodes shows an enrolled node with its certificate checked against the control key; the
    ledger shows the tree size and the C2SP verifier key `tether keys vkey` prints; budgets
    sums a task's limit under its queue."""
    from tether.crypto.note import verifier_key

    node = await cp.node_client("node-7")
    await node.close()
    await cp.client.submit("work", b"{}", budget_limit_micros=5_000)
    async with _operator(cp, Role.AUDITOR) as auditor:
        nodes = (await auditor.get("/nodes")).text
        assert "node-7" in nodes
        assert "signed by this control plane&#39;s key" in nodes
        ledger = (await auditor.get("/ledger")).text
        assert verifier_key(cp.service.log_origin, cp.key.public) in ledger
        assert 'id="tree-size">0<' in ledger
        budgets = (await auditor.get("/budgets")).text
        assert "<td>work</td><td>1</td><td>5000</td><td>0</td>" in budgets


async def test_tasks_list_pages_and_filters(cp: ControlHandle) -> None:
    """53 tasks page as 50 then 3 through the next-page link; the queue and state filters are
    the store's, and an agent filter with no holder matches nothing."""
    ids = [(await cp.client.submit("work", b"{}")).task.task_id for _ in range(52)]
    ids.append((await cp.client.submit("q2", b"{}")).task.task_id)
    async with _operator(cp, Role.AUDITOR) as auditor:
        first = (await auditor.get("/tasks")).text
        assert first.count('<tr id="row-') == 50
        m = re.search(r'id="next-page" href="([^"]+)"', first)
        assert m is not None
        second = (await auditor.get(m.group(1).replace("&amp;", "&"))).text
        assert second.count('<tr id="row-') == 3
        assert 'id="next-page"' not in second
        shown = re.findall(r'<tr id="row-([^"]+)"', first + second)
        assert shown == ids
        q2 = (await auditor.get("/tasks?queue=q2")).text
        assert re.findall(r'<tr id="row-([^"]+)"', q2) == [ids[-1]]
        assert (await auditor.get("/tasks?state=running")).text.count('<tr id="row-') == 0
        assert (await auditor.get("/tasks?agent=alice")).text.count('<tr id="row-') == 0
        recent = (await auditor.get("/tasks?since=1h&queue=q2")).text
        assert recent.count('<tr id="row-') == 1


async def test_console_needs_tls_and_a_free_port(tmp_path: Path) -> None:
    """--console-listen with --insecure-plaintext is refused (no certificates, no operators),
    and a taken port is a ConfigError naming the flag, with nothing left serving."""
    import socket

    from tether.control.server import start_server
    from tether.control.service import Auth
    from tether.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--console-listen needs TLS"):
        await start_server(
            db=tmp_path / "plain.db",
            listen="127.0.0.1:0",
            key=SigningKey.generate(),
            auth=Auth(insecure=True),
            console_listen="127.0.0.1:0",
        )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="--console-listen: cannot listen"):
            async with start_control(tmp_path / "b", console_listen=f"127.0.0.1:{port}"):
                pass


async def test_an_expired_operator_certificate_is_refused_on_an_open_connection(
    cp: ControlHandle,
) -> None:
    """A certificate that expires while its keep-alive connection stays open is refused on
    that connection (401, not a new handshake, which TLS itself would refuse), and an open
    live-updates stream ends once it expires instead of streaming on."""
    key = generate_tls_key()
    cert = cp.pki.ca.issue_operator("short-lived", Role.ADMIN, key.public_key(), ttl_ms=4000)
    expires = cert.not_valid_after_utc.timestamp()
    async with httpx.AsyncClient(
        verify=_ctx(cp, cert_pem(cert), key_pem(key)),
        base_url=cp.running.console_url,
        timeout=20,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    ) as c:
        assert (await c.get("/tasks")).status_code == 200
        async with c.stream("GET", "/tasks/events") as events:
            assert events.status_code == 200
            got = b""
            async with asyncio.timeout(15):  # it expires in 4 s; an endless stream fails here
                async for chunk in events.aiter_bytes():
                    got += chunk
            # The stream ended by itself (no exception, no stopping server): after expiry.
            assert time.time() >= expires - 0.01, (time.time(), expires)
            assert b"event: rows" in got
        r = await c.get("/tasks")
        assert r.status_code == 401, r.text
        assert "expired" in r.text

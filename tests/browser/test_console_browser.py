"""The operator console in a real browser: Debian's Chromium driven by Playwright.

A real control plane (mTLS, SQLite) serves the console; a real sidecar runs
agents that claim, call a tool and finish tasks while the browser watches.
The browser presents operators' client certificates from `TestPKI`, exactly
as an operator's browser presents the one `tether operators add` wrote.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tether.core.states import State
from tether.crypto.pki import Role
from tether.sidecar.tools.base import ToolContext
from tether.testing import ControlHandle, start_control, start_sidecar
from tether.verify.bundle import encode_bundle

pytestmark = [pytest.mark.browser, pytest.mark.timeout(150)]
playwright_api = pytest.importorskip("playwright.async_api", reason="pip install 'tether[browser]'")

CHROMIUM = os.environ.get("TETHER_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
WAIT_MS = 30_000


def lookup(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """The tool the agents call: answers with the word it was given."""
    return {"found": str(args.get("word", ""))}


POLICY = f"""
version = 1
[agents.alice]
queues = ["work"]
[tools.lookup]
adapter = "python"
[tools.lookup.python]
entrypoint = "{__name__}:lookup"
[queues.work]
tools = ["lookup"]
lease_ttl_ms = 60000
max_attempts = 1
"""


@asynccontextmanager
async def browser_as(cp: ControlHandle, role: Role) -> AsyncIterator[Any]:
    """A Chromium context presenting a fresh operator certificate with `role`."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    tls = cp.pki.operator_tls(role, f"browser-{role.value}")
    assert tls.cert_pem is not None
    assert tls.key_pem is not None
    origin = cp.running.console_url.rstrip("/")
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = await browser.new_context(
                # The test CA is not in Chromium's store; the client certificate is the point.
                ignore_https_errors=True,
                client_certificates=[{"origin": origin, "cert": tls.cert_pem, "key": tls.key_pem}],
                timezone_id="Europe/Paris",
                viewport={"width": 1280, "height": 900},
            )
            context.set_default_timeout(WAIT_MS)
            yield context
            await context.close()
        finally:
            await browser.close()


async def work(cp: ControlHandle, side: Any, n: int) -> list[str]:
    """Submits `n` tasks; alice claims each, calls `lookup`, waits a moment, and completes."""
    ids = []
    for i in range(n):
        ids.append((await cp.client.submit("work", json.dumps({"n": i}).encode())).task.task_id)
    async with side.agent("alice") as alice:
        for _ in range(n):
            task = await alice.claim("work", wait_ms=10_000)
            assert task is not None
            await alice.start(task.task_id)
            await alice.call_tool(task.task_id, "lookup", {"word": f"w{task.task_id[-4:]}"})
            await asyncio.sleep(0.3)  # long enough for a live update to show it running
            await alice.complete(task.task_id, result=b'{"ok": true}')
    return ids


async def test_auditor_watches_tasks_live_reads_a_timeline_and_verifies(tmp_path: Path) -> None:
    """As an auditor: tasks appear and finish in the list without a reload while an agent
    works; a task's page shows its lease token, the tool call and the final state; its bundle
    verifies VALID; a tampered copy uploaded is INVALID; its payload is refused."""
    async with (
        start_control(tmp_path, policy=POLICY, console_listen="127.0.0.1:0") as cp,
        start_sidecar(tmp_path, cp.address) as side,
        browser_as(cp, Role.AUDITOR) as context,
    ):
        url = cp.running.console_url
        page = await context.new_page()
        await page.goto(url + "tasks")
        await page.locator("#who").filter(has_text="auditor").wait_for()
        await page.locator("#live-state").filter(has_text="on").wait_for()
        await page.evaluate("window.__stay = 1")  # a reload would drop it

        agent = asyncio.create_task(work(cp, side, 3))
        # Tasks appear live ...
        await page.locator("#task-rows tr[id^='row-']").nth(2).wait_for()
        ids = await agent
        # ... and finish live, on the same page (no reload: the marker is still there).
        for tid in ids:
            await page.locator(f"#row-{tid} .state").filter(has_text="succeeded").wait_for()
        assert await page.evaluate("window.__stay") == 1
        created = page.locator(f"#row-{ids[0]} time").first
        assert (await created.get_attribute("title") or "").endswith("(UTC)")

        # The timeline: lease token, the tool call, the final state.
        await page.click(f"#row-{ids[0]} a")
        await page.wait_for_url(f"**/tasks/{ids[0]}")
        task = (await cp.client.get_task(ids[0])).task
        assert await page.locator("#task-state").inner_text() == "succeeded"
        token = page.locator("#leases .token").first
        assert await token.inner_text() == str(task.fencing_token)
        timeline = page.locator("#timeline")
        call = timeline.locator("tr.kind-tool_call")
        assert await call.count() == 1
        text = await call.inner_text()
        assert "lookup" in text
        assert "arguments sha256" in text
        assert "result sha256" in text
        finished = await timeline.locator("tr.kind-task_finished").inner_text()
        assert "final state succeeded" in finished
        assert await page.locator("#cancel-form").count() == 0  # auditors do not cancel
        await page.screenshot(path=str(tmp_path / "task.png"))

        # Verify the task's bundle: the verdict comes first and is VALID.
        await page.click("#verify-link")
        await page.wait_for_url(f"**/tasks/{ids[0]}/verify")
        assert await page.locator("h1").first.inner_text() == "VALID"

        # A tampered bundle uploaded is INVALID, naming what is wrong.
        assert cp.running.servicer is not None
        ledger = await cp.running.servicer.get_ledger()
        data = encode_bundle(await ledger.export([ids[0]]))
        assert b"lookup" not in data  # the receipt's statement travels base64-encoded
        doc = json.loads(data)
        entry = doc["entries"][0]
        envelope = json.loads(base64.b64decode(entry["envelope"]))  # the DSSE JSON, as stored
        payload = bytearray(base64.b64decode(envelope["payload"]))
        payload[payload.index(b"alice")] = ord("m")  # one byte of a signed receipt: "mlice"
        envelope["payload"] = base64.b64encode(bytes(payload)).decode()
        entry["envelope"] = base64.b64encode(
            json.dumps(envelope, separators=(",", ":")).encode()
        ).decode()
        tampered = tmp_path / "tampered.bundle.json"
        tampered.write_text(json.dumps(doc))
        await page.goto(url + "verify")
        await page.set_input_files("#bundle-file", str(tampered))
        await page.click("#upload-button")
        verdict = page.locator("#verdict")
        assert await verdict.inner_text() == "INVALID"
        assert await page.locator("#failures li").count() >= 1

        # The untouched bundle, uploaded the same way, is VALID.
        good = tmp_path / "good.bundle.json"
        good.write_bytes(data)
        await page.set_input_files("#bundle-file", str(good))
        await page.click("#upload-button")
        assert await page.locator("#verdict").inner_text() == "VALID"

        # An auditor is refused the payload.
        response = await page.goto(url + f"tasks/{ids[0]}/payload")
        assert response is not None
        assert response.status == 403
        assert "may not read payloads" in await page.locator("#refusal").inner_text()
        assert await page.locator("#payload").count() == 0


async def test_submitter_cancels_a_running_task_and_sees_it_end(tmp_path: Path) -> None:
    """As a submitter: a running task's page has a cancel form; cancelling with a reason ends
    the task (canceled, the reason and who recorded), and its timeline ends with the control
    plane's signed cancel record."""
    async with (
        start_control(tmp_path, policy=POLICY, console_listen="127.0.0.1:0") as cp,
        start_sidecar(tmp_path, cp.address) as side,
        side.agent("alice") as alice,
        browser_as(cp, Role.SUBMITTER) as context,
    ):
        # A submitter sees and cancels only its own tasks (authz.OWN_TASKS_ONLY).
        async with cp.operator(Role.SUBMITTER, "browser-submitter") as own:
            tid = (await own.submit("work", b'{"n": 1}')).task.task_id
        task = await alice.claim("work", wait_ms=10_000)
        assert task is not None
        await alice.start(tid)
        assert (await cp.client.get_task(tid)).task.state == State.RUNNING
        page = await context.new_page()
        await page.goto(cp.running.console_url + f"tasks/{tid}")
        assert await page.locator("#task-state").inner_text() == "running"
        await page.fill("#cancel-reason", "stuck on a bad input")
        async with page.expect_navigation():
            await page.click("#cancel-button")
        assert page.url.endswith(f"/tasks/{tid}")
        await page.locator("#task-state").filter(has_text="canceled").wait_for()
        assert "stuck on a bad input" in await page.locator("#task-error").inner_text()
        assert "submitter" in await page.locator("#task-error").inner_text()
        got = (await cp.client.get_task(tid)).task
        assert got.state == State.CANCELED
        end = page.locator("#timeline tr.control").last
        assert "state canceled" in await end.inner_text()
        leases = await page.locator("#leases").inner_text()
        assert "canceled" in leases

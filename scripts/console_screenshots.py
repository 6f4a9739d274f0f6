"""Screenshots of the operator console of a running `tether demo --keep` for docs/console.md.

Usage: .venv/bin/python scripts/console_screenshots.py .tether-demo docs/console
Signs in with the demo's auditor certificate (its PKCS#12 file, as a browser
would) and drives Debian's Chromium with Playwright.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

from playwright.async_api import async_playwright

CHROMIUM = os.environ.get("TETHER_CHROMIUM", "/usr/bin/chromium")


def main(demo: Path, out: Path) -> None:
    url = (demo / "control.addr").read_text().splitlines()[2].rstrip("/")
    db = sqlite3.connect(f"file:{demo / 'control.db'}?mode=ro", uri=True)
    # The demo's killed-agent task: two attempts, the second on a higher token.
    retried = db.execute(
        "SELECT task_id FROM tasks WHERE attempt = 2 AND state = 4 ORDER BY seq LIMIT 1"
    ).fetchone()[0]
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(demo, out, url, retried))


async def shoot(demo: Path, out: Path, url: str, retried: str) -> None:
    """Signs in as the demo's auditor, then its submitter, and saves each page."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        for role in ("auditor", "submitter"):
            ctx = await browser.new_context(
                ignore_https_errors=True,
                client_certificates=[
                    {
                        "origin": url,
                        "pfxPath": str(demo / "keys" / f"demo-{role}.p12"),
                        "passphrase": "tether",
                    }
                ],
                viewport={"width": 1200, "height": 760},
                timezone_id="Europe/Paris",
            )
            page = await ctx.new_page()
            shots = (
                [
                    ("tasks", "/tasks"),
                    ("task", f"/tasks/{retried}"),
                    ("verify", f"/tasks/{retried}/verify"),
                    ("nodes", "/nodes"),
                    ("budgets", "/budgets"),
                    ("ledger", "/ledger"),
                    ("payload-refused", f"/tasks/{retried}/payload"),
                ]
                if role == "auditor"
                else [("task-submitter", f"/tasks/{retried}")]
            )
            for name, path in shots:
                await page.goto(url + path)
                await page.wait_for_timeout(1500)  # the live table's first update
                await page.screenshot(path=str(out / f"{name}.png"))
                print(out / f"{name}.png")
            await ctx.close()
        await browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

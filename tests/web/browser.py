"""A real browser for the web tests: Playwright for Python driving Debian's
chromium (never a browser Playwright downloads), headless.

Without playwright or chromium the browser tests skip on a developer's
machine and fail under CI (CI=1), where scripts/test installs both.

ChatPage is one tab on the chat page, read the way a person reads it: the
room's lines in order, the private messages, the user list, the messages
shown at login and when the connection is lost.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 10_000

# Recorded in every page before its own script runs (Playwright's init
# scripts are not subject to the page's policy): anything the policy blocked,
# and whether an alert or a stray script ever ran.
WATCH = """
window.__blocked = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__blocked.push(e.violatedDirective + " " + e.blockedURI));
"""


def need(what: str) -> None:
    """Skip for lack of `what` here; fail under CI, which must provide it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it: see scripts/test)", pytrace=False)
    pytest.skip(what)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def launch() -> Iterator[Any]:
    """One headless chromium for the session (a Playwright Browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright is not installed (pip install playwright; no `playwright install`)")
    exe = chromium_path()
    if exe is None:
        need("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class ChatPage:
    """One browser tab on the chat page."""

    def __init__(self, browser: Any, url: str, label: str, ignore_https_errors: bool = False,
                 timezone_id: str | None = None) -> None:
        self.label = label
        self.context = browser.new_context(ignore_https_errors=ignore_https_errors,
                                           viewport={"width": 900, "height": 600},
                                           timezone_id=timezone_id)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.add_init_script(WATCH)
        self.read = {"#lines": 0, "#private": 0}
        if url:
            self.page.goto(url)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    # -- doing ---------------------------------------------------------------------

    def login(self, name: str, passcode: str) -> None:
        self.page.fill("#username", name)
        self.page.fill("#passcode", passcode)
        self.page.click("#join")

    def join(self, name: str, passcode: str) -> None:
        """Log in and wait until the page says so."""
        self.login(name, passcode)
        self.expect_status(f"in the room as {name}")
        self.expect_line(f"You joined the room as {name}.")

    def type(self, text: str) -> None:
        """Type a line in the message box and press Enter."""
        self.page.fill("#say", text)
        self.page.press("#say", "Enter")

    # -- reading -------------------------------------------------------------------

    def text(self, selector: str) -> str:
        return str(self.page.text_content(selector) or "")

    def expect_status(self, text: str, timeout_ms: float = TIMEOUT_MS) -> None:
        self.page.wait_for_function(
            "t => document.getElementById('status').textContent === t", arg=text,
            timeout=timeout_ms)

    def next_item(self, where: str = "#lines", timeout_ms: float = TIMEOUT_MS
                  ) -> dict[str, str]:
        """The next line in the room (or in the private messages, `#private`),
        skipping the page's echo of what this person typed: its `text`, its
        `class`, and for a replayed line the server's time (`when`)."""
        while True:
            index = self.read[where]
            self.page.wait_for_function(
                "([w, i]) => document.querySelectorAll(w + ' > .line').length > i",
                arg=[where, index], timeout=timeout_ms)
            self.read[where] = index + 1
            item: dict[str, str] = self.page.evaluate(
                "([w, i]) => { const e = document.querySelectorAll(w + ' > .line')[i];"
                " const t = e.querySelector(':scope > time.when');"
                " return {text: e.textContent, class: e.className,"
                " when: t ? t.dateTime : ''}; }", [where, index])
            if "mine" not in item["class"].split():
                return item

    def next_line(self, where: str = "#lines", timeout_ms: float = TIMEOUT_MS) -> str:
        """The text of next_item."""
        return self.next_item(where, timeout_ms)["text"]

    def room_lines(self) -> list[str]:
        """Every line in the room now, the page's echoes included, replayed
        lines without their time."""
        return [str(t) for t in self.page.evaluate(
            "[...document.querySelectorAll('#lines > .line')].map(e => [...e.childNodes]"
            ".filter(n => !(n.nodeType === 1 && n.matches('time.when')))"
            ".map(n => n.textContent).join(''))")]

    def expect_line(self, text: str, where: str = "#lines") -> None:
        got = self.next_line(where)
        assert got == text, f"{self.label}: expected {text!r} in {where}, got {got!r}"

    def users(self) -> list[str]:
        return [str(t) for t in self.page.locator("#users li").all_text_contents()]

    def expect_users(self, names: list[str]) -> None:
        self.page.wait_for_function(
            "n => JSON.stringify([...document.querySelectorAll('#users li')]"
            ".map(li => li.textContent)) === JSON.stringify(n)", arg=names)

    def expect_visible(self, selector: str, text: str) -> None:
        """`selector` is shown and its text contains `text`."""
        self.page.wait_for_function(
            "([s, t]) => { const e = document.querySelector(s);"
            " return e && !e.hidden && e.offsetParent !== null && e.textContent.includes(t); }",
            arg=[selector, text])

    def assert_safe(self) -> None:
        """No dialog opened, no script error, nothing blocked by the policy,
        and no element came from what the network sent."""
        assert self.dialogs == [], f"{self.label}: a dialog opened: {self.dialogs}"
        assert self.errors == [], f"{self.label}: script errors: {self.errors}"
        blocked = self.page.evaluate("window.__blocked")
        assert blocked == [], f"{self.label}: the policy blocked {blocked}"
        stray = self.page.evaluate(  # the only elements in a line: a replayed line's time
            "document.querySelectorAll('#lines *:not(.line, .line.past > time.when),"
            " #private *:not(.line)').length")
        assert stray == 0, f"{self.label}: elements inside the lines"

    def screenshot(self, path: str) -> None:
        self.page.screenshot(path=path)

    def close(self) -> None:
        self.context.close()

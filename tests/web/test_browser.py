"""The chat page in a real browser (headless chromium through Playwright).

Two browser tabs and a client.py talk through every row of the contract;
markup arrives as text; the login's failures and a lost server are shown
and recovered from; a page of another origin cannot open the WebSocket.
Set CHATROOM_SCREENSHOT=1 to (re)write docs/web-page.png.
"""

from __future__ import annotations

import http.server
import os
import signal
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import ChatPage
from harness import PASSCODE, Room, time_line_re
from webwire import WebServer, repo_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

XSS = ["<img src=x onerror=alert(1)>", "<script>alert(1)</script>",
       "<b onmouseover=alert(1)>bold</b> &amp; &lt;", "__proto__", "constructor"]


def tab(pages: list[ChatPage], chromium: Any, web: WebServer, label: str,
        **kw: Any) -> ChatPage:
    page = ChatPage(chromium, web.page_url, label, **kw)
    pages.append(page)
    return page


def test_two_pages_and_a_client_converse_through_every_row(
        chromium: Any, pages: list[ChatPage], web: WebServer, room: Room) -> None:
    server = web.proc
    alice = tab(pages, chromium, web, "alice")
    alice.join("alice", PASSCODE)
    server.expect("alice joined the chatroom")
    server.expect("alice: searched up active users")  # the page's one :Users, at login
    alice.expect_users(["alice"])
    bob = tab(pages, chromium, web, "bob")
    bob.join("bob", PASSCODE)
    server.expect("bob joined the chatroom")
    server.expect("bob: searched up active users")
    alice.expect_line("bob joined the chatroom")
    carol = room.connect("carol")
    web.announced("carol joined the chatroom")
    for page in (alice, bob):
        page.expect_line("carol joined the chatroom")
    alice.expect_users(["alice", "bob", "carol"])
    bob.expect_users(["alice", "bob", "carol"])

    def everyone_but(sender: object, line: str) -> None:
        server.expect(line)
        for page in (alice, bob):
            if page is not sender:
                page.expect_line(line)
        if carol is not sender:
            carol.expect(line)

    alice.type("Hello Room")
    everyone_but(alice, "alice: Hello Room")
    bob.type(":)")
    everyone_but(bob, "bob: [feeling happy]")
    carol.send(":(")
    everyone_but(carol, "carol: [feeling sad]")
    bob.type("\\:)")
    everyone_but(bob, "bob: :)")
    mine = bob.page.locator("#lines > .line.mine").all_text_contents()
    assert mine == ["bob: [feeling happy]", "bob: :)"]  # what the others saw
    alice.type(":mytime")
    line = server.expect_match(time_line_re("alice")).group(0)
    for page in (alice, bob):
        page.expect_line(line)
    carol.expect(line)
    bob.type(":+1hr")
    line = server.expect_match(time_line_re("bob")).group(0)
    for page in (alice, bob):
        page.expect_line(line)
    carol.expect(line)

    alice.type(":Users")
    server.expect("alice: searched up active users")
    alice.expect_line("Active Users: alice, bob, carol")

    alice.type(":Msg bob hi bob")
    server.expect("alice: send message to bob")
    bob.expect_line("[Message from alice]: hi bob", where="#private")
    carol.send(":Msg alice psst")
    server.expect("carol: send message to alice")
    alice.expect_line("[Message from carol]: psst", where="#private")
    bob.type(":Msg carol from a browser")
    server.expect("bob: send message to carol")
    carol.expect("[Message from bob]: from a browser")
    alice.type(":Msg nobody hi")
    alice.expect_line("No user named nobody is in the chatroom")
    # The whispers went to the private list only: the next room line is this one.
    carol.send("after the whispers")
    everyone_but(carol, "carol: after the whispers")

    if os.environ.get("CHATROOM_SCREENSHOT"):
        alice.screenshot(str(repo_file("docs", "web-page.png")))

    carol.send(":Exit")
    everyone_but(carol, "carol left the chatroom")
    assert carol.wait() == 0
    alice.expect_users(["alice", "bob"])
    alice.type(":Exit")
    server.expect("alice left the chatroom")
    bob.expect_line("alice left the chatroom")
    alice.expect_visible("#lost", "You left the room.")
    alice.expect_status("left the room")
    bob.expect_users(["bob"])


def test_markup_from_the_room_is_shown_as_text(
        chromium: Any, pages: list[ChatPage], web: WebServer, room: Room) -> None:
    alice = tab(pages, chromium, web, "alice")
    alice.join("alice", PASSCODE)
    web.proc.expect("alice joined the chatroom")
    web.proc.expect("alice: searched up active users")
    bob = tab(pages, chromium, web, "bob")
    bob.join("bob", PASSCODE)
    web.proc.expect("bob joined the chatroom")
    web.proc.expect("bob: searched up active users")
    alice.expect_line("bob joined the chatroom")
    mallory = room.nc_join("mallory")  # from a terminal, no page to sanitise anything
    for page in (alice, bob):
        page.expect_line("mallory joined the chatroom")
    for text in XSS:
        bob.type(text)
        web.proc.expect(f"bob: {text}")
        alice.expect_line(f"bob: {text}")
        mallory.expect(f"bob: {text}")
        mallory.send(text)
        web.proc.expect(f"mallory: {text}")
        for page in (alice, bob):
            page.expect_line(f"mallory: {text}")
        mallory.send(f":Msg alice {text}")
        web.proc.expect("mallory: send message to alice")
        alice.expect_line(f"[Message from mallory]: {text}", where="#private")
    # What bob typed is shown to him as text too.
    echoes = bob.page.locator("#lines > .line.mine").all_text_contents()
    assert echoes == [f"bob: {text}" for text in XSS]
    assert alice.page.evaluate("document.images.length") == 0
    assert alice.page.evaluate("document.scripts.length") == 1  # the page's own


def test_a_wrong_passcode_and_a_taken_name_are_explained(
        chromium: Any, pages: list[ChatPage], web: WebServer, room: Room) -> None:
    page = tab(pages, chromium, web, "dave")
    page.login("dave", "wrong")
    page.expect_visible("#login-error", "Wrong passcode")
    assert page.page.input_value("#passcode") == ""  # cleared, to be typed again
    assert page.page.input_value("#username") == "dave"
    assert "wrong" not in page.page.url and page.page.url == web.page_url

    room.nc_join("bob")
    page.login("bob", PASSCODE)
    page.expect_visible("#login-error", "The name bob is taken")
    page.login("dave", PASSCODE)
    page.expect_status("in the room as dave")
    web.proc.expect("dave joined the chatroom")
    assert not page.page.is_visible("#login-error")
    # The passcode is in no URL and no storage.
    stored = page.page.evaluate(
        "JSON.stringify([location.href, localStorage.length, sessionStorage.length,"
        " document.cookie])")
    assert PASSCODE not in stored


class _Blank(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_site() -> Iterator[str]:
    """Another origin on loopback: a blank page on a port of its own."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_page_of_another_origin_cannot_open_the_websocket(
        chromium: Any, pages: list[ChatPage], web: WebServer, other_site: str) -> None:
    evil = ChatPage(chromium, other_site + "/", "another site")
    pages.append(evil)
    result = evil.page.evaluate(
        """url => new Promise(resolve => {
             const seen = [];
             const ws = new WebSocket(url, "chatroom.v1");
             ws.onopen = () => ws.send("LOGIN abc12 evil");
             ws.onmessage = e => seen.push(e.data);
             ws.onclose = e => resolve({code: e.code, reason: e.reason, seen});
           })""", web.ws_url)
    assert result == {"code": 1008, "reason": f"origin {other_site} is not allowed here",
                      "seen": []}
    # The room never saw it: the next thing the server prints is this join.
    page = tab(pages, chromium, web, "alice")
    page.join("alice", PASSCODE)
    web.proc.expect("alice joined the chatroom")


def try_now(page: ChatPage) -> None:
    """Press "Try now" (or nothing, if the page got back in meanwhile: the
    button is pressed by script, since it is hidden then)."""
    page.page.evaluate("document.getElementById('rejoin').click()")


def test_the_page_survives_the_server_going_away(
        chromium: Any, pages: list[ChatPage], web: WebServer, room: Room) -> None:
    alice = tab(pages, chromium, web, "alice")
    alice.join("alice", PASSCODE)
    web.proc.expect("alice joined the chatroom")

    # Shut down: the server says so, and the page tries again by itself.
    web.proc.signal(signal.SIGTERM)
    alice.expect_visible("#lost", "The server is shutting down. Trying again in")
    alice.expect_status("reconnecting…")
    assert web.proc.wait() == 0
    assert alice.text("#rejoin") == "Try now"
    # The message box stays usable; nothing is sent while away, the text stays.
    assert alice.page.is_enabled("#say") and alice.page.is_disabled("#send")
    alice.type("typed while away")
    assert alice.page.input_value("#say") == "typed while away"
    # Trying now while nobody listens fails and the page keeps trying.
    alice.page.click("#rejoin")
    alice.expect_visible("#lost", "Trying again in")
    assert not alice.page.is_visible("#login")

    # A new server on the same ports: the page gets back in by itself (its
    # pauses grow to 2 and 4 s by now, hence the longer wait).
    restarted = WebServer.start(room, tls=None, web_port=web.web_port)
    alice.expect_status("in the room as alice", timeout_ms=40_000)
    restarted.proc.expect("alice joined the chatroom")
    restarted.proc.expect("alice: searched up active users")
    assert alice.page.input_value("#say") == "typed while away"
    assert not alice.page.is_visible("#lost")
    alice.page.press("#say", "Enter")
    restarted.proc.expect("alice: typed while away")

    # Killed outright at once: the page notices the lost connection; its pauses
    # keep growing (it was back for less than 30 s), so "Try now" it is.
    restarted.proc.kill()
    alice.expect_visible("#lost", "Lost the connection to the server. Trying again in")
    again = WebServer.start(room, tls=None, web_port=web.web_port)
    try_now(alice)
    alice.expect_status("in the room as alice", timeout_ms=40_000)
    again.proc.expect("alice joined the chatroom")
    again.proc.expect("alice: searched up active users")
    alice.type("still here")
    again.proc.expect("alice: still here")

    # A refusal ends the retries: back to the login form, as for a first login.
    again.proc.kill()
    alice.expect_visible("#lost", "Lost the connection to the server")
    alice.expect_visible("#lost", "Trying again in")
    WebServer.start(room, tls=None, web_port=web.web_port, passcode="other")
    try_now(alice)
    alice.expect_visible("#login-error", "Wrong passcode")
    alice.expect_status("not connected")
    assert not alice.page.is_visible("#lost")


def test_a_full_server_is_tried_again_not_taken_for_a_refusal(
        chromium: Any, pages: list[ChatPage], web: WebServer, room: Room) -> None:
    alice = tab(pages, chromium, web, "alice")
    alice.join("alice", PASSCODE)
    web.proc.expect("alice joined the chatroom")
    web.proc.kill()
    alice.expect_visible("#lost", "Lost the connection to the server. Trying again in")
    # Back, with room for one connection, taken by bob.
    WebServer.start(room, "-max-clients", "1", tls=None, web_port=web.web_port)
    bob = room.nc_join("bob")
    try_now(alice)
    alice.expect_visible("#lost", "The server did not let the page in: The server is full")
    alice.expect_visible("#lost", "Trying again in")
    assert not alice.page.is_visible("#login")
    room.leave(bob)
    try_now(alice)
    alice.expect_status("in the room as alice", timeout_ms=40_000)
    web.proc.expect("alice joined the chatroom")


def test_the_page_over_https_and_wss(chromium: Any, pages: list[ChatPage], room: Room,
                                     tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    web = WebServer.start(room, "-tls-cert", str(cert), "-tls-key", str(key), tls=context)
    assert web.page_url.startswith("https://")
    page = tab(pages, chromium, web, "alice", ignore_https_errors=True)
    page.join("alice", PASSCODE)
    web.proc.expect("alice joined the chatroom")
    assert page.page.evaluate("location.protocol") == "https:"

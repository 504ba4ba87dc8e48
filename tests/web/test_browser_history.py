"""The chat page on a server with history (`-history N`), in a real browser:
the replay shown apart with local times, `:here` filling the user list, markup
in a replayed line shown as text, and the exact catch-up after the page lost
its server and found it again by itself.
"""

from __future__ import annotations

import signal
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from browser import ChatPage
from harness import PASSCODE, Peer, Room
from webwire import WebServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

XSS = ["<img src=x onerror=alert(1)>", "<script>alert(1)</script>",
       "<b onmouseover=alert(1)>bold</b> &amp; &lt;"]
ZONE = "Asia/Kolkata"  # UTC+05:30: local time is not UTC with the date cut off
RECONNECT_MS = 40_000  # the page's pauses between tries grow: 1, 2, 4, 8 s ...


def tab(pages: list[ChatPage], chromium: Any, web: WebServer, label: str) -> ChatPage:
    page = ChatPage(chromium, web.page_url, label, timezone_id=ZONE)
    pages.append(page)
    return page


def local_stamp(iso: str) -> str:
    """What the page should show for the server's UTC time, in ZONE."""
    zone = ZoneInfo(ZONE)
    when = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(zone)
    hm = when.strftime("%H:%M")
    return hm if when.date() == datetime.now(zone).date() else f"{when:%Y-%m-%d} {hm}"


def expect_past(page: ChatPage, line: str, low: datetime, high: datetime) -> None:
    """The next line is a replayed `line`, dimmed, with its time in front."""
    item = page.next_item()
    assert "past" in item["class"].split(), f"not shown as replayed: {item}"
    when = datetime.fromisoformat(item["when"].replace("Z", "+00:00"))
    assert low.timestamp() - 2 <= when.timestamp() <= high.timestamp() + 2, item
    assert item["text"] == f"{local_stamp(item['when'])} {line}", item


def nc_join(room: Room, name: str) -> Peer:
    """A raw connection in the room as `name`, its replay read (up to `:here`)."""
    peer = room.nc(label=name)
    peer.expect(":hello chatroom 1")
    peer.send(f"LOGIN {room.passcode} {name}")
    peer.expect(f":ok {name}")
    while not (peer.next_line() or ":here").startswith(":here"):
        pass
    peer.name = name
    room.announced_join(peer)
    return peer


def say(room: Room, peer: Peer, text: str, *pages: ChatPage) -> str:
    """`peer` says `text`: the server prints it, every page shows it live."""
    line = f"{peer.name}: {text}"
    peer.send(text)
    assert room.server is not None
    room.server.expect(line)
    for page in pages:
        assert page.next_line() == line
    return line


def test_a_late_joiner_sees_the_replay_apart_then_the_room(
        chromium: Any, pages: list[ChatPage], room: Room) -> None:
    web = WebServer.start(room, "-history", "50")
    start = datetime.now().astimezone()
    alice = nc_join(room, "alice")
    bob = nc_join(room, "bob")
    said = [say(room, alice, "Hello Room")]
    for text in XSS:
        said.append(say(room, bob, text))
    end = datetime.now().astimezone()

    erin = tab(pages, chromium, web, "erin")
    erin.join("erin", PASSCODE)
    web.proc.expect("erin joined the chatroom")
    web.proc.expect("erin: searched up active users")
    assert erin.next_line() == "earlier"
    for line in ["alice joined the chatroom", "bob joined the chatroom", *said]:
        expect_past(erin, line, start, end)
    assert erin.next_line() == "now"
    assert erin.next_line() == "Active Users: alice, bob, erin"
    erin.expect_users(["alice", "bob", "erin"])
    # Live lines after it, not dimmed, no time.
    live = say(room, alice, "welcome erin", erin)
    assert erin.room_lines()[-1] == live
    assert erin.page.locator("#lines > .line.past").count() == 2 + len(said)
    # The markup was text: no image, no script but the page's own.
    assert erin.page.evaluate("document.images.length") == 0
    assert erin.page.evaluate("document.scripts.length") == 1
    alice.send(":Exit")
    web.proc.expect("alice left the chatroom")
    assert erin.next_line() == "alice left the chatroom"
    erin.expect_users(["bob", "erin"])


def test_a_room_with_no_kept_line_shows_only_who_is_here(
        chromium: Any, pages: list[ChatPage], room: Room) -> None:
    web = WebServer.start(room, "-history", "50")
    erin = tab(pages, chromium, web, "erin")
    erin.join("erin", PASSCODE)
    assert erin.next_line() == "Active Users: erin"
    erin.expect_users(["erin"])


def test_the_page_catches_up_exactly_after_its_server_came_back(
        chromium: Any, pages: list[ChatPage], room: Room, tmp_path: Path) -> None:
    history = ("-history", "50", "-history-db", str(tmp_path / "history.db"))
    web = WebServer.start(room, *history)
    erin = tab(pages, chromium, web, "erin")
    erin.join("erin", PASSCODE)
    web.proc.expect("erin joined the chatroom")
    web.proc.expect("erin: searched up active users")
    assert erin.next_line() == "Active Users: erin"
    alice = nc_join(room, "alice")
    assert erin.next_line() == "alice joined the chatroom"
    before = say(room, alice, "before the restart", erin)
    erin.type("mine, before")
    web.proc.expect("erin: mine, before")
    alice.expect("erin: mine, before")

    # The server goes; the page tries again and again, on the web port only.
    web.proc.signal(signal.SIGTERM)
    assert web.proc.wait() == 0
    erin.expect_visible("#lost", "Trying again in")
    erin.expect_line("The server closed the connection: The server is shutting down.")
    erin.page.fill("#say", "half typed")

    # Meanwhile, on a server with the same history but no page, the room talks.
    room.members.clear()
    between = room.start_server(*history)
    alice = nc_join(room, "alice")
    away = [say(room, alice, "said while erin was away"), say(room, alice, "and again")]
    alice.send(":Exit")
    between.expect("alice left the chatroom")
    between.signal(signal.SIGTERM)
    assert between.wait() == 0

    # The server with the page comes back: the page gets in by itself and shows
    # what was said while it was away, once, between its dividers.
    room.members.clear()
    back = WebServer.start(room, *history, web_port=web.web_port)
    erin.expect_status("in the room as erin", timeout_ms=RECONNECT_MS)
    back.proc.expect("erin joined the chatroom")
    back.proc.expect("erin: searched up active users")
    erin.expect_line("You are back in the room as erin.")
    assert erin.next_line() == "while you were away"
    while erin.next_line() != "now":
        pass
    text = erin.room_lines()
    start, end = text.index("while you were away"), len(text) - text[::-1].index("now") - 1
    shown = text[start + 1:end]
    for line in away:
        assert shown.count(line) == 1, shown
    assert before not in shown and "erin: mine, before" not in shown, shown
    assert erin.next_line() == "Active Users: erin"
    assert erin.page.input_value("#say") == "half typed"

    # Live again: a new line shows once; everything said shows exactly once.
    carol = nc_join(room, "carol")
    assert erin.next_line() == "carol joined the chatroom"
    after = say(room, carol, "after", erin)
    text = erin.room_lines()
    for line in [before, "erin: mine, before", *away, after]:
        assert text.count(line) == 1, text

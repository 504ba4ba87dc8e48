"""Fixtures of the web tests (helpers live in webwire.py and browser.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from browser import ChatPage, launch
from harness import PROGRAM_DIR, Room
from webwire import WebServer


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """One headless chromium (Debian's) for every browser test; skips without
    it or playwright, fails under CI."""
    yield from launch()


@pytest.fixture
def room() -> Iterator[Room]:
    """A Room run by this interpreter (the one with websockets installed)."""
    the_room = Room(sys.executable, PROGRAM_DIR, PROGRAM_DIR)
    yield the_room
    tracebacks = the_room.close()
    if tracebacks:
        pytest.fail("a process printed a traceback:\n" + "\n".join(tracebacks), pytrace=False)


@pytest.fixture
def web(room: Room) -> Iterator[WebServer]:
    """server.py with -web 0, nobody in the room yet."""
    server = WebServer.start(room)
    yield server
    server.close()


@pytest.fixture
def pages(chromium: Any) -> Iterator[list[ChatPage]]:
    """Every tab a test opens, closed (and checked for safety) at its end."""
    opened: list[ChatPage] = []
    yield opened
    for page in opened:
        page.assert_safe()
        page.close()

"""client.Link's bound on what waits for the server (HOLD_LIMIT): a sender is
held while more than the limit is queued, and let go as the server reads or
once the connection has ended. A real socket pair, no server process."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator

import pytest

import client
from client import HOLD_LIMIT, LineSplitter, Link

TIMEOUT = 10.0
LINE = b"y" * 999 + b"\n"


@pytest.fixture(autouse=True)
def wake_signal_ignored() -> Iterator[None]:
    """The Link's thread signals the main thread when it ends; in a test
    nobody waits for that signal."""
    previous = signal.signal(client.WAKE_SIGNAL, lambda signum, frame: None)
    yield
    signal.signal(client.WAKE_SIGNAL, previous)


@pytest.fixture
def pair() -> Iterator[tuple[Link, socket.socket]]:
    """A started Link on one end of a socket pair; the test holds the other."""
    ours, theirs = socket.socketpair()
    link = Link(ours, LineSplitter(), lambda event: None)
    link.start()
    yield link, theirs
    link.stop()
    theirs.close()


def waiter(link: Link) -> tuple[threading.Thread, list[int]]:
    """A thread in wait_for_room(); once let go, it notes how much was queued."""
    queued: list[int] = []

    def wait() -> None:
        link.wait_for_room()
        with link._lock:
            queued.append(len(link._outbox))

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, queued


def test_no_wait_under_the_limit(pair: tuple[Link, socket.socket]) -> None:
    link, _ = pair
    link.send(LINE * (HOLD_LIMIT // len(LINE) // 2))
    thread, queued = waiter(link)
    thread.join(TIMEOUT)
    assert not thread.is_alive() and queued


def test_held_past_the_limit_until_the_server_reads(pair: tuple[Link, socket.socket]) -> None:
    link, theirs = pair
    lines = 3 * HOLD_LIMIT // len(LINE)
    link.send(LINE * lines)
    thread, queued = waiter(link)
    thread.join(0.5)
    assert thread.is_alive(), "not held with three times the limit queued"
    theirs.settimeout(TIMEOUT)
    received = bytearray()
    while len(received) < lines * len(LINE):
        data = theirs.recv(1 << 16)
        assert data
        received += data
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert queued[0] <= HOLD_LIMIT
    assert received == LINE * lines  # nothing lost or reordered by the hold


def test_let_go_once_the_connection_has_ended(pair: tuple[Link, socket.socket]) -> None:
    link, theirs = pair
    link.send(LINE * (3 * HOLD_LIMIT // len(LINE)))
    thread, _ = waiter(link)
    theirs.close()  # the server goes away without reading
    assert link.finished.wait(TIMEOUT)
    thread.join(TIMEOUT)
    assert not thread.is_alive()

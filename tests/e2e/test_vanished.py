"""A member whose machine or network vanishes without a word is dropped.

Nothing is sent when a network goes down, so only the kernel's keepalive
can tell: the server has it on every member's connection, and client.py on
its own (so that -reconnect notices a vanished server too). Seen here from
outside, in the sockets' timers as `ss` shows them.
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest
from harness import DEFAULT_TIMEOUT, Room, watched_sockets

import client

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_every_member_connection_and_client_is_watched_for_silence(room: Room) -> None:
    room.start_server()
    assert room.port is not None
    room.join("alice")  # client.py
    room.nc_join("bob")  # a raw socket of this test, with no keepalive of its own
    assert watched_sockets("sport", room.port) == [True, True]  # the server's two
    assert sorted(watched_sockets("dport", room.port)) == [False, True]  # bob's, alice's


TCP_REPAIR = getattr(socket, "TCP_REPAIR", 19)  # Linux; Python does not name it


def close_without_a_word(sock: socket.socket) -> None:
    """Close `sock` sending nothing, not even a FIN: as if its machine had
    gone (TCP repair mode, which needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def repair_mode_allowed() -> bool:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        probe = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        try:
            close_without_a_word(probe)
        except OSError:
            probe.close()
            return False
        finally:
            accepted.close()
    return True


class Network:
    """A path from clients to the server: forwards bytes both ways, and can
    vanish() the first connection, as a network going down does to one
    member. The client's side is reset (its machine sees the loss); the
    server's side is closed without a word (the server sees nothing)."""

    def __init__(self, server_port: int) -> None:
        self._server_port = server_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._vanish = threading.Event()
        self._vanished = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def vanish(self) -> None:
        self._vanish.set()
        assert self._vanished.wait(DEFAULT_TIMEOUT)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(DEFAULT_TIMEOUT)
        for pair in self._pairs:
            for sock in pair:
                sock.close()
        self._listener.close()
        self._selector.close()
        assert self.error is None, f"the network's thread failed: {self.error!r}"

    def _run(self) -> None:
        try:
            self._forward()
        except BaseException as exc:  # said by close(), not lost with the thread
            self.error = exc

    def _forward(self) -> None:  # one thread: a socket is never closed under another's recv
        while not self._stop.is_set():
            if self._vanish.is_set() and not self._vanished.is_set():
                client_side, server_side = self._pairs[0]
                for sock in (client_side, server_side):
                    self._selector.unregister(sock)
                close_without_a_word(server_side)
                client_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client_side.close()
                self._vanished.set()
            for key, _ in self._selector.select(0.05):
                if key.fileobj is self._listener:
                    client_side, _ = self._listener.accept()
                    server_side = socket.create_connection(("127.0.0.1", self._server_port))
                    self._pairs.append((client_side, server_side))
                    self._selector.register(client_side, selectors.EVENT_READ, server_side)
                    self._selector.register(server_side, selectors.EVENT_READ, client_side)
                    continue
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                if ready.fileno() < 0:  # closed with its partner earlier in this batch
                    continue
                try:
                    data = ready.recv(65536)
                    if data:
                        key.data.sendall(data)
                        continue
                except OSError:
                    pass
                for end in (ready, key.data):  # one end done: the pair is done
                    if end.fileno() >= 0:
                        self._selector.unregister(end)
                        end.close()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_member_whose_network_vanished_is_dropped_and_reconnect_brings_it_back() -> None:
    # On the interpreter running the tests only: this test waits on the
    # kernel's clock (the keepalive's 30 s), not on the program's speed.
    if not repair_mode_allowed():
        pytest.skip("closing a socket without a word needs CAP_NET_ADMIN (TCP repair mode)")
    room = Room(sys.executable, ROOT, ROOT)
    network: Network | None = None
    try:
        room.start_server()
        assert room.port is not None
        bob = room.nc_join("bob")
        network = Network(room.port)
        alice = room.spawn_client(*room.client_args("alice", port=network.port), "-reconnect",
                                  name="alice")
        alice.expect(f"Connected to 127.0.0.1 on port {network.port}")
        bob.expect("alice joined the chatroom")

        network.vanish()
        assert alice.expect_err_line().startswith("client.py: lost the connection to the server")
        # alice is back at once, but her name is still held by the connection the
        # server cannot yet know is gone: she is refused and tries again meanwhile.
        # Keepalive: 30 s of quiet, then a probe, which her machine answers with a reset.
        bob.expect("alice left the chatroom", timeout=30 + 30)
        bob.expect("alice joined the chatroom", timeout=client.GHOST_WAIT)
        while (line := alice.expect_err_line(timeout=client.GHOST_WAIT)).startswith(
                "client.py: refused: The username alice is already in the chatroom"):
            pass
        assert line == f"client.py: connected again to 127.0.0.1 port {network.port}"
        bob.send("welcome back")
        alice.expect("bob: welcome back")
    finally:
        if network is not None:
            network.close()
        tracebacks = room.close()
    assert not tracebacks, tracebacks

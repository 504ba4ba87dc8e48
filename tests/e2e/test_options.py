"""server.py's options beyond the contract (README, docs/PROTOCOL.md's error
codes): limits against hostile or broken clients, and TLS. Driven over raw
sockets so that each refusal is seen to the byte."""

from __future__ import annotations

import signal
import socket
import ssl
from pathlib import Path

import pytest
from harness import PASSCODE, Peer, Room, expect_one_error_line

pytestmark = [pytest.mark.e2e, pytest.mark.nc]

NO_EXEMPT = ("-exempt", "")  # loopback is exempt from per-address limits by default


def expect_refusal(peer: Peer, code: str) -> None:
    """`:error <code> <text>` (after `:hello`, if the server sent one), then closed."""
    line = peer.next_line()
    if line == ":hello chatroom 1":
        line = peer.next_line()
    if line is None or not line.startswith(f":error {code} ") or len(line) <= len(code) + 8:
        peer.fail(f"expected ':error {code} <text>', got {line!r}")
    peer.expect_closed()


def test_max_line(room: Room) -> None:
    room.start_server("-max-line", "20")  # the login line is a line too: 16 bytes here
    dave = room.nc_join("dave")
    room.nc_join("erin")
    room.say(dave, "0123456789" * 2)  # 20 bytes: accepted
    dave.send("0123456789" * 2 + "X")
    dave.expect_match(r":error line-too-long .+")
    room.assert_quiet(dave)


def test_flood_without_line_end_is_disconnected(room: Room) -> None:
    room.start_server("-max-line", "20")
    dave = room.nc_join("dave")
    erin = room.nc_join("erin")
    dave.send_raw(b"x" * 161)  # more than 8 x 20 bytes with no line end
    expect_refusal(dave, "flood")
    room.announced_leave(dave)
    room.assert_quiet(erin)


def test_login_timeout(room: Room) -> None:
    room.start_server("-login-timeout", "0.5")
    alice = room.nc_join("alice")
    idle = room.nc(label="idle")
    idle.expect(":hello chatroom 1")
    expect_refusal(idle, "login-timeout")
    room.assert_quiet(alice)  # the server printed nothing about it


def test_max_clients(room: Room) -> None:
    room.start_server("-max-clients", "1")
    alice = room.nc_join("alice")
    expect_refusal(room.nc(label="second"), "full")
    room.assert_quiet(alice)


def test_max_per_ip_when_loopback_is_not_exempt(room: Room) -> None:
    room.start_server("-max-per-ip", "1", *NO_EXEMPT)
    alice = room.nc_join("alice")
    expect_refusal(room.nc(label="second"), "full")
    room.assert_quiet(alice)


def test_loopback_is_exempt_by_default(room: Room) -> None:
    room.start_server("-max-per-ip", "1")
    room.nc_join("alice")
    room.nc_join("bob")
    room.assert_quiet()


def test_login_failures_throttle(room: Room) -> None:
    room.start_server("-login-failures", "2", "-failure-window", "60", *NO_EXEMPT)
    alice = room.nc_join("alice")
    for attempt in range(2):
        peer = room.nc(label=f"guess-{attempt}")
        peer.expect(":hello chatroom 1")
        peer.send("LOGIN wrong dave")
        peer.expect(":error passcode Incorrect passcode")
        peer.expect_closed()
    late = room.nc(label="right-passcode-too-late")
    late.send(f"LOGIN {PASSCODE} dave")
    expect_refusal(late, "throttled")
    room.assert_quiet(alice)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_shutdown_tells_raw_connections(room: Room, sig: signal.Signals) -> None:
    server = room.start_server()
    dave = room.nc_join("dave")
    waiting = room.nc(label="not-logged-in")
    waiting.expect(":hello chatroom 1")
    server.signal(sig)
    for peer in (dave, waiting):
        expect_refusal(peer, "shutdown")
    assert server.wait() == 0, server.describe()
    server.assert_no_traceback()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-max-line", "0"], id="max-line-zero"),
        pytest.param(["-max-clients", "x"], id="max-clients-not-a-number"),
        pytest.param(["-login-timeout", "-1"], id="negative-timeout"),
        pytest.param(["-exempt", "not-a-net"], id="bad-exempt"),
        pytest.param(["-redis-backlog", "0"], id="redis-backlog-zero"),
        pytest.param(
            ["-tls-cert", "/nonexistent.pem", "-tls-key", "/nonexistent.key"],
            id="missing-tls-files",
        ),
    ],
)
def test_bad_option_values(room: Room, args: list[str]) -> None:
    server = room.spawn_server("-start", "-port", "0", "-passcode", PASSCODE, *args)
    code, rest, err = server.finish()
    assert code != 0 and rest == [] and len(err) == 1, server.describe()
    server.assert_no_traceback()


# -- TLS -------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    with files["cert"].open("wb") as chain:
        for blob in cert.cert_chain_pems:
            chain.write(blob.bytes())
    return {k: str(v) for k, v in files.items()}


def tls_server(room: Room, tls_files: dict[str, str]) -> None:
    room.start_server("-tls-cert", tls_files["cert"], "-tls-key", tls_files["key"])


def test_tls_room_with_real_clients(room: Room, tls_files: dict[str, str]) -> None:
    tls_server(room, tls_files)
    ca = tls_files["ca"]
    alice = room.spawn_client(
        *room.client_args("alice", host="localhost"), "-tls", "-tls-ca", ca, name="alice"
    )
    alice.expect(f"Connected to localhost on port {room.port}")
    room.announced_join(alice)
    bob = room.spawn_client(*room.client_args("bob"), "-tls-ca", ca, name="bob")  # implies -tls
    bob.expect(f"Connected to 127.0.0.1 on port {room.port}")
    room.announced_join(bob)
    room.say(alice, "secret hello")
    room.assert_quiet(alice)
    room.leave(bob)


def test_tls_raw_socket(room: Room, tls_files: dict[str, str]) -> None:
    tls_server(room, tls_files)
    assert room.port is not None
    context = ssl.create_default_context(cafile=tls_files["ca"])
    raw = socket.create_connection(("127.0.0.1", room.port), timeout=10)
    peer = Peer(context.wrap_socket(raw, server_hostname="127.0.0.1"), label="tls-nc")
    room.peers.append(peer)
    peer.expect(":hello chatroom 1")
    peer.send(f"LOGIN {PASSCODE} dave")
    peer.expect(":ok dave")
    assert room.server is not None
    room.server.expect("dave joined the chatroom")


def test_tls_client_refuses_an_untrusted_certificate(room: Room, tls_files: dict[str, str]) -> None:
    tls_server(room, tls_files)
    client = room.spawn_client(*room.client_args("alice"), "-tls", name="alice")
    expect_one_error_line(client, status=1)


def test_uvloop_runs_the_same_room(room: Room, python: str) -> None:
    """-uvloop (optional extra) changes the event loop, not one byte of the room."""
    import sys

    if python != sys.executable:
        pytest.skip("uvloop is installed for the test runner's Python only")
    pytest.importorskip("uvloop")
    room.start_server("-uvloop")
    alice = room.join("alice")
    bob = room.join("bob")
    room.say(alice, "over uvloop")
    room.say(bob, ":)", shown="[feeling happy]")
    room.assert_quiet(alice)
    room.leave(bob)


def test_uvloop_missing_is_one_line(room: Room, tmp_path: Path) -> None:
    """Without the package (-S: no site-packages), -uvloop names what to install,
    in one line, status 2."""
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "server.py").write_bytes((Path(__file__).parents[2] / "server.py").read_bytes())
    import subprocess

    done = subprocess.run(
        [room.python, "-I", "-S", "server.py", "-start", "-port", "0", "-passcode", "abc",
         "-uvloop"],
        cwd=alone, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "pip install uvloop" in line

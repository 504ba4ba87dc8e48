"""The web door without a browser: HTTP, the WebSocket protocol, the limits.

A WebSocket member must be a member like any other: same lines, same room,
same limits. These tests hold server.py with -web to that with the
`websockets` library's client, hand-made frames and raw sockets.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import PASSCODE, Room, expect_one_error_line, time_line_re, watched_sockets
from webwire import InvalidStatus, RawWs, WebServer, repo_file, run_server_without

pytestmark = pytest.mark.e2e


def get(url: str, method: str = "GET", context: ssl.SSLContext | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# -- HTTP ------------------------------------------------------------------------


def test_healthz_answers_ok(web: WebServer) -> None:
    status, headers, body = get(web.origin + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"].startswith("text/plain")


def test_the_page_is_served_under_a_strict_policy(web: WebServer) -> None:
    status, headers, body = get(web.page_url)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'none'"
    html = body.decode()
    markup = re.sub(r"<!--.*?-->", "", html, flags=re.DOTALL)
    assert markup.count("<script") == 1 and markup.count("<style") == 1
    # Exactly one inline script and one style, each allowed by its own hash
    # and nothing else: no 'unsafe-inline', no host, no other script.
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        blocks = re.findall(rf"^<{tag}>(.*?)^</{tag}>", html, re.DOTALL | re.MULTILINE)
        assert len(blocks) == 1, tag
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert csp[directive] == f"'sha256-{digest}'"
    assert "unsafe" not in headers["Content-Security-Policy"]
    # Self-contained: nothing is loaded from anywhere, the line limit is filled in.
    assert not re.search(r"\b(src|href)\s*=", html)
    assert 'data-max-line="2048"' in html
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html
    assert "localStorage" not in html and "sessionStorage" not in html


def test_other_paths_and_methods_are_refused(web: WebServer) -> None:
    assert get(web.origin + "/nope")[0] == 404
    assert get(web.origin + "/app.js")[0] == 404
    status, headers, _ = get(web.page_url, method="DELETE")
    assert (status, headers["Allow"]) == (405, "GET")


def test_a_request_that_never_ends_is_cut_off(room: Room) -> None:
    web = WebServer.start(room, "-login-timeout", "1")
    with socket.create_connection(("127.0.0.1", web.web_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        try:
            assert sock.recv(1024) == b""  # closed at the deadline, with no answer
        except ConnectionResetError:
            pass


def test_an_endless_request_is_cut_off(web: WebServer) -> None:
    with socket.create_connection(("127.0.0.1", web.web_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(100):  # 100 KiB of headers, more than any browser sends
                sock.sendall(b"X-Padding: " + b"y" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off while sending
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass


def test_the_websocket_needs_the_subprotocol(web: WebServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        web.ws(subprotocols=[])
    assert info.value.response.status_code == 400


# -- One room: WebSocket, TCP and client.py members together ---------------------------


def test_a_websocket_member_is_a_member_like_any_other(room: Room, web: WebServer) -> None:
    alice = web.ws_join("alice")
    bob = room.nc_join("bob")
    alice.expect("bob joined the chatroom")
    carol = room.connect("carol")
    web.announced("carol joined the chatroom", alice, bob)

    bob.send(":Users")
    web.proc.expect("bob: searched up active users")
    bob.expect("Active Users: alice, bob, carol")
    alice.send(":Users")
    web.proc.expect("alice: searched up active users")
    alice.expect("Active Users: alice, bob, carol")

    alice.send("Hello from a browser")
    web.announced("alice: Hello from a browser", bob, carol)
    bob.send("hi alice")
    web.announced("bob: hi alice", alice, carol)
    alice.send(":)")
    web.announced("alice: [feeling happy]", bob, carol)
    alice.send(":(")
    web.announced("alice: [feeling sad]", bob, carol)
    alice.send("\\:)")
    web.announced("alice: :)", bob, carol)
    alice.send(":Msg carol psst")
    web.proc.expect("alice: send message to carol")
    carol.expect("[Message from alice]: psst")
    carol.send(":Msg alice back")
    web.proc.expect("carol: send message to alice")
    alice.expect("[Message from carol]: back")
    alice.send(":Msg nobody hi")
    alice.expect(":error no-such-user No user named nobody is in the chatroom")
    alice.send(":mytime")
    line = web.proc.expect_match(time_line_re("alice")).group(0)
    for member in (alice, bob, carol):
        member.expect(line)
    alice.send(":+1hr")
    line = web.proc.expect_match(time_line_re("alice")).group(0)
    for member in (alice, bob, carol):
        member.expect(line)

    alice.send(":Exit")
    alice.expect(":bye")
    assert alice.expect_closed() == (1000, "")
    web.announced("alice left the chatroom", bob, carol)


def test_a_closed_websocket_leaves_the_room(web: WebServer, room: Room) -> None:
    bob = room.nc_join("bob")
    alice = web.ws_join("alice", bob)
    alice.close()
    web.announced("alice left the chatroom", bob)


def test_a_websocket_member_is_watched_for_silence(web: WebServer, room: Room) -> None:
    bob = room.nc_join("bob")
    web.ws_join("alice", bob)
    assert watched_sockets("sport", web.web_port) == [True]


def test_names_are_one_namespace(web: WebServer, room: Room) -> None:
    room.nc_join("bob")
    taken = web.ws("taken")
    taken.expect(":hello chatroom 1")
    taken.send(f"LOGIN {PASSCODE} BOB")
    taken.expect(":error name-taken The username BOB is already in the chatroom")
    assert taken.expect_closed()[0] == 1000
    wrong = web.ws("wrong")
    wrong.expect(":hello chatroom 1")
    wrong.send("LOGIN nope dave")
    wrong.expect(":error passcode Incorrect passcode")
    wrong.expect_closed()


def test_the_server_shutting_down_tells_websocket_members(web: WebServer) -> None:
    alice = web.ws_join("alice")
    web.proc.signal(signal.SIGINT)
    alice.expect(":error shutdown The server is shutting down")
    assert alice.expect_closed()[0] == 1000
    assert web.proc.wait() == 0


# -- What is refused, and why --------------------------------------------------------------


def assert_quiet_then(web: WebServer, name: str) -> None:
    """The server printed nothing since: the next stdout line is `name` joining."""
    web.ws_join(name)


def test_a_websocket_without_origin_is_refused(web: WebServer) -> None:
    sneaky = web.ws(origin=None)
    assert sneaky.expect_closed() == (1008, "no Origin header")
    assert sneaky.seen == []  # not even :hello
    assert_quiet_then(web, "alice")


def test_a_websocket_from_a_foreign_origin_is_refused(web: WebServer) -> None:
    for origin in ("http://evil.example", f"http://localhost:{web.web_port}",
                   f"https://127.0.0.1:{web.web_port}", "null"):
        sneaky = web.ws(origin=origin)
        assert sneaky.expect_closed() == (1008, f"origin {origin} is not allowed here")
        assert sneaky.seen == []
    assert_quiet_then(web, "alice")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_the_page_s_own_origin_is_allowed_for_an_address_or_localhost(
        web: WebServer, host: str) -> None:
    hostport = f"{host}:{web.web_port}"
    raw = RawWs(web, "own", origin=f"http://{hostport}", host=hostport)
    assert raw.next_text() == ":hello chatroom 1"


def test_a_name_in_host_is_not_trusted_by_itself(web: WebServer) -> None:
    """DNS rebinding: evil.example resolves to the server; its page's origin
    matches the Host its browser sends, and is still refused."""
    hostport = f"evil.example:{web.web_port}"
    raw = RawWs(web, "rebound", origin=f"http://{hostport}", host=hostport)
    assert raw.close_frame() == (1008, f"origin http://{hostport} is not allowed here")


def test_a_name_given_with_web_origin_is_trusted(room: Room) -> None:
    web = WebServer.start(room, "-web-origin", "http://chat.test")
    raw = RawWs(web, "named", origin="http://chat.test", host="chat.test")
    assert raw.next_text() == ":hello chatroom 1"


def test_web_origin_adds_allowed_origins(room: Room) -> None:
    web = WebServer.start(room, "-web-origin", "https://chat.example.org/",
                          "-web-origin", "http://a.test:8080,http://b.test")
    for origin in ("https://chat.example.org", "http://a.test:8080", "http://B.test",
                   web.origin):
        member = web.ws(origin=origin)
        member.expect(":hello chatroom 1")
        member.close()
    for origin in ("http://chat.example.org", "http://a.test", "https://b.test"):
        assert web.ws(origin=origin).expect_closed()[0] == 1008


def test_a_binary_frame_is_refused(web: WebServer) -> None:
    alice = web.ws_join("alice")
    alice.send_binary(b"hello")
    code, reason = alice.expect_closed()
    assert code == 1003 and "binary" in reason
    web.announced("alice left the chatroom")


def test_a_message_over_the_line_limit_is_refused(room: Room) -> None:
    web = WebServer.start(room, "-max-line", "100")
    alice = web.ws_join("alice")
    alice.send("x" * 100)  # exactly the limit: fine
    web.proc.expect("alice: " + "x" * 100)
    alice.send("é" * 51)  # 102 bytes: the limit counts bytes, as on TCP
    assert alice.expect_closed() == (1009, "line too long: at most 100 bytes in one message")
    web.announced("alice left the chatroom")


def test_a_message_of_several_lines_is_refused(web: WebServer) -> None:
    alice = web.ws_join("alice")
    alice.send("one\n:Users")
    assert alice.expect_closed() == (1007, "one line per message: no line end inside")
    web.announced("alice left the chatroom")


def test_a_message_must_be_utf8(web: WebServer) -> None:
    raw = web.raw()
    assert raw.next_text() == ":hello chatroom 1"
    raw.frame(0x1, b"LOGIN abc12 \xff")
    frame = raw.next_frame()
    assert frame is not None and frame[0] == 0x8
    assert frame[1][:2] == (1007).to_bytes(2, "big")


def test_a_fragmented_message_is_one_line(web: WebServer) -> None:
    raw = web.raw()
    assert raw.next_text() == ":hello chatroom 1"
    raw.frame(0x1, b"LOGIN abc12 ", fin=False)
    raw.frame(0x9, b"ping")  # a control frame may come between fragments
    raw.frame(0x0, b"fra", fin=False)
    raw.frame(0x0, b"g")
    assert raw.next_frame() == (0xA, b"ping")
    assert raw.next_text() == ":ok frag"
    web.proc.expect("frag joined the chatroom")


# -- Every limit counts browser members too ---------------------------------------------------


def test_per_address_limit_counts_websockets_and_tcp_together(room: Room) -> None:
    web = WebServer.start(room, "-max-per-ip", "2", "-exempt", "")
    tcp = room.nc()
    tcp.expect(":hello chatroom 1")
    first = web.ws("first")
    first.expect(":hello chatroom 1")
    third = web.ws("third")
    third.expect(":error full Too many connections from your address")
    assert third.expect_closed()[0] == 1000


def test_the_login_deadline_applies(room: Room) -> None:
    web = WebServer.start(room, "-login-timeout", "1")
    slow = web.ws("slow")
    slow.expect(":hello chatroom 1")
    slow.expect(":error login-timeout The login was not finished in time", timeout=5)
    slow.expect_closed()


def test_the_passcode_throttle_counts_websockets(room: Room) -> None:
    web = WebServer.start(room, "-login-failures", "2", "-exempt", "")
    for _ in range(2):
        guess = web.ws("guess")
        guess.expect(":hello chatroom 1")
        guess.send("LOGIN wrong eve")
        guess.expect(":error passcode Incorrect passcode")
    tcp = room.nc()
    tcp.expect(":hello chatroom 1")
    tcp.send(f"LOGIN {PASSCODE} eve")  # the right passcode, from the same address
    tcp.expect(":error throttled Too many wrong passcodes; try again later")


def test_a_websocket_member_that_stops_reading_is_dropped_at_its_sendq(room: Room) -> None:
    web = WebServer.start(room, "-max-sendq", "16384", "-line-rate", "0", "-byte-rate", "0")
    slow = RawWs(web, "slow", recv_buffer=4096)
    assert slow.next_text() == ":hello chatroom 1"
    slow.text(f"LOGIN {PASSCODE} slow")
    assert slow.next_text() == ":ok slow"
    web.proc.expect("slow joined the chatroom")
    bob = room.nc_join("bob")  # slow stops reading here
    line = "x" * 1000
    sent = 0
    while sent < 50_000:  # at most 50 MB: the kernel's buffers, then 16 KiB
        bob.send_raw("".join(f"{sent + i} {line}\n" for i in range(100)).encode())
        for i in range(100):
            text = web.proc.next_line()
            if text == "slow left the chatroom":
                bob.expect("slow left the chatroom")
                print(f"\nslow was dropped after {sent + i} lines of {len(line) + 12} bytes")
                slow.close()
                return
            assert text == f"bob: {sent + i} {line}"
        sent += 100
    pytest.fail("slow was never dropped")


# -- TLS ---------------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certs]:
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    paths = Certs(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    issued.private_key_pem.write_to_path(str(paths.key))
    paths.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    yield paths


def test_tls_serves_https_and_wss_with_the_same_certificate(room: Room, certs: Certs) -> None:
    context = ssl.create_default_context(cafile=str(certs.ca))
    web = WebServer.start(room, "-tls-cert", str(certs.cert), "-tls-key", str(certs.key),
                          tls=context)
    assert web.scheme == "https"
    status, headers, _ = get(web.page_url, context=context)
    assert status == 200 and "Content-Security-Policy" in headers
    assert get(web.origin + "/healthz", context=context)[2] == b"ok\n"
    alice = web.ws_join("alice")  # Origin https://127.0.0.1:PORT, the page's own
    alice.send("over wss")
    web.proc.expect("alice: over wss")
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        # plain HTTP gets no page
        get(f"http://127.0.0.1:{web.web_port}/healthz")


# -- The command line -------------------------------------------------------------------------


def test_without_websockets_the_flag_is_one_line() -> None:
    out = run_server_without("websockets", "-start", "-port", "0", "-passcode", "abc12",
                             "-web", "0")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("server.py: error: -web needs ")
    assert "pip install '.[web]'" in out.stderr


def test_server_py_alone_says_what_web_needs(tmp_path: Path) -> None:
    """server.py copied alone (no chatroom_ext beside it) runs, and -web is one line."""
    shutil.copy(repo_file("server.py"), tmp_path / "server.py")
    bare = getattr(sys, "_base_executable", sys.executable)  # no venv: nothing installed
    out = subprocess.run([bare, "-I", "server.py", "-start", "-port", "0",
                          "-passcode", "abc12", "-web", "0"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("server.py: error: -web needs the chatroom_ext package beside "
                          "server.py and websockets: pip install '.[web]' "
                          "(could not import chatroom_ext)\n")


def test_a_busy_web_port_is_one_line(room: Room) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = room.spawn_server("-start", "-port", "0", "-passcode", "abc12", "-web", str(port))
        line = expect_one_error_line(proc, status=1)
    assert line == (f"server.py: cannot listen on 127.0.0.1 port {port} (-web): "
                    "address already in use")


@pytest.mark.parametrize("flags", [["-web-origin", "http://x.test"], ["-web-host", "::1"],
                                   ["-web", "0", "-web-origin", "ftp://x.test"],
                                   ["-web", "0", "-web-origin", "http://x.test/path"]])
def test_bad_web_flags_are_one_line(room: Room, flags: list[str]) -> None:
    proc = room.spawn_server("-start", "-port", "0", "-passcode", "abc12", *flags)
    expect_one_error_line(proc, status=2)


def test_the_page_ships_with_the_package() -> None:
    assert repo_file("chatroom_ext", "page.html").is_file()
    text = repo_file("pyproject.toml").read_text()
    assert 'chatroom_ext = ["page.html"]' in text

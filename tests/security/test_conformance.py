"""Conformance over raw sockets, in the spirit of irctest: one test per limit and
per kind of bad input, against a real `server.py` process, asserting the exact
protocol lines of docs/PROTOCOL.md. After each, the server must still serve a
normal client, and neither the server nor any member printed anything for a
refused login (Lab.assert_serving checks both with an in-order barrier)."""

from __future__ import annotations

import random
import signal
import socket
import ssl
import time

import pytest
from secwire import (
    NO_BUDGET,
    Lab,
    LineCollector,
    RssSampler,
    check_flow,
    flood_line,
    flood_until_dropped,
    read_all,
    sanitised,
)

pytestmark = pytest.mark.nc

MiB = 1 << 20


# =============================================================================
# Limits
# =============================================================================

# -- the longest line -----------------------------------------------------------


def test_over_long_line_is_refused_and_the_connection_stays(lab: Lab) -> None:
    srv = lab.server("-max-line", "64")
    alice = lab.member(srv, "alice")
    bob = lab.member(srv, "bob", alice)

    alice.send(b"y" * 65 + b"\n")
    text = alice.expect_error("line-too-long")
    assert "64" in text, f"the error should name the limit: {text!r}"
    alice.send(b"z" * 500 + b"\n")  # far over, still under the flood limit (8 x 64)
    alice.expect_error("line-too-long")
    alice.send(b"w" * 64 + b"\r\n")  # exactly the limit, CR not counted
    alice.say("x" * 64)  # exactly the limit
    alice.say("still here")

    for line in ("w" * 64, "x" * 64, "still here"):
        bob.expect(f"alice: {line}")
        srv.expect(f"alice: {line}")
    alice.say(":Users")
    alice.expect("Active Users: alice, bob")  # nothing else was due to alice
    srv.expect("alice: searched up active users")
    lab.assert_serving(srv, alice, bob)


def test_over_long_login_line_is_a_bad_login(lab: Lab) -> None:
    srv = lab.server("-max-line", "64")
    w = lab.wire(srv.port)
    w.send(b"LOGIN abc12 " + b"n" * 60 + b"\n")
    w.hello()
    w.expect_refused("bad-login")
    lab.assert_serving(srv)


# -- streaming without a line end ---------------------------------------------------


def test_member_streaming_without_newline_is_cut_off_as_flood(lab: Lab) -> None:
    srv = lab.server("-max-line", "64")
    alice = lab.member(srv, "alice")
    eve = lab.member(srv, "eve", alice)
    eve.send(b"e" * 300)  # under 8 x 64: nothing yet
    eve.send(b"e" * 300)  # 600 > 512 without a line end
    eve.expect_refused("flood")
    alice.expect("eve left the chatroom")
    srv.expect("eve left the chatroom")
    lab.assert_serving(srv, alice)


def test_streaming_before_login_is_cut_off_as_flood(lab: Lab) -> None:
    srv = lab.server("-max-line", "64")
    w = lab.wire(srv.port)
    w.send(b"L" * (8 * 64 + 1))
    w.hello()
    w.expect_refused("flood")
    lab.assert_serving(srv)


def test_streaming_50_mib_without_newline_keeps_server_memory_bounded(lab: Lab) -> None:
    srv = lab.server()  # default -max-line 2048: cut off after 16 KiB
    alice = lab.member(srv, "alice")
    eve = lab.member(srv, "eve", alice)
    base = srv.rss()
    sampler = RssSampler(srv.pid, timeout=30)
    chunk = b"\x00\xff" * 32768  # 64 KiB of junk, never a line end
    eve.sock.settimeout(5)
    sent, cut = 0, None
    deadline = time.monotonic() + 20
    for _ in range(800):  # at most 50 MiB
        assert time.monotonic() < deadline, "streaming took too long"
        try:
            eve.sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError) as exc:
            cut = exc
            break
        except TimeoutError:
            pytest.fail(f"the server stopped reading after {sent} bytes but did not "
                        "disconnect the streaming client")
        sent += len(chunk)
    peak = sampler.stop()
    print(f"\nstreaming without newline: sent {sent / MiB:.2f} MiB before the cut "
          f"({cut!r}); server RSS {base} KiB -> peak {peak} KiB (+{peak - base} KiB)")
    assert cut is not None, f"still connected after {sent / MiB:.0f} MiB without a line end"
    assert sent < 16 * MiB, f"cut off only after {sent / MiB:.1f} MiB"
    assert peak - base < 8 * 1024, f"server RSS grew by {peak - base} KiB"
    alice.expect("eve left the chatroom")
    srv.expect("eve left the chatroom")
    lab.assert_serving(srv, alice)


# -- a client that stops reading (SendQ) ----------------------------------------------


def test_client_that_stops_reading_is_dropped_past_max_sendq(lab: Lab) -> None:
    srv = lab.server("-max-sendq", "65536", *NO_BUDGET)
    slow = lab.member(srv, "slow", rcvbuf=4096)  # never reads from here on
    reader = lab.member(srv, "reader")
    flooder = lab.member(srv, "flooder", reader)
    base = srv.rss()
    collector = LineCollector(reader, "flooder: done", timeout=40, limit=100_000)
    size = 1000
    result = flood_until_dropped(srv, flooder, [collector], "slow", size=size)
    print(f"\nsendq 64 KiB: slow dropped after {result.dropped_after} messages "
          f"(~{result.dropped_after * (size + 16) / MiB:.1f} MiB broadcast), {result.sent} sent "
          f"in {result.seconds:.1f} s; server RSS {base} KiB -> peak {result.rss_peak} KiB "
          f"(+{result.rss_peak - base} KiB)")
    assert result.dropped_after > 0, f"slow was never dropped ({result.sent} messages sent)"
    check_flow(collector.lines, "flooder", result.sent, size, also=["slow left the chatroom"])
    flooder.expect("slow left the chatroom")
    srv.wait_for("slow left the chatroom", limit=result.sent + 10)
    srv.wait_for("flooder: done", limit=result.sent + 10)
    assert result.rss_peak - base < 16 * 1024, f"server RSS grew by {result.rss_peak - base} KiB"

    # What reached the slow client is an exact prefix of its stream, then the end:
    # no line lost or reordered before the cut, and the cut really happened.
    head = b"reader joined the chatroom\nflooder joined the chatroom\n"  # after its :ok
    stream = head + b"".join(f"flooder: {flood_line(i, size)}\n".encode()
                             for i in range(result.sent))
    got = slow.buf + read_all(slow.sock, limit=len(stream) + 1, timeout=10)
    assert stream.startswith(got), "the slow client's stream is not a prefix of what was sent"
    assert len(got) < len(stream), "the slow client got everything: it was never cut off"
    lab.assert_serving(srv, reader, flooder)


# -- the login timeout -----------------------------------------------------------------


def test_login_not_finished_in_time_is_cut_off(lab: Lab) -> None:
    srv = lab.server("-login-timeout", "0.5")
    t0 = time.monotonic()
    idle = lab.wire(srv.port, label="idle")
    partial = lab.wire(srv.port, label="partial")
    partial.send(b"LOGIN abc12 da")  # a slow-loris login: never finished
    idle.hello()
    partial.hello()
    idle.expect_refused("login-timeout")
    partial.expect_refused("login-timeout")
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 4, f"timed out after {elapsed:.2f} s, expected about 0.5 s"
    lab.assert_serving(srv)


def test_a_member_is_never_timed_out(lab: Lab) -> None:
    srv = lab.server("-login-timeout", "0.5")
    alice = lab.member(srv, "alice")
    # An idle connection opened after alice's login times out, so alice's own
    # deadline has passed too by then; she must still be in, with nothing pending.
    idle = lab.wire(srv.port, label="idle")
    idle.hello()
    idle.expect_refused("login-timeout")
    alice.say(":Users")
    alice.expect("Active Users: alice")
    srv.expect("alice: searched up active users")
    lab.assert_serving(srv, alice)


# -- connection limits --------------------------------------------------------------------


def test_max_clients(lab: Lab) -> None:
    srv = lab.server("-max-clients", "3")
    a = lab.member(srv, "a")
    b = lab.member(srv, "b", a)
    c = lab.wire(srv.port, label="c")  # connected, not logged in: counts too
    c.hello()
    d = lab.wire(srv.port, label="d")
    d.expect_refused("full")  # no :hello first
    a.say(":Exit")
    a.expect(":bye")
    a.expect_closed()  # the server counted a out before closing it
    b.expect("a left the chatroom")
    srv.expect("a left the chatroom")
    e = lab.member(srv, "e", b)
    f = lab.wire(srv.port, label="f")
    f.expect_refused("full")
    e.say(":Users")
    e.expect("Active Users: b, e")
    srv.expect("e: searched up active users")


def test_max_per_address(lab: Lab) -> None:
    srv = lab.server("-max-per-ip", "2", "-exempt", "")
    a = lab.member(srv, "a")
    b = lab.wire(srv.port, label="b")
    b.hello()
    c = lab.wire(srv.port, label="c")
    c.expect_refused("full")
    other = lab.member(srv, "other", a, source="127.0.0.2")  # another address is not counted
    a.say(":Exit")
    a.expect(":bye")
    a.expect_closed()
    other.expect("a left the chatroom")
    srv.expect("a left the chatroom")
    lab.assert_serving(srv, other)  # a's slot is free again


def test_loopback_is_exempt_from_the_per_address_limit_by_default(lab: Lab) -> None:
    srv = lab.server("-max-per-ip", "2")
    wires = [lab.wire(srv.port, label=f"u{i}") for i in range(30)]
    for i, w in enumerate(wires):
        w.say(f"LOGIN abc12 u{i}")
    for i, w in enumerate(wires):
        w.hello()
        w.expect(f":ok u{i}")
        srv.expect(f"u{i} joined the chatroom")
    lab.assert_serving(srv)


# -- wrong-passcode throttling -------------------------------------------------------------


def test_wrong_passcodes_throttle_one_address_not_another(lab: Lab) -> None:
    srv = lab.server("-exempt", "", "-login-failures", "3", "-failure-window", "30")
    for i in range(3):
        w = lab.wire(srv.port, label=f"guess{i}")
        w.say(f"LOGIN zz{i}99 mallory")
        w.hello()
        assert w.expect_refused("passcode") == "Incorrect passcode"
    late = lab.wire(srv.port, label="right-but-late")
    late.say("LOGIN abc12 alice")  # the right passcode, from the throttled address
    late.hello()
    late.expect_refused("throttled")
    again = lab.wire(srv.port, label="wrong-again")
    again.say("LOGIN qqq mallory")
    again.hello()
    again.expect_refused("throttled")
    # Another address gets in at once, with the right passcode.
    bob = lab.member(srv, "bob", source="127.0.0.2")
    bob.say(":Users")
    bob.expect("Active Users: bob")
    srv.expect("bob: searched up active users")
    lab.assert_serving(srv, bob, source="127.0.0.3")


def test_loopback_is_exempt_from_throttling_by_default(lab: Lab) -> None:
    srv = lab.server("-login-failures", "3", "-failure-window", "30")
    for i in range(5):
        w = lab.wire(srv.port, label=f"guess{i}")
        w.say(f"LOGIN nope{i} mallory")
        w.hello()
        w.expect_refused("passcode")
    lab.assert_serving(srv)


# -- shutdown -------------------------------------------------------------------------------


def test_sigterm_tells_every_connection_and_exits_cleanly(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    bob = lab.member(srv, "bob", alice)
    waiting = lab.wire(srv.port, label="not-logged-in")
    waiting.hello()
    srv.proc.signal(signal.SIGTERM)
    for w in (alice, bob, waiting):
        w.expect_refused("shutdown")
    status = srv.proc.wait(10)
    assert status == 0, f"server exited with {status}"
    assert "Traceback" not in srv.proc.stderr_text()


# -- pipelining and half-close ----------------------------------------------------------


def test_lines_pipelined_with_the_login_are_handled_in_order(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    w = lab.wire(srv.port, label="dave")
    w.send(b"LOGIN abc12 dave\nfirst\n:Users\n:Msg alice psst\n:Exit\nafter exit\n")
    w.hello()
    w.expect(":ok dave")
    w.expect("Active Users: alice, dave")
    w.expect(":bye")
    w.expect_closed()
    for line in ("dave joined the chatroom", "dave: first", "[Message from dave]: psst",
                 "dave left the chatroom"):
        alice.expect(line)
    for line in ("dave joined the chatroom", "dave: first", "dave: searched up active users",
                 "dave: send message to alice", "dave left the chatroom"):
        srv.expect(line)
    lab.assert_serving(srv, alice)  # "after exit" was never said


def test_a_half_closed_client_still_gets_its_replies_and_is_told_out(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    w = lab.wire(srv.port, label="dave")
    w.send(b"LOGIN abc12 dave\nscripted hello\n:Users\n")
    w.sock.shutdown(socket.SHUT_WR)  # like `printf ... | nc -N`: end of input, no :Exit
    w.hello()
    w.expect(":ok dave")
    w.expect("Active Users: alice, dave")
    w.expect_closed()
    for line in ("dave joined the chatroom", "dave: scripted hello", "dave left the chatroom"):
        alice.expect(line)
    srv.expect("dave joined the chatroom")
    srv.expect("dave: scripted hello")
    srv.expect("dave: searched up active users")
    srv.expect("dave left the chatroom")
    lab.assert_serving(srv, alice)


# =============================================================================
# Bad input
# =============================================================================

# Every byte but the line end, then the dangerous code points spelt in UTF-8.
EVERY_BYTE = bytes(b for b in range(256) if b != 0x0A)
DANGEROUS = [
    b"a\x00b",  # NUL
    b"\x1b[2J\x1b[H\x1b]0;pwned\x07",  # clear screen, cursor home, set title (OSC, BEL)
    b"\x1b]52;c;cHduZWQ=\x07",  # OSC 52: write the clipboard
    b"\x9b31m\x9d0;x\x9c",  # raw C1 bytes (CSI, OSC, ST): invalid UTF-8 alone
    "\u009b31m \u0085 \u009d0;x\u009c".encode(),  # C1 code points in valid UTF-8
    b"del\x7fdel\x08\x08back",  # DEL, backspace
    b"cr\rin the middle",
    b"tab\there\x0bvt\x0cff",
    EVERY_BYTE,
]


def expected_text(payload: bytes) -> str:
    return sanitised(payload.decode("utf-8", "replace"))


@pytest.mark.parametrize("payload", DANGEROUS, ids=range(len(DANGEROUS)))
def test_control_characters_never_reach_another_client(lab: Lab, payload: bytes) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    bob = lab.member(srv, "bob", alice)
    alice.send(payload + b"\n")
    alice.send(b":Msg bob " + payload + b"\n")
    shown = expected_text(payload)
    # Wire.line() also checks every line: no byte < 0x20, no 0x7f, no C1, UTF-8.
    bob.expect(f"alice: {shown}")
    bob.expect(f"[Message from alice]: {shown}")
    srv.expect(f"alice: {shown}")
    srv.expect("alice: send message to bob")
    lab.assert_serving(srv, alice, bob)


def test_invalid_utf8_is_replaced_not_dropped(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    bob = lab.member(srv, "bob", alice)
    payload = b"caf\xc3\x28 \xff\xfe \xe2\x82 ok \xed\xa0\x80 \xf4\x90\x80\x80 \xc0\xaf end"
    alice.send(payload + b"\n")
    shown = payload.decode("utf-8", "replace")
    assert "\ufffd" in shown
    bob.expect(f"alice: {shown}")
    srv.expect(f"alice: {shown}")
    lab.assert_serving(srv, alice, bob)


def test_crlf_line_ends_work_for_login_and_messages(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    bob = lab.wire(srv.port, label="bob")
    bob.send(b"LOGIN abc12 bob\r\n")
    bob.hello()
    bob.expect(":ok bob")
    alice.expect("bob joined the chatroom")
    srv.expect("bob joined the chatroom")
    bob.send(b"hi from telnet\r\n:)\r\n")
    alice.expect("bob: hi from telnet")
    alice.expect("bob: [feeling happy]")
    bob.send(b"two\r\r\n")  # only the CR right before the LF is a line end
    alice.expect("bob: two\ufffd")
    srv.expect("bob: hi from telnet")
    srv.expect("bob: [feeling happy]")
    srv.expect("bob: two\ufffd")
    lab.assert_serving(srv, alice, bob)


def test_empty_and_blank_lines_are_ignored(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    bob = lab.member(srv, "bob", alice)
    alice.send(b"\n\r\n   \n \r\n\n")
    alice.say("after the blanks")
    bob.expect("alice: after the blanks")  # nothing before it
    srv.expect("alice: after the blanks")
    alice.say(":Users")
    alice.expect("Active Users: alice, bob")  # and no error for alice either
    srv.expect("alice: searched up active users")
    lab.assert_serving(srv, alice, bob)


BAD_LOGINS = [
    b"HELLO there\n",
    b"LOGIN abc12\n",
    b"LOGIN\n",
    b"LOGIN  abc12 dave\n",
    b"LOGIN abc12  dave\n",
    b"LOGIN abc12 dave extra\n",
    b"LOGIN abc12 da ve\n",  # a space in the name makes four words
    b" LOGIN abc12 dave\n",
    b"\n",
    b"\x00\x00\x00\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\x05\n",
]


@pytest.mark.parametrize("first", BAD_LOGINS, ids=[repr(b)[:30] for b in BAD_LOGINS])
def test_a_garbage_login_line_is_a_bad_login(lab: Lab, first: bytes) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    w = lab.wire(srv.port)
    w.send(first)
    w.hello()
    w.expect_refused("bad-login")
    lab.assert_serving(srv, alice)


def test_binary_junk_as_the_first_bytes(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    junk = random.Random(3251).randbytes(4000) + b"\n"
    w = lab.wire(srv.port)
    try:
        w.send(junk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it read everything; the answer is still there
    w.hello()
    w.expect_refused("bad-login")
    lab.assert_serving(srv, alice)


def test_a_tls_client_hello_to_the_plaintext_server(lab: Lab) -> None:
    srv = lab.server("-login-timeout", "1")
    alice = lab.member(srv, "alice")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    w = lab.wire(srv.port)
    w.send(hello)
    w.hello()
    # The ClientHello holds random bytes: a 0x0a among them ends a (bad) login line;
    # with none, the login is never finished.
    w.expect_refused("bad-login" if b"\n" in hello else "login-timeout")
    lab.assert_serving(srv, alice)


BAD_NAMES = [
    ("a\x01b", "bad-username"),
    ("a\x1b[2J", "bad-username"),
    ("a\x7fb", "bad-username"),
    ("a\u0085b", "bad-username"),  # C1 NEL
    ("a\u009bb", "bad-username"),  # C1 CSI
    ("a:b", "bad-username"),
    (":ab", "bad-username"),
    ("ab:", "bad-username"),
    ("a\tb", "bad-username"),
    ("a\u00a0b", "bad-username"),  # no-break space
    ("a\u3000b", "bad-username"),  # ideographic space
    ("abcdefghi", "bad-username"),  # 9 characters
    ("ééééééééé", "bad-username"),  # 9 characters, 18 bytes
    ("", "bad-username"),
    ("a\u200bb", "bad-username"),  # zero-width space
    ("\u200b", "bad-username"),
    ("a\u200db", "bad-username"),  # zero-width joiner
    ("a\u2060b", "bad-username"),  # word joiner
    ("\ufeffab", "bad-username"),  # BOM
    ("a\u202eb", "bad-username"),  # right-to-left override
    ("a\u00adb", "bad-username"),  # soft hyphen
    ("a b", "bad-login"),  # a space: the login line has four words
]


@pytest.mark.parametrize(("name", "code"), BAD_NAMES, ids=[repr(n) for n, _ in BAD_NAMES])
def test_bad_usernames_are_refused(lab: Lab, name: str, code: str) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    w = lab.wire(srv.port)
    w.send(f"LOGIN abc12 {name}\n".encode())
    w.hello()
    w.expect_refused(code)
    lab.assert_serving(srv, alice)


def test_the_passcode_is_checked_before_the_username(lab: Lab) -> None:
    srv = lab.server()
    w = lab.wire(srv.port)
    w.send(b"LOGIN wrong a\x1bb\n")
    w.hello()
    assert w.expect_refused("passcode") == "Incorrect passcode"
    lab.assert_serving(srv)


@pytest.mark.parametrize("name", ["abcdefgh", "éééééééé", "日本語の名前です", "o'brien", "e\u0301"])
def test_unusual_but_valid_usernames_get_in(lab: Lab, name: str) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    w = lab.member(srv, name, alice)
    w.say("hi")
    alice.expect(f"{name}: hi")
    srv.expect(f"{name}: hi")
    lab.assert_serving(srv, alice, w)


DUPLICATES = [
    ("alice", "alice"),
    ("alice", "ALICE"),
    ("alice", "Alice"),
    ("josé", "jose\u0301"),  # the same name, composed and decomposed
    ("straße", "STRASSE"),  # equal under Unicode case folding
]


@pytest.mark.parametrize(("first", "second"), DUPLICATES, ids=[repr(d) for d in DUPLICATES])
def test_duplicate_names_are_refused_ignoring_case(lab: Lab, first: str, second: str) -> None:
    srv = lab.server()
    owner = lab.member(srv, first)
    w = lab.wire(srv.port)
    w.say(f"LOGIN abc12 {second}")
    w.hello()
    w.expect_refused("name-taken")
    owner.say(":Users")
    owner.expect(f"Active Users: {first}")
    srv.expect(f"{first}: searched up active users")
    lab.assert_serving(srv, owner)


def test_a_name_is_free_again_once_its_owner_left(lab: Lab) -> None:
    srv = lab.server()
    bob = lab.member(srv, "bob")
    alice = lab.member(srv, "alice", bob)
    alice.say(":Exit")
    alice.expect(":bye")
    alice.expect_closed()
    bob.expect("alice left the chatroom")
    srv.expect("alice left the chatroom")
    lab.member(srv, "ALICE", bob)


def test_malformed_commands_get_their_error_and_the_connection_stays(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    bob = lab.member(srv, "bob", alice)
    alice.say(":Msg")
    alice.expect_error("usage")
    alice.say(":Msg bob")
    alice.expect_error("usage")
    alice.say(":Msg zed hello")
    alice.expect_error("no-such-user")
    alice.say(":Msg BOB hello")
    bob.expect("[Message from alice]: hello")
    srv.expect("alice: send message to bob")
    lab.assert_serving(srv, alice, bob)


def test_no_such_user_error_carries_no_control_characters(lab: Lab) -> None:
    srv = lab.server()
    alice = lab.member(srv, "alice")
    alice.send(b":Msg \x1b]0;pwned\x07 hello\n")
    text = alice.expect_error("no-such-user")  # Wire.line() rejects a control byte
    assert "\ufffd]0;pwned\ufffd" in text, text
    lab.assert_serving(srv, alice)

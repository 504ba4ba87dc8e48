"""TLS: the server with -tls-cert/-tls-key, raw ssl sockets and the real client.

Certificates come from trustme (a test dependency only): a throwaway CA and a
certificate for localhost and 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Proc, child_env, expect_one_error_line
from secwire import ROOT, Lab, Server, Wire

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.e2e


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return ["-tls-cert", str(self.cert), "-tls-key", str(self.key)]

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certs]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    paths = Certs(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    issued.private_key_pem.write_to_path(str(paths.key))
    paths.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    yield paths


def tls_server(lab: Lab, certs: Certs, *flags: str) -> Server:
    return lab.server(*certs.flags(), *flags)


def tls_member(lab: Lab, srv: Server, certs: Certs, name: str, *others: Wire,
               host: str = "127.0.0.1") -> Wire:
    return lab.member(srv, name, *others, tls=certs.context(), server_hostname=host)


# -- raw TLS sockets --------------------------------------------------------------------


def test_raw_tls_clients_log_in_and_chat(lab: Lab, certs: Certs) -> None:
    srv = tls_server(lab, certs)
    alice = tls_member(lab, srv, certs, "alice")
    bob = tls_member(lab, srv, certs, "bob", alice, host="localhost")
    for w in (alice, bob):
        assert isinstance(w.sock, ssl.SSLSocket)
        assert w.sock.version() in ("TLSv1.2", "TLSv1.3"), w.sock.version()
    alice.say("secret plans")
    bob.expect("alice: secret plans")
    srv.expect("alice: secret plans")
    bob.say(":Msg alice \x1b[31mpsst")
    alice.expect("[Message from bob]: \ufffd[31mpsst")
    srv.expect("bob: send message to alice")
    lab.assert_serving(srv, alice, bob, tls=certs.context())


def test_tls_1_2_is_accepted(lab: Lab, certs: Certs) -> None:
    srv = tls_server(lab, certs)
    ctx = certs.context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    w = lab.member(srv, "old", tls=ctx)
    assert isinstance(w.sock, ssl.SSLSocket) and w.sock.version() == "TLSv1.2"


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">HH", kind, len(data)) + data


def client_hello(version: bytes) -> bytes:
    """A minimal but complete ClientHello offering exactly `version` (0x0301 is
    TLS 1.0, 0x0302 TLS 1.1, 0x0303 TLS 1.2) with ciphers every version shares."""
    suites = bytes.fromhex("c02bc02fc02cc030c009c013c00ac014009c002f0035")
    extensions = (_extension(0x000A, bytes.fromhex("0004001d0017"))  # x25519, P-256
                  + _extension(0x000B, b"\x01\x00")  # uncompressed points
                  + _extension(0x000D, bytes.fromhex("0006040308040401")))  # signatures
    body = (version + os.urandom(32) + b"\x00" + struct.pack(">H", len(suites)) + suites
            + b"\x01\x00" + struct.pack(">H", len(extensions)) + extensions)
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def first_bytes(port: int, data: bytes) -> bytes:
    """What the server answers first to `data` (b"" if it just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        try:
            return s.recv(16)
        except ConnectionResetError:
            return b""


SERVER_HELLO = b"\x16\x03\x03"  # a handshake record, then ServerHello (type 2)


def test_tls_below_1_2_is_refused(lab: Lab, certs: Certs) -> None:
    srv = tls_server(lab, certs)
    # The same hello with version 1.2 gets a ServerHello: the hello itself is sound.
    answer = first_bytes(srv.port, client_hello(b"\x03\x03"))
    assert answer.startswith(SERVER_HELLO) and answer[5:6] == b"\x02", answer
    for version in (b"\x03\x01", b"\x03\x02"):  # TLS 1.0, TLS 1.1
        answer = first_bytes(srv.port, client_hello(version))
        assert answer[:1] in (b"", b"\x15"), f"TLS {version.hex()}: answered {answer!r}"
    # And Python's own TLS 1.1, where this OpenSSL can still offer it.
    ctx = certs.context()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pass
    else:  # (if this OpenSSL cannot offer 1.1 at all, the raw hellos above decide)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            lab.wire(srv.port, tls=ctx)
    lab.assert_serving(srv, tls=certs.context())


def test_the_server_cuts_off_a_plaintext_or_silent_peer(lab: Lab, certs: Certs) -> None:
    srv = tls_server(lab, certs, "-login-timeout", "1")
    t0 = time.monotonic()
    plain = lab.wire(srv.port, label="plaintext")
    plain.send(b"LOGIN abc12 alice\n")
    silent = lab.wire(srv.port, label="silent")  # never starts the handshake
    for w in (plain, silent):
        w.sock.settimeout(6)
        got = b""
        for _ in range(100):
            try:
                chunk = w.sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        assert b":hello" not in got and b":ok" not in got, f"{w.label}: plaintext leaked: {got!r}"
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"the server took {elapsed:.1f} s to cut off the handshake"
    lab.assert_serving(srv, tls=certs.context())


# -- the real client -------------------------------------------------------------------


def start_client(lab: Lab, srv: Server, name: str, *args: str, host: str = "127.0.0.1") -> Proc:
    argv = [sys.executable, "client.py", "-join", "-host", host, "-port", str(srv.port),
            "-username", name, "-passcode", "abc12", *args]
    proc = Proc(argv, cwd=ROOT, label=name, env=child_env())
    lab.cleanups.append(proc.cleanup)
    lab.clients.append(proc)
    return proc


def test_real_clients_chat_over_tls(lab: Lab, certs: Certs) -> None:
    srv = tls_server(lab, certs)
    alice = start_client(lab, srv, "alice", "-tls", "-tls-ca", str(certs.ca))
    alice.expect(f"Connected to 127.0.0.1 on port {srv.port}")
    srv.expect("alice joined the chatroom")
    bob = start_client(lab, srv, "bob", "-tls", "-tls-ca", str(certs.ca), host="localhost")
    bob.expect(f"Connected to localhost on port {srv.port}")
    srv.expect("bob joined the chatroom")
    alice.expect("bob joined the chatroom")
    alice.send("Hello over TLS")
    bob.expect("alice: Hello over TLS")
    srv.expect("alice: Hello over TLS")
    bob.send(":Users")
    bob.expect("Active Users: alice, bob")
    srv.expect("bob: searched up active users")
    bob.send(":Exit")
    alice.expect("bob left the chatroom")
    srv.expect("bob left the chatroom")
    assert bob.finish() == (0, [], [])


def test_tls_client_without_the_ca_gets_one_clear_line(lab: Lab, certs: Certs) -> None:
    srv = tls_server(lab, certs)
    proc = start_client(lab, srv, "alice", "-tls")
    line = expect_one_error_line(proc, None, timeout=15)
    print(f"\nclient -tls without -tls-ca: {line!r}")
    assert "certificate" in line.lower() or "verif" in line.lower(), line
    lab.assert_serving(srv, tls=certs.context())


def test_plaintext_client_against_the_tls_server_gets_one_clear_line(lab: Lab,
                                                                     certs: Certs) -> None:
    srv = tls_server(lab, certs, "-login-timeout", "1")
    t0 = time.monotonic()
    proc = start_client(lab, srv, "alice")
    line = expect_one_error_line(proc, None, timeout=15)
    elapsed = time.monotonic() - t0
    print(f"\nplaintext client vs TLS server, {elapsed:.2f} s: {line!r}")
    assert elapsed < 10
    lab.assert_serving(srv, tls=certs.context())


def test_tls_client_against_a_plaintext_server_gets_one_clear_line(lab: Lab,
                                                                   certs: Certs) -> None:
    srv = lab.server("-login-timeout", "1")
    proc = start_client(lab, srv, "alice", "-tls", "-tls-ca", str(certs.ca))
    line = expect_one_error_line(proc, None, timeout=15)
    print(f"\nTLS client vs plaintext server: {line!r}")
    assert "TLS" in line or "tls" in line, line
    lab.assert_serving(srv)


# -- the server's certificate files ------------------------------------------------------


def bad_server(*flags: str) -> Proc:
    argv = [sys.executable, "server.py", "-start", "-port", "0", "-passcode", "abc12", *flags]
    return Proc(argv, cwd=ROOT, label="server", env=child_env())


@pytest.mark.parametrize("case", ["missing-cert", "missing-key", "garbage-cert", "garbage-key",
                                  "key-of-another-cert", "cert-without-key", "key-without-cert"])
def test_the_server_refuses_a_bad_certificate_with_one_line_and_status_2(
        certs: Certs, tmp_path: Path, case: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                       "-----END CERTIFICATE-----\n")
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    cert, key = str(certs.cert), str(certs.key)
    flags = {
        "missing-cert": ["-tls-cert", str(tmp_path / "nope.pem"), "-tls-key", key],
        "missing-key": ["-tls-cert", cert, "-tls-key", str(tmp_path / "nope.pem")],
        "garbage-cert": ["-tls-cert", str(garbage), "-tls-key", key],
        "garbage-key": ["-tls-cert", cert, "-tls-key", str(garbage)],
        "key-of-another-cert": ["-tls-cert", cert, "-tls-key", str(other_key)],
        "cert-without-key": ["-tls-cert", cert],
        "key-without-cert": ["-tls-key", key],
    }[case]
    proc = bad_server(*flags)
    try:
        print(f"\n{case}: {expect_one_error_line(proc, 2, timeout=15)!r}")
    finally:
        proc.cleanup()

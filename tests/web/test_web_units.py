"""chatroom_ext.web's pure parts: origins, hosts, the page's policy, framing."""

from __future__ import annotations

import base64
import hashlib

import pytest

web = pytest.importorskip("chatroom_ext.web")


@pytest.mark.parametrize(("host", "literal"), [
    ("127.0.0.1", True), ("127.0.0.1:8080", True), ("[::1]:8080", True), ("[::1]", True),
    ("localhost:8080", True), ("LOCALHOST", True), ("10.1.2.3:80", True),
    ("evil.example:8080", False), ("localhost.evil.example", False), ("", False),
    ("127.0.0.1.nip.io:8080", False), ("[::1", False), ("[::1]x", False),
])
def test_literal_host(host: str, literal: bool) -> None:
    assert web.literal_host(host) is literal


@pytest.mark.parametrize(("values", "origins"), [
    ([], ()),
    (["https://Chat.Example.org/"], ("https://chat.example.org",)),
    (["http://a.test:8080, http://b.test", "http://a.test:8080"],
     ("http://a.test:8080", "http://b.test")),
    ([" , "], ()),
])
def test_parse_origins(values: list[str], origins: tuple[str, ...]) -> None:
    assert web.parse_origins(values) == origins


@pytest.mark.parametrize("bad", ["ftp://x.test", "x.test", "http://x.test/path", "http://",
                                 "http://user@x.test", "null", "*"])
def test_parse_origins_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an origin"):
        web.parse_origins(["http://ok.test", bad])


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_text_frames_one_per_line(size: int) -> None:
    line = b"x" * size
    framed = web.text_frames(line + b"\n" + b"ab\n")
    if size < 126:
        head = bytes([0x81, size])
    elif size < 65536:
        head = bytes([0x81, 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x81, 127]) + size.to_bytes(8, "big")
    assert framed == head + line + b"\x81\x02ab"


def test_the_policy_pins_the_page_s_script_and_style() -> None:
    page = web.Page.load(100)
    html = page.body.decode()
    assert 'data-max-line="100"' in html
    for tag in ("script", "style"):
        text = html.split(f"\n<{tag}>", 1)[1].split(f"\n</{tag}>", 1)[0] + "\n"
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in page.csp

"""Names cannot impersonate (issue 19, item 6): the username rule, look-alike
names (name_skeleton and Room.check_login), and what neutralise() replaces in
messages. The rule is copied in server.py and client.py (each runs alone);
the last tests hold the two copies equal."""

from __future__ import annotations

import inspect
import unicodedata
from types import ModuleType

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import client
import server
from server import Refused, Room, name_key, name_skeleton, neutralise, username_problem

PASSCODE = "abc12"
TAKEN = "name-taken"


def room_with(*names: str) -> Room:
    room = Room(PASSCODE)
    for name in names:
        assert room.check_login(PASSCODE, name) is None, name
        room.join(name)
    return room


# --- refused whatever the room holds ------------------------------------------------------

INVISIBLE = [
    "bob\u034f",  # combining grapheme joiner (issue 19)
    "bob\ufe0f",  # variation selector 16 (issue 19)
    "bob\u3164",  # Hangul filler (issue 19)
    "bob\u2800",  # Braille pattern blank (issue 19)
    "a\u200bb",  # zero width space (the client used to accept it)
    "bob\u200c", "bob\u200d", "bob\u2060", "\ufeffbob",  # (non-)joiners, word joiner, BOM
    "bob\u115f", "bob\u1160", "bob\uffa0",  # Hangul fillers
    "bob\u180e", "bob\u180b", "bob\u17b4",  # Mongolian, Khmer
    "bob\u00ad",  # soft hyphen
    "bob\u202e", "bob\u202a", "bob\u200e", "bob\u200f", "bob\u061c",  # bidi controls
    "bob\u2066", "bob\u2067", "bob\u2068", "bob\u2069",  # bidi isolates
    "bob\U000e0062", "bob\U000e0100",  # a tag, a variation selector (supplement)
    "bob\U0001d173",  # musical symbol begin beam
]


@pytest.mark.parametrize("name", INVISIBLE, ids=ascii)
def test_invisible_characters_are_refused(name: str) -> None:
    assert "invisible" in (username_problem(name) or "")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "1 to 8 characters"),
        ("abcdefghi", "1 to 8 characters"),
        ("a b", "no whitespace"),
        ("a\u00a0b", "no whitespace"),
        ("a\u3000b", "no whitespace"),
        ("a\u2028b", "no whitespace"),  # line separator (Zl)
        ("a\tb", "no control characters"),
        ("a\x1bb", "no control characters"),
        ("a\x85b", "no control characters"),
        ("a:b", "no ':'"),
        ("a\uff1ab", "no ':'"),  # fullwidth colon: a colon after NFKC
        ("a\ufe55b", "no ':'"),  # small colon
        ("x\ufffd", "valid UTF-8"),  # what bytes that were not UTF-8 became (the client took it)
        ("a\udcffb", "valid UTF-8"),  # how Python shows argv bytes that are not UTF-8
        ("a\ue000b", "private-use or unassigned"),
        ("a\U0010fffdb", "private-use or unassigned"),
        ("a\u0378b", "private-use or unassigned"),  # unassigned in the Greek block
        ("\u0301bob", "combining mark"),
        ("b\u043eb", "mix scripts (Cyrillic and Latin)"),  # Cyrillic о (issue 19)
        ("\u0430lice", "mix scripts (Cyrillic and Latin)"),  # Cyrillic а
        ("b\u03bfb", "mix scripts (Greek and Latin)"),  # Greek ο
        ("\u0430\u03bf", "mix scripts (Cyrillic and Greek)"),
        ("bob\u0585", "mix scripts (Armenian and Latin)"),
        ("abc\u0661", "mix scripts (Arabic and Latin)"),  # an Arabic-Indic digit
        ("\u0431\uff4f\u0431", "mix scripts (Cyrillic and Latin)"),  # fullwidth o, after NFKC
    ],
    ids=ascii,
)
def test_refused_names_and_why(name: str, problem: str) -> None:
    assert problem in (username_problem(name) or "")


@pytest.mark.parametrize(
    "name",
    [
        "a", "alice", "12345678", "a-b_c.d", "b0b", "bo8", "Zoë", "josé", "jose\u0301",
        "straße", "Ærøskøbing"[:8], "日本語", "ひらがな漢字", "カタカナ", "한국어", "中文ㄅㄆ",
        "Tanaka山田", "Kim김", "Σωκράτης", "Дмитрий", "Ἀθηνᾶ", "עברית", "علي", "علي١٢",
        "महेश", "ΒΟΒ", "\u0441\u043e\u0440", "𝐛𝐨𝐛", "ｂｏｂ", "ǅ", "😀", "a😀", "★",
    ],
    ids=ascii,
)
def test_names_people_use_are_accepted(name: str) -> None:
    assert username_problem(name) is None


# --- look-alikes of a member who is in ---------------------------------------------------

LOOK_ALIKES = [
    # (in the room, refused while it is in)
    ("bob", "\u0392\u039f\u0392"),  # Greek capitals ΒΟΒ: shows as BOB
    ("bob", "\u0299\u1d0f\u0299"),  # Latin small capitals ʙᴏʙ
    ("bob", "𝐛𝐨𝐛"),  # mathematical bold, NFKC
    ("bob", "ｂｏｂ"),  # fullwidth
    ("cop", "\u0441\u043e\u0440"),  # Cyrillic сор
    ("COP", "\u0441\u043e\u0440"),  # ... whatever the member's case
    ("\u0441\u043e\u0440", "cop"),  # and the other way round
    ("\u0441\u043e\u0440", "COP"),
    ("\u0441\u043e\u0440", "\u0421\u041e\u0420"),  # the same Cyrillic name in capitals
    ("pax", "\u0440\u0430\u0445"),  # Cyrillic рах
    ("aux", "\u03b1\u03c5\u03c7"),  # Greek αυχ
    ("ohn", "\u0585\u0570\u0578"),  # Armenian օհո
    ("bill", "b\u0131ll"),  # dotless i
    ("jose", "j\u03bfse"),  # refused anyway (mixed), and a look-alike
    ("josé", "jos\u0435\u0301"),  # Cyrillic е with a combining acute: mixed too
    ("\u0451\u0436", "\u0435\u0308\u0436"),  # ё composed and decomposed (the exact key too)
]


@pytest.mark.parametrize(("member", "name"), LOOK_ALIKES, ids=ascii)
def test_a_look_alike_of_a_member_is_refused_while_it_is_in(member: str, name: str) -> None:
    room = room_with(member)
    refused = room.check_login(PASSCODE, name)
    assert refused is not None and refused.code in (TAKEN, "bad-username"), refused
    if refused.code == TAKEN:
        assert refused == Refused(TAKEN, f"The username {name} is already in the chatroom")
        assert name_skeleton(name) == name_skeleton(member)
    room.leave(member)
    if username_problem(name) is None:
        assert room.check_login(PASSCODE, name) is None  # free once the member has left


def test_the_cyrillic_bob_of_the_issue() -> None:
    room = room_with("bob")
    refused = room.check_login(PASSCODE, "b\u043eb")
    assert refused is not None and refused.code == "bad-username"
    assert "mix scripts" in refused.text


def test_greek_bob_gets_in_when_bob_has_left_and_then_bob_is_refused() -> None:
    room = room_with("bob")
    greek = "\u0392\u039f\u0392"
    assert room.check_login(PASSCODE, greek) == Refused(
        TAKEN, f"The username {greek} is already in the chatroom")
    room.leave("bob")
    assert room.check_login(PASSCODE, greek) is None
    room.join(greek)
    assert room.check_login(PASSCODE, "bob") == Refused(
        TAKEN, "The username bob is already in the chatroom")
    assert room.check_login(PASSCODE, "BOB") is not None


@pytest.mark.parametrize(
    ("member", "name"),
    [
        ("bob", "b0b"),  # ASCII digits stay digits: see docs/SECURITY.md, "Names"
        ("bill", "b1ll"),
        ("bill", "bi11"),
        ("Ian", "lan"),  # I and l: distinct in a terminal's monospace font
        ("rn", "m"),  # two cells and one
        ("bob", "bób"),  # an accent is visible
        ("cop", "\u0441\u043e\u043f"),  # Cyrillic соп: п is not n
        ("\u0432\u0430\u0441", "bac"),  # Cyrillic в is not b
        ("top", "\u03c4\u03bf\u03c1"),  # Greek τ is left out (a small capital T at most)
        ("alice", "bob"),
    ],
    ids=ascii,
)
def test_names_that_merely_resemble_are_both_allowed(member: str, name: str) -> None:
    assert room_with(member).check_login(PASSCODE, name) is None


def test_a_member_who_leaves_frees_its_look() -> None:
    room = room_with("\u0441\u043e\u0440", "alice")
    room.leave("alice")
    assert room.check_login(PASSCODE, "cop") is not None
    room.leave("\u0441\u043e\u0440")
    assert room.check_login(PASSCODE, "cop") is None
    assert room._looks == {}


# --- properties ---------------------------------------------------------------------------

ASCII_NAMES = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
                      min_size=1, max_size=8)


@given(ASCII_NAMES)
def test_an_ascii_name_looks_like_itself_ignoring_case(name: str) -> None:
    assert username_problem(name) is None
    assert name_skeleton(name) == name.lower() == name_key(name)


def test_the_look_alike_table_maps_other_letters_to_ascii_ones() -> None:
    for code, target in server._LOOK_ALIKE.items():
        source = chr(code)
        assert not source.isascii() and source.isalpha(), ascii(source)
        assert isinstance(target, str) and target.isascii() and target.isalpha()
        assert unicodedata.normalize("NFKD", source) == source, ascii(source)


@given(st.lists(st.text(min_size=1, max_size=8), max_size=12), st.text(max_size=8))
def test_a_room_never_holds_two_names_with_one_look(names: list[str], last: str) -> None:
    room = Room(PASSCODE)
    for name in [*names, last]:
        if room.check_login(PASSCODE, name) is None:
            room.join(name)
    looks = [name_skeleton(n) for n in room.names]
    assert len(set(looks)) == len(looks)
    for name in room.names:
        assert username_problem(name) is None


# --- messages: separators and bidi controls are neutralised ------------------------------

LAYOUT = "\u2028\u2029\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize("char", LAYOUT, ids=ascii)
def test_separators_and_bidi_controls_in_messages_become_u_fffd(char: str) -> None:
    assert neutralise(f"a{char}b") == "a\ufffdb"
    assert client.sanitize(f"a{char}b") == "a\ufffdb"  # and the client trusts nobody


@given(st.text())
def test_neutralise_leaves_no_separator_or_bidi_control(text: str) -> None:
    out = neutralise(text)
    assert len(out) == len(text)
    assert not any(ch in LAYOUT or unicodedata.category(ch) == "Cc" for ch in out)
    assert client.sanitize(text) == out  # one idea of a harmless line on both sides


def test_neutralise_keeps_plain_text_and_invisible_joiners() -> None:
    assert neutralise("hello, world") == "hello, world"
    assert neutralise("👩\u200d💻 ok\ufe0f") == "👩\u200d💻 ok\ufe0f"  # emoji sequences stay


# --- the client and the server apply one rule ------------------------------------------------

SPECIAL = "".join(
    [":", " ", "\t", "\x00", "\x1b", "\x7f", "\x85", "\xa0", "\xad", "\u034f", "\u0301",
     "\u0430", "\u043e", "\u03bf", "\u0392", "\u0585", "\u115f", "\u1160", "\u180e", "\u200b",
     "\u200d", "\u200e", "\u2028", "\u202e", "\u2066", "\u2800", "\u3000", "\u3164", "\ufe0f",
     "\ufeff", "\uff1a", "\uffa0", "\ufffd", "\ue000", "\U000e0041", "\U000e0100", "日", "カ",
     "한", "١", "a", "b", "o", "Z", "0"])
NAMES = st.one_of(
    st.text(max_size=10),
    st.text(st.sampled_from(SPECIAL), max_size=10),
    st.text(st.characters(codec="utf-8"), max_size=10),
)


@given(NAMES)
@example("a\u200bb")
@example("x\ufffd")
@example("bob\u2800")
@example("b\u043eb")
def test_client_and_server_apply_the_same_username_rule(name: str) -> None:
    assert client.username_problem(name) == server.username_problem(name)


def _rule_source(module: ModuleType) -> str:
    text = inspect.getsource(module)
    start = text.index("# --- The username rule")
    return text[start:text.index("# --- End of the username rule", start)]


def test_the_two_copies_of_the_rule_are_the_same_text() -> None:
    assert _rule_source(client) == _rule_source(server)

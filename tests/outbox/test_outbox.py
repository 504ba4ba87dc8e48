"""server.Outbox: what each connection is owed in one pass, with no I/O.

The outbox joins a broadcast once for everyone and keeps what sets one
connection apart as edits. Held here against the plainest model there is:
a list of bytes per connection, appended to as each call is made.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server import Outbox, stream_view


def written(outbox: Outbox) -> dict[int, bytes]:
    batch = outbox.take()
    cids = [cid for cid, _ in batch.writes]
    assert len(cids) == len(set(cids)), "one write per connection"
    return dict(batch.writes)


def test_a_broadcast_is_one_joined_write_for_each_recipient_and_skips_its_sender() -> None:
    box = Outbox()
    for cid in (1, 2, 3):
        box.add(cid)
    box.take()
    box.broadcast(b"a: hi\n", skip=1)
    box.broadcast(b"b: yo\n", skip=2)
    box.broadcast(b"notice\n")
    got = written(box)
    assert got == {1: b"b: yo\nnotice\n", 2: b"a: hi\nnotice\n", 3: b"a: hi\nb: yo\nnotice\n"}
    assert not box


def test_joining_and_leaving_mid_pass_see_only_their_part() -> None:
    box = Outbox()
    box.add(1)
    box.broadcast(b"before\n")
    box.send(2, b":ok\n")
    box.add(2)
    box.broadcast(b"between\n")
    box.remove(1)
    box.send(1, b":bye\n")
    box.close(1)
    box.broadcast(b"after\n")
    batch = box.take()
    assert dict(batch.writes) == {1: b"before\nbetween\n:bye\n", 2: b":ok\nbetween\nafter\n"}
    assert batch.close == [1]


def test_a_dropped_connection_is_owed_nothing_and_printing_is_kept_apart() -> None:
    box = Outbox()
    box.add(1)
    box.add(2)
    box.broadcast(b"x\n")
    box.send(2, b"only 2\n")
    box.close(2)
    box.print(b"x\n")
    box.drop(2)
    batch = box.take()
    assert batch.writes == [(1, b"x\n")]
    assert batch.close == []
    assert batch.printed == b"x\n"


def test_urgent_is_set_by_the_caller_and_cleared_by_take() -> None:
    box = Outbox()
    box.broadcast(b"alice joined the chatroom\n")
    assert box and not box.urgent
    box.urgent = True
    box.take()
    assert not box.urgent and not box


OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 4)),
    st.tuples(st.just("remove"), st.integers(1, 4)),
    st.tuples(st.just("broadcast"), st.one_of(st.none(), st.integers(1, 4))),
    st.tuples(st.just("send"), st.integers(1, 5)),
    st.tuples(st.just("drop"), st.integers(1, 5)),
    st.tuples(st.just("take"), st.none()),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_the_outbox_equals_a_list_per_connection(ops: list[tuple[str, int | None]]) -> None:
    box = Outbox()
    model: dict[int, bytearray] = {}
    members: set[int] = set()
    added: set[int] = set()  # a connection becomes a recipient once at most
    gone: set[int] = set()
    counter = 0
    for op, cid in ops:
        counter += 1
        data = f"{op} {counter}\n".encode()
        if op == "take":
            assert written(box) == {c: bytes(b) for c, b in model.items() if b}
            model.clear()
            continue
        if op == "broadcast":
            box.broadcast(data, skip=cid)
            for m in members - {cid}:
                model.setdefault(m, bytearray()).extend(data)
            continue
        assert cid is not None
        if cid in gone:
            continue  # a connection's number is never used again
        if op == "add" and cid not in added:
            box.add(cid)
            members.add(cid)
            added.add(cid)
        elif op == "remove":
            box.remove(cid)
            members.discard(cid)
        elif op == "send":
            box.send(cid, data)
            model.setdefault(cid, bytearray()).extend(data)
        elif op == "drop":
            box.drop(cid)
            members.discard(cid)
            model.pop(cid, None)
            gone.add(cid)
    assert written(box) == {c: bytes(b) for c, b in model.items() if b}


# --- stream_view: one connection's bytes in a pass ------------------------------------


def test_stream_view_applies_skips_puts_and_ranges() -> None:
    bcast = [b"A\n", b"B\n", b"C\n"]
    common = b"".join(bcast)
    offsets = [0, 2, 4, 6]
    assert stream_view(common, offsets, [], 0, 3) == b"A\nB\nC\n"
    assert stream_view(common, offsets, [(1, None)], 0, 3) == b"A\nC\n"
    assert stream_view(common, offsets, [(1, b"p\n")], 0, 3) == b"A\np\nB\nC\n"
    assert stream_view(common, offsets, [(0, b"p\n"), (0, None)], 0, 3) == b"p\nB\nC\n"
    assert stream_view(common, offsets, [], 1, 3) == b"B\nC\n"  # joined mid-pass
    assert stream_view(common, offsets, [(3, b":bye\n")], 0, 2) == b"A\nB\n:bye\n"  # left
    assert stream_view(common, offsets, [(2, None)], 0, 2) == b"A\nB\n"

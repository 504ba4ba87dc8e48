"""server.PassLoop: hooks that run at the end of each pass of the loop.

The Hub writes from such a hook, so these pin down what it relies on: a hook
runs after every callback that was ready in the pass, before the loop sleeps,
and a callback that a hook schedules runs without waiting for other events.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import pytest

import server

pytestmark = pytest.mark.timeout(30)


def run(main: Callable[[], object]) -> object:
    async def wrapper() -> object:
        return await main()  # type: ignore[misc]
    return server.run_on_pass_loop(wrapper())


def run_closing(pairs: list[tuple[socket.socket, socket.socket]],
                main: Callable[[], object]) -> None:
    """run(main), then close the socket pairs it used, whatever happened."""
    try:
        run(main)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_the_hook_runs_after_every_ready_callback_of_the_pass() -> None:
    seen: list[str] = []

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        loop.before_poll.append(lambda: seen.append("end of pass"))
        seen.clear()
        for name in ("a", "b", "c"):
            loop.call_soon(seen.append, name)
        await asyncio.sleep(0)  # this task's own step is one more ready callback
        return seen

    order = run(main)
    assert isinstance(order, list)
    # The pass that scheduled a, b and c ends first; they run in the next one.
    assert order[:5] == ["end of pass", "a", "b", "c", "end of pass"]


def test_data_on_two_sockets_in_one_pass_is_heard_before_the_hook() -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        done = loop.create_future()

        def readable(k: int) -> None:
            pairs[k][0].recv(100)
            loop.remove_reader(pairs[k][0])
            seen.append(f"read {k}")

        def end_of_pass() -> None:
            if seen and seen[-1] != "end of pass":
                seen.append("end of pass")
            if seen.count("read 0") + seen.count("read 1") == 2 and not done.done():
                done.set_result(None)

        for k, (a, b) in enumerate(pairs):
            a.setblocking(False)
            b.send(b"x")  # both readable before the loop polls
            loop.add_reader(a, readable, k)
        loop.before_poll.append(end_of_pass)
        await done

    run_closing(pairs, main)
    assert sorted(seen[:2]) == ["read 0", "read 1"]
    assert seen[2] == "end of pass"


def test_a_callback_scheduled_by_the_hook_runs_without_another_event() -> None:
    """Closing a transport from the hook schedules connection_lost; the loop
    must not sleep on it. Nothing else wakes this loop: no timer, no I/O. A
    watchdog thread wakes it after 5 s, so a regression fails instead of hanging."""
    rescued = threading.Event()

    async def main() -> str:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        fut: asyncio.Future[str] = loop.create_future()
        armed = [False]

        def hook() -> None:
            if armed[0]:
                armed[0] = False
                loop.call_soon(fut.set_result, "ran")

        loop.before_poll.append(hook)
        await asyncio.sleep(0)
        armed[0] = True  # the next end of pass schedules the callback, then polls
        def rescue() -> None:
            rescued.set()
            loop.call_soon_threadsafe(lambda: None)

        watchdog = threading.Timer(5.0, rescue)
        watchdog.start()
        try:
            return await fut
        finally:
            watchdog.cancel()

    assert run(main) == "ran"
    assert not rescued.is_set(), "the loop slept with a callback ready"


def test_run_on_pass_loop_returns_the_result_and_leaves_no_loop_behind() -> None:
    async def main() -> int:
        assert isinstance(asyncio.get_running_loop(), server.PassLoop)
        return 7

    assert server.run_on_pass_loop(main()) == 7
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def late_arrival(look_first: bool, more: int = 1) -> list[str]:
    """A reads, and while its callback runs, data reaches B (as when several
    senders write a few microseconds apart). With look_first set, B is read
    before the hook; without, the hook runs first and B waits a pass.
    `more` > 1: each read sends on to the next socket and asks to look again."""
    pairs = [socket.socketpair() for _ in range(more + 1)]
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        done = loop.create_future()

        def readable(k: int) -> None:
            pairs[k][0].recv(100)
            seen.append(f"read {k}")
            if k + 1 < len(pairs):
                pairs[k + 1][1].send(b"x")  # arrives after this pass polled
                loop.look_first = look_first
            elif not done.done():
                done.set_result(None)

        def hook() -> None:
            if seen and seen[-1] != "hook":
                seen.append("hook")

        for k, (a, _) in enumerate(pairs):
            a.setblocking(False)
            loop.add_reader(a, readable, k)
        loop.before_poll.append(hook)
        await asyncio.sleep(0)
        seen.clear()
        pairs[0][1].send(b"x")
        await done
        for a, _ in pairs:
            loop.remove_reader(a)

    run_closing(pairs, main)
    return seen


def test_look_first_takes_in_what_arrived_during_the_pass_before_the_hook() -> None:
    assert late_arrival(look_first=True)[:3] == ["read 0", "read 1", "hook"]
    assert late_arrival(look_first=False)[:3] == ["read 0", "hook", "read 1"]


def test_look_first_delays_the_hook_by_one_pass_at_most() -> None:
    # Every read asks to look first and makes the next socket readable: the
    # look is spent once, so the hook still runs every other pass.
    seen = late_arrival(look_first=True, more=4)
    assert seen[:6] == ["read 0", "read 1", "hook", "read 2", "read 3", "hook"]


def test_a_timer_that_a_hook_sets_fires_without_another_event() -> None:
    """The loop chose how long to sleep before the hooks ran: a timer one of
    them sets must still fire on time (the Hub's wait for room notices)."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        fired: asyncio.Future[float] = loop.create_future()
        armed: list[float] = []

        def hook() -> None:
            if not armed:
                armed.append(loop.time())
                loop.call_later(0.01, lambda: fired.set_result(loop.time()))

        loop.before_poll.append(hook)
        # The only other timer is wait_for's own: without the fix the poll
        # sleeps until it, and this times out.
        return await asyncio.wait_for(fired, 2.0) - armed[0]

    waited = run(main)
    assert isinstance(waited, float)
    assert 0.009 < waited < 1.0

"""server.Printer: the server's stdout, never in the room's way."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

import pytest

import server


def test_a_regular_file_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with path.open("wb") as f:
        printer = server.Printer(f.fileno())
        printer.write(b"alice joined the chatroom\n")
        assert path.read_bytes() == b"alice joined the chatroom\n"  # no thread, no wait
        printer.close()


def test_a_pipe_nobody_reads_never_blocks_and_what_was_lost_is_told(
        capsys: pytest.CaptureFixture[str]) -> None:
    read_end, write_end = os.pipe()
    try:
        printer = server.Printer(write_end, limit=100_000)
        line = b"x" * 99 + b"\n"
        start = time.monotonic()
        for _ in range(5000):  # 500 KB into a 64 KB pipe and a 100 KB buffer
            printer.write(line)
        assert time.monotonic() - start < 1.0  # never waited for the pipe
        got = bytearray()
        done = threading.Event()

        def read_on() -> None:
            while not done.is_set():
                if select.select([read_end], [], [], 0.05)[0]:
                    got.extend(os.read(read_end, 1 << 16))

        drain = threading.Thread(target=read_on, daemon=True)
        drain.start()  # the reader is back
        printer.write(line)
        err = ""
        deadline = time.monotonic() + 10
        while not err and time.monotonic() < deadline:
            time.sleep(0.02)
            err = capsys.readouterr().err
        assert err.startswith("server.py: ") and err.endswith(
            " lines could not be printed (stdout was not being read)\n"), err
        lost = int(err.split()[1])
        printer.close()
        done.set()
        drain.join(5)
        assert lost > 0
        assert got.count(b"\n") + lost <= 5001
        assert got == line * got.count(b"\n")  # whole lines only
    finally:
        os.close(read_end)
        os.close(write_end)

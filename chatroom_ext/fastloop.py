"""Run the server on uvloop (`server.py ... -uvloop`).

uvloop is a drop-in event loop built on libuv; the server's code is the same
on either loop. Install it with `pip install uvloop` (or `pip install .[uvloop]`).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like asyncio.run, on a uvloop event loop."""
    return uvloop.run(main)

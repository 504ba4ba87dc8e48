"""Fixtures of the security suite (helpers live in secwire.py)."""

from secwire import lab  # noqa: F401  (the fixture every security test uses)

"""Words shared by alignkit's messages."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """``1 step``, ``3 steps``: a count with its noun, plural where English wants it."""
    return f"{n} {noun}{'s' if n != 1 else ''}"

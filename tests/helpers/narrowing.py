"""Narrowing for the type checker where a test relies on a value being there."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def present(value: T | None) -> T:
    """`value`, asserted not None: a result the test expects (a reply's DP spend, an out-dir's
    outcome or claim); None fails the test here rather than as an AttributeError further on."""
    assert value is not None
    return value

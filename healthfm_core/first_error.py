"""One line for a pydantic validation's first problem, as every reader of a file, a run config or a
peer's message reports it: the source, the field, its value and what is wrong (pydantic's own
text spans several lines and lists every problem)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError


def first_error(err: ValidationError, source: str, where: Callable[[tuple[Any, ...]], str] | None = None) -> str:
    """`source: field <name>: value <value>: <message>` for the first problem of `err`, or
    `source: <message>` for a problem of the whole (a model's own check, whose message names its
    fields). `where` names the field from its location (default: the location joined by dots; a
    message's parser passes its wire names). A value is cut at 80 characters, an array shown by its
    dtype and shape, a missing field as (missing)."""
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if not loc:
        return f"{source}: {message}"
    value = first.get("input")
    if first.get("type") == "missing":
        shown = "(missing)"
    elif hasattr(value, "dtype") and hasattr(value, "shape"):  # an array: its values say nothing here
        shown = f"array {value.dtype}{tuple(value.shape)}"
    else:
        shown = repr(value)[:80]
    name = where(loc) if where is not None else ".".join(str(x) for x in loc)
    return f"{source}: field {name}: value {shown}: {message}"


__all__ = ["first_error"]

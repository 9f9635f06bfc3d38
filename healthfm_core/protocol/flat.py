"""The one flat form of every message: a pydantic message as the values of a Flower ConfigRecord,
and back. The config of a train or evaluate message (RoundConfig, EvalConfig), a site's
capabilities, the task head's messages and the secure rounds' messages all travel in it.

A ConfigRecord holds scalars (int, float, str, bytes, bool) and lists of one of them; never None,
never a nested mapping. So each field goes under its wire name (its name, underscores as dashes):
- a scalar, bytes, or a list of scalars: as it is (bytes raw: a secure round's masked vector is
  its bulk, 2 bytes a value, and base64 would make it 2.67, past the 2x-of-int8 budget);
- None: left out (read back, the field takes its default);
- anything else (a nested model, a mapping, a list of models): its JSON text.
Which fields are JSON follows from the model's annotations, on both sides.

Reading back (`from_flat`) refuses a key that names no field (but those the caller says travel
`beside` the message), a record larger than `max_bytes`, JSON that does not parse or repeats a
key; then the model validates the whole. Every failure is one ValueError (or the caller's
subclass) naming the message, the field and the value (healthfm_core/first_error.py).
"""

from __future__ import annotations

import json
import types
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from healthfm_core.first_error import first_error
from healthfm_core.strict_files import strict_json

M = TypeVar("M", bound=BaseModel)

_SCALARS = (bool, int, float, str, bytes)
NUMBER_BYTES = 8  # what a number counts towards a record's size (as Flower's protobuf holds it)


def wire_name(field: str) -> str:
    """A field's key in the flat form: its name, underscores as dashes."""
    return field.replace("_", "-")


def _as_it_is(annotation: Any, in_list: bool = False) -> bool:
    """Whether a ConfigRecord holds this field's values as they are (else: as JSON text): a
    scalar, or (not `in_list`) a list of scalars; None allowed beside either."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _as_it_is(get_args(annotation)[0], in_list)
    if origin in (Union, types.UnionType):
        return all(_as_it_is(a, in_list) for a in get_args(annotation) if a is not type(None))
    if origin is list:
        return not in_list and _as_it_is(get_args(annotation)[0], in_list=True)
    if origin is Literal:
        return all(isinstance(v, _SCALARS) for v in get_args(annotation))
    return annotation in _SCALARS


def json_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of `cls` that travel as JSON text."""
    return frozenset(name for name, info in cls.model_fields.items() if not _as_it_is(info.annotation))


def to_flat(message: BaseModel) -> dict[str, Any]:
    """The message's ConfigRecord values (Any: a ConfigRecord's value types, which this package
    does not import)."""
    encoded = json_fields(type(message))
    plain = message.model_dump(exclude=set(encoded))
    as_json = message.model_dump(mode="json", include=set(encoded))
    out: dict[str, Any] = {}
    for name in type(message).model_fields:
        if name in encoded:
            out[wire_name(name)] = json.dumps(as_json[name], separators=(",", ":"))
        elif plain[name] is not None:
            out[wire_name(name)] = plain[name]
    return out


def flat_size(record: Mapping[str, object]) -> int:
    """A record's size in bytes: its text and bytes in full, NUMBER_BYTES a number."""

    def size(value: object) -> int:
        if isinstance(value, str | bytes):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return NUMBER_BYTES

    return sum(len(key) + size(value) for key, value in record.items())


def from_flat(
    cls: type[M],
    record: Mapping[str, object],
    *,
    what: str | None = None,
    context: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
    beside: Collection[str] = (),
    error: type[ValueError] = ValueError,
) -> M:
    """The message of type `cls` from a received record. `what` names it in errors (default: the
    class's name); `context`: the model's validation context; `beside`: keys that travel in the
    same record but are not the message's (ignored); `error`: the ValueError subclass raised."""
    what = what or cls.__name__
    names = {wire_name(name): name for name in cls.model_fields}
    if unknown := sorted(set(record) - set(names) - set(beside)):
        raise error(f"{what}: unexpected key(s) {', '.join(unknown)} (its fields: {', '.join(names)})")
    if max_bytes is not None and (size := flat_size(record)) > max_bytes:
        raise error(f"{what}: {size} bytes > limit {max_bytes}")
    encoded = json_fields(cls)
    data: dict[str, Any] = {}
    for key, name in names.items():
        if key not in record:
            continue
        value = record[key]
        if name in encoded:
            if not isinstance(value, str):
                raise error(f"{what}: field {key}: value {repr(value)[:80]}: expected JSON text")
            value = strict_json(value, f"{what}: field {key}")
        data[name] = value
    try:
        return cls.model_validate(data, context=dict(context or {}))
    except ValidationError as err:
        raise error(first_error(err, what)) from None


__all__ = ["NUMBER_BYTES", "flat_size", "from_flat", "json_fields", "to_flat", "wire_name"]

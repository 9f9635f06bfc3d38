"""Files the platform reads, read strictly: the one JSON and YAML reader every site and coordinator
file (and every JSON a peer sends) goes through. healthfm_core/files.py writes them.

Strict means what a reader could otherwise take silently:
- **A duplicated key is refused.** JSON and YAML parsers keep the last of two equal keys, so a
  policy with two `dp:` blocks (mandatory with cap 3, then optional with cap 100) turned
  mandatory DP off without a word. Here it is an error naming the file and the key.
- **A YAML boolean is `true` or `false`.** YAML 1.1 (PyYAML) also reads `yes`, `no`, `on`, `off`
  as booleans; a site admin writing `require_secure_aggregation: yes` meant something, and
  `country: no` meant Norway. They are refused, naming the file, the field and the value (quote
  the word for text).
- **YAML numbers are YAML 1.2's (its core schema).** PyYAML follows YAML 1.1, where a float needs
  a dot (`1e308`, `1e-5`, `5e0` are strings there, `1.0e+308` a float), so a value in scientific
  notation arrived as a string; here every spelling is the number it is, and the reader's range
  checks then apply. Integers are decimal, `0x` hexadecimal or `0o` octal (`0x1` is 1, `0o17` is
  15). A plain number YAML 1.1 reads otherwise than YAML 1.2 is refused, naming the file, line,
  field, value and both readings (quote it for text): a sexagesimal `1:00` (1.1: 60; 1.2: the
  text "1:00"), a leading zero `020` (1.1: octal 16; 1.2: 20: whichever the writer meant, a reader
  of the other version takes the other number, so neither is assumed), `0b101`, `1_000`, `-0x1`.
- **No merge keys.** `<<` merges another mapping's keys into this one, and a later `<<` or a key
  written beside it silently replaces what an earlier one set: `dp: {<<: {mandatory: true,
  epsilon_cap: 3}, <<: {mandatory: false, epsilon_cap: 100}}` read as optional DP with cap 100,
  past the duplicate-key check. No file the platform reads needs one; a merge key is refused,
  naming the file and line (write the keys out; an anchor and alias `*name` alone are allowed).

Errors are StrictFileError (a ValueError), one line: the file, the line where known, the field
and the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

# YAML 1.2's core schema (yaml.org/spec/1.2.2, 10.3.2): integers and floats. A leading-zero
# decimal (`017`) matches _YAML12_INT but is refused as ambiguous (module docstring).
_YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]+$")
_YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
# YAML 1.1's (PyYAML's resolver): what it reads as a number, for the values 1.2 reads otherwise.
_YAML11_INT = re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$"
)
_YAML11_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_AMBIGUOUS_TAG = "tag:healthfm,2026:ambiguous-number"  # never written: what the resolver gives such a value
_BOOL_TAG = "tag:yaml.org,2002:bool"
_YAML12_BOOLS = {"true": True, "false": False}


def _yaml11_reading(value: str) -> str:
    """What YAML 1.1 (PyYAML's own loader) makes of a plain scalar, in words."""
    read = yaml.safe_load(value)
    return f"{type(read).__name__} {read!r}"


def _yaml12_reading(value: str) -> str:
    if _YAML12_INT.match(value):
        return f"int {int(value, 0) if value.lstrip('+-')[:2] in ('0x', '0o') else int(value, 10)}"
    return f"the text {value!r}"


class StrictFileError(ValueError):
    """A file (or a peer's JSON) that a strict reader refuses: names the file, field and value."""


class DuplicateKeyError(StrictFileError):
    """A key twice in one mapping: not a file cut short but one written (or edited) so, which a
    reader that skips damaged lines (rounds.jsonl) must not skip."""


def _where(where: str | Path) -> str:
    return str(where)


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, strict: duplicated keys, merge keys, YAML 1.1 booleans and numbers
    YAML 1.1 and 1.2 read differently refused, numbers read as YAML 1.2's core schema. `where`
    names the file in errors (set by strict_yaml)."""

    where = "<yaml>"

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        # A plain scalar's number tag is YAML 1.2's; one that YAML 1.1 reads as another number
        # (or as a number where 1.2 reads text) gets the ambiguous tag, refused when constructed.
        if kind is yaml.ScalarNode and implicit[0] and isinstance(value, str):
            if _LEADING_ZERO.match(value):
                # `00` is 0 to both; `020` is 16 to one and 20 to the other, `09` text to one.
                return _INT_TAG if yaml.safe_load(value) == int(value, 10) == 0 else _AMBIGUOUS_TAG
            if _YAML12_INT.match(value):
                return _INT_TAG
            if _YAML12_FLOAT.match(value):
                return _FLOAT_TAG
            if _YAML11_INT.match(value) or _YAML11_FLOAT.match(value):
                return _AMBIGUOUS_TAG
        return str(super().resolve(kind, value, implicit))

    def _ambiguous(self, node: yaml.ScalarNode, field: Hashable | None = None) -> StrictFileError:
        named = f"field {field}: " if field is not None else ""
        value = str(node.value)
        return StrictFileError(
            f"{self.where}: line {node.start_mark.line + 1}: {named}value {value}: YAML 1.1 reads "
            f"{_yaml11_reading(value)}, YAML 1.2 {_yaml12_reading(value)}; write the number plainly "
            "(decimal without a leading zero, 0x hexadecimal, 0o octal), or quote it if it is text"
        )

    def construct_ambiguous(self, node: yaml.ScalarNode) -> Any:
        raise self._ambiguous(node)

    def _number_text(self, node: yaml.ScalarNode, pattern: re.Pattern[str], kind: str) -> str:
        """A number's text, refused unless YAML 1.2 writes that kind so (resolved plain scalars
        are; `!!int VALUE` and `!!float VALUE` may be anything)."""
        value = str(self.construct_scalar(node))
        if self.resolve(yaml.ScalarNode, value, (True, False)) == _AMBIGUOUS_TAG:
            raise self._ambiguous(node)
        if not pattern.match(value):
            raise StrictFileError(
                f"{self.where}: line {node.start_mark.line + 1}: value {value!r}: not a YAML 1.2 {kind}"
            )
        return value

    def construct_yaml12_int(self, node: yaml.ScalarNode) -> int:
        value = self._number_text(node, _YAML12_INT, "integer")
        return int(value, 0) if value[:2] in ("0x", "0o") else int(value, 10)

    def construct_yaml12_float(self, node: yaml.ScalarNode) -> float:
        self._number_text(node, _YAML12_FLOAT, "float")
        return float(super().construct_yaml_float(node))

    def _bool_problem(self, node: yaml.Node, field: Hashable | None) -> StrictFileError:
        named = f"field {field}: " if field is not None else ""
        return StrictFileError(
            f"{self.where}: line {node.start_mark.line + 1}: {named}value {node.value!r}: a boolean is written "
            "true or false (YAML 1.1's yes/no/on/off are refused; quote the word if it is text)"
        )

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        value = str(self.construct_scalar(node))
        if value.lower() not in _YAML12_BOOLS:
            raise self._bool_problem(node, None)
        return _YAML12_BOOLS[value.lower()]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Hashable, int] = {}
            # The mapping's own keys, before merge keys (`<<`) are resolved: a key written beside a
            # merge overrides the merged one, which YAML allows and is no duplicate.
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    raise StrictFileError(
                        f"{self.where}: line {key_node.start_mark.line + 1}: merge key <<: refused (what one merge "
                        "sets, another merge or a key beside it silently replaces); write the keys out"
                    )
                if isinstance(value_node, yaml.ScalarNode) and value_node.tag == _AMBIGUOUS_TAG:
                    raise self._ambiguous(value_node, self.construct_object(key_node, deep=True))
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error below names it
                    first = None
                if first is not None:
                    raise DuplicateKeyError(
                        f"{self.where}: line {line}: field {key}: duplicated key (first at line {first}); "
                        "a second value would silently replace the first"
                    )
                try:
                    seen[key] = line
                except TypeError:
                    pass
                if (
                    isinstance(value_node, yaml.ScalarNode)
                    and value_node.tag == _BOOL_TAG
                    and str(value_node.value).lower() not in _YAML12_BOOLS
                ):
                    raise self._bool_problem(value_node, key)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_constructor(_BOOL_TAG, StrictLoader.construct_yaml_bool)
StrictLoader.add_constructor(_INT_TAG, StrictLoader.construct_yaml12_int)
StrictLoader.add_constructor(_FLOAT_TAG, StrictLoader.construct_yaml12_float)
StrictLoader.add_constructor(_AMBIGUOUS_TAG, StrictLoader.construct_ambiguous)
StrictLoader.add_constructor("tag:yaml.org,2002:map", StrictLoader.construct_yaml_map)


def strict_yaml(text: str | bytes, where: str | Path) -> Any:
    """YAML text parsed strictly (the module docstring); `where` names the file in errors.
    StrictFileError for a duplicated key or a YAML 1.1 boolean, for YAML that does not parse."""
    loader = StrictLoader(text)
    loader.where = _where(where)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise StrictFileError(f"{_where(where)}: not valid YAML ({' '.join(str(err).split())})") from None
    finally:
        loader.dispose()


def _refuse_duplicates(where: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise DuplicateKeyError(
                    f"{where}: field {key}: duplicated key in one object; a second value would silently replace the first"
                )
            out[key] = value
        return out

    return pairs


def strict_json(text: str | bytes, where: str | Path) -> Any:
    """JSON text parsed with duplicated keys refused; `where` names the file in errors.
    StrictFileError also for JSON that does not parse."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates(_where(where)))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StrictFileError(f"{_where(where)}: not valid JSON ({err})") from None


def strict_model(model: type[M], text: str | bytes, where: str | Path) -> M:
    """`model.model_validate_json(text)`, with duplicated keys refused first (pydantic's own JSON
    parser keeps the last one). pydantic's ValidationError passes through, as from the original."""
    strict_json(text, where)
    return model.model_validate_json(text)


def read_json(path: str | Path) -> Any:
    """A JSON file, read strictly (StrictFileError naming the file when unreadable or refused)."""
    return strict_json(_read_bytes(path), path)


def read_yaml(path: str | Path) -> Any:
    """A YAML file, read strictly (StrictFileError naming the file when unreadable or refused)."""
    return strict_yaml(_read_bytes(path), path)


def read_config_file(path: str | Path) -> Any:
    """A config a user writes, JSON when it ends in .json, else YAML; read strictly."""
    return read_json(path) if Path(path).suffix.lower() == ".json" else read_yaml(path)


def _read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise StrictFileError(f"{path}: cannot read ({err.strerror or err})") from None


__all__ = [
    "DuplicateKeyError",
    "StrictFileError",
    "StrictLoader",
    "read_config_file",
    "read_json",
    "read_yaml",
    "strict_json",
    "strict_model",
    "strict_yaml",
]

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
- **YAML numbers are read as YAML 1.2 reads them**: PyYAML follows YAML 1.1, where a float needs a
  dot (`1e308`, `1e-5`, `5e0` are strings there, `1.0e+308` a float), so a value in scientific
  notation arrived as a string; here every spelling is the number it is, and the reader's range
  checks then apply.

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

# YAML 1.2's float forms missing from YAML 1.1 (PyYAML): an exponent without a dot, an exponent
# without a sign. Tried after PyYAML's own int and float patterns, so `5` stays an int.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_BOOL_TAG = "tag:yaml.org,2002:bool"
_YAML12_BOOLS = {"true": True, "false": False}


class StrictFileError(ValueError):
    """A file (or a peer's JSON) that a strict reader refuses: names the file, field and value."""


class DuplicateKeyError(StrictFileError):
    """A key twice in one mapping: not a file cut short but one written (or edited) so, which a
    reader that skips damaged lines (rounds.jsonl) must not skip."""


def _where(where: str | Path) -> str:
    return str(where)


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, strict: duplicated keys and YAML 1.1 booleans refused, YAML 1.2
    floats read as numbers. `where` names the file in errors (set by strict_yaml)."""

    where = "<yaml>"

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
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
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


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
StrictLoader.add_constructor(_BOOL_TAG, StrictLoader.construct_yaml_bool)
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

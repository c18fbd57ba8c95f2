"""Reading files the user (or an earlier run) wrote: text, YAML and JSON, each failure one AdapterError.

- `read_text(path, what, max_bytes=...)`: UTF-8 text, a size cap checked before reading, and a bad
  byte reported with its line, never a raw UnicodeDecodeError.
- `load_yaml(text, where)`: YAML through one safe loader: duplicate keys refused (PyYAML silently
  keeps the last), aliases that would expand beyond MAX_YAML_NODES nodes (an "alias bomb") or that
  refer to themselves refused, too deep nesting refused.
- `parse_json(text, where)` / `read_json(path, what)`: JSON with too deep nesting (RecursionError)
  and bad UTF-8 reported like a syntax error.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import AdapterError, shorten

MAX_YAML_NODES = 100_000  # what a YAML document may expand to, aliases followed (a recipe has a few hundred)
MERGE_TAG = "tag:yaml.org,2002:merge"


def read_text(path, what: str, *, max_bytes: int | None = None, fix: str = "save it as UTF-8") -> str:
    """The text of `path` as UTF-8; AdapterError for a file too large or not UTF-8."""
    path = Path(path)
    if max_bytes is not None:
        size = path.stat().st_size
        if size > max_bytes:
            raise AdapterError(f"{what} {path} is {size:,} bytes, above the limit of {max_bytes:,}: "
                               "is it the right file? Keep it small (data goes in data.json, not the recipe)")
    data = path.read_bytes()
    return decode(data, f"{what} {path}", fix)


def decode(data: bytes, where: str, fix: str = "save it as UTF-8") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise AdapterError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}): "
                           f"{fix}") from None


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: the constructor's own error names it
                seen.setdefault(key, line)
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shorten(key)} (first on line {first}): keep one of them",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict, active: set) -> int:
    """How many nodes `node` stands for with every alias expanded (memoised: cheap on shared nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise AdapterError("a YAML alias refers to the node that holds it (a recursive structure): remove it")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, memo, active)
        if total > MAX_YAML_NODES:
            break
    active.discard(key)
    memo[key] = total
    return total


def _unshared(data):
    """A copy in which no two places share one object (PyYAML gives an alias the anchor's own object, so
    setting `adapters.0.x` would change every entry that is `*a`); bounded by MAX_YAML_NODES."""
    if isinstance(data, dict):
        return {k: _unshared(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_unshared(v) for v in data]
    return data


def load_yaml(text: str, where: str):
    """The data of one YAML document, read safely (see the module's docstring)."""
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise AdapterError(f"{where}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values, "
                               "so it is refused (an \"alias bomb\"); write the values out, or use fewer aliases")
        return _unshared(loader.construct_document(node))
    except yaml.YAMLError as err:
        raise AdapterError(f"{where} is not valid YAML: {_one_line(err)}") from None
    except RecursionError:
        raise AdapterError(f"{where}: the YAML is nested too deeply; flatten it") from None
    finally:
        loader.dispose()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).replace('in "<unicode string>", ', "").split())


def parse_json(text: str, where: str, fix: str = "fix or replace the file"):
    """The data of a JSON text; AdapterError (naming `where` and `fix`) when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{where} is not valid JSON ({err}): {fix}") from None
    except RecursionError:
        raise AdapterError(f"{where}: the JSON is nested too deeply to read: {fix}") from None


def read_json(path, what: str, fix: str = "fix or replace the file"):
    """The data of the JSON file at `path` (UTF-8)."""
    path = Path(path)
    return parse_json(read_text(path, what, fix=fix), f"{what} {path}", fix)

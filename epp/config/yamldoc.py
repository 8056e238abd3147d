"""YAML reading that remembers where things were written.

A config error should point at the line the user has to fix, so mappings and sequences are read into
`LineMap` / `LineList`: a plain dict / list that also carries the 1-based line of the container, of each
key (`key_lines`) and of each item (`item_lines`). Duplicate keys in a mapping are refused (YAML's own
behaviour, silently keeping the last one, hides typos). `plain()` strips the line information again before
values are handed to plugins.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.constructor import ConstructorError


class LineMap(dict[Any, Any]):
    """A dict read from YAML; `line` is where it starts and `key_lines[k]` where key `k` is written."""

    line: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, int] = {}


class LineList(list[Any]):
    """A list read from YAML; `line` is where it starts and `item_lines[i]` where item `i` is written."""

    line: int | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []


class _Loader(yaml.SafeLoader):
    """SafeLoader building LineMap / LineList and refusing duplicate keys."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[LineMap]:
    data = LineMap()
    data.line = node.start_mark.line + 1
    yield data
    loader.flatten_mapping(node)  # resolves `<<` merge keys
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            ) from None
        if key in data:
            raise ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r} (first written on line {data.key_lines[key]})",
                key_node.start_mark,
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Iterator[LineList]:
    data = LineList()
    data.line = node.start_mark.line + 1
    yield data
    for child in node.value:
        data.append(loader.construct_object(child, deep=True))
        data.item_lines.append(child.start_mark.line + 1)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


class YamlSyntaxError(ValueError):
    """The text is not one well-formed YAML document. `line` / `column` are 1-based, None if unknown."""

    def __init__(self, message: str, line: int | None, column: int | None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


def parse_yaml(text: str) -> Any:
    """Reads exactly one YAML document (None when the text holds no document at all)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        what = exc.problem or exc.context or "malformed YAML"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        where = f"line {line}, column {column}" if line is not None else "unknown position"
        raise YamlSyntaxError(f"invalid YAML at {where}: {what}", line, column) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", None, None) from None


def plain(value: Any) -> Any:
    """The same data as plain dicts and lists (what plugins' parameters should see)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value

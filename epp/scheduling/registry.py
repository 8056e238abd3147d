"""The plugin registry: type name -> plugin class, and typed parameter parsing.

A plugin class declares:
  type: ClassVar[str]                 the name users write in YAML (`queue-scorer`)
  aliases: ClassVar[tuple[str, ...]]  optional deprecated names that map to the same class
  Params: a frozen dataclass          optional; its fields, in camelCase, are the allowed `parameters`
and is constructed as `cls(name, params, handle)`.

Parameter keys are the camelCase form of the dataclass field names (`max_num_of_endpoints` ->
`maxNumOfEndpoints`); a field can name its key explicitly with `field(metadata={"key": "maxTTFTPenaltyMs"})`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from epp.datastore.pool import Pool


class ConfigError(ValueError):
    """A configuration a user wrote is wrong. The message says where and what is allowed."""


class NoParams:
    """Params for plugins that take none."""


@dataclasses.dataclass(frozen=True)
class Duration:
    """A duration parameter, written like Go/Kubernetes durations: `200ms`, `2s`, `1m30s`, or a number of
    seconds."""

    seconds: float

    _UNITS: typing.ClassVar[dict[str, float]] = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    _PART: typing.ClassVar[re.Pattern[str]] = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")

    @classmethod
    def parse(cls, value: Any) -> Duration:
        if isinstance(value, bool):
            raise ValueError("expected a duration such as '200ms' or '2s'")
        if isinstance(value, (int, float)):
            return cls(float(value))
        if isinstance(value, str):
            text = value.strip()
            pos, total = 0, 0.0
            for m in cls._PART.finditer(text):
                if m.start() != pos:
                    break
                total += float(m.group(1)) * cls._UNITS[m.group(2)]
                pos = m.end()
            if text and pos == len(text):
                return cls(total)
        raise ValueError(f"expected a duration such as '200ms' or '2s', got {value!r}")


class PluginHandle:
    """What a plugin may reach at construction: other plugins by name, and the pool."""

    def __init__(self, pool: Pool | None = None) -> None:
        self.pool = pool if pool is not None else Pool()
        self.plugins: dict[str, Any] = {}

    def plugin(self, name: str) -> Any:
        try:
            return self.plugins[name]
        except KeyError:
            raise ConfigError(f"no plugin named {name!r} is defined (defined: {sorted(self.plugins)})") from None


_REGISTRY: dict[str, type] = {}
_CANONICAL: dict[str, str] = {}  # alias -> canonical type


def register(cls: type) -> type:
    """Class decorator: make `cls` available under `cls.type` (and its `aliases`)."""
    type_name = getattr(cls, "type", None)
    if not isinstance(type_name, str) or not type_name:
        raise TypeError(f"plugin class {cls.__name__} needs a non-empty `type` class attribute")
    for key in (type_name, *getattr(cls, "aliases", ())):
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not cls:
            raise TypeError(f"plugin type {key!r} registered twice: {existing.__name__} and {cls.__name__}")
        _REGISTRY[key] = cls
        _CANONICAL[key] = type_name
    return cls


def lookup(type_name: str) -> type | None:
    return _REGISTRY.get(type_name)


def known_types() -> list[str]:
    return sorted(_REGISTRY)


_loaded = False


def load_builtin_plugins() -> None:
    """Import every module of the `plugins` package (recursively) so their decorators register them."""
    global _loaded
    if _loaded:
        return
    import plugins

    for info in pkgutil.walk_packages(plugins.__path__, prefix="plugins."):
        importlib.import_module(info.name)
    _loaded = True


def create(type_name: str, name: str, parameters: Mapping[str, Any] | None, handle: PluginHandle, where: str = "") -> Any:
    """Instantiate a registered plugin. `where` prefixes error messages (e.g. the config file and key)."""
    cls = _REGISTRY.get(type_name)
    prefix = f"{where}: " if where else ""
    if cls is None:
        raise ConfigError(
            f"{prefix}unknown plugin type {type_name!r}; known types: {', '.join(known_types())}"
        )
    params_cls = getattr(cls, "Params", NoParams)
    params = parse_params(params_cls, parameters, f"{prefix}plugin {name!r} (type {type_name!r})")
    return cls(name, params, handle)


# --------------------------------------------------------------------------------------------------------
# Parameters


def param_key(f: dataclasses.Field) -> str:
    explicit = f.metadata.get("key")
    if explicit:
        return explicit
    head, *rest = f.name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def parse_params(params_cls: type, raw: Mapping[str, Any] | None, where: str) -> Any:
    """Build `params_cls` from the YAML mapping `raw`. Unknown keys and wrong types are ConfigErrors that
    name `where`, the key and what is allowed."""
    if params_cls is NoParams:
        if raw:
            raise ConfigError(f"{where}: takes no parameters, got {sorted(raw)}")
        return NoParams()
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: `parameters` must be a mapping, got {type(raw).__name__}")
    return _build_dataclass(params_cls, raw, where)


def _build_dataclass(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {param_key(f): f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown parameter {unknown[0]!r}; allowed: {', '.join(sorted(fields)) or '(none)'}"
        )
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        if key in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[key], f"{where}: parameter {key!r}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Duration:
        try:
            return Duration.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        items = [_convert(item_t, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build_dataclass(tp, value, where)
    raise TypeError(f"unsupported parameter type {_type_name(tp)} at {where}")

"""The shape of an EndpointPickerConfig document, checked strictly and turned into plain dataclasses.

This module knows YAML keys and their types, nothing about plugins: whether a type exists, a reference
resolves or a parameter is allowed is decided later by the loader. Every error names the source, the key
path (`schedulingProfiles[0].plugins[1].weight`) with its line, and what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.config.yamldoc import LineList, LineMap, YamlSyntaxError, parse_yaml, plain
from epp.scheduling.registry import ConfigError

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"
TOP_LEVEL_KEYS = (
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "featureGates",
    "saturationDetector",
    "dataLayer",
    "parser",
    "flowControl",
)
PLUGIN_KEYS = ("name", "type", "parameters")
PROFILE_KEYS = ("name", "plugins")
PROFILE_ENTRY_KEYS = ("pluginRef", "weight")
REF_KEYS = ("pluginRef",)
DATA_LAYER_KEYS = ("sources",)
SOURCE_KEYS = ("pluginRef", "extractors")

# Feature gates the reference EPP registers. Only the accepted ones change nothing here:
#  - dataLayer: the data layer is always on (as in the reference, where the gate is now a no-op).
#  - enableLegacyMetrics: the reference falls back to its old per-pod poller; we have a single scraping
#    path (the data layer), so the gate is accepted for compatibility and does nothing.
#  - flowControl: refused until priority-based admission exists (see FLOW_CONTROL_UNSUPPORTED).
ACCEPTED_FEATURE_GATES = ("dataLayer", "enableLegacyMetrics")
FLOW_CONTROL_GATE = "flowControl"
KNOWN_FEATURE_GATES = (*ACCEPTED_FEATURE_GATES, FLOW_CONTROL_GATE)
FLOW_CONTROL_UNSUPPORTED = (
    "flow control is not supported yet (admission by priority arrives later); remove the `flowControl` "
    "feature gate and the `flowControl` section to run with the default admission (sheddable requests "
    "are rejected with 429 when the pool is saturated)"
)


@dataclass(frozen=True, slots=True)
class Where:
    """A place in a config: the source (file path or `--config-text`), a key path and its 1-based line."""

    source: str
    path: str = ""
    line: int | None = None

    def __str__(self) -> str:
        if not self.path:
            return self.source if self.line is None else f"{self.source}: line {self.line}"
        return f"{self.source}: {self.path}" + ("" if self.line is None else f" (line {self.line})")

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self}: {message}")

    def key(self, container: Any, key: str) -> Where:
        """The place of `key` inside the mapping `container` (which lives at self); no line if the key is
        not written."""
        line = container.key_lines.get(key) if isinstance(container, LineMap) else None
        return Where(self.source, f"{self.path}.{key}" if self.path else key, line)

    def item(self, container: Any, index: int) -> Where:
        """The place of item `index` of the list `container` (which lives at self)."""
        line = self.line
        if isinstance(container, LineList) and index < len(container.item_lines):
            line = container.item_lines[index]
        return Where(self.source, f"{self.path}[{index}]", line)


@dataclass(frozen=True, slots=True)
class PluginSpec:
    name: str
    type: str
    parameters: Mapping[str, Any] | None  # plain data, as written
    where: Where  # the entry, `plugins[i]`
    type_where: Where
    parameters_where: Where


@dataclass(frozen=True, slots=True)
class ProfileEntrySpec:
    plugin_ref: str
    weight: float | None  # None: not written
    where: Where  # the entry, `schedulingProfiles[i].plugins[j]`
    ref_where: Where
    weight_where: Where


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    entries: tuple[ProfileEntrySpec, ...]
    where: Where


@dataclass(frozen=True, slots=True)
class RefSpec:
    plugin_ref: str
    where: Where  # of the `pluginRef` key


@dataclass(frozen=True, slots=True)
class SourceSpec:
    ref: RefSpec
    extractors: tuple[RefSpec, ...]
    where: Where


@dataclass(frozen=True, slots=True)
class ConfigSpec:
    source: str
    api_version: str
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...] | None  # None: not written (or empty), the loader builds `default`
    profiles_where: Where
    feature_gates: frozenset[str]
    saturation_detector: RefSpec | None
    parser: RefSpec | None
    data_sources: tuple[SourceSpec, ...] | None  # None: dataLayer not written; () disables scraping


# --------------------------------------------------------------------------------------------------------


def suggest(word: str, choices: Sequence[str]) -> str:
    """`; did you mean 'x'?` when `word` looks like a typo of one of `choices`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _mapping(value: Any, where: Where, allowed: Sequence[str], what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(f"{what} must be a mapping with keys {', '.join(allowed)}; got {_describe(value)}")
    for key in value:
        if key not in allowed:
            key_where = where.key(value, key) if isinstance(key, str) else where
            hint = suggest(key, allowed) if isinstance(key, str) else ""
            raise key_where.error(f"unknown key {key!r} in {what}; allowed: {', '.join(allowed)}{hint}")
    return value


def _list(value: Any, where: Where, what: str) -> Sequence[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise where.error(f"{what} must be a list; got {_describe(value)}")
    return value


def _string(value: Any, where: Where, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"{what} must be a non-empty string; got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def _ref(value: Any, where: Where, what: str) -> RefSpec:
    entry = _mapping(value, where, REF_KEYS, what)
    if "pluginRef" not in entry:
        raise where.error(f"{what} needs `pluginRef`, the name of a plugin defined under `plugins`")
    ref_where = where.key(entry, "pluginRef")
    return RefSpec(_string(entry["pluginRef"], ref_where, "pluginRef"), ref_where)


# --------------------------------------------------------------------------------------------------------


def parse_document(text: str, source: str) -> ConfigSpec:
    """Reads and shape-checks one EndpointPickerConfig document. Raises ConfigError."""
    try:
        doc = parse_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    top = Where(source)
    if doc is None:
        raise top.error(
            "the config is empty; write an EndpointPickerConfig "
            f"(apiVersion: {API_VERSIONS[0]}, kind: {KIND}, plugins, schedulingProfiles)"
        )
    top = Where(source, "", getattr(doc, "line", None))
    doc = _mapping(doc, top, TOP_LEVEL_KEYS, "an EndpointPickerConfig")
    top = Where(source)  # top-level keys are reported by their own path and line

    if "apiVersion" not in doc:
        raise top.error(f"apiVersion is missing; allowed: {', '.join(API_VERSIONS)}")
    api_version = doc["apiVersion"]
    if api_version not in API_VERSIONS:
        raise top.key(doc, "apiVersion").error(
            f"unsupported apiVersion {api_version!r}; allowed: {', '.join(API_VERSIONS)}"
        )
    if "kind" not in doc:
        raise top.error(f"kind is missing; allowed: {KIND}")
    if doc["kind"] != KIND:
        raise top.key(doc, "kind").error(f"unsupported kind {doc['kind']!r}; allowed: {KIND}")

    feature_gates = _feature_gates(doc, top)
    if "flowControl" in doc:
        raise top.key(doc, "flowControl").error(FLOW_CONTROL_UNSUPPORTED)

    plugins = _plugins(doc, top)
    profiles_where = top.key(doc, "schedulingProfiles")
    profiles = _profiles(doc.get("schedulingProfiles"), profiles_where)

    saturation_detector = parser = None
    if doc.get("saturationDetector") is not None:
        saturation_detector = _ref(
            doc["saturationDetector"], top.key(doc, "saturationDetector"), "saturationDetector"
        )
    if doc.get("parser") is not None:
        parser = _ref(doc["parser"], top.key(doc, "parser"), "parser")
    data_sources = None
    if doc.get("dataLayer") is not None:
        data_sources = _data_layer(doc["dataLayer"], top.key(doc, "dataLayer"))

    return ConfigSpec(
        source=source,
        api_version=api_version,
        plugins=plugins,
        profiles=profiles,
        profiles_where=profiles_where,
        feature_gates=feature_gates,
        saturation_detector=saturation_detector,
        parser=parser,
        data_sources=data_sources,
    )


def _feature_gates(doc: Mapping[str, Any], top: Where) -> frozenset[str]:
    where = top.key(doc, "featureGates")
    gates = _list(doc.get("featureGates"), where, "featureGates")
    for i, gate in enumerate(gates):
        gate_where = where.item(gates, i)
        if gate == FLOW_CONTROL_GATE:
            raise gate_where.error(FLOW_CONTROL_UNSUPPORTED)
        if gate not in ACCEPTED_FEATURE_GATES:
            hint = suggest(gate, KNOWN_FEATURE_GATES) if isinstance(gate, str) else ""
            raise gate_where.error(
                f"unknown feature gate {gate!r}; known gates: {', '.join(KNOWN_FEATURE_GATES)} "
                f"({FLOW_CONTROL_GATE} is not supported yet){hint}"
            )
    return frozenset(gates)


def _plugins(doc: Mapping[str, Any], top: Where) -> tuple[PluginSpec, ...]:
    where = top.key(doc, "plugins")
    entries = _list(doc.get("plugins"), where, "plugins")
    specs = []
    for i, raw in enumerate(entries):
        entry_where = where.item(entries, i)
        entry = _mapping(raw, entry_where, PLUGIN_KEYS, "a plugin entry")
        type_where = entry_where.key(entry, "type")
        if "type" not in entry:
            raise entry_where.error("a plugin entry needs `type`, the plugin type (e.g. queue-scorer)")
        type_name = _string(entry["type"], type_where, "type")
        name = type_name
        if entry.get("name") is not None:
            name = _string(entry["name"], entry_where.key(entry, "name"), "name")
        params_where = entry_where.key(entry, "parameters")
        params = entry.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise params_where.error(f"parameters must be a mapping; got {_describe(params)}")
        specs.append(
            PluginSpec(
                name=name,
                type=type_name,
                parameters=plain(params) if params is not None else None,
                where=entry_where,
                type_where=type_where,
                parameters_where=params_where,
            )
        )
    return tuple(specs)


def _profiles(value: Any, where: Where) -> tuple[ProfileSpec, ...] | None:
    raw_profiles = _list(value, where, "schedulingProfiles")
    if not raw_profiles:
        return None
    profiles = []
    for i, raw in enumerate(raw_profiles):
        profile_where = where.item(raw_profiles, i)
        profile = _mapping(raw, profile_where, PROFILE_KEYS, "a scheduling profile")
        if "name" not in profile:
            raise profile_where.error("a scheduling profile needs `name`")
        name = _string(profile["name"], profile_where.key(profile, "name"), "name")
        entries_where = profile_where.key(profile, "plugins")
        raw_entries = _list(profile.get("plugins"), entries_where, "plugins")
        entries = []
        for j, raw_entry in enumerate(raw_entries):
            entry_where = entries_where.item(raw_entries, j)
            entry = _mapping(raw_entry, entry_where, PROFILE_ENTRY_KEYS, "a profile plugin entry")
            if "pluginRef" not in entry:
                raise entry_where.error(
                    "a profile plugin entry needs `pluginRef`, the name of a plugin under `plugins`"
                )
            ref_where = entry_where.key(entry, "pluginRef")
            ref = _string(entry["pluginRef"], ref_where, "pluginRef")
            weight_where = entry_where.key(entry, "weight")
            weight = entry.get("weight")
            if weight is not None:
                if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise weight_where.error(f"weight must be a number >= 0; got {_describe(weight)}")
                if not weight >= 0:  # also refuses NaN
                    raise weight_where.error(f"weight must be a number >= 0; got {weight!r}")
                weight = float(weight)
            entries.append(ProfileEntrySpec(ref, weight, entry_where, ref_where, weight_where))
        profiles.append(ProfileSpec(name, tuple(entries), profile_where))
    return tuple(profiles)


def _data_layer(value: Any, where: Where) -> tuple[SourceSpec, ...]:
    layer = _mapping(value, where, DATA_LAYER_KEYS, "dataLayer")
    if "sources" not in layer:
        raise where.error(
            "dataLayer needs `sources` (write `sources: []` to turn metrics scraping off, or leave dataLayer "
            "out for the default metrics-data-source + core-metrics-extractor)"
        )
    sources_where = where.key(layer, "sources")
    raw_sources = _list(layer["sources"], sources_where, "dataLayer.sources")
    sources = []
    for i, raw in enumerate(raw_sources):
        source_where = sources_where.item(raw_sources, i)
        entry = _mapping(raw, source_where, SOURCE_KEYS, "a data source entry")
        if "pluginRef" not in entry:
            raise source_where.error(
                "a data source entry needs `pluginRef`, the name of a metrics source plugin"
            )
        ref_where = source_where.key(entry, "pluginRef")
        ref = RefSpec(_string(entry["pluginRef"], ref_where, "pluginRef"), ref_where)
        extractors_where = source_where.key(entry, "extractors")
        raw_extractors = _list(entry.get("extractors"), extractors_where, "extractors")
        if not raw_extractors:
            raise (extractors_where if "extractors" in entry else source_where).error(
                f"data source {ref.plugin_ref!r} needs at least one entry under `extractors` "
                "(e.g. `- pluginRef: core-metrics-extractor`)"
            )
        extractors = tuple(
            _ref(item, extractors_where.item(raw_extractors, j), "an extractor entry")
            for j, item in enumerate(raw_extractors)
        )
        sources.append(SourceSpec(ref, extractors, source_where))
    return tuple(sources)

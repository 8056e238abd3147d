"""EndpointPickerConfig loading: plugin instances, defaulting, validation, and the wired result (EppConfig).

The document is first shape-checked (`epp.config.spec`), then turned into running objects in this order,
which is also the order of `EppConfig.plugins` and of the hook lists:

1. every plugin under `plugins`, in the order written (name defaults to the type);
2. plugins that a plugin `requires` (class attribute, plugin types) and nobody declared, named after their
   type and given the requiring plugin's parameters that the required type accepts;
3. the scheduling profiles: as written, or one `default` profile of every filter, scorer and picker;
4. the profile handler (`single-profile-handler` when there is exactly one profile and none is declared);
5. a picker for every profile without one (the only picker defined, else `max-score-picker`);
6. the data layer (`metrics-data-source` + `core-metrics-extractor` unless `dataLayer` is written),
   the parser (`openai-parser`) and the saturation detector (`utilization-detector`);
7. `bind(handle)` on every instance that has it, so plugins can reach the plugins they work with.

Each instance is slotted into every extension point it implements (checked structurally with the
runtime-checkable Protocols), as the reference EPP does. Data producers are ordered by what they produce
and consume. Every error is a ConfigError naming the source, the key path and line, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from epp.config.producers import DependencyCycle, order_producers
from epp.config.spec import ConfigSpec, ProfileSpec, RefSpec, Where, parse_document, suggest
from epp.scheduling import registry
from epp.scheduling.interfaces import (
    Admitter,
    DataProducer,
    Filter,
    MetricsExtractor,
    MetricsSource,
    Parser,
    Picker,
    PreRequest,
    ProfileHandler,
    ResponseBodyHook,
    ResponseCompleteHook,
    ResponseHeaderHook,
    SaturationDetector,
    Scorer,
)
from epp.scheduling.registry import ConfigError, PluginHandle
from epp.scheduling.scheduler import Scheduler, SchedulerProfile, WeightedScorer

# The extension points, in the order they are listed in messages.
EXTENSION_POINTS: tuple[tuple[str, type], ...] = (
    ("ProfileHandler", ProfileHandler),
    ("Filter", Filter),
    ("Scorer", Scorer),
    ("Picker", Picker),
    ("DataProducer", DataProducer),
    ("PreRequest", PreRequest),
    ("ResponseHeaderHook", ResponseHeaderHook),
    ("ResponseBodyHook", ResponseBodyHook),
    ("ResponseCompleteHook", ResponseCompleteHook),
    ("Admitter", Admitter),
    ("SaturationDetector", SaturationDetector),
    ("Parser", Parser),
    ("MetricsSource", MetricsSource),
    ("MetricsExtractor", MetricsExtractor),
)

DEFAULT_PROFILE = "default"
BUILTIN_PROFILE_SOURCE = "built-in {name} profile"
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class DefaultTypes:
    """The plugin types the loader adds when a config leaves them out (the reference EPP's defaults)."""

    profile_handler: str = "single-profile-handler"
    picker: str = "max-score-picker"
    parser: str = "openai-parser"
    saturation_detector: str = "utilization-detector"
    metrics_source: str = "metrics-data-source"
    metrics_extractor: str = "core-metrics-extractor"


BUILTIN_DEFAULTS = DefaultTypes()


@dataclass
class EppConfig:
    """A loaded config: every plugin instance, wired into the scheduler and the request pipeline."""

    source: str  # file path, "--config-text" or "built-in default profile"
    plugins: dict[str, object]  # every instance by name, including auto-added ones, in creation order
    scheduler: Scheduler
    producers: list[DataProducer]  # producers of a key come before its consumers
    pre_request: list[PreRequest]
    response_header_hooks: list[ResponseHeaderHook]
    response_body_hooks: list[ResponseBodyHook]
    response_complete_hooks: list[ResponseCompleteHook]
    saturation_detector: SaturationDetector | None
    parser: Parser
    data_sources: list[tuple[MetricsSource, list[MetricsExtractor]]]  # empty = no scraping
    feature_gates: frozenset[str]
    admitters: list[Admitter] = dataclasses.field(default_factory=list)  # asked after the producers

    @property
    def owned_request_headers(self) -> tuple[str, ...]:
        """Request headers that plugins set (class attribute `owned_request_headers`, e.g. the P/D handler's
        x-prefiller-host-port): a client's own copy is removed unless a plugin set it for this request."""
        out: list[str] = []
        for p in self.plugins.values():
            for h in getattr(p, "owned_request_headers", ()):
                if h not in out:
                    out.append(h)
        return tuple(out)

    @property
    def response_body_readers(self) -> list[str]:
        """The plugins that read response bodies: the gateway's ext_proc filter must send the response body
        (response_body_mode FULL_DUPLEX_STREAMED) for them to work. With none, it need not (NONE), which saves
        most of the EPP's CPU on streamed responses."""
        return [getattr(h, "name", type(h).__name__) for h in self.response_body_hooks]


# --------------------------------------------------------------------------------------------------------
# Entry points


def load_config(
    text: str,
    source: str,
    handle: PluginHandle,
    *,
    defaults: DefaultTypes = BUILTIN_DEFAULTS,
    builtin_plugins: bool = True,
) -> EppConfig:
    """Loads an EndpointPickerConfig from YAML `text`; `source` names it in error messages (a file path or
    `--config-text`). Instances are added to `handle.plugins` as they are created, so pass a fresh handle.

    `builtin_plugins` imports the `plugins` package first so its types are registered; `defaults` names
    the types added when the config leaves them out. Raises ConfigError.
    """
    if builtin_plugins:
        registry.load_builtin_plugins()
    spec = parse_document(text, source)
    return _Builder(spec, handle, defaults).build()


def load_config_file(
    path: str | os.PathLike[str],
    handle: PluginHandle,
    *,
    defaults: DefaultTypes = BUILTIN_DEFAULTS,
    builtin_plugins: bool = True,
) -> EppConfig:
    """Loads the EndpointPickerConfig file at `path` (see load_config). Raises ConfigError."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: the config file is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    return load_config(text, source, handle, defaults=defaults, builtin_plugins=builtin_plugins)


def profile_names() -> list[str]:
    """The names of the built-in profiles (`epp/profiles/<name>.yaml`)."""
    folder = resources.files("epp") / "profiles"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(
    name: str,
    handle: PluginHandle,
    *,
    defaults: DefaultTypes = BUILTIN_DEFAULTS,
    builtin_plugins: bool = True,
) -> EppConfig:
    """Loads the built-in profile `epp/profiles/<name>.yaml` (`default` is what `epp` runs without a config
    flag). Raises ConfigError for an unknown name, listing the known ones."""
    resource = resources.files("epp") / "profiles" / f"{name}.yaml"
    if not _PROFILE_NAME.fullmatch(name) or not resource.is_file():
        raise ConfigError(
            f"unknown built-in profile {name!r}{suggest(name, profile_names())}; "
            f"known profiles: {', '.join(profile_names())} (or pass a file with --config-file)"
        )
    text = resource.read_text(encoding="utf-8")
    return load_config(
        text,
        BUILTIN_PROFILE_SOURCE.format(name=name),
        handle,
        defaults=defaults,
        builtin_plugins=builtin_plugins,
    )


# --------------------------------------------------------------------------------------------------------
# Building


def implemented_points(plugin: object) -> list[str]:
    """The names of the extension points `plugin` implements."""
    return [name for name, proto in EXTENSION_POINTS if isinstance(plugin, proto)]


def _accepted_keys(cls: type) -> set[str] | None:
    """The parameter keys the plugin class accepts (None: it takes no parameters)."""
    params_cls = getattr(cls, "Params", registry.NoParams)
    if params_cls is registry.NoParams or not dataclasses.is_dataclass(params_cls):
        return None
    return {registry.param_key(f) for f in dataclasses.fields(params_cls) if f.init}


class _Builder:
    """One load: creates the instances and wires them. Holds no state beyond the load."""

    def __init__(self, spec: ConfigSpec, handle: PluginHandle, defaults: DefaultTypes) -> None:
        self.spec = spec
        self.handle = handle
        self.defaults = defaults
        self.plugins: dict[str, Any] = {}
        self.types: dict[str, str] = {}  # name -> type as written
        self.origin: dict[str, Where] = {}  # name -> where it was declared or why it was added
        self.raw_params: dict[str, Mapping[str, Any] | None] = {}

    # -- instances ------------------------------------------------------------------------------------

    def _describe(self, name: str) -> str:
        return f"{name!r} (type {self.types[name]!r}, {self.origin[name].path or 'added by default'})"

    def _create(
        self,
        type_name: str,
        name: str,
        parameters: Mapping[str, Any] | None,
        where: Where,
        type_where: Where,
        params_where: Where,
    ) -> Any:
        if name in self.plugins:
            raise where.error(
                f"plugin name {name!r} is already used by {self._describe(name)}; "
                "give each plugin a unique `name`"
            )
        if registry.lookup(type_name) is None:
            raise type_where.error(
                f"unknown plugin type {type_name!r}{suggest(type_name, registry.known_types())}; "
                f"known types: {', '.join(registry.known_types())}"
            )
        try:
            instance = registry.create(type_name, name, parameters, self.handle, where=str(params_where))
        except ConfigError:
            raise
        except ValueError as exc:
            raise params_where.error(f"plugin {name!r} (type {type_name!r}): {exc}") from None
        self.plugins[name] = instance
        self.handle.plugins[name] = instance
        self.types[name] = type_name
        self.origin[name] = where
        self.raw_params[name] = parameters
        return instance

    def _create_declared(self) -> None:
        for p in self.spec.plugins:
            self._create(p.type, p.name, p.parameters, p.where, p.type_where, p.parameters_where)

    def _create_required(self) -> None:
        """Adds the plugin types that instances `require` and that no instance provides (transitively)."""
        names = list(self.plugins)
        i = 0
        while i < len(names):
            name = names[i]
            i += 1
            for required in getattr(self.plugins[name], "requires", None) or ():
                cls = registry.lookup(required)
                if cls is None:
                    raise self.origin[name].error(
                        f"plugin {name!r} requires plugin type {required!r}, which is not registered; "
                        f"known types: {', '.join(registry.known_types())}"
                    )
                if any(isinstance(p, cls) for p in self.plugins.values()):
                    continue
                accepted = _accepted_keys(cls)
                raw = self.raw_params.get(name) or {}
                params = {k: v for k, v in raw.items() if k in accepted} if accepted else None
                origin = self.origin[name]
                why = f"{origin.path or 'plugins'} (auto-added {required!r}, required by {name!r})"
                where = Where(origin.source, why, origin.line)
                if required in self.plugins:
                    raise where.error(
                        f"plugin {name!r} needs a plugin of type {required!r}, and the name {required!r} "
                        f"it would get is used by {self._describe(required)}; rename that plugin or "
                        f"declare a {required!r} plugin yourself"
                    )
                self._create(
                    required,
                    required,
                    params,
                    where,
                    where,
                    Where(origin.source, f"{why}.parameters", origin.line),
                )
                names.append(required)

    def _default_instance(self, type_name: str, purpose: str, *, reuse_by_type: bool) -> Any:
        """An instance of `type_name` for `purpose`: an existing one (the first of that type, or the one
        named after the type when `reuse_by_type` is false), else a new one named after the type."""
        cls = registry.lookup(type_name)
        if cls is not None:
            if reuse_by_type:
                for instance in self.plugins.values():
                    if isinstance(instance, cls):
                        return instance
            elif isinstance(self.plugins.get(type_name), cls):
                return self.plugins[type_name]
        if type_name in self.plugins:
            raise self.origin[type_name].error(
                f"cannot add the default {purpose} {type_name!r}: the name is used by "
                f"{self._describe(type_name)}; rename that plugin or configure the {purpose} explicitly"
            )
        where = Where(self.spec.source, f"plugins (default {purpose} {type_name!r})")
        return self._create(type_name, type_name, None, where, where, where)

    def _name_of(self, instance: Any) -> str:
        return next(n for n, p in self.plugins.items() if p is instance)

    # -- references -----------------------------------------------------------------------------------

    def _resolve(self, ref: str, where: Where) -> Any:
        if ref not in self.plugins:
            defined = ", ".join(self.plugins) or "(none)"
            raise where.error(
                f"pluginRef {ref!r} names no defined plugin{suggest(ref, list(self.plugins))}; "
                f"defined plugins: {defined}"
            )
        return self.plugins[ref]

    def _resolve_as(self, ref: RefSpec, proto: type, point: str, example: str) -> Any:
        instance = self._resolve(ref.plugin_ref, ref.where)
        if not isinstance(instance, proto):
            implements = ", ".join(implemented_points(instance)) or "no extension point"
            raise ref.where.error(
                f"plugin {ref.plugin_ref!r} (type {self.types[ref.plugin_ref]!r}) is not a {point} "
                f"(it implements: {implements}); name a {point} plugin such as {example}"
            )
        return instance

    # -- profiles -------------------------------------------------------------------------------------

    def _default_profile(self) -> SchedulerProfile:
        """No schedulingProfiles: one `default` profile of every filter, scorer and picker (weights 1)."""
        profile = SchedulerProfile(DEFAULT_PROFILE)
        pickers = [n for n, p in self.plugins.items() if isinstance(p, Picker)]
        if len(pickers) > 1:
            raise self.spec.profiles_where.error(
                f"no schedulingProfiles are written, so profile {DEFAULT_PROFILE!r} takes every filter, "
                f"scorer and picker, but several pickers are defined ({', '.join(pickers)}); a profile has "
                "at most one picker: write schedulingProfiles and choose one picker per profile"
            )
        for instance in self.plugins.values():
            if isinstance(instance, Filter):
                profile.filters.append(instance)
            if isinstance(instance, Scorer):
                profile.scorers.append(WeightedScorer(instance, 1.0))
            if isinstance(instance, Picker):
                profile.picker = instance
        return profile

    def _profile(self, spec: ProfileSpec) -> SchedulerProfile:
        profile = SchedulerProfile(spec.name)
        picker_ref: str | None = None
        seen: dict[str, str] = {}
        for entry in spec.entries:
            ref = entry.plugin_ref
            instance = self._resolve(ref, entry.ref_where)
            if ref in seen:
                raise entry.ref_where.error(
                    f"plugin {ref!r} is listed twice in profile {spec.name!r} (also at {seen[ref]}); "
                    "list it once"
                )
            seen[ref] = entry.where.path
            is_filter, is_scorer, is_picker = (isinstance(instance, p) for p in (Filter, Scorer, Picker))
            if not (is_filter or is_scorer or is_picker):
                implements = ", ".join(implemented_points(instance)) or "no extension point"
                raise entry.ref_where.error(
                    f"plugin {ref!r} (type {self.types[ref]!r}) cannot be part of a scheduling profile: "
                    f"a profile entry must be a Filter, Scorer or Picker, and it implements: {implements}"
                )
            if entry.weight is not None and not is_scorer:
                raise entry.weight_where.error(
                    f"`weight` is only allowed on scorers, and plugin {ref!r} (type {self.types[ref]!r}) "
                    "is not a scorer; remove the weight"
                )
            if is_filter:
                profile.filters.append(instance)
            if is_scorer:
                profile.scorers.append(
                    WeightedScorer(instance, 1.0 if entry.weight is None else entry.weight)
                )
            if is_picker:
                if picker_ref is not None:
                    raise entry.ref_where.error(
                        f"profile {spec.name!r} has more than one picker ({picker_ref!r} and {ref!r}); "
                        "a profile has at most one picker"
                    )
                picker_ref = ref
                profile.picker = instance
        return profile

    def _profiles(self) -> dict[str, SchedulerProfile]:
        if self.spec.profiles is None:
            return {DEFAULT_PROFILE: self._default_profile()}
        profiles: dict[str, SchedulerProfile] = {}
        first_at: dict[str, Where] = {}
        for spec in self.spec.profiles:
            if spec.name in profiles:
                raise spec.where.error(
                    f"duplicate scheduling profile name {spec.name!r} (also {first_at[spec.name].path}); "
                    "profile names must be unique"
                )
            profiles[spec.name] = self._profile(spec)
            first_at[spec.name] = spec.where
        return profiles

    def _profile_handler(self, profiles: Mapping[str, SchedulerProfile]) -> Any:
        handlers = [n for n, p in self.plugins.items() if isinstance(p, ProfileHandler)]
        if len(handlers) > 1:
            raise self.origin[handlers[1]].error(
                "more than one profile handler is defined "
                f"({', '.join(self._describe(n) for n in handlers)}); keep exactly one"
            )
        if handlers:
            handler = self.plugins[handlers[0]]
        elif len(profiles) == 1:
            handler = self._default_instance(
                self.defaults.profile_handler, "profile handler", reuse_by_type=False
            )
        else:
            raise self.spec.profiles_where.error(
                f"{len(profiles)} scheduling profiles ({', '.join(profiles)}) need a profile handler that "
                f"decides which of them run; add one under `plugins` ({self.defaults.profile_handler} runs "
                "exactly one profile)"
            )
        max_profiles = getattr(handler, "max_profiles", None)
        if max_profiles is not None and len(profiles) > max_profiles:
            name = self._name_of(handler)
            raise self.spec.profiles_where.error(
                f"profile handler {self._describe(name)} takes at most {max_profiles} profile(s), but "
                f"{len(profiles)} are defined ({', '.join(profiles)}); remove profiles or use a handler made "
                "for several"
            )
        return handler

    def _default_pickers(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        lacking = [p for p in profiles.values() if p.picker is None]
        if not lacking:
            return
        pickers = [p for p in self.plugins.values() if isinstance(p, Picker)]
        if len(pickers) == 1:
            picker = pickers[0]
        else:
            picker = self._default_instance(self.defaults.picker, "picker", reuse_by_type=False)
            if not isinstance(picker, Picker):
                raise ConfigError(
                    f"{self.spec.source}: the default picker type {self.defaults.picker!r} is not a Picker"
                )
        for profile in lacking:
            profile.picker = picker

    # -- request pipeline -----------------------------------------------------------------------------

    def _data_layer(self) -> list[tuple[Any, list[Any]]]:
        if self.spec.data_sources is None:
            source = self._default_instance(
                self.defaults.metrics_source, "metrics data source", reuse_by_type=True
            )
            extractor = self._default_instance(
                self.defaults.metrics_extractor, "metrics extractor", reuse_by_type=True
            )
            self._check_default(source, MetricsSource, self.defaults.metrics_source)
            self._check_default(extractor, MetricsExtractor, self.defaults.metrics_extractor)
            return [(source, [extractor])]
        wired = []
        for s in self.spec.data_sources:
            notifier = self._resolve(s.ref.plugin_ref, s.ref.where)
            if callable(getattr(notifier, "attach_extractor", None)):
                # An endpoint-notification source (llm-d): its extractors follow the pool's endpoints;
                # nothing is scraped for it.
                for e in s.extractors:
                    try:
                        notifier.attach_extractor(self._resolve(e.plugin_ref, e.where))
                    except ValueError as exc:
                        raise e.where.error(str(exc)) from None
                continue
            source = self._resolve_as(s.ref, MetricsSource, "MetricsSource", self.defaults.metrics_source)
            extractors = [
                self._resolve_as(e, MetricsExtractor, "MetricsExtractor", self.defaults.metrics_extractor)
                for e in s.extractors
            ]
            wired.append((source, extractors))
        return wired

    def _check_default(self, instance: Any, proto: type, type_name: str) -> None:
        if not isinstance(instance, proto):
            raise ConfigError(
                f"{self.spec.source}: the default plugin type {type_name!r} does not implement "
                f"{proto.__name__}"
            )

    def _parser(self) -> Any:
        if self.spec.parser is not None:
            return self._resolve_as(self.spec.parser, Parser, "Parser", self.defaults.parser)
        parser = self._default_instance(self.defaults.parser, "parser", reuse_by_type=True)
        self._check_default(parser, Parser, self.defaults.parser)
        return parser

    def _saturation_detector(self) -> Any:
        if self.spec.saturation_detector is not None:
            return self._resolve_as(
                self.spec.saturation_detector,
                SaturationDetector,
                "SaturationDetector",
                self.defaults.saturation_detector,
            )
        detector = self._default_instance(
            self.defaults.saturation_detector, "saturation detector", reuse_by_type=True
        )
        self._check_default(detector, SaturationDetector, self.defaults.saturation_detector)
        return detector

    def _bind(self) -> None:
        for name, instance in list(self.plugins.items()):
            bind = getattr(instance, "bind", None)
            if not callable(bind):
                continue
            try:
                bind(self.handle)
            except ValueError as exc:  # ConfigError included: handle.plugin() names no source
                raise self.origin[name].error(f"plugin {name!r} (type {self.types[name]!r}): {exc}") from None

    def _producers(self) -> list[Any]:
        producers = [p for p in self.plugins.values() if isinstance(p, DataProducer)]
        try:
            return order_producers(producers, name=self._name_of)
        except DependencyCycle as exc:
            raise Where(self.spec.source, "plugins").error(
                f"{exc}; a producer's `consumes` must not depend on its own output through other producers"
            ) from None

    # -- all together ---------------------------------------------------------------------------------

    def build(self) -> EppConfig:
        self._create_declared()
        self._create_required()
        profiles = self._profiles()
        handler = self._profile_handler(profiles)
        self._default_pickers(profiles)
        data_sources = self._data_layer()
        parser = self._parser()
        detector = self._saturation_detector()
        self._create_required()  # for the plugins added by default
        self._bind()
        check = getattr(handler, "check_profiles", None)
        if callable(check):  # a handler that names profiles (e.g. P/D) checks them against the config's
            try:
                check(profiles)
            except (ConfigError, ValueError) as exc:
                name = self._name_of(handler)
                where = self.origin.get(name)
                message = f"plugin {name!r} (type {self.types.get(name, handler.type)!r}): {exc}"
                raise (where.error(message) if where is not None else ConfigError(message)) from None
        instances = list(self.plugins.values())
        return EppConfig(
            source=self.spec.source,
            plugins=dict(self.plugins),
            scheduler=Scheduler(handler, profiles),
            producers=self._producers(),
            pre_request=[p for p in instances if isinstance(p, PreRequest)],
            response_header_hooks=[p for p in instances if isinstance(p, ResponseHeaderHook)],
            response_body_hooks=[p for p in instances if isinstance(p, ResponseBodyHook)],
            response_complete_hooks=[p for p in instances if isinstance(p, ResponseCompleteHook)],
            saturation_detector=detector,
            parser=parser,
            data_sources=data_sources,
            feature_gates=self.spec.feature_gates,
            admitters=[p for p in instances if isinstance(p, Admitter)],
        )

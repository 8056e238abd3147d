"""`core-metrics-extractor`: turns a model server's Prometheus page into the endpoint's `Metrics` snapshot
(queue length, running requests, KV-cache usage, LoRA adapters, KV-cache geometry).

The metric names depend on the engine. Each endpoint's engine is read from its label `engineLabelKey`
(default `inference.networking.k8s.io/engine-type`; llm-d's `llm-d.ai/engine-type` is accepted when that
label is absent), else `defaultEngine` (vllm). Built-in maps: vllm, sglang, trtllm-serve,
triton-tensorrt-llm (epp/datalayer/engines.py). `engineConfigs` entries replace a built-in map wholesale
(same `name`) or add one; a spec set to "" disables that metric.

When it is wrong: a mislabelled endpoint fails every scrape with a message naming the missing metric (its
last good snapshot is kept and ages); an engine whose gauges lag its real load (SGLang's token_usage counts
tokens, not blocks) misleads the KV-cache scorers by as much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from epp.datalayer.engines import BUILTIN_ENGINES, EngineConfig, EngineMetrics, with_default_cache_labels
from epp.datastore.endpoint import Endpoint, Metrics
from epp.scheduling.registry import ConfigError, PluginHandle, register

ENGINE_LABEL_KEY = "inference.networking.k8s.io/engine-type"
LLMD_ENGINE_LABEL_KEY = "llm-d.ai/engine-type"


@dataclass(frozen=True)
class CoreMetricsExtractorParams:
    engine_label_key: str = ENGINE_LABEL_KEY
    default_engine: str = "vllm"
    engine_configs: tuple[EngineConfig, ...] = ()

    def validate(self) -> None:
        if not self.engine_label_key:
            raise ValueError("parameter 'engineLabelKey' must not be empty")
        seen: set[str] = set()
        for cfg in self.engine_configs:
            if cfg.name in seen:
                raise ValueError(f"parameter 'engineConfigs' names engine {cfg.name!r} twice")
            seen.add(cfg.name)
        known = set(BUILTIN_ENGINES) | seen
        if self.default_engine not in known:
            raise ValueError(
                f"parameter 'defaultEngine' is {self.default_engine!r}, which is neither built in nor in "
                f"engineConfigs; known engines: {', '.join(sorted(known))}"
            )


@register
class CoreMetricsExtractor:
    """Implements MetricsExtractor."""

    type: ClassVar[str] = "core-metrics-extractor"
    Params = CoreMetricsExtractorParams

    def __init__(
        self, name: str, params: CoreMetricsExtractorParams | None = None, handle: PluginHandle | None = None
    ) -> None:
        self.name = name
        self.params = params = params if params is not None else CoreMetricsExtractorParams()
        try:
            params.validate()
            configs = dict(BUILTIN_ENGINES)
            configs.update((c.name, with_default_cache_labels(c)) for c in params.engine_configs)
            self.engines: dict[str, EngineMetrics] = {n: EngineMetrics(c) for n, c in sorted(configs.items())}
        except ValueError as exc:
            raise ConfigError(f"{self.type} {name!r}: {exc}") from None
        self.engine_label_key = params.engine_label_key
        fallbacks = [k for k in (LLMD_ENGINE_LABEL_KEY, ENGINE_LABEL_KEY) if k != params.engine_label_key]
        self._fallback_keys = tuple(fallbacks)
        self._default = self.engines[params.default_engine]

    def engine_for(self, endpoint: Endpoint) -> EngineMetrics:
        """The engine map for `endpoint`, chosen by its labels. Raises ValueError for an unknown engine."""
        labels = endpoint.labels
        value = labels.get(self.engine_label_key)
        if not value:
            for key in self._fallback_keys:
                value = labels.get(key)
                if value:
                    break
            else:
                return self._default
        engine = self.engines.get(value)
        if engine is None:
            raise ValueError(
                f"endpoint {endpoint.name} ({endpoint.hostport}): engine type {value!r} (from its labels) is not "
                f"known; known engines: {', '.join(self.engines)}; add an engineConfigs entry named {value!r} "
                f"to the {self.type} plugin {self.name!r}"
            )
        return engine

    def extract(self, text: bytes, endpoint: Endpoint, now: float) -> Metrics:
        return self.engine_for(endpoint).extract(text, now, f"endpoint {endpoint.name} ({endpoint.hostport})")

    def __repr__(self) -> str:
        return f"CoreMetricsExtractor({self.name!r}, engines={list(self.engines)})"

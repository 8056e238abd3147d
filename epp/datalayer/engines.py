"""Per-engine metric maps: which series of a model server's exposition mean "queued requests", "running
requests", "KV-cache usage", LoRA state and KV-cache geometry, and the extraction of a `Metrics` snapshot.

The built-in maps follow the Model Server Protocol of the Gateway API Inference Extension (vLLM, SGLang,
trtllm-serve, Triton with the TensorRT-LLM backend). Users replace a map wholesale, or add one for another
engine, with an `engineConfigs` entry of the `core-metrics-extractor` plugin; an empty spec disables that
metric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from epp.datalayer.promtext import FamilyReader, Sample, Selector, parse_selector
from epp.datastore.endpoint import Metrics

__all__ = ["BUILTIN_ENGINES", "EngineConfig", "EngineMetrics"]

# (field name, parameter key, what it is) of every spec that is a selector, in report order.
_SPECS: tuple[tuple[str, str, str], ...] = (
    ("queued_requests_spec", "queuedRequestsSpec", "queued requests"),
    ("running_requests_spec", "runningRequestsSpec", "running requests"),
    ("kv_usage_spec", "kvUsageSpec", "KV-cache usage"),
    ("lora_spec", "loraSpec", "LoRA adapters"),
    ("cache_info_spec", "cacheInfoSpec", "cache info"),
    ("cache_block_size_spec", "cacheBlockSizeSpec", "KV-cache block size"),
    ("cache_num_blocks_spec", "cacheNumBlocksSpec", "KV-cache block count"),
)
_LORA_RUNNING = "running_lora_adapters"
_LORA_WAITING = "waiting_lora_adapters"
_LORA_MAX = "max_lora"


@dataclass(frozen=True)
class EngineConfig:
    """One engine's metric map, as written in `engineConfigs` (keys in camelCase). Every spec is an instant
    selector `name{label="value"}`; "" (the default) means the engine does not report that quantity.

    Queued requests, running requests and KV-cache usage are required when their spec is set: a scrape
    without them is an error. LoRA and cache geometry are optional: absent series leave the field empty.
    """

    name: str = ""
    queued_requests_spec: str = ""
    running_requests_spec: str = ""
    kv_usage_spec: str = ""  # a fraction in [0, 1]
    lora_spec: str = ""  # vLLM's lora_requests_info: the series with the largest value wins
    cache_info_spec: str = ""  # an info gauge whose labels carry the cache geometry
    cache_block_size_label_name: str = ""  # label of cache_info_spec: tokens per KV block
    cache_num_blocks_label_name: str = ""  # label of cache_info_spec: KV blocks on the device
    cache_block_size_spec: str = ""  # a gauge whose value is the block size (wins over the label)
    cache_num_blocks_spec: str = ""  # a gauge whose value is the block count (wins over the label)

    def validate(self) -> None:
        """Raise ValueError naming the key when the entry is unusable."""
        if not self.name:
            raise ValueError("an engineConfigs entry needs a `name` (the engine label value it applies to)")
        for attr, key, _ in _SPECS:
            spec = getattr(self, attr)
            if spec:
                try:
                    parse_selector(spec)
                except ValueError as exc:
                    raise ValueError(f"engine {self.name!r}: {key}: {exc}") from None
        labels = self.cache_block_size_label_name or self.cache_num_blocks_label_name
        if labels and not self.cache_info_spec:
            raise ValueError(
                f"engine {self.name!r}: cacheBlockSizeLabelName/cacheNumBlocksLabelName name labels of "
                f"cacheInfoSpec, which is empty; set cacheInfoSpec or use cacheBlockSizeSpec/cacheNumBlocksSpec"
            )
        # cacheInfoSpec without label names: `with_default_cache_labels` supplies them (the built-in
        # engine's of the same name, else vLLM's block_size / num_gpu_blocks), as the reference does.
        if not any(getattr(self, attr) for attr, _, _ in _SPECS):
            raise ValueError(f"engine {self.name!r}: every spec is empty, so nothing would be scraped")


BUILTIN_ENGINES: Mapping[str, EngineConfig] = {
    c.name: c
    for c in (
        EngineConfig(
            name="vllm",
            queued_requests_spec="vllm:num_requests_waiting",
            running_requests_spec="vllm:num_requests_running",
            kv_usage_spec="vllm:kv_cache_usage_perc",
            lora_spec="vllm:lora_requests_info",
            cache_info_spec="vllm:cache_config_info",
            cache_block_size_label_name="block_size",
            cache_num_blocks_label_name="num_gpu_blocks",
        ),
        EngineConfig(
            name="sglang",
            queued_requests_spec="sglang:num_queue_reqs",
            running_requests_spec="sglang:num_running_reqs",
            kv_usage_spec="sglang:token_usage",
            cache_info_spec="sglang:cache_config_info",
            cache_block_size_label_name="page_size",
            cache_num_blocks_label_name="num_pages",
        ),
        EngineConfig(
            name="trtllm-serve",
            queued_requests_spec="trtllm_num_requests_waiting",
            running_requests_spec="trtllm_num_requests_running",
            kv_usage_spec="trtllm_kv_cache_utilization",
            cache_block_size_spec="trtllm_kv_cache_tokens_per_block",
            cache_num_blocks_spec="trtllm_kv_cache_max_blocks",
        ),
        EngineConfig(
            name="triton-tensorrt-llm",
            queued_requests_spec='nv_trt_llm_request_metrics{request_type="waiting"}',
            running_requests_spec='nv_trt_llm_request_metrics{request_type="scheduled"}',
            kv_usage_spec='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}',
            cache_block_size_spec='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"}',
            cache_num_blocks_spec='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"}',
        ),
    )
}


def _opt(spec: str) -> Selector | None:
    return parse_selector(spec) if spec else None


def _int_label(labels: Mapping[str, str], key: str) -> int:
    """A label holding a count; vLLM writes "None" before the cache is sized, which reads as 0 (unknown)."""
    text = labels.get(key, "")
    try:
        value = int(text)
    except ValueError:
        try:
            value = int(float(text))
        except (ValueError, OverflowError):
            return 0
    return value if value > 0 else 0


def _adapters(text: str) -> frozenset[str]:
    if not text:
        return frozenset()
    return frozenset(a for a in (p.strip() for p in text.split(",")) if a)


class EngineMetrics:
    """One engine's compiled metric map: selectors parsed once, a FamilyReader for just their names."""

    __slots__ = (
        "config",
        "_queued",
        "_running",
        "_kv",
        "_lora",
        "_cache_info",
        "_block_size",
        "_num_blocks",
        "_reader",
        "_lora_cache",
    )

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self._queued = _opt(config.queued_requests_spec)
        self._running = _opt(config.running_requests_spec)
        self._kv = _opt(config.kv_usage_spec)
        self._lora = _opt(config.lora_spec)
        self._cache_info = _opt(config.cache_info_spec)
        self._block_size = _opt(config.cache_block_size_spec)
        self._num_blocks = _opt(config.cache_num_blocks_spec)
        selectors = (
            self._queued,
            self._running,
            self._kv,
            self._lora,
            self._cache_info,
            self._block_size,
            self._num_blocks,
        )
        self._reader = FamilyReader(s.name for s in selectors if s is not None)
        # (running, waiting) label strings -> adapter sets; the same few strings recur every scrape.
        self._lora_cache: dict[tuple[str, str], tuple[frozenset[str], frozenset[str]]] = {}

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def family_names(self) -> tuple[str, ...]:
        return self._reader.names

    def extract(self, text: bytes, now: float, where: str = "") -> Metrics:
        """Map one exposition to a Metrics snapshot taken at `now`. `where` (the endpoint) prefixes errors.
        Raises ValueError when a required series is missing or not a number."""
        found = self._reader.read(text)
        waiting = self._required_count(found, self._queued, "queuedRequestsSpec", where)
        running = self._required_count(found, self._running, "runningRequestsSpec", where)
        kv = 0.0
        if self._kv is not None:
            kv = self._required(found, self._kv, "kvUsageSpec", where).value
        active: frozenset[str] = frozenset()
        waiting_models: frozenset[str] = frozenset()
        max_lora = 0
        if self._lora is not None:
            lora = self._lora.select_max_value(found.get(self._lora.name))
            if lora is not None:
                labels = lora.labels
                key = (labels.get(_LORA_RUNNING, ""), labels.get(_LORA_WAITING, ""))
                sets = self._lora_cache.get(key)
                if sets is None:
                    if len(self._lora_cache) > 1024:
                        self._lora_cache.clear()
                    sets = self._lora_cache[key] = (_adapters(key[0]), _adapters(key[1]))
                active, waiting_models = sets
                max_lora = _int_label(labels, _LORA_MAX)
        block_size = num_blocks = 0
        if self._cache_info is not None:
            info = self._cache_info.select(found.get(self._cache_info.name))
            if info is not None:
                if self.config.cache_block_size_label_name:
                    block_size = _int_label(info.labels, self.config.cache_block_size_label_name)
                if self.config.cache_num_blocks_label_name:
                    num_blocks = _int_label(info.labels, self.config.cache_num_blocks_label_name)
        if self._block_size is not None:
            block_size = self._optional_count(found, self._block_size) or block_size
        if self._num_blocks is not None:
            num_blocks = self._optional_count(found, self._num_blocks) or num_blocks
        return Metrics(
            waiting_queue_size=waiting,
            running_requests_size=running,
            kv_cache_usage_percent=kv,
            active_models=active,
            waiting_models=waiting_models,
            max_active_models=max_lora,
            cache_block_size=block_size,
            cache_num_blocks=num_blocks,
            update_time=now,
        )

    def _required(self, found: dict[str, list[Sample]], sel: Selector, key: str, where: str) -> Sample:
        sample = sel.select(found.get(sel.name))
        if sample is None:
            prefix = f"{where}: " if where else ""
            if sel.name in found:
                detail = (
                    f"{len(found[sel.name])} series of {sel.name} are exposed but none matches the labels"
                )
            else:
                detail = f"the exposition has no {sel.name}"
            raise ValueError(
                f"{prefix}engine {self.name!r} requires {key} {str(sel)!r}, but {detail}; if the endpoint runs "
                f"another engine, label it with its engine type; if the engine lacks this metric, set {key} "
                f'to "" in an engineConfigs entry for {self.name!r}'
            )
        if math.isnan(sample.value):
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}{key} {str(sel)!r} is NaN")
        return sample

    def _required_count(
        self, found: dict[str, list[Sample]], sel: Selector | None, key: str, where: str
    ) -> int:
        if sel is None:
            return 0
        value = self._required(found, sel, key, where).value
        if math.isinf(value):
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}{key} {str(sel)!r} is infinite")
        return int(value) if value > 0 else 0

    @staticmethod
    def _optional_count(found: dict[str, list[Sample]], sel: Selector) -> int:
        sample = sel.select(found.get(sel.name))
        if sample is None or not math.isfinite(sample.value) or sample.value <= 0:
            return 0
        return int(sample.value)


def with_default_cache_labels(config: EngineConfig) -> EngineConfig:
    """An entry that sets cacheInfoSpec but names none of its labels reads the labels of the built-in
    engine of the same name, or vLLM's (`block_size`, `num_gpu_blocks`) for an engine we do not know. (The
    reference's own example restates the vllm engine this way.)"""
    if not config.cache_info_spec or config.cache_block_size_label_name or config.cache_num_blocks_label_name:
        return config
    base = BUILTIN_ENGINES.get(config.name) or BUILTIN_ENGINES["vllm"]
    return dataclasses.replace(config, cache_block_size_label_name=base.cache_block_size_label_name or "block_size",
                               cache_num_blocks_label_name=base.cache_num_blocks_label_name or "num_gpu_blocks")

"""The data layer: scraping model servers' Prometheus metrics into each endpoint's `Metrics` snapshot.

- `promtext`: a selective Prometheus text reader (only the asked-for families are parsed) and PromQL-like
  instant selectors `name{label="value"}`.
- `engines`: the per-engine metric maps (vllm, sglang, trtllm-serve, triton-tensorrt-llm) and extraction.
- `scraper`: the asyncio scraper, one kept-alive HTTP/1.1 connection and one task per (endpoint, source).

The plugins that configure it live in `plugins/metrics_data_source.py` and `plugins/core_metrics_extractor.py`.
"""

from epp.datalayer.engines import BUILTIN_ENGINES, EngineConfig, EngineMetrics
from epp.datalayer.promtext import FamilyReader, PromTextError, Sample, Selector, parse_selector
from epp.datalayer.scraper import HttpStatusError, ScrapeProtocolError, Scraper

__all__ = [
    "BUILTIN_ENGINES",
    "EngineConfig",
    "EngineMetrics",
    "FamilyReader",
    "HttpStatusError",
    "PromTextError",
    "Sample",
    "ScrapeProtocolError",
    "Scraper",
    "Selector",
    "parse_selector",
]

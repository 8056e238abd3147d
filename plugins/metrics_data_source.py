"""`metrics-data-source`: where and how often the data layer scrapes each endpoint's Prometheus metrics.

The scraper (epp/datalayer/scraper.py) GETs `url(endpoint)` every `interval_s` over a kept-alive connection
per endpoint, gives up on a scrape after `timeout_s`, and hands the body to the extractors wired to this
source (normally `core-metrics-extractor`). Every load-aware scorer reads what comes out of it, so its
interval bounds how stale their signals are: at 50 ms a burst of requests is seen within about one
scrape; between scrapes the EPP's own in-flight counters carry the load.

Parameters follow the reference EPP: `scheme` (http | https), `path` (/metrics), `insecureSkipVerify`
(true: https certificates are not checked, as model servers usually serve self-signed ones), plus
`interval` (50ms; the CLI's `--refresh-metrics-interval` overrides it through `set_interval`) and
`timeout` (1s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from epp.datastore.endpoint import Endpoint
from epp.scheduling.registry import ConfigError, Duration, PluginHandle, register


@dataclass(frozen=True)
class MetricsDataSourceParams:
    scheme: Literal["http", "https"] = "http"
    path: str = "/metrics"
    insecure_skip_verify: bool = True
    interval: Duration = field(default_factory=lambda: Duration(0.05))
    timeout: Duration = field(default_factory=lambda: Duration(1.0))

    def validate(self) -> None:
        if not self.path.startswith("/") or any(c in self.path for c in " \r\n\t#"):
            raise ValueError(
                f"parameter 'path' must be an absolute URL path such as '/metrics', got {self.path!r}"
            )
        if not self.interval.seconds > 0:
            raise ValueError(f"parameter 'interval' must be positive, got {self.interval.seconds}s")
        if not self.timeout.seconds > 0:
            raise ValueError(f"parameter 'timeout' must be positive, got {self.timeout.seconds}s")


@register
class MetricsDataSource:
    """Implements MetricsSource."""

    type: ClassVar[str] = "metrics-data-source"
    Params = MetricsDataSourceParams

    def __init__(
        self, name: str, params: MetricsDataSourceParams | None = None, handle: PluginHandle | None = None
    ) -> None:
        self.name = name
        self.params = params if params is not None else MetricsDataSourceParams()
        self.scheme: str = self.params.scheme
        self.path: str = self.params.path
        self.insecure_skip_verify: bool = self.params.insecure_skip_verify
        self.interval_s: float = self.params.interval.seconds
        self.timeout_s: float = self.params.timeout.seconds
        self._prefix = f"{self.scheme}://"

    def url(self, endpoint: Endpoint) -> str:
        return f"{self._prefix}{endpoint.hostport}{self.path}"

    def set_interval(self, seconds: float) -> None:
        """Override the scrape period (the CLI's `--refresh-metrics-interval`); running scrapers pick it up
        at their next tick."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ConfigError(
                f"{self.type} {self.name!r}: the metrics refresh interval must be a positive "
                f"number of seconds, got {seconds!r}"
            )
        self.interval_s = float(seconds)

    def __repr__(self) -> str:
        return f"MetricsDataSource({self.name!r}, {self.scheme}://<endpoint>{self.path}, every {self.interval_s}s)"

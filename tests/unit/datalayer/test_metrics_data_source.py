"""`metrics-data-source`: parameters, URL building and the interval override."""

from __future__ import annotations

from typing import Any

import pytest

import plugins.metrics_data_source  # noqa: F401  (registers the plugin type)
from epp.datastore.endpoint import Endpoint
from epp.scheduling import registry
from epp.scheduling.interfaces import MetricsSource
from epp.scheduling.registry import ConfigError, PluginHandle


def make(parameters: dict[str, Any] | None = None):
    return registry.create("metrics-data-source", "metrics", parameters, PluginHandle(), where="config.yaml")


def test_defaults_follow_the_reference_epp():
    source = make()
    assert isinstance(source, MetricsSource)
    assert (source.scheme, source.path, source.insecure_skip_verify) == ("http", "/metrics", True)
    assert source.interval_s == 0.05
    assert source.timeout_s == 1.0


@pytest.mark.parametrize(
    ("parameters", "endpoint", "url"),
    [
        ({}, Endpoint("a", "10.0.0.5", 8000), "http://10.0.0.5:8000/metrics"),
        ({"scheme": "https"}, Endpoint("a", "10.0.0.5", 8443), "https://10.0.0.5:8443/metrics"),
        ({"path": "/v1/metrics"}, Endpoint("a", "127.0.0.2", 8000), "http://127.0.0.2:8000/v1/metrics"),
        ({}, Endpoint("a", "fd00::7", 8000), "http://[fd00::7]:8000/metrics"),
    ],
)
def test_the_url_is_scheme_hostport_and_path(parameters, endpoint, url):
    assert make(parameters).url(endpoint) == url


@pytest.mark.parametrize(
    ("parameters", "interval", "timeout"),
    [
        ({"interval": "200ms"}, 0.2, 1.0),
        ({"interval": "1s", "timeout": "250ms"}, 1.0, 0.25),
        ({"interval": 0.5, "timeout": 2}, 0.5, 2.0),
    ],
)
def test_interval_and_timeout_take_durations(parameters, interval, timeout):
    source = make(parameters)
    assert (source.interval_s, source.timeout_s) == (interval, timeout)


@pytest.mark.parametrize(
    ("parameters", "complaint"),
    [
        ({"scheme": "ftp"}, "'ftp' is not allowed; allowed: 'http', 'https'"),
        ({"path": "metrics"}, "absolute URL path"),
        ({"path": "/me trics"}, "absolute URL path"),
        ({"insecureSkipVerify": "yes"}, "expected true or false"),
        ({"interval": "fast"}, "expected a duration"),
        ({"interval": "0s"}, "'interval' must be positive"),
        ({"timeout": 0}, "'timeout' must be positive"),
        ({"port": 9000}, "unknown parameter 'port'"),
    ],
)
def test_bad_parameters_are_config_errors(parameters, complaint):
    with pytest.raises(ConfigError) as info:
        make(parameters)
    assert complaint in str(info.value)
    assert str(info.value).startswith("config.yaml: plugin 'metrics'")


def test_set_interval_overrides_the_configured_interval():
    source = make({"interval": "1s"})
    source.set_interval(0.025)
    assert source.interval_s == 0.025


@pytest.mark.parametrize("bad", [0, -1, float("nan"), True, "50ms"])
def test_set_interval_refuses_anything_but_a_positive_number_of_seconds(bad):
    source = make()
    with pytest.raises(ConfigError, match="positive number of seconds"):
        source.set_interval(bad)
    assert source.interval_s == 0.05

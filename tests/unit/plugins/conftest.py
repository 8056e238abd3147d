"""Builders shared by the plugin specs: endpoints with given metrics, requests, plugins made through the
registry exactly as the config loader makes them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from epp.datastore.endpoint import Endpoint, Metrics
from epp.request import LLMRequest
from epp.scheduling import registry


def _endpoint(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    in_flight: int = 0,
    **metrics: Any,
) -> Endpoint:
    index = int.from_bytes(name.encode()[-1:] or b"\0") % 250 + 2
    return Endpoint(
        name=name,
        address=f"127.0.0.{index}",
        port=8000,
        labels=dict(labels or {}),
        metrics=Metrics(**metrics),
        in_flight=in_flight,
    )


@pytest.fixture
def endpoint() -> Callable[..., Endpoint]:
    """`endpoint("a", waiting_queue_size=3, labels={...}, in_flight=2)`: an Endpoint whose Metrics fields are
    the keyword arguments other than `labels` and `in_flight`."""
    return _endpoint


def _request(target_model: str = "base-model") -> LLMRequest:
    return LLMRequest(
        request_id="req-1",
        api="completions",
        model=target_model,
        target_model=target_model,
        body={"model": target_model, "prompt": "hi"},
        headers={},
        size_bytes=0,
        prompt="hi",
    )


@pytest.fixture
def request_for() -> Callable[..., LLMRequest]:
    """`request_for("adapter-1")`: a completions request whose target model is the given name."""
    return _request


@pytest.fixture
def make_plugin() -> Callable[..., Any]:
    """`make_plugin(type, params)`: a plugin built through the registry, as the config loader builds it."""
    registry.load_builtin_plugins()

    def make(type_name: str, params: Mapping[str, Any] | None = None, name: str | None = None) -> Any:
        return registry.create(type_name, name or type_name, params, registry.PluginHandle())

    return make


@pytest.fixture
def scored() -> Callable[..., dict[Endpoint, float]]:
    """`scored({"a": 0.5, "b": 1.0})`: `{endpoint: score}` for fresh endpoints named by the keys, in that order
    (what the scheduler hands a picker)."""

    def build(scores: Mapping[str, float]) -> dict[Endpoint, float]:
        return {_endpoint(name): score for name, score in scores.items()}

    return build

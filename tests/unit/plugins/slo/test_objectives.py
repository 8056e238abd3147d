"""Spec: `slo-objectives-producer` reads TTFT/TPOT objectives from the request headers (llm-d names first,
the older names second), else from its objective's defaults, else from the global defaults; a malformed
value is a 400 naming the header and the allowed form."""

from __future__ import annotations

import pytest

from epp.errors import RequestError
from epp.request import LLMRequest
from epp.scheduling import registry
from epp.scheduling.interfaces import DataProducer
from plugins.slo import OBJECTIVES_KEY, Objectives
from plugins.slo.objectives import ObjectiveDefaults, SLOObjectivesProducer, parse_ms

TYPE = "slo-objectives-producer"


def request(headers: dict[str, str], objective: str | None = None) -> LLMRequest:
    return LLMRequest(request_id="r", api="completions", model="m", target_model="m", body={}, headers=headers,
                      size_bytes=0, prompt="hi", objective=objective)


def objectives_of(producer, headers: dict[str, str], objective: str | None = None) -> Objectives | None:
    req = request(headers, objective)
    producer.prepare(req, [])
    return req.scratch[OBJECTIVES_KEY]


def test_is_a_registered_data_producer(make_plugin):
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is SLOObjectivesProducer
    assert isinstance(make_plugin(TYPE), DataProducer)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-llm-d-slo-ttft-ms": "500"}, Objectives(500.0, None)),
        ({"x-llm-d-slo-tpot-ms": "25"}, Objectives(None, 25.0)),
        ({"x-llm-d-slo-ttft-ms": "500", "x-llm-d-slo-tpot-ms": "25"}, Objectives(500.0, 25.0)),
        ({"x-slo-ttft-ms": "800", "x-slo-tpot-ms": "40"}, Objectives(800.0, 40.0)),  # the older names
        ({"x-llm-d-slo-ttft-ms": "300", "x-slo-ttft-ms": "900"}, Objectives(300.0, None)),  # new name wins
        ({"x-llm-d-slo-ttft-ms": "300", "x-slo-tpot-ms": "30"}, Objectives(300.0, 30.0)),  # mixed per kind
        ({"x-llm-d-slo-ttft-ms": " 12.5 "}, Objectives(12.5, None)),  # surrounding spaces
        ({"x-llm-d-slo-ttft-ms": ".5"}, Objectives(0.5, None)),
        ({"x-llm-d-slo-ttft-ms": "1e3"}, Objectives(1000.0, None)),
        ({"x-llm-d-slo-ttft-ms": "7."}, Objectives(7.0, None)),
        ({"x-other": "5"}, None),
    ],
)
def test_reads_objectives_from_headers(make_plugin, headers, expected):
    assert objectives_of(make_plugin(TYPE), headers) == expected


@pytest.mark.parametrize("value", ["", "  ", "0", "0.0", "-5", "+5", "abc", "500ms", "5 0", "nan", "inf",
                                   "Infinity", "1e999", "1_000", "0x10", "5,5"])
@pytest.mark.parametrize("header", ["x-llm-d-slo-ttft-ms", "x-llm-d-slo-tpot-ms", "x-slo-ttft-ms",
                                    "x-slo-tpot-ms"])
def test_a_malformed_value_is_a_400_naming_the_header_and_the_allowed_form(make_plugin, header, value):
    with pytest.raises(RequestError) as info:
        objectives_of(make_plugin(TYPE), {header: value})
    assert info.value.status == 400
    assert header in info.value.message
    assert "positive number of milliseconds" in info.value.message


def test_the_older_header_is_not_read_when_the_new_one_is_present(make_plugin):
    # Only the header used is validated: a stale legacy header next to a good new one does not fail.
    assert objectives_of(make_plugin(TYPE), {"x-llm-d-slo-ttft-ms": "100", "x-slo-ttft-ms": "junk"}) == \
        Objectives(100.0, None)


def test_parse_ms_accepts_exactly_positive_finite_decimal_numbers():
    assert parse_ms("h", "250") == 250.0
    assert parse_ms("h", "0.001") == 0.001
    with pytest.raises(RequestError):
        parse_ms("h", "-0.001")


PARAMS = {"defaultTtftMs": 2000, "objectives": {"chat": {"ttftMs": 300, "tpotMs": 20}, "batch": {"tpotMs": 100}}}


@pytest.mark.parametrize(
    ("headers", "objective", "expected"),
    [
        ({}, None, Objectives(2000.0, None)),  # the global default
        ({}, "chat", Objectives(300.0, 20.0)),  # the objective's defaults
        ({}, "batch", Objectives(2000.0, 100.0)),  # a kind the objective leaves unset falls to the global
        ({}, "unknown", Objectives(2000.0, None)),
        ({"x-llm-d-slo-ttft-ms": "150"}, "chat", Objectives(150.0, 20.0)),  # a header wins kind by kind
        ({"x-slo-tpot-ms": "5"}, "chat", Objectives(300.0, 5.0)),
    ],
)
def test_requests_without_headers_take_their_objective_defaults(make_plugin, headers, objective, expected):
    assert objectives_of(make_plugin(TYPE, PARAMS), headers, objective) == expected


def test_without_any_default_a_request_without_headers_has_no_objectives(make_plugin):
    assert objectives_of(make_plugin(TYPE, {"objectives": {"chat": {"ttftMs": 300}}}), {}, "other") is None


def test_objective_defaults_can_be_replaced_at_run_time(make_plugin):
    producer = make_plugin(TYPE)
    producer.set_objective_defaults({"gold": ObjectiveDefaults(ttft_ms=250.0)})
    assert objectives_of(producer, {}, "gold") == Objectives(250.0, None)
    with pytest.raises(ValueError, match="objective 'bad'.*ttftMs"):
        producer.set_objective_defaults({"bad": ObjectiveDefaults(ttft_ms=-1.0)})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"defaultTtftMs": -1}, "ttftMs must be a finite number"),
        ({"objectives": {"chat": {"tpotMs": -3}}}, "'objectives'.chat: tpotMs must be"),
        ({"objectives": {"chat": {"ttft": 3}}}, "unknown parameter 'ttft'"),
        ({"defaultTTFT": 3}, "unknown parameter 'defaultTTFT'"),
    ],
)
def test_bad_parameters_are_config_errors(make_plugin, params, message):
    with pytest.raises(registry.ConfigError, match=message):
        make_plugin(TYPE, params)

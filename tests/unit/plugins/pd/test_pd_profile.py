"""Spec: the shipped `pd` profile loads as documented, routes long uncached prompts through a prefill pod and
cached or short ones aggregated, teaches the prefix cache both legs, and the ext_proc session forwards the
`x-prefiller-host-port` header with the decode pod as destination."""

from __future__ import annotations

import logging

import pytest

from epp.config import load_profile, profile_names
from epp.datastore.pool import Pool
from epp.datastore.static import parse_endpoints
from epp.director import Director
from epp.observability.metrics import EppMetrics
from epp.request import LLMRequest
from epp.scheduling.registry import PluginHandle
from plugins.pd import PREFILLER_HEADER
from plugins.prefix import APPROX_PRODUCER_TYPE
from tests.unit.extproc_helpers import (
    CHAT_HEADERS,
    DecodedSession,
    Mode,
    body_msg,
    chat_body,
    destination_of,
    headers_msg,
)

POOL = ("10.0.0.1:8000;llm-d.ai/role=decode,10.0.0.2:8000;llm-d.ai/role=decode,"
        "10.0.0.3:8000;llm-d.ai/role=prefill")
DECODE_PODS = {"10.0.0.1:8000", "10.0.0.2:8000"}
PREFILL_POD = "10.0.0.3:8000"
LONG = "".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog. " for i in range(70))  # ~1,000 tokens


def pd_config(endpoints: str = POOL):
    pool = Pool()
    pool.replace(parse_endpoints(endpoints))
    pool.synced = True
    return load_profile("pd", PluginHandle(pool)), pool


def completion(prompt: str, request_id: str = "r") -> LLMRequest:
    return LLMRequest(request_id, "completions", "m", "m", {"model": "m", "prompt": prompt}, {}, len(prompt),
                      prompt=prompt)


def route(config, pool, request: LLMRequest):
    """What the Director does around the scheduler: producers, schedule, pre-request hooks."""
    for producer in config.producers:
        producer.prepare(request, pool.endpoints)
    result = config.scheduler.schedule(request, pool.endpoints)
    for hook in config.pre_request:
        hook.pre_request(request, result)
    return result


def test_pd_is_a_builtin_profile_of_two_stages(caplog):
    assert "pd" in profile_names()
    with caplog.at_level(logging.WARNING):
        config, _ = pd_config()
        config.scheduler.handler.check_profiles(config.scheduler.profiles)
    assert caplog.text == ""
    handler = config.scheduler.handler
    assert type(handler).type == "disagg-profile-handler"
    assert (handler.decode_profile, handler.prefill_profile, handler.prefill_first) == ("decode", "prefill", False)
    assert handler.decider is config.plugins["prefix-based-pd-decider"]
    assert handler.decider.non_cached_tokens == 512

    def shape(name):
        profile = config.scheduler.profiles[name]
        return ([type(f).type for f in profile.filters], [(type(s.scorer).type, s.weight) for s in profile.scorers],
                type(profile.picker).type)

    assert shape("decode") == (
        ["decode-filter"],
        [("prefix-cache-scorer", 3.0), ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0)],
        "max-score-picker",
    )
    assert shape("prefill") == (
        ["prefill-filter"],
        [("prefix-cache-scorer", 3.0), ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 1.0)],
        "max-score-picker",
    )
    assert [type(p).type for p in config.producers] == [APPROX_PRODUCER_TYPE]
    assert config.plugins[APPROX_PRODUCER_TYPE] in config.pre_request


def test_a_long_uncached_prompt_is_disaggregated_then_served_where_it_is_cached():
    config, pool = pd_config()
    first = route(config, pool, completion(LONG, "r1"))
    decode_pod = first.target_endpoints[0]
    assert decode_pod.hostport in DECODE_PODS
    assert first.headers == {PREFILLER_HEADER: PREFILL_POD}

    again = route(config, pool, completion(LONG, "r2"))
    assert again.target_endpoints[0] is decode_pod  # prefix affinity: the decode pod holds the prompt now
    assert again.headers == {}  # and has (almost) nothing left to prefill


def test_the_prefix_cache_learns_both_legs():
    config, pool = pd_config()
    route(config, pool, completion(LONG, "r1"))
    probe = completion(LONG + " and a new question", "probe")
    config.plugins[APPROX_PRODUCER_TYPE].prepare(probe, pool.endpoints)
    held = {ep.hostport: ep.attributes[APPROX_PRODUCER_TYPE].match_blocks for ep in pool.endpoints}
    learned = {hp for hp, blocks in held.items() if blocks > 0}
    assert PREFILL_POD in learned and len(learned & DECODE_PODS) == 1
    assert len(set(held.values()) - {0}) == 1  # both legs hold the whole prompt


def test_a_short_prompt_is_served_aggregated():
    config, pool = pd_config()
    result = route(config, pool, completion("hello there, how are you?"))
    assert result.target_endpoints[0].hostport in DECODE_PODS
    assert result.headers == {} and list(result.profile_results) == ["decode"]


def test_a_pool_without_prefill_pods_serves_everything_aggregated():
    config, pool = pd_config("10.0.0.1:8000,10.0.0.2:8000;llm-d.ai/role=decode")
    result = route(config, pool, completion(LONG))
    assert result.target_endpoints[0].hostport in {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert result.headers == {}


# ---------------------------------------------------------------------------------------- through ext_proc


def headers_of(reply, field: str) -> dict[str, str]:
    common = getattr(reply, field).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


@pytest.mark.parametrize("mode", ["streamed", "buffered"])
def test_the_session_sends_the_decode_pod_and_the_prefiller_header(mode):
    config, pool = pd_config()
    director = Director(config, pool, EppMetrics(pool), {})
    s = DecodedSession(director, max_body_bytes=1 << 20)
    field = "request_headers"
    if mode == "buffered":
        first = s.handle(headers_msg(CHAT_HEADERS, request_mode=Mode.BUFFERED))
        assert len(first) == 1 and not first[0].request_headers.response.header_mutation.set_headers
        field = "request_body"
    else:
        assert s.handle(headers_msg(CHAT_HEADERS)) == []
    out = s.handle(body_msg(chat_body(LONG), True))

    routed = s.routed
    decode_pod = routed.endpoint.hostport
    assert decode_pod in DECODE_PODS
    assert routed.result.headers == {PREFILLER_HEADER: PREFILL_POD}
    assert destination_of(out[0]) == (decode_pod, decode_pod)
    sent = headers_of(out[0], field)
    assert sent[PREFILLER_HEADER] == PREFILL_POD
    assert sent["x-gateway-destination-endpoint"] == decode_pod


def test_the_session_sends_no_prefiller_header_for_an_aggregated_request():
    config, pool = pd_config()
    director = Director(config, pool, EppMetrics(pool), {})
    s = DecodedSession(director, max_body_bytes=1 << 20)
    s.handle(headers_msg(CHAT_HEADERS))
    out = s.handle(body_msg(chat_body("short question"), True))
    assert s.routed.result.headers == {}
    assert PREFILLER_HEADER not in headers_of(out[0], "request_headers")
    assert destination_of(out[0])[0] in DECODE_PODS


@pytest.mark.parametrize("prompt, removed", [("short question", True), (LONG, False)],
                         ids=["aggregated: the client's header is removed", "disaggregated: the EPP's value wins"])
def test_a_client_cannot_choose_the_prefiller(prompt, removed):
    config, pool = pd_config()
    director = Director(config, pool, EppMetrics(pool), {})
    s = DecodedSession(director, max_body_bytes=1 << 20)
    s.handle(headers_msg({**CHAT_HEADERS, PREFILLER_HEADER: "203.0.113.9:80"}))
    out = s.handle(body_msg(chat_body(prompt), True))
    mutation = out[0].request_headers.response.header_mutation
    assert (PREFILLER_HEADER in mutation.remove_headers) is removed
    assert headers_of(out[0], "request_headers").get(PREFILLER_HEADER) == (None if removed else PREFILL_POD)

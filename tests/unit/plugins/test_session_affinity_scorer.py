"""Spec: `session-affinity-scorer` scores 1 the endpoint named by the `x-session-token` request header (0 the
others), and names the endpoint that served each response in the `x-session-token` response header."""

from __future__ import annotations

import base64

import pytest

from epp.config import load_config
from epp.datastore.endpoint import Endpoint
from epp.datastore.pool import Pool
from epp.datastore.static import parse_endpoints
from epp.director import Director
from epp.observability.metrics import EppMetrics
from epp.request import LLMRequest
from epp.scheduling import registry
from epp.scheduling.interfaces import ResponseHeaderHook, Scorer
from epp.scheduling.registry import PluginHandle
from epp.scheduling.types import CycleState, ResponseInfo
from plugins.session_affinity_scorer import SESSION_HEADER, SessionAffinityScorer, decode_token, encode_token
from tests.unit.extproc_helpers import (
    CHAT_HEADERS,
    DecodedSession,
    body_msg,
    chat_body,
    destination_of,
    headers_msg,
    response_headers_msg,
)

TYPE = "session-affinity-scorer"


def request_with(headers: dict[str, str]) -> LLMRequest:
    return LLMRequest("r", "completions", "m", "m", {"prompt": "hi"}, headers, 2, prompt="hi")


def make(pool: Pool | None = None) -> SessionAffinityScorer:
    registry.load_builtin_plugins()
    return registry.create(TYPE, TYPE, None, PluginHandle(pool))


def test_is_a_registered_scorer_and_response_header_hook():
    scorer = make()
    assert registry.lookup(TYPE) is SessionAffinityScorer
    assert isinstance(scorer, Scorer) and isinstance(scorer, ResponseHeaderHook)


@pytest.mark.parametrize("name", ["10.0.0.1:8000", "vllm-7f9c-rank-0", "[fd00::1]:8000", "pöd-ünïcode"])
def test_token_round_trip(name):
    token = encode_token(name)
    assert token == base64.b64encode(name.encode()).decode()
    assert decode_token(token) == name
    assert decode_token(token.rstrip("=")) == name  # missing padding
    urlsafe = base64.urlsafe_b64encode(name.encode()).decode()
    assert decode_token(urlsafe) == name


@pytest.mark.parametrize(
    "token",
    ["", "   ", "!!!not-base64!!!", "a", base64.b64encode(b"\xff\xfe").decode(), "A" * 2000, "=="],
    ids=["empty", "blank", "bad-alphabet", "bad-length", "not-utf8", "too-long", "padding-only"],
)
def test_invalid_tokens_name_nothing(token):
    assert decode_token(token) is None


def test_the_named_endpoint_scores_one_and_the_others_zero(endpoint):
    a, b, c = endpoint("a"), endpoint("b"), endpoint("c")
    request = request_with({SESSION_HEADER: encode_token(b.name)})
    assert make().score(CycleState(), request, [a, b, c]) == {a: 0.0, b: 1.0, c: 0.0}


@pytest.mark.parametrize(
    "headers",
    [{}, {SESSION_HEADER: encode_token("gone")}, {SESSION_HEADER: "%%%"}, {"x-session-id": encode_token("a")}],
    ids=["no-token", "unknown-endpoint", "invalid-token", "other-header"],
)
def test_without_a_valid_token_for_a_candidate_every_endpoint_scores_zero(endpoint, headers):
    a, b = endpoint("a"), endpoint("b")
    assert make().score(CycleState(), request_with(headers), [a, b]) == {a: 0.0, b: 0.0}


def test_the_response_names_the_routed_endpoint(endpoint):
    ep = endpoint("a")
    response = ResponseInfo(status=200)
    make().response_headers(request_with({}), response, ep)
    assert response.set_headers == {SESSION_HEADER: encode_token("a")}


def test_the_response_names_the_fallback_endpoint_envoy_served_from():
    pool = Pool()
    first, second = parse_endpoints("10.0.0.1:8000,10.0.0.2:8000")
    pool.replace([first, second])
    response = ResponseInfo(status=200, served_endpoint=second.hostport)
    make(pool).response_headers(request_with({}), response, first)
    assert decode_token(response.set_headers[SESSION_HEADER]) == second.name


def test_a_served_endpoint_outside_the_pool_sets_no_token():
    response = ResponseInfo(status=200, served_endpoint="10.9.9.9:8000")
    make(Pool()).response_headers(request_with({}), response, Endpoint("a", "10.0.0.1", 8000))
    assert response.set_headers == {}


def test_only_the_stateless_strategy_is_accepted(make_plugin):
    assert make_plugin(TYPE, {"strategy": "encoded_endpoint_header"}).params.strategy == "encoded_endpoint_header"
    with pytest.raises(registry.ConfigError, match="'session_id' is not allowed; allowed: 'encoded_endpoint_header'"):
        make_plugin(TYPE, {"strategy": "session_id"})


# ---------------------------------------------------------------------------------------- through ext_proc

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: session-affinity-scorer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: session-affinity-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: max-score-picker}
dataLayer: {sources: []}
"""


def test_round_trip_through_the_session_keeps_the_client_on_its_pod():
    pool = Pool()
    pool.replace(parse_endpoints("10.0.0.1:8000,10.0.0.2:8000,10.0.0.3:8000"))
    director = Director(load_config(CONFIG, "t", PluginHandle(pool)), pool, EppMetrics(pool), {})

    def exchange(headers: dict[str, str]) -> tuple[str, str]:
        """(destination, x-session-token of the response) of one request."""
        s = DecodedSession(director, max_body_bytes=1 << 20)
        s.handle(headers_msg(headers))
        destination = destination_of(s.handle(body_msg(chat_body(), True))[0])[0]
        (reply,) = s.handle(response_headers_msg(end_of_stream=True))
        mutation = reply.response_headers.response.header_mutation.set_headers
        tokens = [h.header.raw_value.decode() for h in mutation if h.header.key == SESSION_HEADER]
        assert len(tokens) == 1
        return destination, tokens[0]

    first, token = exchange(CHAT_HEADERS)
    assert decode_token(token) == first  # a static pool names endpoints ip:port
    # queues are equal, so without the token the picker would choose among all three at random
    for _ in range(8):
        assert exchange({**CHAT_HEADERS, SESSION_HEADER: token}) == (first, token)
    other = next(ep for ep in pool.endpoints if ep.hostport != first)
    assert exchange({**CHAT_HEADERS, SESSION_HEADER: encode_token(other.name)})[0] == other.hostport

"""The ext_proc stream state machine: the Endpoint Picker Protocol as Envoy sees it."""

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.extproc.protocol import (
    BODY_CHUNK,
    ReplyCache,
    _streamed_frame,
    request_headers_routed,
    streamed_body,
    streamed_chunks,
)
from tests.unit.extproc_helpers import (
    CHAT_HEADERS,
    DecodedSession,
    Mode,
    body_msg,
    chat_body,
    destination_of,
    headers_msg,
    make_director,
    response_body_msg,
    response_headers_msg,
)


def session(**kw):
    d = make_director(**kw)
    return DecodedSession(d, max_body_bytes=1 << 20), d


def test_headers_answer_is_deferred_until_the_body_is_complete():
    s, _ = session()
    assert s.handle(headers_msg(CHAT_HEADERS)) == []
    body = chat_body()
    assert s.handle(body_msg(body[:10], False)) == []
    out = s.handle(body_msg(body[10:], True))
    assert out[0].HasField("request_headers")
    header, meta = destination_of(out[0])
    assert header == meta and header in {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
    assert out[0].request_headers.response.clear_route_cache
    echoed = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out[1:])
    assert echoed == body
    assert out[-1].request_body.response.body_mutation.streamed_response.end_of_stream


def test_large_bodies_are_echoed_in_chunks_of_at_most_62000_bytes():
    s, _ = session()
    body = chat_body("x" * 300_000)
    s.handle(headers_msg(CHAT_HEADERS))
    out = s.handle(body_msg(body, True))
    chunks = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert all(len(c.body) <= BODY_CHUNK for c in chunks)
    assert b"".join(c.body for c in chunks) == body
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_header_only_request_goes_to_a_random_endpoint_at_once():
    s, d = session()
    seen = set()
    for _ in range(60):
        s = DecodedSession(d, 1 << 20)
        (out,) = s.handle(headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
        seen.add(destination_of(out)[0])
        s.close()
    assert seen == {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
    assert all(e.in_flight == 0 for e in d.pool.endpoints)


def test_subset_hint_restricts_candidates_by_ip():
    s, _ = session()
    s.handle(headers_msg(CHAT_HEADERS, subset=["10.0.0.2:9999"]))
    out = s.handle(body_msg(chat_body(), True))
    assert destination_of(out[0])[0] == "10.0.0.2:8000"


def test_empty_or_unmatched_subset_hint_is_503():
    for subset in ([], ["192.168.9.9:8000"]):
        s, _ = session()
        s.handle(headers_msg(CHAT_HEADERS, subset=subset))
        (out,) = s.handle(body_msg(chat_body(), True))
        assert out.immediate_response.status.code == 503
        assert "subset" in orjson.loads(out.immediate_response.body)["error"]["message"]


def test_fallback_list_when_the_picker_returns_several():
    s, _ = session(fallbacks=3)
    s.handle(headers_msg(CHAT_HEADERS))
    out = s.handle(body_msg(chat_body(), True))
    header, meta = destination_of(out[0])
    assert header == meta and len(header.split(",")) == 3 and len(set(header.split(","))) == 3


def test_bad_body_is_400_with_openai_error():
    s, _ = session()
    s.handle(headers_msg(CHAT_HEADERS))
    (out,) = s.handle(body_msg(b"{oops", True))
    assert out.immediate_response.status.code == 400
    err = orjson.loads(out.immediate_response.body)["error"]
    assert "not valid JSON" in err["message"]
    assert s.handle(body_msg(b"more", True)) == []  # the exchange is over


def test_body_over_the_limit_is_400_naming_the_flag():
    d = make_director()
    s = DecodedSession(d, max_body_bytes=100)
    s.handle(headers_msg(CHAT_HEADERS))
    (out,) = s.handle(body_msg(b"x" * 101, False))
    assert out.immediate_response.status.code == 400
    assert b"--max-request-body-bytes" in out.immediate_response.body


def test_sheddable_request_on_a_saturated_pool_is_429():
    d = make_director(objectives={"batch": -1})  # never-scraped endpoints count as saturated
    s = DecodedSession(d, 1 << 20)
    s.handle(headers_msg({**CHAT_HEADERS, "x-gateway-inference-objective": "batch"}))
    (out,) = s.handle(body_msg(chat_body(), True))
    assert out.immediate_response.status.code == 429
    s = DecodedSession(d, 1 << 20)  # priority 0 (no objective) is never shed
    s.handle(headers_msg(CHAT_HEADERS))
    assert s.handle(body_msg(chat_body(), True))[0].HasField("request_headers")


def test_buffered_mode_answers_headers_at_once_and_routes_with_the_body():
    s, _ = session()
    (first,) = s.handle(headers_msg(CHAT_HEADERS, request_mode=Mode.BUFFERED))
    assert first.HasField("request_headers") and not first.request_headers.response.header_mutation.set_headers
    (out,) = s.handle(body_msg(chat_body(), True))
    assert out.HasField("request_body")
    header, meta = destination_of(out)
    assert header == meta


def test_model_rewrite_rewrites_the_body_and_restores_the_name_in_the_response():
    s, _ = session()
    s.handle(headers_msg({**CHAT_HEADERS, "x-gateway-model-name-rewrite": "food-review-1"}))
    out = s.handle(body_msg(chat_body(model="food-review"), True))
    sent = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out[1:])
    assert orjson.loads(sent)["model"] == "food-review-1"
    length = [h.header.raw_value for h in out[0].request_headers.response.header_mutation.set_headers
              if h.header.key == "content-length"]
    assert length == [str(len(sent)).encode()]
    s.handle(response_headers_msg())
    (resp,) = s.handle(response_body_msg(b'{"model":"food-review-1","x":1}', True))
    assert resp.response_body.response.body_mutation.streamed_response.body == b'{"model":"food-review","x":1}'


def test_response_usage_is_read_and_state_released_at_the_end():
    s, d = session()
    s.handle(headers_msg(CHAT_HEADERS))
    s.handle(body_msg(chat_body(stream=True), True))
    routed = s.routed
    assert routed.endpoint.in_flight == 1
    s.handle(response_headers_msg(content_type="text/event-stream"))
    events = (b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":9,'
              b'"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":5}}}\n\ndata: [DONE]\n\n')
    s.handle(response_body_msg(events[:40], False))
    out = s.handle(response_body_msg(events[40:], True))
    assert out[-1].response_body.response.body_mutation.streamed_response.end_of_stream
    r = routed.response
    assert (r.status, r.streaming, r.prompt_tokens, r.completion_tokens, r.cached_tokens) == (200, True, 9, 4, 5)
    assert routed.done and routed.endpoint.in_flight == 0
    s.close()
    assert routed.endpoint.in_flight == 0  # close after completion releases nothing twice


def test_stream_closed_mid_response_releases_state_as_aborted():
    s, d = session()
    s.handle(headers_msg(CHAT_HEADERS))
    s.handle(body_msg(chat_body(), True))
    s.handle(response_headers_msg())
    s.handle(response_body_msg(b'{"partial', False))
    s.close()
    assert s.routed.response.aborted and all(e.in_flight == 0 for e in d.pool.endpoints)


# ---------------------------------------------------------------- robustness (hypothesis)

_messages = st.one_of(
    st.builds(lambda eos: headers_msg(CHAT_HEADERS, end_of_stream=eos), st.booleans()),
    st.builds(body_msg, st.binary(max_size=200) | st.builds(chat_body, st.text(max_size=50)), st.booleans()),
    st.builds(response_headers_msg, st.sampled_from([200, 404, 500]), st.sampled_from(["text/event-stream", "application/json"]), st.booleans()),
    st.builds(response_body_msg, st.binary(max_size=200), st.booleans()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages, max_size=12))
def test_random_message_orders_never_crash_and_never_leak(msgs):
    d = make_director()
    s = DecodedSession(d, 1 << 20)
    for m in msgs:
        for resp in s.handle(m):
            assert resp.WhichOneof("response") is not None
    s.close()
    assert all(e.in_flight == 0 and e.in_flight_tokens == 0 for e in d.pool.endpoints)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(
        ["model", "messages", "prompt", "role", "content", "stream", "cache_salt", "input"]), children, max_size=5),
    max_leaves=20).map(lambda v: json.dumps(v).encode())), st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                                      "/v1/responses", "/v1/other"]))
def test_random_bodies_get_a_route_or_a_4xx_never_an_exception(body, path):
    d = make_director()
    s = DecodedSession(d, 1 << 20)
    s.handle(headers_msg({**CHAT_HEADERS, ":path": path}))
    out = s.handle(body_msg(body, True))
    assert out
    if out[0].HasField("immediate_response"):
        assert out[0].immediate_response.status.code == 400
    else:
        assert out[0].HasField("request_headers")
    s.close()


# Around each change of varint width: of the body length, and of the four lengths around it (up to 12 bytes
# more), which the 2- and 3-byte fast paths must leave to the general encoding.
@pytest.mark.parametrize("size", [0, 1, 2, 115, 116, 117, 126, 127, 128, 129, 300, 16_370, 16_371, 16_372, 16_373,
                                  16_374, 16_375, 16_376, 16_380, 16_383, 16_384, 16_385, 30_000, 61_999, 62_000])
@pytest.mark.parametrize("end_of_stream", [False, True])
@pytest.mark.parametrize("response", [False, True])
def test_hand_encoded_body_frames_equal_the_protobuf_encoding(size, end_of_stream, response):
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (frame,) = streamed_chunks(body, end_of_stream, response)
    assert frame == streamed_body(body, end_of_stream, response).SerializeToString()
    (frame,) = streamed_chunks(memoryview(body), end_of_stream, response)
    assert frame == streamed_body(body, end_of_stream, response).SerializeToString()


@pytest.mark.parametrize("size", [2_097_133, 2_097_134, 2_097_135, 2_097_136, 2_097_151, 2_097_152, 3_000_000])
def test_frames_of_bodies_past_three_byte_lengths_equal_the_protobuf_encoding(size):
    body = b"x" * size  # larger than one streamed chunk: the frame encoder itself
    for end_of_stream in (False, True):
        expected = streamed_body(body, end_of_stream, True).SerializeToString()
        assert _streamed_frame(body, end_of_stream, True) == expected


def test_cached_routing_answer_equals_a_fresh_one():
    cache = ReplyCache(limit=2)
    for dest in ("10.0.0.1:8000", "10.0.0.1:8000,10.0.0.2:8000", "10.0.0.3:8000"):
        assert cache.request_headers_routed(dest) == request_headers_routed(dest, {}, None).SerializeToString()


# ---------------------------------------------------------------- gateways that send no response body


def test_without_response_bodies_the_end_of_the_stream_completes_the_request():
    s, d = session()
    s.handle(headers_msg(CHAT_HEADERS, response_mode=Mode.NONE))
    s.handle(body_msg(chat_body(), True))
    routed = s.routed
    s.handle(response_headers_msg())
    assert routed.endpoint.in_flight == 1 and not routed.done  # the response is still being written
    s.close()
    assert routed.done and not routed.response.aborted and routed.endpoint.in_flight == 0


def test_without_response_bodies_a_stream_closed_before_the_response_headers_is_an_abort():
    s, d = session()
    s.handle(headers_msg(CHAT_HEADERS, response_mode=Mode.NONE))
    s.handle(body_msg(chat_body(), True))
    s.close()
    assert s.routed.response.aborted and all(e.in_flight == 0 for e in d.pool.endpoints)


def test_a_plugin_that_reads_response_bodies_is_warned_about_once_when_the_gateway_sends_none(caplog):
    d = make_director()
    d.response_body_readers = ["usage-reader"]  # as if a plugin implemented ResponseBodyHook
    for _ in range(3):
        s = DecodedSession(d, max_body_bytes=1 << 20)
        s.handle(headers_msg(CHAT_HEADERS, response_mode=Mode.NONE))
    warnings = [r for r in caplog.records if "usage-reader" in r.getMessage()]
    assert len(warnings) == 1 and "FULL_DUPLEX_STREAMED" in warnings[0].getMessage()


def test_no_warning_when_no_plugin_reads_response_bodies(caplog):
    s, d = session()
    s.handle(headers_msg(CHAT_HEADERS, response_mode=Mode.NONE))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_headers_a_response_hook_sets_go_out_on_the_response_headers_answer():
    s, d = session()
    s.handle(headers_msg(CHAT_HEADERS))
    s.handle(body_msg(chat_body(), True))
    s.routed.response.set_headers["x-session-token"] = "abc"
    # A response-headers hook fills set_headers while the response headers are handled.
    d.config.response_header_hooks.append(type("Hook", (), {
        "response_headers": lambda self, req, resp, ep: resp.set_headers.update({"x-served": ep.hostport})})())
    out = s.handle(response_headers_msg())
    sets = {h.header.key: h.header.raw_value.decode()
            for h in out[0].response_headers.response.header_mutation.set_headers}
    assert sets == {"x-session-token": "abc", "x-served": s.routed.endpoint.hostport}

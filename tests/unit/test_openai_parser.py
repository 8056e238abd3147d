"""`openai-parser` on the response path: token usage from JSON bodies and from SSE streams."""

import pytest

from epp.scheduling.registry import PluginHandle, create, load_builtin_plugins
from epp.scheduling.types import ResponseInfo
from plugins.openai_parser import MAX_BUFFERED_RESPONSE

USAGE = b'"usage":{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}}'


@pytest.fixture
def parser():
    load_builtin_plugins()
    return create("openai-parser", "openai-parser", None, PluginHandle())


def feed(parser, chunks, streaming):
    resp = ResponseInfo(streaming=streaming)
    for i, chunk in enumerate(chunks):
        resp.end_of_stream = i == len(chunks) - 1
        parser.parse_response_chunk(resp, chunk, streaming)
    return resp.prompt_tokens, resp.completion_tokens, resp.cached_tokens


def test_json_usage_is_read_at_the_end_of_a_body_split_anywhere(parser):
    body = b'{"id":"x","choices":[{"text":"hi"}],' + USAGE + b"}"
    for cut in range(1, len(body)):
        assert feed(parser, [body[:cut], body[cut:]], streaming=False) == (12, 5, 8)


def test_sse_usage_event_split_across_chunks(parser):
    stream = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],' + USAGE + b"}\n\ndata: [DONE]\n\n"
    for cut in range(1, len(stream)):
        assert feed(parser, [stream[:cut], stream[cut:]], streaming=True) == (12, 5, 8)


def test_sse_last_event_without_trailing_newline(parser):
    assert feed(parser, [b'data: {"choices":[],' + USAGE + b"}"], streaming=True) == (12, 5, 8)


def test_responses_api_input_and_output_token_names(parser):
    body = b'{"usage":{"input_tokens":3,"output_tokens":4,"input_tokens_details":{"cached_tokens":1}}}'
    assert feed(parser, [body], streaming=False) == (3, 4, 1)


@pytest.mark.parametrize("body", [b"not json", b'{"usage":"nope"}', b'{"choices":[]}', b""])
def test_bodies_without_usable_usage_leave_it_unknown(parser, body):
    assert feed(parser, [body], streaming=False) == (None, None, None)


def test_a_body_over_the_buffer_limit_is_not_parsed(parser):
    big = b'{"pad":"' + b"x" * MAX_BUFFERED_RESPONSE + b'",' + USAGE + b"}"
    assert feed(parser, [big[: len(big) // 2], big[len(big) // 2 :]], streaming=False) == (None, None, None)

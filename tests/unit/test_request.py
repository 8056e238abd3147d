"""OpenAI request parsing: what each API requires, and the 400s a client gets otherwise."""

import orjson
import pytest

from epp.errors import RequestError
from epp.request import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    api_of_path,
    parse_openai_request,
    request_path,
)


def parse(body, path="/v1/completions", **headers):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_openai_request(raw, {":path": path, **headers}, "rid-1")


@pytest.mark.parametrize("path,api", [
    ("/v1/completions", COMPLETIONS),
    ("/v1/chat/completions", CHAT_COMPLETIONS),
    ("/v1/chat/completions?x=1", CHAT_COMPLETIONS),
    ("/openai/v1/embeddings", EMBEDDINGS),
    ("/v1/responses", RESPONSES),
    ("/v1/rerank", ""),
])
def test_the_api_is_chosen_by_path_suffix(path, api):
    assert api_of_path(request_path({":path": path})) == api


def test_path_falls_back_to_original_path_headers():
    assert request_path({"x-original-path": "/v1/chat/completions"}) == "/v1/chat/completions"


def test_completions_prompt_string_and_list():
    assert parse({"model": "m", "prompt": "hello"}).prompt == "hello"
    assert parse({"model": "m", "prompt": ["a", "b"]}).prompt == "a b"
    assert parse({"model": "m", "prompt": [1, 2, 3]}).prompt == "1 2 3"


def test_chat_messages_with_string_and_content_parts():
    req = parse({"model": "m", "messages": [{"role": "system", "content": "s"},
                                            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
                path="/v1/chat/completions")
    assert req.api == CHAT_COMPLETIONS and len(req.messages) == 2


def test_model_rewrite_header_sets_the_target_model():
    req = parse({"model": "food-review", "prompt": "x"}, **{"x-gateway-model-name-rewrite": "food-review-1"})
    assert (req.model, req.target_model) == ("food-review", "food-review-1")


def test_stream_cache_salt_and_objective_are_read():
    req = parse({"model": "m", "prompt": "x", "stream": True, "cache_salt": "s1"},
                **{"x-gateway-inference-objective": "batch"})
    assert req.stream and req.cache_salt == "s1" and req.objective == "batch"


@pytest.mark.parametrize("body,path,needle", [
    (b"{not json", "/v1/completions", "not valid JSON"),
    (b"[1,2]", "/v1/completions", "JSON object"),
    ({"prompt": "x"}, "/v1/completions", "model not found"),
    ({"model": "", "prompt": "x"}, "/v1/completions", "model not found"),
    ({"model": "m"}, "/v1/completions", "`prompt` is required"),
    ({"model": "m", "prompt": ""}, "/v1/completions", "must not be empty"),
    ({"model": "m", "prompt": []}, "/v1/completions", "`prompt` must be"),
    ({"model": "m", "messages": []}, "/v1/chat/completions", "non-empty list"),
    ({"model": "m", "messages": [{"content": "x"}]}, "/v1/chat/completions", "string `role`"),
    ({"model": "m", "input": ""}, "/v1/embeddings", "`input` is required"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "/v1/completions", "`stream`"),
    ({"model": "m", "prompt": "x", "cache_salt": 5}, "/v1/completions", "`cache_salt`"),
])
def test_bad_requests_are_400_with_a_message_saying_what_is_wrong(body, path, needle):
    with pytest.raises(RequestError) as err:
        parse(body, path=path)
    assert err.value.status == 400
    assert needle in err.value.message
    error = orjson.loads(err.value.body())["error"]
    assert error["type"] == "BadRequestError" and needle in error["message"]

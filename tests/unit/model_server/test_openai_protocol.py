"""Request parsing (OpenAI completions and chat) and the stop-string detokenizer."""

import pytest

from epp_model_server.chat import render_chat
from epp_model_server.detokenize import IncrementalDetokenizer
from epp_model_server.lora import LoRAAdapter
from epp_model_server.openai_protocol import APIError, ModelContext, parse_request
from epp_model_server.tokenizer import BuiltinTokenizer

TOK = BuiltinTokenizer()
ADAPTER = LoRAAdapter("sql", "/sql", 1)
CTX = ModelContext(served_model_names=["base", "alias"], lookup_lora={"sql": ADAPTER}.get, tokenizer=TOK,
                   default_max_tokens=16)


def test_a_string_prompt_is_encoded_with_the_tokenizer():
    p = parse_request("completion", {"model": "base", "prompt": "hello there world"}, CTX)
    assert p.prompts == [TOK.encode("hello there world")]
    assert (p.model, p.lora, p.max_tokens, p.stream) == ("base", None, 16, False)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (["a b", "c"], [TOK.encode("a b"), TOK.encode("c")]),
        ([5, 6, 7], [[5, 6, 7]]),
        ([[5, 6], [7]], [[5, 6], [7]]),
    ],
)
def test_list_prompts_give_one_token_list_each(prompt, expected):
    assert parse_request("completion", {"prompt": prompt}, CTX).prompts == expected


def test_chat_messages_are_rendered_by_the_template_then_encoded():
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    p = parse_request("chat", {"model": "alias", "messages": messages, "max_completion_tokens": 7}, CTX)
    assert p.prompts == [TOK.encode(render_chat(messages))]
    assert (p.model, p.max_tokens) == ("alias", 7)


def test_a_lora_adapter_name_selects_the_adapter():
    p = parse_request("completion", {"model": "sql", "prompt": "x"}, CTX)
    assert p.lora is ADAPTER and p.model == "sql"


def test_stream_options_and_sampling_fields_are_read():
    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 3, "min_tokens": 1, "ignore_eos": True, "seed": 9, "stop": "END",
            "stop_token_ids": [5], "cache_salt": "tenant", "temperature": 0.7}
    p = parse_request("completion", body, CTX)
    assert (p.stream, p.include_usage, p.continuous_usage) == (True, True, True)
    assert (p.max_tokens, p.min_tokens, p.ignore_eos, p.seed) == (3, 1, True, 9)
    assert (p.stop, p.stop_token_ids, p.cache_salt) == (["END"], frozenset({5}), "tenant")


@pytest.mark.parametrize(
    ("kind", "body", "param", "match"),
    [
        ("completion", [], None, "JSON object"),
        ("completion", {"model": "nope", "prompt": "x"}, "model", "does not exist"),
        ("completion", {"model": 5, "prompt": "x"}, "model", "type str"),
        ("completion", {}, "prompt", "required"),
        ("completion", {"prompt": []}, "prompt", "must be a string"),
        ("completion", {"prompt": [1, "a"]}, "prompt", "must be a string"),
        ("completion", {"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
        ("completion", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "type int"),
        ("completion", {"prompt": "x", "max_tokens": True}, "max_tokens", "type int"),
        ("completion", {"prompt": "x", "n": 2}, "n", "n=1"),
        ("completion", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ("completion", {"prompt": "x", "stop": ["ok", ""]}, "stop", "non-empty"),
        ("completion", {"prompt": "x", "min_tokens": 20}, "min_tokens", "between 0"),
        ("completion", {"prompt": "x", "echo": True}, "echo", "not supported"),
        ("completion", {"prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
        ("completion", {"prompt": "x", "cache_salt": ""}, "cache_salt", "non-empty"),
        ("chat", {"model": "base"}, "messages", "required"),
        ("chat", {"messages": [{"content": "no role"}]}, "messages", "role"),
    ],
)
def test_bad_requests_are_400_errors_naming_the_parameter(kind, body, param, match):
    with pytest.raises(APIError, match=match) as info:
        parse_request(kind, body, CTX)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize(
    ("pieces", "stop", "expected_text", "stopped_on"),
    [
        (["Hello", " wor", "ld"], [], "Hello world", None),
        (["Hello", " wor", "ld", " END", " more"], ["END"], "Hello world ", "END"),
        (["ab", "cE", "ND", "x"], ["END"], "abc", "END"),  # stop string split across tokens
        (["one", " two"], ["two", "one"], "", "one"),
    ],
)
def test_detokenizer_cuts_text_before_the_first_stop_string(pieces, stop, expected_text, stopped_on):
    class PieceTokenizer:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

    detok = IncrementalDetokenizer(PieceTokenizer(), stop)
    deltas = [detok.add([i]) for i in range(len(pieces))]
    deltas.append(detok.flush())  # generation ended
    assert detok.text == expected_text and detok.stopped_on == stopped_on
    assert "".join(deltas) == expected_text  # streamed text equals the final text


def test_text_that_may_start_a_stop_string_is_held_back_until_decided():
    class PieceTokenizer:
        def decode(self, ids):
            return "".join(["done E", "ND?", "x"][i] for i in ids)

    detok = IncrementalDetokenizer(PieceTokenizer(), ["END!"])
    assert detok.add([0]) == "done "
    assert detok.add([1]) == "END?"  # "END?" is not "END!": released
    assert detok.stopped_on is None


def test_detokenizer_holds_back_incomplete_characters():
    class BytesTokenizer:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(BytesTokenizer())
    euro = "€".encode()
    assert [detok.add([b]) for b in [*b"a", *euro]] == ["a", "", "", "€"]

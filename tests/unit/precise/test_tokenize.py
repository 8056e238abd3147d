"""Request-side tokenization gives exactly the model server's token ids, with a prefix cache that is exact."""

from __future__ import annotations

import pytest

from epp.request import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, LLMRequest
from epp_model_server.hf_tokenizer import load_tokenizer
from epp_model_server.openai_protocol import APIError, ModelContext, parse_request
from plugins.prefix.precise.tokenize import (
    BuiltinBackend,
    HFBackend,
    RequestTokenizer,
    SegmentCache,
    TokenizerError,
    bytes_to_ids,
    load_backend,
)

from .offline_tokenizer import CHAT_TEMPLATE, long_text, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module", params=["builtin", "hf"])
def pair(request, tokenizer_json):
    """(our RequestTokenizer, the model server's own tokenizer) for one tokenizer kind."""
    if request.param == "builtin":
        return RequestTokenizer(load_backend("builtin", 32000)), load_tokenizer(None, 32000)
    return RequestTokenizer(load_backend(str(tokenizer_json))), load_tokenizer(str(tokenizer_json), 32000)


def llm_request(api: str, body: dict) -> LLMRequest:
    return LLMRequest(request_id="r", api=api, model="m", target_model="m", body=body, headers={}, size_bytes=0)


def server_prompts(server_tokenizer, api: str, body: dict) -> list[list[int]]:
    ctx = ModelContext(served_model_names=["m"], lookup_lora=lambda name: None, tokenizer=server_tokenizer,
                       default_max_tokens=16)
    kind = "chat" if api == CHAT_COMPLETIONS else "completion"
    return parse_request(kind, {"model": "m", **body}, ctx).prompts


SYSTEM = "You are a careful assistant. " + long_text(400, seed=3)
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a prefix cache?"}]

REQUESTS = [
    (COMPLETIONS, {"prompt": "Hello world, this is a prompt."}),
    (COMPLETIONS, {"prompt": long_text(3000, seed=5)}),  # many segments
    (COMPLETIONS, {"prompt": "  leading  and   repeated spaces\n\n and new lines \t tabs  "}),
    (COMPLETIONS, {"prompt": ["first prompt here", "second prompt, different"]}),
    (COMPLETIONS, {"prompt": [5, 6, 7, 8]}),
    (COMPLETIONS, {"prompt": [[5, 6], [7, 8, 9]]}),
    (COMPLETIONS, {"prompt": "Ünïcödé text — with dashes, émojis 🙂 and 数字 123456."}),
    (CHAT_COMPLETIONS, {"messages": MESSAGES}),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "add_generation_prompt": False}),
    (CHAT_COMPLETIONS, {"messages": [*MESSAGES, {"role": "assistant", "content": "A prefix"}],
                        "add_generation_prompt": False, "continue_final_message": True}),
    (CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                                  {"type": "text", "text": "part two"}]}]}),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "chat_template": "{% for m in messages %}[{{ m['role'] }}] "
                                                               "{{ m['content'] }}\n{% endfor %}"}),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False},
                        "tools": [{"type": "function", "function": {"name": "f"}}]}),
]


@pytest.mark.parametrize(("api", "body"), REQUESTS, ids=range(len(REQUESTS)))
def test_token_ids_equal_the_model_servers(pair, api, body):
    ours, server = pair
    expected = server_prompts(server, api, body)
    for _ in range(2):  # cold, then from the cache
        assert [bytes_to_ids(p) for p in ours.prompts(llm_request(api, body))] == expected


def test_a_repeated_system_prompt_is_not_tokenized_again(pair):
    ours, server = pair
    ours.cache._cache.clear()
    first = {"messages": MESSAGES}
    ours.prompts(llm_request(CHAT_COMPLETIONS, first))
    first_segments = set(ours.cache.segments(ours.chat_text(first)))
    stats = ours.cache.stats
    before_hits, before_encoded = stats.segments_hit, stats.segments_encoded
    second = {"messages": [MESSAGES[0], {"role": "user", "content": "And what is a KV block, precisely?"}]}
    got = [bytes_to_ids(p) for p in ours.prompts(llm_request(CHAT_COMPLETIONS, second))]
    assert got == server_prompts(server, CHAT_COMPLETIONS, second)
    segments = ours.cache.segments(ours.chat_text(second))
    shared = sum(seg in first_segments for seg in segments)
    assert len(segments) > 3 and shared >= len(segments) - 2  # the system prompt's segments are shared
    assert stats.segments_hit - before_hits == shared
    assert stats.segments_encoded - before_encoded == len(segments) - shared  # around the new question only


def test_apis_without_a_prompt_have_no_tokens(pair):
    ours, _ = pair
    assert ours.prompts(llm_request(EMBEDDINGS, {"input": "text"})) == []


@pytest.mark.parametrize(
    ("api", "body"),
    [
        (COMPLETIONS, {"prompt": 42}),
        (COMPLETIONS, {"prompt": []}),
        (COMPLETIONS, {"prompt": [1, "a"]}),
        (CHAT_COMPLETIONS, {"messages": "hello"}),
        (CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        (CHAT_COMPLETIONS, {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True}),
    ],
)
def test_prompts_the_model_server_refuses_are_errors(pair, api, body):
    ours, server = pair
    with pytest.raises(APIError):
        server_prompts(server, api, body)
    with pytest.raises(TokenizerError):
        ours.prompts(llm_request(api, body))


@pytest.mark.parametrize("space_in_next", [True, False])
def test_segments_cut_at_single_spaces_and_give_the_text_back(space_in_next):
    backend = BuiltinBackend(32000)
    backend.space_in_next = space_in_next
    cache = SegmentCache(backend, segment_chars=32)
    text = "word " * 40 + "a  b\n c " + "x" * 100 + " end"
    segments = cache.segments(text)
    assert len(segments) > 4
    assert ("" if space_in_next else " ").join(segments) == text
    for seg in segments[1:]:
        if space_in_next:
            assert seg.startswith(" ") and not seg[1].isspace()
    assert cache.segments("short text") == ["short text"]


class NotCompositional:
    """A tokenizer whose ids depend on the whole text (its length), so segments do not compose."""

    name = "not-compositional"
    space_in_next = True
    chat_template = None
    bos_token = eos_token = ""
    prefix_specials = suffix_specials = b""

    def encode(self, text: str) -> bytes:
        return bytes(4) * (len(text) % 7 + 1)

    encode_with_specials = encode


def test_a_tokenizer_that_does_not_compose_turns_the_cache_off_and_stays_exact():
    backend = NotCompositional()
    cache = SegmentCache(backend, segment_chars=32)
    text = long_text(200)
    assert cache.encode(text) == backend.encode(text)
    assert not cache.enabled and cache.stats.verify_failures == 1
    assert cache.encode(text) == backend.encode(text) and len(cache) == 0


def test_the_cache_is_verified_then_trusted_and_bounded_in_bytes():
    backend = BuiltinBackend(32000)
    cache = SegmentCache(backend, segment_chars=64, max_bytes=4096, verify=2)
    for seed in range(5):
        text = long_text(300, seed=seed)
        assert cache.encode(text) == backend.encode(text)
    assert cache.stats.verified == 2 and cache.enabled
    assert cache.size_bytes <= 4096


def test_hf_special_tokens_are_found_by_probing(tokenizer_json):
    backend = HFBackend(str(tokenizer_json))
    assert backend.specials_known
    assert bytes_to_ids(backend.prefix_specials) == [0]  # the BOS the post-processor adds
    assert backend.suffix_specials == b""
    assert backend.chat_template == CHAT_TEMPLATE and backend.bos_token == "<s>"


def test_a_missing_tokenizer_says_what_to_give(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json there"):
        load_backend(str(tmp_path / "nope.json"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_backend(str(tmp_path))

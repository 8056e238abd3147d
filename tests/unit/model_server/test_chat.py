import json

import pytest

from epp_model_server.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat
from epp_model_server.hf_tokenizer import TokenizerLoadError, load_tokenizer, read_tokenizer_config
from epp_model_server.tokenizer import BuiltinTokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_builtin_template_renders_one_block_per_message_then_the_assistant_header():
    assert render_chat(MESSAGES) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"


def test_without_generation_prompt_there_is_no_assistant_header():
    assert render_chat(MESSAGES, add_generation_prompt=False) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n"


def test_continue_final_message_leaves_the_last_message_open():
    messages = [*MESSAGES, {"role": "assistant", "content": "Hello"}]
    text = render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|assistant|>\nHello")


def test_text_parts_are_joined_with_newlines_like_vllm():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(parts) == render_chat([{"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "no role"}], r"messages\[0\]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text parts only"),
        ([{"role": "user", "content": 5}], "string or a list"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(messages)


def test_model_template_gets_bos_token_and_can_raise():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    assert render_chat(MESSAGES, template, bos_token="<s>", add_generation_prompt=False) == (
        "<s>[system] Be brief.\n[user] Hi!\n"
    )
    with pytest.raises(ChatTemplateError, match="no tools here"):
        render_chat([{"role": "tool", "content": "x"}], template)


def test_rendering_then_builtin_encoding_is_reproducible():
    tok = BuiltinTokenizer()
    assert tok.encode(render_chat(MESSAGES, DEFAULT_CHAT_TEMPLATE)) == BuiltinTokenizer().encode(render_chat(MESSAGES))


def test_tokenizer_config_supplies_template_and_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}",
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
    }))
    cfg = read_tokenizer_config(tmp_path)
    assert (cfg.chat_template, cfg.bos_token, cfg.eos_token) == ("{{ bos_token }}{{ messages[0]['content'] }}",
                                                                 "<s>", "</s>")


def test_a_list_of_named_templates_yields_the_default_one(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }))
    assert read_tokenizer_config(tmp_path).chat_template == "D"


def test_chat_template_jinja_file_is_used_when_the_config_has_none(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_tokenizer_config(tmp_path).chat_template == "J"


def test_no_tokenizer_path_means_the_builtin_tokenizer():
    assert isinstance(load_tokenizer(None, 1000), BuiltinTokenizer)


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path), 1000)


def test_tokenizer_json_without_the_tokenizers_package_says_how_to_fix_it(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    import builtins

    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(TokenizerLoadError, match="pip install tokenizers"):
        load_tokenizer(str(tmp_path / "tokenizer.json"), 1000)


def test_hf_tokenizer_wraps_a_tokenizers_object_with_the_config_tokens():
    from epp_model_server.hf_tokenizer import HFTokenizer, TokenizerConfig

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    class FakeTokenizers:
        """The part of `tokenizers.Tokenizer` the wrapper uses."""

        def get_vocab_size(self, with_added_tokens=True):
            return 100

        def token_to_id(self, token):
            return {"</s>": 2}.get(token)

        def encode(self, text, add_special_tokens=True):
            return Encoding(([1] if add_special_tokens else []) + [len(w) for w in text.split()])

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids if not (skip_special_tokens and i < 3))

    tok = HFTokenizer(FakeTokenizers(), TokenizerConfig(chat_template="T", bos_token="<s>", eos_token="</s>"))
    assert (tok.vocab_size, tok.eos_token_id, tok.chat_template, tok.bos_token) == (100, 2, "T", "<s>")
    assert tok.encode("ab cde", add_special_tokens=True) == [1, 2, 3]
    assert tok.encode("ab cde") == [2, 3]
    assert tok.decode([1, 5, 7]) == "5 7"

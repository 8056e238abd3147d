"""Chat rendering: OpenAI chat messages -> one prompt string, through a jinja2 chat template.

`render_chat` is a pure function of its arguments so that the EPP's precise prefix scorer can reproduce
the server's prompt text (and then its token ids) exactly. The environment mirrors how `transformers`
renders chat templates (sandboxed, `trim_blocks`, `lstrip_blocks`, the loop-controls extension, the
`raise_exception` and `strftime_now` helpers), so a model's own template from `tokenizer_config.json`
renders the same text here as in vLLM.

Message contents given as a list of parts are flattened the way vLLM's "string" content format does:
the text parts joined with a newline (non-text parts are refused: this server is text-only).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.sandbox

# Used when the tokenizer brings no template (the built-in tokenizer, or a tokenizer.json without a
# tokenizer_config.json chat_template): one block per message, then the assistant header.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (bad shape, or the template raised); a 400 for the client."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def flatten_content(content: Any) -> str:
    """A message's `content` as one string: a string as is, None as '', text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"unsupported content part {kind!r}: this server accepts text parts only")
        return "\n".join(texts)
    raise ChatTemplateError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks the OpenAI message list and flattens every content to a string (other keys kept)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise ChatTemplateError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        normalized = dict(message)
        normalized["content"] = flatten_content(message.get("content"))
        out.append(normalized)
    return out


def render_chat(
    messages: Any,
    template: str | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    tools: Any = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for `messages` under `template` (the built-in template when None).

    `continue_final_message` leaves the last (assistant) message open, as vLLM does: the rendered text is
    cut right after that message's content, and no generation prompt is added.
    """
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both be true")
    normalized = normalize_messages(messages)
    variables: dict[str, Any] = dict(template_kwargs or {})
    variables.update(
        messages=normalized,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    if tools is not None:
        variables["tools"] = tools
    try:
        text = _compile(template or DEFAULT_CHAT_TEMPLATE).render(**variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    if continue_final_message:
        final = normalized[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut >= 0:
            text = text[: cut + len(final)]
    return text

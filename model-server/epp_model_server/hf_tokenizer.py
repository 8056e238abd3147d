"""Loading a Hugging Face `tokenizer.json` (with the optional `tokenizers` package) and its chat template.

`--tokenizer` names a `tokenizer.json` file or a directory holding one. The chat template and the BOS/EOS
strings come from `tokenizer_config.json` (or `chat_template.jinja`) next to it, as `transformers` reads
them, so the rendered chat prompt is the model's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tokenizer import BuiltinTokenizer, Tokenizer


class TokenizerLoadError(Exception):
    """The tokenizer named by --tokenizer cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class TokenizerConfig:
    """The parts of `tokenizer_config.json` the server uses."""

    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""


def _token_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return ""


def read_tokenizer_config(directory: Path) -> TokenizerConfig:
    """Reads `tokenizer_config.json` / `chat_template.jinja` in `directory`; missing files give defaults.

    A `chat_template` given as a list of `{name, template}` entries (several templates) yields the one
    named "default", else the first.
    """
    template: str | None = None
    bos = eos = ""
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerLoadError(f"cannot read {config_file}: {exc}; fix or remove the file") from exc
        raw = data.get("chat_template")
        if isinstance(raw, str):
            template = raw
        elif isinstance(raw, list) and raw:
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        bos = _token_text(data.get("bos_token"))
        eos = _token_text(data.get("eos_token"))
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return TokenizerConfig(chat_template=template, bos_token=bos, eos_token=eos)


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the server's Tokenizer protocol."""

    def __init__(self, tokenizer: Any, config: TokenizerConfig) -> None:
        self._tok = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.chat_template = config.chat_template
        self.bos_token = config.bos_token
        self.eos_token = config.eos_token
        self.eos_token_id = tokenizer.token_to_id(config.eos_token) if config.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)


def load_tokenizer(path: str | None, vocab_size: int) -> Tokenizer:
    """The built-in tokenizer when `path` is None, else the Hugging Face tokenizer at `path`."""
    if not path:
        return BuiltinTokenizer(vocab_size)
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise TokenizerLoadError(
            f"--tokenizer {path}: no tokenizer.json there; pass a tokenizer.json file or its directory"
        )
    try:
        import tokenizers  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise TokenizerLoadError(
            "--tokenizer needs the 'tokenizers' package, which is not installed: "
            "run `pip install tokenizers`, or drop --tokenizer to use the built-in tokenizer"
        ) from exc
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise TokenizerLoadError(f"cannot load {file}: {exc}") from exc
    return HFTokenizer(tok, read_tokenizer_config(file.parent))

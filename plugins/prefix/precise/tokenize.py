"""Request-side tokenization, exactly as the model server does it, cached by prefix.

The precise index holds keys of the engines' token ids, so a request must be turned into the very ids the
engine will compute, or nothing matches (reference notes 3.2: a different tokenizer, chat template or
special-token rule gives silent 0% hits). The rules mirror `epp_model_server.openai_protocol`, which
mirror vLLM:

  completions       `prompt` as a string, or a list of strings: each encoded *with* special tokens;
                    token ids (a list, or a list of lists) are used as they are
  chat/completions  `messages` rendered by the chat template (`chat_template` in the request, else the
                    configured template, else the tokenizer's own, else the model server's built-in one),
                    with `add_generation_prompt`, `continue_final_message`, `tools` and
                    `chat_template_kwargs` from the request, then encoded *without* special tokens
  anything else     no tokens (the request matches nothing)

Two tokenizers: the model server's built-in one (`epp_model_server.tokenizer.BuiltinTokenizer`, for pods
started without `--tokenizer`), or a Hugging Face `tokenizer.json` (with the `tokenizers` package) whose
chat template and BOS/EOS strings come from `tokenizer_config.json` next to it.

Prefix cache. An 8k-token prompt costs milliseconds to tokenize, and many requests repeat a long system
prompt. The text is therefore cut into segments at fixed places (the first single space after every
`segment_chars` characters that follows a non-space and precedes a non-space), each segment is encoded on
its own, and segment -> ids is cached (LRU, bounded in bytes). A request repeating a prefix re-encodes
only the segments after it. This is exact when encoding is compositional at those cuts, which holds for
the pre-tokenizers in use (byte-level and Metaspace BPE split words before a space; the built-in tokenizer
splits on spaces). It is checked, not assumed: the first `verify` texts that are cut are also encoded
whole, and on any difference the cache is switched off for good (logged, and counted in `stats`), so a
tokenizer that is not compositional costs speed, never accuracy. Special tokens (a BOS a completion gets)
are added around the joined segments.
"""

from __future__ import annotations

import logging
import re
import sys
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from epp.request import CHAT_COMPLETIONS, COMPLETIONS, LLMRequest

log = logging.getLogger(__name__)

_BIG_ENDIAN = sys.byteorder == "big"
# Where a text may be cut: a single space between two non-space characters.
_CUT = re.compile(r"(?<=\S) (?=\S)")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or a request cannot be tokenized; the message says what to do."""


def ids_to_bytes(ids: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian bytes (the layout keys.py hashes). Raises TokenizerError for ids
    that are not integers in [0, 2**32)."""
    try:
        arr = array("I", ids)
    except (TypeError, OverflowError) as exc:
        raise TokenizerError(f"token ids must be integers in [0, 2**32): {exc}") from None
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def bytes_to_ids(data: bytes) -> list[int]:
    arr = array("I", data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


# --------------------------------------------------------------------------------------------------------
# Backends


class Backend(Protocol):
    """A tokenizer as the cache needs it."""

    name: str
    # True: a cut's space begins the next segment (HF pre-tokenizers attach a space to the word after it);
    # False: the space is the separator and belongs to no segment (the built-in tokenizer).
    space_in_next: bool
    chat_template: str | None
    bos_token: str
    eos_token: str
    prefix_specials: bytes  # ids a completion gets before its text (add_special_tokens=True)
    suffix_specials: bytes  # … and after it

    def encode(self, text: str) -> bytes:
        """Ids of `text` without special tokens, as uint32 LE bytes."""
        ...

    def encode_with_specials(self, text: str) -> bytes: ...


class BuiltinBackend:
    """The model server's built-in tokenizer (pods started without --tokenizer)."""

    space_in_next = False
    chat_template = None
    bos_token = ""
    eos_token = ""
    prefix_specials = b""
    suffix_specials = b""

    def __init__(self, vocab_size: int) -> None:
        from epp_model_server.tokenizer import BuiltinTokenizer

        try:
            self._tok = BuiltinTokenizer(vocab_size)
        except ValueError as exc:
            raise TokenizerError(f"built-in tokenizer: {exc}") from None
        self.name = f"builtin(vocab_size={vocab_size})"

    def encode(self, text: str) -> bytes:
        return self._tok.encode_bytes(text)

    encode_with_specials = encode


class HFBackend:
    """A Hugging Face `tokenizer.json`, with the chat template and BOS/EOS of `tokenizer_config.json` (or
    `chat_template.jinja`) in the same directory, read as the model server reads them."""

    space_in_next = True

    def __init__(self, path: str) -> None:
        from epp_model_server.hf_tokenizer import TokenizerLoadError, read_tokenizer_config

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"tokenizer {path!r}: no tokenizer.json there; give the path of a tokenizer.json file (or its "
                "directory), the same the model servers get with --tokenizer, or `builtin`"
            )
        try:
            import tokenizers
        except ImportError as exc:  # pragma: no cover - a dependency of the project
            raise TokenizerError("the `tokenizers` package is needed for a tokenizer.json; pip install tokenizers") from exc
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"cannot load tokenizer {file}: {exc}") from None
        try:
            config = read_tokenizer_config(file.parent)
        except TokenizerLoadError as exc:
            raise TokenizerError(str(exc)) from None
        self.name = str(file)
        self.chat_template = config.chat_template
        self.bos_token = config.bos_token
        self.eos_token = config.eos_token
        self.prefix_specials, self.suffix_specials, self._specials_known = self._probe_specials()

    def _probe_specials(self) -> tuple[bytes, bytes, bool]:
        """The ids the post-processor adds around a text (e.g. a BOS), found by encoding a probe text with
        and without special tokens."""
        for probe in ("a", "hello", "x y"):
            plain = self._tok.encode(probe, add_special_tokens=False).ids
            full = self._tok.encode(probe, add_special_tokens=True).ids
            n = len(plain)
            for i in range(len(full) - n + 1):
                if full[i : i + n] == plain:
                    return ids_to_bytes(full[:i]), ids_to_bytes(full[i + n :]), True
        return b"", b"", False

    @property
    def specials_known(self) -> bool:
        return self._specials_known

    def encode(self, text: str) -> bytes:
        return ids_to_bytes(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_specials(self, text: str) -> bytes:
        return ids_to_bytes(self._tok.encode(text, add_special_tokens=True).ids)


def load_backend(tokenizer: str, vocab_size: int = 32000) -> Backend:
    """`builtin` (the model server's built-in tokenizer) or the path of a tokenizer.json."""
    if tokenizer == "builtin":
        return BuiltinBackend(vocab_size)
    return HFBackend(tokenizer)


# --------------------------------------------------------------------------------------------------------
# The segment cache


@dataclass
class TokenizeStats:
    segments_hit: int = 0
    segments_encoded: int = 0
    verified: int = 0
    verify_failures: int = 0
    errors: int = 0


class SegmentCache:
    """Encodes texts segment by segment, caching segment -> ids (see the module docstring)."""

    def __init__(self, backend: Backend, *, segment_chars: int = 512, max_bytes: int = 64 << 20,
                 verify: int = 16) -> None:
        if segment_chars < 16:
            raise ValueError(f"segment_chars must be at least 16, got {segment_chars}")
        self.backend = backend
        self.segment_chars = segment_chars
        self.max_bytes = max_bytes
        self._verify_left = verify
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self.enabled = max_bytes > 0
        self.stats = TokenizeStats()

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def segments(self, text: str) -> list[str]:
        """The segments `text` is cut into (joining them, with the separating spaces for the built-in
        tokenizer, gives `text` back)."""
        step = self.segment_chars
        n = len(text)
        if n <= step:
            return [text]
        skip = 0 if self.backend.space_in_next else 1
        out: list[str] = []
        search = _CUT.search
        start = 0
        target = step
        while target < n:
            m = search(text, target)
            if m is None:
                break
            c = m.start()
            out.append(text[start:c])
            start = c + skip
            target = (c // step + 1) * step
        out.append(text[start:])
        return out

    def encode(self, text: str, *, special_tokens: bool = False) -> bytes:
        """Ids of `text` (uint32 LE), with the backend's special tokens around it when `special_tokens`."""
        backend = self.backend
        if not self.enabled or (special_tokens and not getattr(backend, "specials_known", True)):
            return backend.encode_with_specials(text) if special_tokens else backend.encode(text)
        segments = self.segments(text)
        cache = self._cache
        parts: list[bytes] = []
        hits = 0
        for seg in segments:
            ids = cache.get(seg)
            if ids is None:
                ids = backend.encode(seg)
                self._put(seg, ids)
            else:
                cache.move_to_end(seg)
                hits += 1
            parts.append(ids)
        self.stats.segments_hit += hits
        self.stats.segments_encoded += len(segments) - hits
        joined = b"".join(parts)
        if len(segments) > 1 and self._verify_left > 0 and hits < len(segments):
            joined = self._verify(text, joined)
        if special_tokens:
            joined = backend.prefix_specials + joined + backend.suffix_specials
        return joined

    def _verify(self, text: str, joined: bytes) -> bytes:
        """The ids of `text` encoded whole; on a difference from `joined`, the cache is turned off."""
        self._verify_left -= 1
        whole = self.backend.encode(text)
        if whole == joined:
            self.stats.verified += 1
            return whole
        self.stats.verify_failures += 1
        self.enabled = False
        self._cache.clear()
        self._bytes = 0
        log.warning(
            "tokenizer %s does not encode text the same when cut into segments at spaces; the prefix "
            "token cache is off, and every request is tokenized whole (correct, but slower)",
            self.backend.name,
        )
        return whole

    def _put(self, seg: str, ids: bytes) -> None:
        cost = len(seg) + len(ids) + 128
        if cost > self.max_bytes:
            return
        self._cache[seg] = ids
        self._bytes += cost
        while self._bytes > self.max_bytes:
            old, old_ids = self._cache.popitem(last=False)
            self._bytes -= len(old) + len(old_ids) + 128


# --------------------------------------------------------------------------------------------------------
# Requests


class RequestTokenizer:
    """The token ids (uint32 LE bytes) a model server computes for a request, one entry per prompt."""

    def __init__(self, backend: Backend, *, chat_template: str | None = None, segment_chars: int = 512,
                 cache_bytes: int = 64 << 20, verify: int = 16) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.cache = SegmentCache(backend, segment_chars=segment_chars, max_bytes=cache_bytes, verify=verify)

    def prompts(self, request: LLMRequest) -> list[bytes]:
        """Token ids of each prompt of `request` ([] when the API has no prompt we can tokenize). Raises
        TokenizerError for a prompt the model server would refuse."""
        if request.api == CHAT_COMPLETIONS:
            return [self.cache.encode(self.chat_text(request.body), special_tokens=False)]
        if request.api == COMPLETIONS:
            return self.completion_prompts(request.body.get("prompt"))
        return []

    def completion_prompts(self, prompt: Any) -> list[bytes]:
        if isinstance(prompt, str):
            return [self.cache.encode(prompt, special_tokens=True)]
        if _is_token_list(prompt):
            return [ids_to_bytes(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [self.cache.encode(p, special_tokens=True) for p in prompt]
            if all(_is_token_list(p) for p in prompt):
                return [ids_to_bytes(p) for p in prompt]
        raise TokenizerError("`prompt` must be a string, a list of strings, or token ids")

    def chat_text(self, body: Mapping[str, Any]) -> str:
        """The prompt the chat template renders for a chat request (as the model server renders it)."""
        from epp_model_server.chat import ChatTemplateError, render_chat

        kwargs = body.get("chat_template_kwargs")
        template = body.get("chat_template")
        if not isinstance(template, str) or not template:
            template = self.chat_template or self.backend.chat_template
        add_generation_prompt = body.get("add_generation_prompt", True)
        continue_final = body.get("continue_final_message", False)
        try:
            return render_chat(
                body.get("messages"),
                template,
                add_generation_prompt=add_generation_prompt if isinstance(add_generation_prompt, bool) else True,
                continue_final_message=continue_final if isinstance(continue_final, bool) else False,
                bos_token=self.backend.bos_token,
                eos_token=self.backend.eos_token,
                tools=body.get("tools"),
                template_kwargs=kwargs if isinstance(kwargs, dict) else None,
            )
        except ChatTemplateError as exc:
            raise TokenizerError(str(exc)) from None


def _is_token_list(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def read_chat_template(path: str) -> str:
    """The text of a `--chat-template`-style jinja file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot read chat template {path!r}: {exc.strerror or exc}") from None

"""The built-in deterministic tokenizer (pure, standard library only).

The EPP's precise prefix scorer imports this module to compute exactly the token ids the model server
computes, so it stays dependency-free, deterministic across processes, platforms and Python versions, and
fast on 32 KB prompts.

How text becomes ids:
1. The text is split on single spaces (`str.split(" ")`, C speed). Each space-separated piece is looked up
   in a per-instance memo of piece -> ids (one C dict lookup on a hit, which is the common case: prompts
   reuse words).
2. On a miss the piece is cut into sub-pieces by a regex: runs of at most 8 letters, at most 3 digits, at
   most 4 punctuation characters, at most 8 whitespace characters; an empty piece (two spaces in a row)
   is one "space" sub-piece. Each sub-piece's id is `4 + crc32(utf-8 bytes) % (vocab_size - 4)`.
3. The ids of all pieces are concatenated as uint32 little-endian bytes, so `encode_bytes` returns the
   exact byte layout block hashers use (llm-d hashes token ids as uint32 little-endian).

Counts are realistic for English (about one token per 4-5 characters, long words split like BPE), and
ids are lossy by design: two sub-pieces may share an id and ids cannot be decoded back to the prompt.
`decode` renders ids as pronounceable pseudo-words, which is what generated text looks like.
"""

from __future__ import annotations

import re
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence
from typing import Protocol

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
FIRST_REGULAR_ID = 4
DEFAULT_VOCAB_SIZE = 32000

_SUB_PIECE = re.compile(r"[^\W\d_]{1,8}|\d{1,3}|(?:[^\s\w]|_){1,4}|\s{1,8}")

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 75 syllables

# Bound on the memo of piece ids (about 200 bytes an entry at worst).
_MEMO_LIMIT = 1 << 17
_LITTLE_ENDIAN = sys.byteorder == "little"


class Tokenizer(Protocol):
    """What the server needs from a tokenizer (the built-in one or a Hugging Face `tokenizer.json`)."""

    vocab_size: int
    eos_token_id: int | None
    bos_token: str
    eos_token: str
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class BuiltinTokenizer:
    """Deterministic hash tokenizer: the same text gives the same ids in every process.

    `add_special_tokens` is accepted for interface compatibility and has no effect: this vocabulary has
    no BOS to prepend, so completions and chat prompts are both just `encode(text)`.
    """

    bos_token = ""
    eos_token = ""
    eos_token_id = EOS_ID
    chat_template = None

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
        if vocab_size <= FIRST_REGULAR_ID + 1:
            raise ValueError(f"vocab_size must be greater than {FIRST_REGULAR_ID + 1}, got {vocab_size}")
        self.vocab_size = vocab_size
        self._modulus = vocab_size - FIRST_REGULAR_ID
        self._memo: dict[str, bytes] = {}

    def encode_bytes(self, text: str) -> bytes:
        """The ids of `text` as consecutive uint32 little-endian values."""
        pieces = text.split(" ")
        memo = self._memo
        parts = list(map(memo.get, pieces))
        if None in parts:
            for i, part in enumerate(parts):
                if part is None:
                    parts[i] = self._piece_bytes(pieces[i])
        return b"".join(parts)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = array("I", self.encode_bytes(text))
        if not _LITTLE_ENDIAN:
            ids.byteswap()
        return ids.tolist()

    def _piece_bytes(self, piece: str) -> bytes:
        subs = _SUB_PIECE.findall(piece) if piece else [" "]
        ids = array("I", [FIRST_REGULAR_ID + zlib.crc32(s.encode("utf-8")) % self._modulus for s in subs])
        if not _LITTLE_ENDIAN:
            ids.byteswap()
        data = ids.tobytes()
        if len(self._memo) < _MEMO_LIMIT:
            self._memo[piece] = data
        return data

    def decode(self, token_ids: Iterable[int]) -> str:
        return "".join(map(self.id_to_text, token_ids))

    def id_to_text(self, token_id: int) -> str:
        """A pseudo-word for a regular id (with a leading space), '' for the special ids."""
        if token_id < FIRST_REGULAR_ID:
            return ""
        n = token_id - FIRST_REGULAR_ID
        syllables = []
        while True:
            n, r = divmod(n, len(_SYLLABLES))
            syllables.append(_SYLLABLES[r])
            if n == 0:
                break
        word = " " + "".join(syllables)
        if token_id % 13 == 0:
            return word + "."
        if token_id % 7 == 0:
            return word + ","
        return word


def encode(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[int]:
    """One-shot convenience: the ids `BuiltinTokenizer(vocab_size)` gives for `text`.

    Callers that encode many prompts should keep one `BuiltinTokenizer` (its memo makes repeats cheap).
    """
    return BuiltinTokenizer(vocab_size).encode(text)

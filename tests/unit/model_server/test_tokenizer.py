import subprocess
import sys
import zlib

import pytest

from epp_model_server.tokenizer import (
    EOS_ID,
    FIRST_REGULAR_ID,
    BuiltinTokenizer,
    encode,
)


def _sub_id(piece: str, vocab: int = 32000) -> int:
    return FIRST_REGULAR_ID + zlib.crc32(piece.encode("utf-8")) % (vocab - FIRST_REGULAR_ID)


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("hello world", ["hello", "world"]),
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        ("tokenization", ["tokeniza", "tion"]),  # letters run at most 8
        ("12345", ["123", "45"]),  # digits run at most 3
        ("a  b", ["a", " ", "b"]),  # an empty space-separated piece is one space token
        ("x\n\ny", ["x", "\n\n", "y"]),
        ("snake_case", ["snake", "_", "case"]),
        ("", [" "]),
    ],
)
def test_encode_cuts_text_into_documented_sub_pieces(text, pieces):
    assert BuiltinTokenizer().encode(text) == [_sub_id(p) for p in pieces]


def test_same_text_gives_same_ids_in_a_fresh_process():
    text = "The quick brown fox, jumping over 1234 lazy dogs!\nNew line."
    code = (
        "from epp_model_server.tokenizer import encode; "
        f"print(encode({text!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert out.stdout.strip() == str(encode(text))


def test_memoised_and_fresh_encodings_agree():
    tok = BuiltinTokenizer()
    text = "repeat repeat words, words and more words " * 50
    first = tok.encode(text)
    assert tok.encode(text) == first == BuiltinTokenizer().encode(text)


def test_encode_bytes_is_uint32_little_endian_of_encode():
    tok = BuiltinTokenizer()
    text = "bytes layout check 42"
    data = tok.encode_bytes(text)
    assert [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)] == tok.encode(text)


def test_ids_stay_inside_the_regular_range_of_the_vocabulary():
    tok = BuiltinTokenizer(vocab_size=100)
    ids = tok.encode(" ".join(f"w{i} token{i}" for i in range(500)))
    assert min(ids) >= FIRST_REGULAR_ID and max(ids) < 100


def test_token_count_is_realistic_for_english_text():
    text = ("Routing requests to the server that already holds the prompt's prefix in its KV cache "
            "reduces the time to first token considerably. ") * 20
    ids = encode(text)
    chars_per_token = len(text) / len(ids)
    assert 3.5 <= chars_per_token <= 6.5


def test_decode_gives_words_for_regular_ids_and_nothing_for_special_ids():
    tok = BuiltinTokenizer()
    assert tok.decode([0, 1, EOS_ID, 3]) == ""
    text = tok.decode([4, 5, 1000])
    assert text.startswith(" ") and len(text.split()) == 3
    assert tok.decode([1000]) == tok.decode([1000])


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        BuiltinTokenizer(vocab_size=5)

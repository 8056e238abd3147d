"""A small Hugging Face tokenizer trained offline (no downloads), for the precise prefix cache's tests.

`write_tokenizer(directory)` trains a byte-level BPE with the `tokenizers` package on generated text and
writes `tokenizer.json` (with a BOS added to encodings that ask for special tokens, as Llama tokenizers
do) and `tokenizer_config.json` (its chat template and BOS/EOS strings) to `directory`. The model server
runs with `--tokenizer <directory>/tokenizer.json`, so it and the EPP tokenize with the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BOS = "<s>"
EOS = "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A chat template in the style of the models' own (jinja, with the BOS and role tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part cache prefix token block router model server request endpoint pod "
    "system prompt assistant user answer question document summary kubernetes gateway inference"
).split()


def corpus(n_lines: int = 2000, seed: int = 7) -> list[str]:
    """Generated English-like lines with punctuation, digits and newlines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return lines


def write_tokenizer(directory: Path, vocab_size: int = 2000) -> Path:
    """Train and write the tokenizer; returns the path of tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": BOS, "eos_token": EOS}), encoding="utf-8"
    )
    return path


def long_text(n_words: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))

"""A tiny word-level tokenizer with a ChatML template, written to disk and loaded back like a real one."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from posttrain.data import CHATML_TEMPLATE

SPECIAL = ["<|pad|>", "[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant Be brief hi hello friend bye see you What is 2 + 3 ? 5 Answer the question "
         "good bad great film it was a movie four score and seven years ago yes no maybe one two three").split()


def build_tokenizer(path):
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    # Splits on whitespace and punctuation; newlines produce no token, so every token is a word or a marker.
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))

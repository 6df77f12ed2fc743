"""Tiny model folders shared by the models tests (built once per session, no network)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.models.tiny import FALLBACK_CORPUS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The embedded default, built from the fallback texts (ChatML template, eos <|im_end|>, pad <|pad|>)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", size="tiny", vocab_size=300, corpus=FALLBACK_CORPUS)


def byte_bpe(special: list[str], vocab_size: int = 300) -> Tokenizer:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(FALLBACK_CORPUS, trainer=trainer)
    return core


def small_llama(vocab_size: int, *, layers: int = 2, tie: bool = False, seed: int = 0, **kw) -> LlamaForCausalLM:
    """hidden 32, 4 heads of 8, 2 kv heads (k/v width 16), MLP 64."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **kw,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def plain_dir(tmp_path_factory):
    """A GPT-2-like folder: only <|endoftext|> (eos), no pad, no chat template, untied head."""
    out = tmp_path_factory.mktemp("plain") / "plain"
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    small_llama(len(tok)).save_pretrained(out)
    return out


@pytest.fixture
def make_llama():
    """small_llama as a fixture (test modules here are not a package, so they cannot import conftest)."""
    return small_llama


@pytest.fixture
def make_bpe():
    return byte_bpe

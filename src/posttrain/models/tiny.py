"""The embedded default model: a small Llama-style LM and a byte-level BPE tokenizer built locally.

`posttrain tiny-model OUT` writes an ordinary Hugging Face folder (safetensors weights, config,
tokenizer with a ChatML chat template) that `AutoModelForCausalLM` / `AutoTokenizer` load like
any hub model, so the whole pipeline runs with no network. The weights are random: SFT on the
built-in tasks is what teaches it anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.config import ConfigError, TinyModelConfig
from posttrain.models.adapt import save_pretrained_atomic
from posttrain.models.load import CHATML_TEMPLATE, count_parameters

# RoPE positions cost nothing to allow; 2048 lets the benchmark run its 1-2k-token rows
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# hidden, layers, heads, kv heads, intermediate. Parameter counts at vocab 512, tied embeddings:
# tiny = 512*128 + 4 * (2*128*128 + 2*128*64 + 3*128*384 + 2*128) + 128 = 853,376;
# small = 512*512 + 8 * (2*512*512 + 2*512*256 + 3*512*2048 + 2*512) + 512 = 31,731,200;
# base = 512*768 + 14 * (2*768*768 + 2*768*256 + 3*768*3072 + 2*768) + 768 = 121,526,016 (a GPU-sized model).
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12, num_key_value_heads=4, intermediate_size=3072),
}

# Used when the built-in tasks are not importable: enough text for byte-level BPE merges on
# chat-like English and digits; every byte stays encodable through the byte alphabet.
FALLBACK_CORPUS = [
    "What is 12 + 7? The answer is 19.",
    "What is 3 * 4? The answer is 12.",
    "Compute 45 - 18. 45 - 18 = 27.",
    "The movie was wonderful, I loved every minute of it.",
    "The food was cold and the service was terrible.",
    "Classify the sentiment of this review: positive or negative.",
    "Hello! How can I help you today?",
    "Thank you, that was very helpful. Have a nice day.",
    "Please answer the question in one short sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
]


def default_corpus(seed: int = 0) -> list[str]:
    """Texts of every built-in task (posttrain.tasks.corpus) plus the fallback texts."""
    try:
        from posttrain.tasks import corpus
    except ImportError:
        return list(FALLBACK_CORPUS)
    return list(corpus(seed)) + FALLBACK_CORPUS


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with ChatML special tokens and chat template.

    The 256 byte symbols are always in the vocabulary, so any text encodes; the remaining
    `vocab_size - 256 - 4` entries are merges. eos = `<|im_end|>` (the end of an assistant turn,
    what the model must learn to emit), pad = `<|pad|>`, no bos.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (byte alphabet + special tokens), got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=MAX_POSITIONS,  # what the model takes, so long rows draw no "longer than 512" warning
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def make_tiny_model(size: str = "tiny", vocab_size: int = 512, seed: int = 0, corpus: list[str] | None = None):
    """(model, tokenizer): the tokenizer trained on `corpus` and a randomly initialised Llama model."""
    if size not in SIZES:
        raise ConfigError(f"unknown size `{size}`; use one of {', '.join(SIZES)}")
    tok = build_tokenizer(corpus if corpus is not None else default_corpus(seed), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SIZES[size],
    )
    # A private RNG stream: the init is a function of `seed` alone and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    return model, tok


def build_tiny_model(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    vocab_size: int = 512,
    seed: int = 0,
    corpus: list[str] | None = None,
) -> Path:
    """Build the tokenizer and model (`make_tiny_model`) and write them atomically to out_dir."""
    model, tok = make_tiny_model(size, vocab_size, seed, corpus)
    out = Path(out_dir)
    save_pretrained_atomic(model, tok, out)
    return out


def main(cfg: TinyModelConfig) -> Path:
    """`posttrain tiny-model`: write the tiny model folder and print its size."""
    model, tok = make_tiny_model(cfg.size, cfg.vocab_size, cfg.seed)
    out = Path(cfg.output_dir)
    save_pretrained_atomic(model, tok, out)
    _, total = count_parameters(model)
    print(f"wrote {out}: {cfg.size} Llama model, {total:,} parameters, vocab {cfg.vocab_size}")
    return out

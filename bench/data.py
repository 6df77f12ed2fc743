"""Benchmark inputs made locally: a tiny Llama + ChatML tokenizer, and chat rows of mixed length.

Used when ``posttrain tiny-model`` / ``posttrain task`` are not available, and always for the
long-sequence case (rows of ~1-2k tokens, which no built-in task produces). Runs under any
environment that has torch, transformers and tokenizers (the project's and the peers').

    python bench/data.py model OUT [--size tiny|small|long] [--vocab 512] [--seed 0]
    python bench/data.py rows OUT_DIR --n N [--min-words A] [--max-words B] [--seed 0]

``rows`` writes ``sft.jsonl`` (``{"messages": [...]}``), ``prefs.jsonl``
(``{"prompt", "chosen", "rejected"}``, strings) and ``prompts.jsonl`` (``{"prompt"}``): the same
file formats as ``posttrain task`` (docs/internals.md).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# model shapes: tiny ~0.8M params, small ~28M params, long = tiny with room for 2k-token rows
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048),
}

WORDS = (
    "the a one two three four five six seven eight nine ten plus minus times equals answer question "
    "model learns data row token batch step loss reward policy value critic prompt response chosen "
    "rejected short long story river mountain city garden window music paper light water stone green "
    "blue red quiet quick slow bright dark happy calm because therefore however while after before "
    "compute add subtract number result sum product total first second third last next please explain"
).split()


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Texts for training the BPE tokenizer: every word of WORDS in running text, plus ChatML lines."""
    rng = random.Random(seed)
    texts = [_sentence(rng, rng.randint(5, 40)) for _ in range(n)]
    texts += [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n{t}<|im_end|>" for t in texts[:50]]
    return texts


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Byte-level BPE with ChatML specials; eos = <|im_end|>, pad = <|pad|> (pad != eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(out_dir: str | Path, size: str = "tiny", vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a LlamaForCausalLM (float32) and its tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, seed)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, **SIZES[size])
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_rows(n: int, seed: int = 0, min_words: int = 4, max_words: int = 120) -> dict[str, list[dict]]:
    """``n`` rows of each kind; lengths uniform in [min_words, max_words] per turn (mixed-length data)."""
    rng = random.Random(seed)
    sft, prefs, prompts = [], [], []
    for _ in range(n):
        q = _sentence(rng, rng.randint(min_words, max(min_words, max_words // 4)))
        a = _sentence(rng, rng.randint(min_words, max_words))
        b = _sentence(rng, rng.randint(min_words, max_words))
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        prefs.append({"prompt": q, "chosen": a, "rejected": b})
        prompts.append({"prompt": q})
    return {"sft": sft, "prefs": prefs, "prompts": prompts}


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    m = sp.add_parser("model")
    m.add_argument("out")
    m.add_argument("--size", default="tiny", choices=sorted(SIZES))
    m.add_argument("--vocab", type=int, default=512)
    m.add_argument("--seed", type=int, default=0)
    r = sp.add_parser("rows")
    r.add_argument("out")
    r.add_argument("--n", type=int, default=256)
    r.add_argument("--min-words", type=int, default=4)
    r.add_argument("--max-words", type=int, default=120)
    r.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "model":
        print(build_model(a.out, a.size, a.vocab, a.seed))
    else:
        for kind, rows in make_rows(a.n, a.seed, a.min_words, a.max_words).items():
            print(write_jsonl(Path(a.out) / f"{kind}.jsonl", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

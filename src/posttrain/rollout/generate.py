"""``posttrain generate``: sample from a model for given prompts, or chat with it in the terminal.

Prompts come from ``prompt`` (texts on the command line, one user turn each) or ``prompts``
(a file: json / jsonl / csv / parquet rows with ``prompt`` or ``messages``, else one prompt per
line). Each is rendered with the model's chat template and the generation prompt, then
sampled with the rollout engine (``rollout.temperature: 0`` = greedy).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import torch

from posttrain.config import ConfigError, GenerateConfig
from posttrain.data import load_examples, tokenize_prompt
from posttrain.errors import DataError
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.rollout.backends import build_backend
from posttrain.rollout.sampler import Sampler

TABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def read_prompts(cfg: GenerateConfig) -> list[list[dict]]:
    """The conversations to answer, each a list of messages ending before the assistant turn."""
    convs = [[{"role": "user", "content": text}] for text in cfg.prompt]
    if cfg.prompts:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise DataError("prompt file not found", source=str(path))
        if path.suffix.lower() in TABLE_SUFFIXES:
            examples, _ = load_examples([str(path)], "prompt")
            convs += [ex.prompt for ex in examples]
        else:
            lines = [line.strip() for line in path.read_text().splitlines()]
            convs += [[{"role": "user", "content": line}] for line in lines if line]
    if not convs and not cfg.chat:
        raise ConfigError("posttrain generate needs `prompt` (text) or `prompts` (a file), or --chat")
    return convs


def answer(sampler: Sampler, tokenizer, conversations: list[list[dict]], *, num_samples: int = 1,
           generator: torch.Generator | None = None) -> list[list[str]]:
    """Sampled replies: one list of ``num_samples`` strings per conversation."""
    ids = [tokenize_prompt(tokenizer, conv) for conv in conversations]
    batch = sampler.generate(ids, num_samples=num_samples, generator=generator)
    texts = batch.texts(tokenizer)
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(conversations))]


def chat(sampler: Sampler, tokenizer, lines: Iterable[str], out: TextIO, *, generator: torch.Generator | None = None) -> list[dict]:
    """Terminal chat: each input line is a user turn answered with the whole history as context.

    ``/reset`` clears the history, ``/exit`` (or end of input) quits. Returns the final history.
    """
    history: list[dict] = []
    out.write("chat: /reset clears the history, /exit quits\n")
    for raw in lines:
        line = raw.strip()
        if line == "/exit":
            break
        if line == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = answer(sampler, tokenizer, [history], generator=generator)[0][0]
        history.append({"role": "assistant", "content": reply})
        out.write(f"assistant> {reply}\n")
        out.flush()
    return history


def _stdin_lines() -> Iterable[str]:
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def main(cfg: GenerateConfig) -> list[list[str]]:
    conversations = read_prompts(cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, tokenizer=tokenizer, attn_implementation=cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code)
    sampler = build_backend(model, tokenizer, cfg.rollout, model_path=cfg.model)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    if cfg.chat:
        chat(sampler, tokenizer, _stdin_lines(), sys.stdout, generator=generator)
        return []
    replies = []
    n = max(1, cfg.rollout.samples_per_prompt)
    for start in range(0, len(conversations), 64):
        replies += answer(sampler, tokenizer, conversations[start:start + 64], num_samples=n, generator=generator)
    for conv, samples in zip(conversations, replies):
        print(f"### prompt\n{conv[-1]['content']}")
        for j, text in enumerate(samples):
            print(f"### response{f' {j + 1}' if n > 1 else ''}\n{text}")
        print()
    return replies

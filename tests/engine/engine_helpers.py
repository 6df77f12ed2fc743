"""Shared by the engine tests and the torchrun worker: a tiny real Llama, a tiny pure-torch causal LM
(for the worker processes, which then skip importing transformers), variable-length data and a
token-summed causal-LM loss."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 48


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)


class TinyCausalLM(nn.Module):
    """Embedding, one pre-norm causal transformer block, linear head; forward returns ``.logits``."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        t = input_ids.size(1)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # (T, T) True = blocked
        h = self.block(self.embed(input_ids), src_mask=causal, src_key_padding_mask=attention_mask == 0)  # (B, T, W)
        return SimpleNamespace(logits=self.head(self.norm(h)))  # (B, T, V)


def tiny_causal_lm(seed: int = 0, dtype: torch.dtype = torch.float64) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM().to(dtype)


# (length, loss tokens) per sequence: very different token counts, so a mean of per-micro-batch
# means weights sequences differently from the token mean over the step.
SHAPES = [(6, 2), (12, 10), (9, 4), (4, 3)]


def sequences(step: int) -> list[dict[str, torch.Tensor]]:
    """Four sequences for optimizer step ``step``; a private generator, independent of global RNG."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for length, n_loss in SHAPES:
        ids = torch.randint(1, VOCAB, (length,), generator=g)  # (T,)
        labels = ids.clone()
        labels[: length - n_loss] = -100  # the last n_loss tokens are targets
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 on pads."""
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = x["input_ids"], 1, x["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_tokens(mb: dict[str, torch.Tensor]) -> int:
    """Loss tokens: shifted targets that are not -100."""
    return int((mb["labels"][:, 1:] != -100).sum())


def lm_loss_sum(model, mb: dict[str, torch.Tensor]):
    """SUM over loss tokens of -log p(token t+1 | <= t), plus token accuracy as (sum, count)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits  # (B, T, V)
    logits, targets = logits[:, :-1], mb["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    valid = targets != -100
    correct = ((logits.argmax(-1) == targets) & valid).sum()
    return loss_sum, {"token_accuracy": (correct, valid.sum())}

"""Supervised fine-tuning loss: negative log-likelihood of the target tokens."""

from __future__ import annotations

import torch


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, zero where `mask` is false.

    logprobs: (B, T) log p(token t+1 | tokens <= t); mask: (B, T) bool or 0/1, true where the
    token is in the loss (assistant turns, including the end-of-turn EOS). Returns (B, T).

    Normalisation is the caller's: `engine.train_step` sums these per-token losses over every
    micro-batch and rank of one optimizer step and divides by the global count of masked-in
    tokens, so gradient accumulation and the rank split never change the loss. `torch.where`
    (not a product) keeps a -inf log-prob on a padding position from turning into NaN.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return torch.where(mask.bool(), -logprobs, torch.zeros_like(logprobs))  # (B, T)


__all__ = ["sft_loss"]

"""Token log-probabilities and entropies without materialising full float32 logits.

A (B, T, V) float32 logit tensor is the largest object in LM post-training (B=8, T=2048,
V=152k is 10 GB), and `log_softmax` would make a second one. The functions here work row
chunk by row chunk: `selective_log_softmax` keeps only a logsumexp per row, and
`logprobs_from_hidden` never builds more than one chunk of logits, also in the backward pass
(each chunk is recomputed under `torch.utils.checkpoint`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

_EXACT = (torch.float32, torch.float64)
# Below this many bytes of float32 logits (N x V x 4) the projection runs in one piece with autograd keeping
# the logits: recomputing them chunk by chunk in the backward pass costs more than the memory it saves.
UNCHUNKED_LOGIT_BYTES = 64 * 2**20


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, *, chunk_rows: int = 512) -> torch.Tensor:
    """log softmax(logits)[index] for every row, without a full log_softmax tensor.

    logits: (..., V); index: (...) int64 with the same leading shape. Returns (...).
    float32/float64 logits keep their dtype: log p = logit[index] - logsumexp(row), computed
    `chunk_rows` rows at a time so the temporary exp() is one chunk wide. bf16/fp16 logits are
    upcast to float32 one chunk at a time (their logsumexp in half precision loses ~3 digits),
    and the result is float32.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index shape {tuple(index.shape)} must equal logits shape without the vocab dim {tuple(logits.shape[:-1])}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # (N, V)
    flat_index = index.reshape(-1, 1)  # (N, 1)
    out_dtype = logits.dtype if logits.dtype in _EXACT else torch.float32
    pieces = []
    for start in range(0, flat.shape[0], chunk_rows):
        rows = flat[start : start + chunk_rows]  # (n, V)
        if rows.dtype not in _EXACT:
            rows = rows.float()
        chosen = rows.gather(-1, flat_index[start : start + chunk_rows]).squeeze(-1)  # (n,)
        pieces.append(chosen - torch.logsumexp(rows, dim=-1))
    if not pieces:
        return torch.zeros(index.shape, dtype=out_dtype, device=logits.device)
    return torch.cat(pieces).reshape(index.shape)


def entropy_from_logits(logits: torch.Tensor, *, chunk_rows: int = 512) -> torch.Tensor:
    """Entropy of softmax(logits) per row: H = logsumexp(z) - sum_v p_v z_v.

    logits: (..., V) -> (...). Computed in float32 (float64 kept) a chunk of rows at a time.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # (N, V)
    out_dtype = logits.dtype if logits.dtype in _EXACT else torch.float32
    pieces = []
    for start in range(0, flat.shape[0], chunk_rows):
        rows = flat[start : start + chunk_rows]
        if rows.dtype not in _EXACT:
            rows = rows.float()
        probs = torch.softmax(rows, dim=-1)  # (n, V)
        pieces.append(torch.logsumexp(rows, dim=-1) - (probs * rows).sum(-1))
    if not pieces:
        return torch.zeros(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    return torch.cat(pieces).reshape(logits.shape[:-1])


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                    scale: float = 1.0, softcap: float | None = None):
    """Log-probs (and entropy) of one chunk of tokens. hidden (n, D), weight (V, D), targets (n,)."""
    logits = hidden @ weight.T  # (n, V), in the model's dtype
    if logits.dtype not in _EXACT:
        logits = logits.float()
    # The family's post-head transform (models.head.LogitHead): what the model's own forward returns.
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    # Sampling used softmax(logits / T); the policy-gradient ratio needs the same distribution.
    logits = logits / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp  # (n,)
    if not with_entropy:
        return logp, None
    probs = torch.softmax(logits, dim=-1)
    entropy = logsumexp - (probs * logits).sum(-1)  # (n,)
    return logp, entropy


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    unchunked_bytes: int = UNCHUNKED_LOGIT_BYTES,
    scale: float = 1.0,
    softcap: float | None = None,
):
    """Per-token log p(target) under softmax(z / temperature), z = softcap(scale * hidden @ weight.T), chunked over tokens.

    hidden: (N, D) or (B, T, D) final hidden states; weight: (V, D) the LM head (no bias);
    targets: (N,) or (B, T) token ids, all valid (callers mask ignored positions afterwards).
    Returns log-probs shaped like `targets` (float32, or float64 for float64 inputs), and the
    entropy of each token's distribution too when `return_entropy` is set. `scale` and `softcap`
    (tanh(z / softcap) * softcap) are a model family's post-head transform, applied before the temperature.

    At most `chunk_size` rows of logits exist at once. When autograd records, each chunk runs
    under non-reentrant `torch.utils.checkpoint`, so the backward pass recomputes a chunk's
    logits instead of keeping all N x V of them; the gradient is that of the unchunked formula.
    When all N x V float32 logits fit in `unchunked_bytes` (64 MB by default) they are one chunk, kept for
    the backward pass instead of recomputed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden shape without D {tuple(hidden.shape[:-1])}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    flat_targets = targets.reshape(-1)  # (N,)
    checkpointed = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if flat_hidden.shape[0] * weight.shape[0] * 4 <= unchunked_bytes:
        chunk_size, checkpointed = max(flat_hidden.shape[0], 1), False  # one piece; autograd keeps its logits
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        h = flat_hidden[start : start + chunk_size]
        t = flat_targets[start : start + chunk_size]
        if checkpointed:
            logp, entropy = checkpoint(_chunk_logprobs, h, weight, t, temperature, return_entropy, scale, softcap,
                                       use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(h, weight, t, temperature, return_entropy, scale, softcap)
        logps.append(logp)
        entropies.append(entropy)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if not logps:
        empty = torch.zeros(targets.shape, dtype=out_dtype, device=hidden.device)
        return (empty, empty.clone()) if return_entropy else empty
    logp = torch.cat(logps).reshape(targets.shape)
    if not return_entropy:
        return logp
    return logp, torch.cat(entropies).reshape(targets.shape)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets] for already computed logits (..., V) -> (...)."""
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, targets)


__all__ = ["selective_log_softmax", "entropy_from_logits", "logprobs_from_hidden", "logprobs_from_logits"]

"""Forward passes the losses need: per-token log-probs, per-token values, per-sequence scores.

Each runs the model's own top-level forward (so DDP and peft wrappers see the call and LoRA is
active) and takes the final, normed hidden states from it; the vocabulary projection is then done
in chunks by `logprobs_from_hidden`, so a full (B, T, V) float32 logit tensor never exists.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.losses.logprobs import logprobs_from_hidden


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens, so a left-padded row matches its unpadded self.

    attention_mask: (B, T) with 1 = token, 0 = pad. Pads get position 0 (they are masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / peft wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel
            model = model.module
        else:
            return model


def _final_hidden(model: nn.Module, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
    """Final hidden states (B, T, D) after the last norm, from one call of the model's forward."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
        **kwargs,
    )
    # transformers ties hidden_states[-1] to last_hidden_state (after the final norm).
    return out.hidden_states[-1]  # (B, T, D)


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The (V, D) output projection; with tied embeddings this is the input embedding matrix."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer"):
        raise ValueError("LoRA on lm_head is not supported by token_logprobs; leave lm_head out of lora.target_modules")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(unwrap(model)).__name__}: an lm_head with a bias is not supported")
    return head.weight


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 1024,
):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) at position t, shape (B, T-1), float32.

    Values at pad positions are whatever the model computes there; callers mask them.
    `temperature` divides the logits (the sampler's distribution). With `return_entropy`,
    also returns the entropy of each position's next-token distribution, (B, T-1).
    position_ids default to the attention-mask cumsum (left padding); pass them for packing.
    """
    # logits_to_keep=1: the model's own lm_head runs on one position only; we project the rest.
    hidden = _final_hidden(model, input_ids, attention_mask, position_ids, logits_to_keep=1)  # (B, T, D)
    weight = lm_head_weight(model)  # (V, D)
    targets = input_ids[:, 1:]  # (B, T-1)
    return logprobs_from_hidden(
        hidden[:, :-1], weight, targets, temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy
    )


def _score_head(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(inner).__name__} has no `score` head; load it with load_sequence_classifier")


def token_values(
    critic: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The classifier head applied at every position: (B, T) for one label, (B, T, C) for C labels.

    The PPO critic's V(s_t) for the prefix ending at token t.
    """
    hidden = _final_hidden(critic, input_ids, attention_mask, position_ids)  # (B, T, D)
    values = _score_head(critic)(hidden)  # (B, T, C); a peft ModulesToSaveWrapper routes to the trained copy
    values = values.float()
    return values.squeeze(-1) if values.shape[-1] == 1 else values


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


def sequence_scores(rm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score read at the last non-pad token: (B,) for one label, (B, C) for C.

    Found from the attention mask, so left and right padding give the same score.
    """
    values = token_values(rm, input_ids, attention_mask)  # (B, T) or (B, T, C)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (B,)
    return values[rows, last_token_index(attention_mask)]
